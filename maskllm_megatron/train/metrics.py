"""What people watch during mask learning: mask statistics per layer type, and the loggers
(console, a JSONL file the plot tool reads, TensorBoard, Weights & Biases)."""
from __future__ import annotations

import json
import os
import re
import resource
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from ..masks.sampling import mix_patterns


def layer_type(layer_id: str) -> str:
    return layer_id.rsplit(".", 1)[-1]


class MaskWatcher:
    """How settled the masks are, per layer type, summed over TP ranks: the mean max probability of the
    pattern distribution ``softmax(logits * scale / tau)`` (its noise-free expectation, so the figure is
    cheap and does not jitter with the Gumbel draw), the flip rate of the argmax patterns (share of
    groups whose pattern changed since the previous call), and the regulariser's ``sum((W * mask)^2)``
    at that expected soft mask."""

    def __init__(self, layers):
        self.layers = list(layers)
        self.previous = {}

    @torch.no_grad()
    def collect(self, step) -> dict[str, float]:
        sums = defaultdict(lambda: torch.zeros(4, dtype=torch.float64))  # maxprob, flips, groups, reg
        for layer in self.layers:
            logits = layer.mask_logits.detach()
            # softmax by hand: ATen's softmax over a last dimension of 6 is several times slower
            z = logits.float() * (step.scale / step.temperature)
            e = torch.exp(z - z.amax(-1, keepdim=True))
            total = e.sum(-1, keepdim=True)
            probs = e / total
            soft = mix_patterns(probs, layer.nm).view_as(layer.weight)
            pattern = logits.argmax(-1).to(torch.uint8)
            prev = self.previous.get(layer.mask_layer_id)
            flips = float((pattern != prev).sum()) if prev is not None else 0.0
            self.previous[layer.mask_layer_id] = pattern
            s = sums[layer_type(layer.mask_layer_id)]
            s += torch.tensor([float(total.reciprocal().sum()), flips, float(pattern.numel()),
                               float(((layer.weight.float() * soft) ** 2).sum())], dtype=torch.float64)
        keys = sorted(sums)
        stacked = torch.stack([sums[k] for k in keys]) if keys else torch.zeros(0, 4, dtype=torch.float64)
        if torch.distributed.is_initialized() and keys:
            from megatron.core import parallel_state

            from ..megatron.parallel import collective_device

            stacked = stacked.to(collective_device())
            torch.distributed.all_reduce(stacked, group=parallel_state.get_model_parallel_group())
            stacked = stacked.cpu()
        out = {}
        total = torch.zeros(4, dtype=torch.float64)
        for k, row in zip(keys, stacked):
            out[f"mask/max_prob/{k}"] = float(row[0] / row[2])
            out[f"mask/flip_rate/{k}"] = float(row[1] / row[2])
            total += row
        if keys:
            out["mask/max_prob"] = float(total[0] / total[2])
            out["mask/flip_rate"] = float(total[1] / total[2])
            out["regularizer"] = float(total[3])
        return out


class StepThroughput:
    """Tokens per second of the training steps since the last report. Only the time inside ``step()``
    counts: evaluation, checkpoint saving and logging between steps do not, as megatron's interval timer
    pauses around them (otherwise the interval after an evaluation reports a lower speed)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.seconds = 0.0

    @contextmanager
    def step(self):
        start = self.clock()
        try:
            yield
        finally:
            self.seconds += self.clock() - start

    def report(self, tokens: int) -> float:
        """``tokens`` (processed since the last report) per second of step time; starts a new interval."""
        rate = tokens / max(self.seconds, 1e-9)
        self.seconds = 0.0
        return rate


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated, or without CUDA the process's peak resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return host_peak_rss_bytes()


def _proc_status_bytes(field: str) -> Optional[int]:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def host_rss_bytes() -> int:
    """The process's resident set size now (Linux ``VmRSS``)."""
    rss = _proc_status_bytes("VmRSS")
    return rss if rss is not None else host_peak_rss_bytes()


def host_peak_rss_bytes() -> int:
    """The process's peak resident set size: Linux's ``VmHWM``, the high-water mark of this process's
    own memory. Not ``ru_maxrss``: a child started by ``subprocess`` inherits in it the parent's RSS at
    the fork, so a child of a large process reads the parent's size as its own peak."""
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_host_peak_rss() -> bool:
    """Reset the peak resident set size to the current one (``/proc/self/clear_refs``); False where the
    kernel does not allow it (the peak then also covers what came before)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MetricsLogger:
    """Writes every record to ``metrics.jsonl`` (rank 0), the console, TensorBoard and W&B when on."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, wandb_project: str = "", config: Optional[dict] = None,
                 enabled: bool = True):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                print("[maskllm] tensorboard is not installed: pip install tensorboard to get event files")
        if wandb_project:
            import wandb  # the user asked for it: a missing package is an error

            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(out_dir))

    def log(self, record: dict, console: Optional[str] = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        step = record.get("iteration", 0)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        if console:
            print(console, flush=True)

    def truncate_after(self, iteration: int) -> None:
        """Drop records past ``iteration`` (a resumed run repeats them), and a torn last line (a write the
        run did not finish: disk full, a kill)."""
        if not self.enabled or not self.path.exists():
            return
        records, torn = read_records(self.path)
        if torn:
            print(f"[maskllm] {self.path}: dropping its incomplete last line", flush=True)
        keep = [json.dumps(r) for r in records if r.get("iteration", 0) <= iteration]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, self.path)


class MetricsError(ValueError):
    """A metrics file that is not what the driver writes (message names the file and line)."""


def read_records(path: str | Path) -> tuple[list[dict], bool]:
    """``(records, torn)`` of a ``metrics.jsonl``: every JSON record with an ``iteration``; a last line that
    does not parse is a write that did not finish and is skipped (``torn``); a bad line anywhere else is a
    ``MetricsError``."""
    path = Path(path)
    lines = [(i, l) for i, l in enumerate(path.read_text(errors="replace").splitlines(), 1) if l.strip()]
    records, torn = [], False
    for k, (lineno, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                torn = True
                continue
            raise MetricsError(f"{path}:{lineno} is not a JSON record: {line[:80]!r}") from None
        if not isinstance(rec, dict) or "iteration" not in rec:
            raise MetricsError(f"{path}:{lineno} has no 'iteration': not a maskllm-train metrics file")
        records.append(rec)
    return records, torn
