"""Sparse export formats: masked HF weights, compressed-tensors sparse-24-bitmask, mask files."""
import json
import os
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from maskllm_megatron.export.formats import (
    FormatError, apply_mask_file, apply_mask_hf, chunk_layout, compress_24_bitmask, decompress_24_bitmask,
    load_masks, nm_floor_bits, pack_pattern_indices, save_compressed_tensors, save_masks, unpack_pattern_indices)
from maskllm_megatron.masks.patterns import NMSpec, patterns_to_mask


def random_mask(shape, spec, seed=0, dtype=torch.bool):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, spec.num_patterns, (*shape[:-1], shape[-1] // spec.m), generator=g)
    return patterns_to_mask(index, spec, dtype=dtype)


def bits(t):
    """Bit pattern of a float tensor, so that -0.0 != +0.0 in comparisons."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def test_apply_mask_hf_selects_and_never_writes_negative_zero():
    w = -torch.rand(4, 8) - 0.5  # all negative: a multiply by 0 would give -0.0
    w[0, 0] = -0.0  # a kept -0.0 becomes +0.0
    mask = random_mask((4, 8), NMSpec(2, 4))
    mask[0, :4] = torch.tensor([True, True, False, False])
    out = apply_mask_hf(w, mask)
    assert torch.equal(bits(out[mask][1:]), bits(w[mask][1:]))
    assert not torch.signbit(out[out == 0]).any()
    assert out[0, 0] == 0 and not torch.signbit(out[0, 0])
    with pytest.raises(FormatError, match="transpose the mask"):
        apply_mask_hf(w, mask.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [16, 12])  # 12: the bitmask's last byte is padded
def test_24_bitmask_round_trip_exact(dtype, cols):
    w = torch.randn(6, cols).to(dtype)
    w[2, 4] = 0.0  # a kept weight that is exactly zero: its group has one non-zero
    masked = apply_mask_hf(w, random_mask((6, cols), NMSpec(2, 4), seed=1))
    data = compress_24_bitmask(masked)
    assert data["compressed"].shape == (6, cols // 2) and data["compressed"].dtype == dtype
    assert data["bitmask"].shape == (6, (cols + 7) // 8) and data["bitmask"].dtype == torch.uint8
    assert data["shape"].reshape(-1).tolist() == [6, cols]
    assert torch.equal(bits(decompress_24_bitmask(data)), bits(masked))
    assert torch.equal(bits(decompress_24_bitmask(compress_24_bitmask(w, random_mask((6, cols), NMSpec(2, 4), 1)))),
                       bits(masked))


def test_24_bitmask_layout_is_row_major_values_and_little_endian_bits():
    w = torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0, 3.0, 0.0, 4.0]])
    data = compress_24_bitmask(w)
    assert data["compressed"].tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert data["bitmask"].tolist() == [[0b10100011]]  # bits 0, 1, 5, 7 set (little-endian)
    assert data["shape"].tolist() == [[1], [8]]


def test_24_bitmask_rejects_three_nonzeros():
    w = apply_mask_hf(torch.randn(4, 8), random_mask((4, 8), NMSpec(2, 4)))
    w[3, 4:7] = 1.0
    with pytest.raises(FormatError, match=r"row 3, group 1\): 3 non-zeros"):
        compress_24_bitmask(w)


def test_24_bitmask_matches_the_compressed_tensors_library():
    lib = pytest.importorskip("compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask")
    masked = apply_mask_hf(torch.randn(8, 32), random_mask((8, 32), NMSpec(2, 4), seed=2))
    ours = compress_24_bitmask(masked)
    theirs = lib.Sparse24BitMaskTensor.from_dense(masked).dict("x.weight")
    for key in ("compressed", "bitmask", "shape"):
        assert torch.equal(ours[key], theirs[f"x.{key}"]), key
    assert torch.equal(lib.Sparse24BitMaskTensor.from_compressed_data(**ours).decompress(), masked)


def tiny_llama_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(32, 16, generator=g),
          "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
          "model.layers.0.mlp.down_proj.weight": torch.randn(16, 24, generator=g),
          "model.layers.0.mlp.down_proj.bias": torch.randn(16, generator=g),
          "model.norm.weight": torch.ones(16),
          "lm_head.weight": torch.randn(32, 16, generator=g)}
    targets = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    for i, name in enumerate(targets):
        sd[name] = apply_mask_hf(sd[name], random_mask(tuple(sd[name].shape), NMSpec(2, 4), seed=i))
    return sd, targets


def test_save_compressed_tensors_folder(tmp_path):
    sd, targets = tiny_llama_state()
    umask = os.umask(0o022)  # what a shared cluster account typically has
    try:
        out = save_compressed_tensors(tmp_path / "ct", sd, {"model_type": "llama"}, targets, max_shard_bytes=1500)
        save_masks(tmp_path / "m.safetensors", {n: sd[n] != 0 for n in targets}, NMSpec(2, 4))
    finally:
        os.umask(umask)
    # readable by everyone, as any file written with this umask (safetensors alone would give 0600)
    for f in [*out.glob("*.safetensors"), tmp_path / "m.safetensors"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    sc = q["sparsity_config"]
    assert (sc["format"], sc["sparsity_structure"]) == ("sparse-24-bitmask", "2:4")
    assert sc["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    assert sc["ignore"] == ["lm_head", "model.embed_tokens"]
    zeros = sum(int((t == 0).sum()) for t in sd.values())
    assert sc["global_sparsity"] == pytest.approx(zeros / sum(t.numel() for t in sd.values()))
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    stored = {}
    for fname in set(index.values()):
        stored.update(load_file(out / fname))
    assert set(stored) == set(index)
    for name in targets:
        mod = name[: -len(".weight")]
        assert name not in stored
        assert torch.equal(decompress_24_bitmask({k: stored[f"{mod}.{k}"] for k in ("compressed", "bitmask", "shape")}),
                           sd[name])
    assert torch.equal(stored["lm_head.weight"], sd["lm_head.weight"])
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(FormatError, match="already exists"):
        save_compressed_tensors(out, sd, {"model_type": "llama"}, targets)
    with pytest.raises(FormatError, match="Conv1D"):
        save_compressed_tensors(tmp_path / "g", sd, {"model_type": "gpt2"}, targets)


def test_compressed_tensors_library_reads_our_folder(tmp_path):
    lib = pytest.importorskip("compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask")
    from compressed_tensors.config import SparsityCompressionConfig
    sd, targets = tiny_llama_state()
    out = save_compressed_tensors(tmp_path / "ct", sd, {"model_type": "llama"}, targets)
    sc = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    config = SparsityCompressionConfig.load_from_registry(sc["format"], **sc)
    dense = dict(lib.Sparse24BitMaskCompressor(config=config).decompress(str(out)))
    for name in targets:
        assert torch.equal(dense[name], sd[name])


@pytest.mark.parametrize("spec", [NMSpec(2, 4), NMSpec(1, 4), NMSpec(4, 8), NMSpec(4, 4)])
def test_mask_file_round_trip(tmp_path, spec):
    masks = {"a.weight": random_mask((5, 8 * spec.m), spec, seed=3),
             "b.weight": random_mask((3, 2, 2 * spec.m), spec, seed=4),  # leading dims (e.g. experts)
             "c.weight": random_mask((0, spec.m), spec)}
    stats = save_masks(tmp_path / "m.safetensors", masks, spec)
    loaded, got_spec = load_masks(tmp_path / "m.safetensors")
    assert got_spec == spec and set(loaded) == set(masks)
    for name, mask in masks.items():
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], mask), name
    assert stats["floor_bits_per_weight"] == pytest.approx(nm_floor_bits(spec))


def test_mask_file_rejects_invalid_mask_and_keeps_the_old_file(tmp_path):
    spec = NMSpec(2, 4)
    path = tmp_path / "m.safetensors"
    good = {"a.weight": random_mask((4, 8), spec)}
    save_masks(path, good, spec)
    bad = good["a.weight"].clone()
    bad[1, 4:8] = torch.tensor([True, True, True, False])
    with pytest.raises(FormatError, match=r"'a.weight'.*\[1, 1\]"):
        save_masks(path, {"a.weight": bad}, spec)
    assert torch.equal(load_masks(path)[0]["a.weight"], good["a.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_mask_file_size_near_the_floor(tmp_path):
    spec = NMSpec(2, 4)
    masks = {f"layers.{i}.weight": random_mask((512, 1024), spec, seed=i) for i in range(4)}  # 2.1M weights
    stats = save_masks(tmp_path / "m.safetensors", masks, spec)
    size = (tmp_path / "m.safetensors").stat().st_size
    bpw = 8 * size / (4 * 512 * 1024)
    assert stats["bits_per_weight"] == pytest.approx(bpw)
    assert nm_floor_bits(spec) == pytest.approx(0.6462, abs=1e-4)
    assert bpw <= 1.10 * nm_floor_bits(spec), bpw
    assert bpw < 0.66  # 17 base-6 digits per 44 bits: 0.647 bits/weight


def test_pattern_packing_detects_corruption():
    k, b = chunk_layout(6)
    assert (k, b) == (17, 44)
    index = np.random.default_rng(0).integers(0, 6, size=100)
    data = pack_pattern_indices(index, 6)
    assert np.array_equal(unpack_pattern_indices(data, 100, 6), index)
    with pytest.raises(FormatError, match="truncated"):
        unpack_pattern_indices(data[:-1], 100, 6)
    with pytest.raises(FormatError, match="corrupt"):
        unpack_pattern_indices(np.full_like(data, 0xFF), 100, 6)


def test_apply_published_npz_and_our_mask_file(tmp_path):
    spec = NMSpec(2, 4)
    sd = {"model.layers.0.mlp.up_proj.weight": torch.randn(6, 12), "model.norm.weight": torch.randn(12)}
    mask = random_mask((6, 12), spec, seed=5)
    # The layout of MaskLLM's tool_compress_mask.py: packbits of the flattened mask, key "<param>.mask".
    np.savez_compressed(tmp_path / "mask_compressed.npz",
                        **{"model.layers.0.mlp.up_proj.weight.mask": np.packbits(mask.numpy())})
    out = apply_mask_file(sd, tmp_path / "mask_compressed.npz")
    assert torch.equal(bits(out["model.layers.0.mlp.up_proj.weight"]),
                       bits(apply_mask_hf(sd["model.layers.0.mlp.up_proj.weight"], mask)))
    assert out["model.norm.weight"] is sd["model.norm.weight"]
    save_masks(tmp_path / "m.safetensors", {"model.layers.0.mlp.up_proj.weight": mask}, spec)
    assert torch.equal(apply_mask_file(sd, tmp_path / "m.safetensors")["model.layers.0.mlp.up_proj.weight"],
                       out["model.layers.0.mlp.up_proj.weight"])
    # GPT-2 Conv1D weights are [in, out]: our [out, in] masks are transposed onto them.
    conv = {"h.0.mlp.c_fc.weight": torch.randn(12, 6)}
    save_masks(tmp_path / "g.safetensors", {"h.0.mlp.c_fc.weight": mask}, spec)
    got = apply_mask_file(conv, tmp_path / "g.safetensors", config={"model_type": "gpt2"})
    assert torch.equal(got["h.0.mlp.c_fc.weight"], apply_mask_hf(conv["h.0.mlp.c_fc.weight"], mask.t()))
    with pytest.raises(FormatError, match="not in the state dict"):
        apply_mask_file({}, tmp_path / "m.safetensors")


def test_apply_masks_takes_only_an_exact_mask_of_this_model(tmp_path, capsys):
    """A published .npz mask of another size, or one that keeps fewer than 2 of 4, is refused before
    any weight is written; an exact one is applied and recorded as 2:4."""
    from safetensors.torch import save_file

    from maskllm_megatron.export.cli import main

    spec = NMSpec(2, 4)
    name = "model.layers.0.mlp.up_proj.weight"
    hf = tmp_path / "hf"
    hf.mkdir()
    w = torch.randn(6, 12)
    save_file({name: w, "model.norm.weight": torch.randn(12)}, hf / "model.safetensors")
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))

    def npz(file, mask):
        np.savez_compressed(tmp_path / file, **{f"{name}.mask": np.packbits(mask.numpy().astype(np.uint8))})
        return str(tmp_path / file)

    mask = random_mask((6, 12), spec, seed=2)
    sparse_one = mask.clone()
    sparse_one[3, 4:8] = torch.tensor([True, False, False, False])  # one group keeps 1 of 4
    with pytest.raises(FormatError, match="holds 80 bits, not the 72 of its weight"):
        apply_mask_file({name: w}, npz("big.npz", torch.ones(6, 13, dtype=torch.bool)))
    assert main(["apply-masks", "--hf", str(hf), "--masks", npz("one.npz", sparse_one), "--out",
                 str(tmp_path / "one")]) == 2
    assert "one.npz is not an exact 2:4 mask file" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()
    assert main(["apply-masks", "--hf", str(hf), "--masks", npz("ok.npz", mask), "--out", str(tmp_path / "ok")]) == 0
    got = load_file(tmp_path / "ok" / "model.safetensors")
    assert torch.equal(bits(got[name]), bits(apply_mask_hf(w, mask)))
    record = json.loads((tmp_path / "ok" / "config.json").read_text())["sparsity"]
    assert record["structure"] == "2:4" and record["targets"] == [name]
