"""Each megatron-core CPU patch: what fails without it works with it; nothing happens with CUDA."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.torchrun_util import torchrun

PROBE = "tests/scripts/cpu_compat_probe.py"


def run_probe(*args):
    out = subprocess.run([sys.executable, PROBE, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the patches apply only without CUDA")
def test_each_patch_fixes_its_failure():
    r = run_probe()
    assert r["applied"] is True
    assert set(r["before"]) == set(r["patches"])
    for name in r["patches"]:
        assert r["before"][name] != "ok", f"{name} works without the patch: the patch is not needed"
        assert r["after"][name] == "ok", f"{name} still fails with the patch: {r['after'][name]}"


def test_no_op_when_cuda_is_available():
    assert run_probe("fake-cuda") == {"applied": False}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU path")
def test_gpt_model_trains_and_checkpoints_on_cpu():
    """megatron's DDP, distributed optimizer, schedules and dist_checkpointing on gloo: TP=2 x DP=1
    and TP=1 x DP=2 both train, round-trip a checkpoint, and give the same loss trajectory."""
    trajectories = []
    for tp in (2, 1):
        out = torchrun("tests/scripts/cpu_train_smoke.py", tp, 1, nproc=2)
        results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert len(results) == 2 and all(r["ckpt_same"] for r in results)
        losses = results[0]["losses"]
        assert losses[-1] < losses[0]
        trajectories.append(losses)
    assert trajectories[0] == pytest.approx(trajectories[1], rel=1e-5)


SINGLE_RANK_PROBE = r"""
import json, os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
import megatron.core.distributed.param_and_grad_buffer as pgb
from maskllm_megatron.megatron import cpu_compat
calls = []
def spy(real):
    def collective(output, input, *a, **k):
        calls.append(real.__name__)
        return real(output, input, *a, **k)
    return collective
pgb.dist_reduce_scatter_func = spy(dist.reduce_scatter_tensor)
pgb.dist_all_gather_func = spy(dist.all_gather_into_tensor)
cpu_compat.apply()
buf = torch.arange(8.0)
pgb.dist_reduce_scatter_func(buf.view(1, -1)[0], buf)  # megatron's in-place bucket calls: identities
pgb.dist_all_gather_func(buf, buf.view(1, -1)[0])
skipped = list(calls)
out = torch.empty(8)
pgb.dist_reduce_scatter_func(out, buf)  # another output tensor: the real collective runs
print(json.dumps({"skipped": skipped, "calls": calls, "out": out.tolist(), "buf": buf.tolist()}))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the patches apply only without CUDA")
def test_single_rank_bucket_collectives_are_skipped_only_when_they_are_identities():
    from maskllm_megatron.launch import free_port

    out = subprocess.run([sys.executable, "-c", SINGLE_RANK_PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "PORT": str(free_port())}).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["skipped"] == [] and r["calls"] == ["reduce_scatter_tensor"]
    assert r["out"] == r["buf"] == list(map(float, range(8)))


def test_teardown_joins_every_gloo_worker_thread_before_the_interpreter_shuts_down():
    """torch's destroy_process_group leaves megatron-core's groups alive (40 of this probe's 44 gloo worker
    threads); a thread still alive at interpreter shutdown can abort a finished process with "terminate
    called without an active exception". parallel.teardown leaves none, and both ranks end with exit 0."""
    out = torchrun("tests/scripts/teardown_probe.py", nproc=2)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in rows) == [0, 1], out[-2000:]
    for r in rows:
        assert r["sum"] == [4.0, 4.0, 4.0]  # the TP group's, then the shadow group's all-reduce
        assert r["live"] >= 10, r  # megatron's groups, each with its gloo threads
        assert r["after_teardown"] == 0, r
        assert not r["initialized"] and not r["megatron_initialized"], r


@pytest.mark.skipif(torch.cuda.is_available(), reason="the patches apply only without CUDA")
def test_gloo_bucket_collectives_are_bit_identical_to_megatrons_at_dp2():
    """The fast path (one all-reduce per bucket on a second gloo group) gives the bytes megatron's own
    coalesced reduce-scatter / all-gather give, signed zeros and infinities included; async calls
    (overlap_grad_reduce) keep megatron's path."""
    out = torchrun("tests/scripts/gloo_buckets_probe.py", nproc=2)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 2
    for r in rows:
        assert r["same"] == {"rs": True, "ag": True, "rs_async": True}, r
        assert r["fast_calls"] == 4 and r["async_fast_calls"] == 0, r


def test_megatrons_jit_fuser_stays_eager_without_cuda_when_the_package_comes_first():
    """Imported after maskllm_megatron on a machine without CUDA, megatron's jit-fused functions are the
    plain functions (its own ``disable_jit_fuser``) and torch._dynamo is never imported; imported alone,
    megatron compiles them with torch.compile. Nemotron's squared ReLU is the same maths either way."""
    probe = ("import sys{first}\nimport megatron.core.activations as a, torch\nx = torch.randn(64)\n"
             "print(a.squared_relu.__module__, 'torch._dynamo' in sys.modules, {same})")
    seen = {}
    same = "bool((a.squared_relu(x) == torch.relu(x) ** 2).all())"
    for name, first, same in (("package first", "\nimport maskllm_megatron", same),
                              ("megatron alone", "", "None")):  # (not called: its first call compiles C++)
        r = subprocess.run([sys.executable, "-c", probe.format(first=first, same=same)], capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        assert r.returncode == 0, r.stderr[-3000:]
        seen[name] = r.stdout.split()
    assert seen["package first"] == ["megatron.core.activations", "False", "True"], seen
    assert seen["megatron alone"][1] == "True", seen  # torch.compile's wrapper: dynamo imported
