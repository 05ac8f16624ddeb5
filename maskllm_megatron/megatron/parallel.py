"""Process groups: start torch.distributed and megatron-core's model-parallel groups, small collectives,
and the teardown every entry point ends with.

Start: ``init_parallel(tp, pp, ep)`` (torchrun's ranks, or a one-process world when launched plainly).
End: ``teardown()``. Destroying torch's default group alone leaves megatron-core's groups (and the CPU
shadow groups of ``cpu_compat``) alive, each with gloo worker threads, until the interpreter shuts down.
A worker thread that releases a tensor whose Python object it owns needs the GIL; during shutdown that
acquire ends the thread with a forced unwind, and the process aborts with "terminate called without an
active exception" (exit -6) after it finished its work. ``teardown`` drops every group while Python is
fully alive, so their threads are joined first.
"""
from __future__ import annotations

import datetime
import gc
import os
import sys
from typing import Optional

import torch


class ParallelLayoutError(ValueError):
    """The processes started do not fit the requested layout; the message names the launch that does."""


class ProcessGroupScope:
    """A command's hold on the process groups: ``close`` tears down (``teardown``) those the command made,
    and none when the caller had initialised torch.distributed already (a test or a script that calls the
    command's ``main`` in-process keeps its groups).

        groups = ProcessGroupScope()
        try:
            ...                       # the command's work
            groups.close(sync=True)   # completed: a barrier first
        finally:
            groups.close()            # after an error: no barrier (the other ranks may never arrive)
    """

    def __init__(self) -> None:
        self.owned = not (torch.distributed.is_available() and torch.distributed.is_initialized())

    def close(self, sync: bool = False) -> None:
        if self.owned:
            self.owned = False
            teardown(sync)


#: minutes a rank waits for the others (group creation, every collective) before its run ends with an error
DEFAULT_TIMEOUT_MINUTES = 30.0
_timeout_minutes = DEFAULT_TIMEOUT_MINUTES


def timeout_minutes() -> float:
    """The process groups' timeout of this process (``init_process_group``'s, else the default)."""
    return _timeout_minutes


def init_process_group(timeout_minutes: Optional[float] = None) -> None:
    """torch.distributed from torchrun's environment, or a one-process world when launched plainly;
    NCCL on the LOCAL_RANK's GPU where CUDA is available, else gloo. No-op when already initialised.

    ``timeout_minutes`` (default ``DEFAULT_TIMEOUT_MINUTES``) bounds every wait on another rank: the
    rendezvous, group creation and each collective (megatron's groups and ``cpu_compat``'s get it too),
    so a rank that never arrives ends the run with an error instead of a hang.

    Under torchrun every restart attempt gets its own prefix in the rendezvous store: torchrun keeps one
    TCP store across attempts (pytorch issue #135712), and without the prefix a restarted rank read the
    dead attempt's gloo addresses from it and waited in group creation forever."""
    global _timeout_minutes
    if timeout_minutes is not None:
        _timeout_minutes = float(timeout_minutes)
    if torch.distributed.is_initialized():
        return
    timeout = datetime.timedelta(minutes=_timeout_minutes)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ or (os.environ.get("WORLD_SIZE") == "1" and "MASTER_ADDR" not in os.environ):
        # one process: an in-process store, no TCP port (a port found free can be taken before the store
        # binds it, seen under a parallel test run: EADDRINUSE)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1,
                                             timeout=timeout)
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        torch.distributed.init_process_group(backend, timeout=timeout)
        return
    store, rank, world = next(torch.distributed.rendezvous("env://", timeout=timeout))
    store = torch.distributed.PrefixStore(f"maskllm/attempt_{attempt}", store)
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def init_parallel(tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 1234, data_parallel: bool = False) -> None:
    """torch.distributed (``init_process_group``) and megatron-core's model-parallel groups for ``tp`` x
    ``pp`` x ``ep`` ranks (expert parallel: the ``ep`` ranks hold the same dense weights and different
    experts), then megatron's per-rank RNG states from ``seed``. The world must be exactly that many
    processes, or with ``data_parallel`` (the driver) a multiple of ``tp`` x ``pp``: the data-parallel
    replicas. Groups of another layout made earlier in this process are replaced; the same layout is kept."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from . import cpu_compat

    cpu_compat.apply()
    init_process_group()
    world = torch.distributed.get_world_size()
    if (world % (tp * pp) or world % ep) if data_parallel else world != tp * pp * ep:
        raise ParallelLayoutError(f"{world} processes for --tp {tp} x --pp {pp}" + (f" x --ep {ep}" if ep > 1 else "")
                                  + f": launch with nproc={tp * pp * ep}")
    same = (parallel_state.model_parallel_is_initialized()
            and parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
            and parallel_state.get_expert_model_parallel_world_size() == ep)
    if not same:
        _drop_model_parallel_groups()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 expert_model_parallel_size=ep,
                                                 distributed_timeout_minutes=_timeout_minutes)
    model_parallel_cuda_manual_seed(seed)


def _drop_model_parallel_groups() -> None:
    """megatron-core's ``destroy_model_parallel``, and every process group its module still holds after it
    (0.16.1 keeps e.g. ``_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP``)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    group_type = torch.distributed.ProcessGroup
    for name, value in list(vars(parallel_state).items()):
        if name.startswith("_") and name.isupper() and isinstance(value, group_type):
            setattr(parallel_state, name, None)


