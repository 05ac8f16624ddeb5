"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

megatron-core's local ``DotProductAttention`` materialises the [b, heads, s, s] scores with
``baddbmm``, repeats the KV heads for grouped-query attention, and runs softmax, masking and the
backward as separate full-size kernels. Without Transformer Engine (every CPU run) that is about a
third of a SmolLM2 training step. ``SDPAttention`` keeps the parent's constructor, parameters and
checkpoint layout and only replaces the arithmetic with PyTorch's fused SDPA (flash-attention
kernel on CPU, flash/memory-efficient kernels on GPU), GQA included. A causal sliding window
(megatron's ``window_size`` = (left, 0), Mistral) becomes a boolean mask, or the causal kernel when
the sequence fits in the window. Features SDPA cannot express here (attention dropout under
megatron's RNG tracker, other windows, softmax offsets, packed sequences) fall back to the parent's
forward, so results never silently change.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` computed by fused scaled-dot-product attention (same inputs/outputs)."""

    def _needs_parent(self, attention_bias, packed_seq_params) -> bool:
        dropout = self.attention_dropout.p if self.training else 0.0
        return (dropout > 0 or attention_bias is not None or packed_seq_params is not None
                or self.softmax_offset is not None or self._window() not in (None, "causal"))

    def _window(self):
        """None (no window), "causal" (a causal window (left, 0): handled here), or the window itself."""
        window = self.scale_mask_softmax.window_size
        if window is None:
            return None
        return "causal" if window[1] == 0 and window[0] >= 0 else window

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [sq, b, np, hn], key/value [sk, b, ng, hn], attention_mask [b, 1, sq, sk] bool with
        True = masked out (megatron's convention) or None for causal; returns [sq, b, np * hn]."""
        if self._needs_parent(attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        scale = self.softmax_scale
        if self.config.apply_query_key_layer_scaling:  # the parent divides by the layer number, then
            scale = scale * self.layer_number  # its softmax multiplies it back: the net scale is unchanged
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        sq, sk = q.shape[2], k.shape[2]
        left = self.scale_mask_softmax.window_size[0] if self._window() == "causal" else None
        if left is not None and sk - 1 <= left:
            left = None  # the whole sequence fits in the window
        keep = None if attention_mask is None else ~attention_mask
        if left is not None:
            qi = torch.arange(sk - sq, sk, device=q.device).unsqueeze(1)  # query positions (end-aligned)
            ki = torch.arange(sk, device=q.device).unsqueeze(0)
            window = (ki <= qi) & (ki >= qi - left)
            keep = window if keep is None else keep & window
        causal = keep is None
        in_dtype = q.dtype
        if self.config.attention_softmax_in_fp32 and in_dtype != torch.float32 and q.device.type == "cpu":
            q, k, v = q.float(), k.float(), v.float()  # CPU half kernels are slow and less accurate
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal, scale=scale,
                                                 enable_gqa=k.size(1) != q.size(1))
        # [b, np, sq, hn] -> [sq, b, np * hn]
        context = context.to(in_dtype).permute(2, 0, 1, 3).contiguous()
        return context.view(context.size(0), context.size(1), self.hidden_size_per_partition)