def teardown(sync: bool = False) -> int:
    """Destroy every process group of this process: megatron-core's, ``cpu_compat``'s shadow groups and
    torch's, then collect them so that their gloo worker threads are joined now, not during interpreter
    shutdown (see the module docstring). ``sync``: first a barrier, so that no rank closes its connections
    while another still reads from them (on success paths only: after an error the other ranks may never
    arrive). A no-op without torch.distributed.

    Returns the number of gloo worker threads still running: 0 unless something outside the
    process-group registries (a live model's modules, a kept ``Work``) still holds a group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if sync:
            torch.distributed.barrier()
        from . import cpu_compat

        cpu_compat.drop_shadow_groups()
        if "megatron.core.parallel_state" in sys.modules:  # never imported only to tear down
            _drop_model_parallel_groups()
        torch.distributed.destroy_process_group()
    gc.collect()
    return gloo_worker_threads()


def gloo_worker_threads() -> int:
    """Threads of live gloo process groups in this process (Linux; 0 where /proc is absent)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    count = 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += f.read().strip() == "pt_gloo_runloop"
        except OSError:  # the thread ended meanwhile
            pass
    return count


def collective_failure(error: BaseException, timeout_minutes: Optional[float] = None) -> Optional[str]:
    """One line saying why this rank's wait on the others failed (``error`` from the rendezvous, group
    creation or a collective): another rank did not arrive within the timeout, or its connection broke
    (it died); None for any other error."""
    text = " ".join(str(e) for e in (error, error.__cause__) if e is not None)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)[:200]
    where = f"rank {os.environ.get('RANK', '0')}"
    limit = timeout_minutes if timeout_minutes is not None else _timeout_minutes
    if isinstance(error, torch.distributed.DistError) or "Timed out" in text or "timed out" in text or \
            "Connection reset by peer" in text or "Connection closed by peer" in text or "Broken pipe" in text:
        if "imed out" in text or "Timeout" in text or "timeout" in text:
            return (f"{where}: another rank did not arrive within parallel.timeout_minutes={limit:g} ({first}): "
                    "check that every rank started and none is stuck; torchrun --max-restarts restarts the group, "
                    "which resumes from the newest checkpoint")
        return (f"{where}: the connection to another rank broke ({first}): that rank failed or died, see its "
                "error; torchrun --max-restarts restarts the group, which resumes from the newest checkpoint")
    return None


def collective_device():
    """Where a small tensor for a collective must live: the current GPU under NCCL (which cannot reduce
    CPU tensors), else the CPU (gloo)."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_floats(values, op=None, group=None) -> list[float]:
    """All-reduce a few numbers across ranks (sum unless ``op``) in float64; returns them as floats."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM if op is None else op, group=group)
    return t.tolist()
