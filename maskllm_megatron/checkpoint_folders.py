"""The folders the tools read and write, in one place: what each kind holds, how it is recognised and
read without megatron, and how every one is written atomically by all ranks. Pure Python and torch.

Kinds (``is_dist_checkpoint``, ``looks_like_run`` and ``run_folder.resolve_run_checkpoint`` tell them apart;
each tool refuses the wrong one in one line naming the fix):

- **converted** (``maskllm-convert hf-to-mcore``): a megatron-core dist checkpoint (``metadata.json`` +
  torch's ``.metadata``), ``model_config.json`` (``convert.checkpoint.CheckpointInfo``) and ``tokenizer/``.
- **exported mcore** (``maskllm-export --format mcore``): a converted folder whose masked weights keep
  their boolean mask as ``prior_mask`` tensors, plus ``sparsity.json``.
- **run** (``maskllm-train``): ``OUT/checkpoints/iter_XXXXXXX``, a dist checkpoint (weights, logits,
  optimizer) plus ``extra_state.json`` (iteration, scheduler, history, the run's config); the
  ``latest`` file beside it names the newest; which one a run means is ``run_folder``'s to say.
- **hf** (``maskllm-convert mcore-to-hf``, ``maskllm-export --format hf / compressed-tensors``):
  ``config.json`` + safetensors; a **mask file** is one safetensors file with a ``MASK_FILE_FORMAT`` header.

Nothing read from a checkpoint can run code: the driver's plain values are JSON (``extra_state.json``;
an older ``extra_state.pt`` is read with ``torch.load(weights_only=True)``), and torch's dist-checkpoint
``.metadata``, a pickle that every load unpickles, is first read by an unpickler that admits only the
dist-checkpoint metadata classes (``check_metadata``): a checkpoint from a stranger that names anything
else is refused.

Every output is assembled in a hidden sibling (``staging``) and renamed into place (``publish``) once
every rank has written its part, so a folder that exists is complete; ``atomic_dir`` is the two together
for a tool's output folder, which it marks as that tool's (``--overwrite`` replaces only such a folder).

Cluster faults (#39): a run folder is held by one live driver (``RunLock``, ``hold_run_folder``); each rank
records the CRC-32 of every file it wrote in a run checkpoint (``write_digests``), which readers check
(``digest_problem``, ``verify_checkpoint``); a write that does not fit, or did not fit, on its filesystem
is one line (``check_room``, ``disk_full_error``, raised by ``staging``).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import zlib
from pathlib import Path
from typing import Iterator, Optional

import torch


class FolderError(ValueError):
    """A path is not the folder kind a tool needs, or an output cannot be written there (message: the
    problem and the fix). Like every bad-input error it is a ValueError: the tools print it as one line."""


class CheckpointMismatch(FolderError):
    """The checkpoint does not fit the model, or is damaged (message names the file or tensor and the fix)."""


class UnsafeCheckpoint(CheckpointMismatch):
    """A checkpoint file would run code when read (message names the file and what it references)."""


class RunCheckpointError(FolderError):
    """The path is not a usable run checkpoint (message: problem and fix)."""


MODEL_CONFIG_FILE = "model_config.json"  # a converted (or exported mcore) folder's CheckpointInfo
TOKENIZER_DIR = "tokenizer"
SPARSITY_FILE = "sparsity.json"  # an exported mcore folder's structure record
EXTRA_FILE = "extra_state.json"  # a run checkpoint's plain values
LEGACY_EXTRA_FILE = "extra_state.pt"  # written before the JSON file; read without unpickling code
LATEST_FILE = "latest"  # beside a run's iter_* folders: the newest one's name (run_folder writes it)
MEGATRON_METADATA = "metadata.json"  # megatron's index of a dist checkpoint
DIST_FILES = (MEGATRON_METADATA, ".metadata")  # megatron's and torch's indexes of a dist checkpoint
OUTPUT_MARKER = ".maskllm-output.json"  # in every folder a tool writes: what --overwrite may replace
#: ``format`` in the header of the N:M mask files ``maskllm-export --format masks`` writes
MASK_FILE_FORMAT = "maskllm-nm-packed"


def extra_path(ckpt_dir: str | Path) -> Optional[Path]:
    """The checkpoint's extra-state file (JSON, or an older ``.pt``), None if it has none."""
    for name in (EXTRA_FILE, LEGACY_EXTRA_FILE):
        path = Path(ckpt_dir) / name
        if path.is_file():
            return path
    return None


def read_extra(ckpt_dir: str | Path) -> Optional[dict]:
    """The driver's plain values saved beside the tensors (None if there are none). A malformed file is a
    ``CheckpointMismatch`` naming it."""
    path = extra_path(ckpt_dir)
    if path is None:
        return None
    try:
        if path.name == EXTRA_FILE:
            extra = json.loads(path.read_text())
        else:
            extra = torch.load(path, weights_only=True)  # plain containers and numbers only
    except (ValueError, OSError, pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointMismatch(f"{path} cannot be read as a checkpoint's extra state ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else 'empty'}): the checkpoint is damaged; "
                                 "resume from another one") from None
    if not isinstance(extra, dict):
        raise CheckpointMismatch(f"{path} holds a {type(extra).__name__}, not a checkpoint's extra state")
    return extra


def write_extra(folder: Path, extra: dict) -> None:
    """Write the driver's plain values as the folder's ``extra_state.json``."""
    (folder / EXTRA_FILE).write_text(json.dumps(extra, allow_nan=True))


# torch.distributed.checkpoint's metadata pickle names these and nothing else (checked on its writers'
# output: megatron's torch_dist strategy, plain dcp.save, which records the checkpoint id as a path; a
# path object is inert data)
_METADATA_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner"}
_METADATA_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                   ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                   *((module, cls) for module in ("pathlib", "pathlib._local")
                     for cls in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = (module in _METADATA_MODULES and not name.startswith("__")) or (module, name) in _METADATA_NAMES
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise UnsafeCheckpoint(f"{module}.{name}")
        return super().find_class(module, name)


def check_metadata(ckpt_dir: str | Path) -> None:
    """Refuse a dist checkpoint whose ``.metadata`` pickle references anything but the dist-checkpoint
    metadata classes (a planted pickle would run code inside torch's reader). Call before every load."""
    path = Path(ckpt_dir) / ".metadata"
    if not path.is_file():
        raise CheckpointMismatch(f"{ckpt_dir} has no .metadata: it is not a complete dist checkpoint")
    try:
        _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except UnsafeCheckpoint as e:
        raise UnsafeCheckpoint(f"{path} references {e}, which a dist checkpoint's metadata never holds: refusing to "
                               "read a checkpoint that could run code (rewrite it with maskllm-train or "
                               "maskllm-convert)") from None
    except Exception as e:  # a truncated or foreign file
        raise CheckpointMismatch(f"{path} is not a dist checkpoint's metadata ({type(e).__name__}): the checkpoint "
                                 "is damaged; save or convert it again") from None


def read_metadata(ckpt_dir: str | Path):
    """torch's dist-checkpoint ``Metadata`` of ``ckpt_dir``, read by the restricted unpickler."""
    check_metadata(ckpt_dir)
    return _MetadataUnpickler(io.BytesIO((Path(ckpt_dir) / ".metadata").read_bytes())).load()


def is_complete(ckpt_dir: str | Path) -> bool:
    """True when ``ckpt_dir`` holds a whole checkpoint: megatron's ``metadata.json``, torch's ``.metadata``,
    the extra state, and every byte range of every data file the metadata names (a folder half deleted,
    or copied in part, is not complete)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / MEGATRON_METADATA).is_file() or extra_path(ckpt_dir) is None:
        return False
    try:
        metadata = read_metadata(ckpt_dir)
        needed = {}
        for info in (getattr(metadata, "storage_data", None) or {}).values():
            path = getattr(info, "relative_path", None)
            if path is not None:
                needed[path] = max(needed.get(path, 0), int(info.offset) + int(info.length))
        for name, size in needed.items():
            f = ckpt_dir / name
            if not f.is_file() or f.stat().st_size < size:
                return False
        read_extra(ckpt_dir)
    except CheckpointMismatch:
        return False
    return True


# ----------------------------------------------------------------------------- recognising the kinds

def is_dist_checkpoint(folder: str | Path) -> bool:
    """A megatron-core dist checkpoint (converted, exported mcore or run): megatron's and torch's indexes."""
    return all((Path(folder) / name).is_file() for name in DIST_FILES)


def looks_like_run(folder: str | Path) -> bool:
    """The folder has a run's files (extra state or a ``latest`` pointer), complete or not: the tools that
    take a model refuse it and name ``maskllm-export``."""
    folder = Path(folder)
    return extra_path(folder) is not None or (folder / LATEST_FILE).is_file()


# ----------------------------------------------------------------------------- writing atomically

def is_rank0() -> bool:
    """Whether this process does the file-system work of a write (always, outside a multi-process world)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """A barrier over every rank; nothing in a one-process world."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _roles(collective: bool):
    return (is_rank0(), barrier) if collective else (True, lambda: None)


def partial_path(out: Path, suffix: str = "partial") -> Path:
    """The hidden sibling where ``out`` is assembled before it is renamed into place."""
    return out.with_name(f".{out.name}.{suffix}")


@contextlib.contextmanager
def staging(out: str | Path, suffix: str = "partial", collective: bool = True, needed: int = 0) -> Iterator[Path]:
    """An empty hidden folder beside ``out`` (``partial_path``) for the block to assemble ``out`` in; deleted
    when the block ends, whatever happens (``publish`` moves the finished output out of it first).

    ``collective``: every rank of a multi-process world enters the block and rank 0 does the file-system
    work between barriers, so the folder exists before any rank writes; False: this process alone. A
    failure on rank 0 deletes the folder at once, without waiting for the others (they may be stuck in a
    collective): their writes then fail too, and nothing half-written is left. A failure because the
    filesystem filled up becomes one line (``disk_full_error``; ``needed``: the bytes the whole write
    needs, where known)."""
    tmp = partial_path(Path(out).absolute(), suffix)
    rank0, sync = _roles(collective)
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    sync()
    try:
        yield tmp
    except BaseException as e:  # torch's CheckpointException, which carries a writer's ENOSPC, is a BaseException
        full = None if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit, FolderError)) else \
            disk_full_error(e, tmp, needed, Path(out).absolute())
        if full is None:
            raise
        raise full from None
    finally:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)


def publish(src: Path, out: str | Path, tool: Optional[str] = None, collective: bool = True) -> Path:
    """Rename the finished ``src`` (a folder or a file, assembled in ``staging``) to ``out`` once every rank
    has written its part, replacing an earlier ``out``; a folder is first marked as ``tool``'s output."""
    out = Path(out).absolute()
    rank0, sync = _roles(collective)
    sync()
    if rank0:
        if tool is not None and src.is_dir():
            mark_output(src, tool)
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        os.replace(src, out)
    sync()
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, tool: str = "maskllm-convert", inputs=(),
               collective: bool = True, needed: int = 0) -> Iterator[Path]:
    """Yield an empty folder to write ``out`` in; ``out`` appears, marked as ``tool``'s output, only when the
    block succeeds, so it is either complete or absent. Refuses first what ``check_output`` refuses.
    ``needed``: the bytes the output needs, where known (``staging``'s disk-full diagnosis)."""
    out = Path(out).absolute()
    check_output(out, overwrite, tool, inputs)
    with staging(out, "partial", collective, needed) as tmp:
        yield tmp
        publish(tmp, out, tool, collective)


def output_exists(out: str | Path) -> str:
    """The one-line refusal of an existing output folder, naming the three ways on."""
    return f"output {out} already exists: remove it, choose another --out, or pass --overwrite"


def mark_output(folder: Path, tool: str) -> None:
    """Record in an output folder (before it is renamed into place) which tool wrote it."""
    (Path(folder) / OUTPUT_MARKER).write_text(json.dumps({"tool": tool}) + "\n")


def written_by(path: Path) -> Optional[str]:
    """The tool that wrote the output ``path`` (a folder with our marker, or a mask file with our header),
    None for anything else."""
    path = Path(path)
    marker = path / OUTPUT_MARKER
    if path.is_dir() and marker.is_file():
        try:
            return json.loads(marker.read_text()).get("tool")
        except (ValueError, AttributeError):
            return None
    if path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # not a safetensors file
            return None
        return "maskllm-export" if meta.get("format") == MASK_FILE_FORMAT else None
    return None


def check_output(out: str | Path, overwrite: bool, tool: str, inputs=()) -> None:
    """Refuse, before any work, an output that exists (without ``overwrite``), and with ``overwrite`` one
    that holds or is an input (replacing it would delete what is being read) or that is not an earlier
    output of the same ``tool``: ``--overwrite`` never deletes a folder it does not recognise."""
    out = Path(out).absolute()
    if not out.exists():
        return
    if not overwrite:
        raise FolderError(output_exists(out))
    for inp in inputs:
        inp = Path(inp).absolute()
        if out == inp or out in inp.parents:
            raise FolderError(f"--out {out} holds the input {inp}: --overwrite would delete it; choose another --out")
    if written_by(out) != tool:
        raise FolderError(f"--overwrite replaces only an earlier output of {tool}, and {out} is not one: remove it "
                          "yourself or choose another --out")


# ----------------------------------------------------------------------------- one driver per run folder

RUN_LOCK_FILE = ".maskllm-run.lock"  # in run.out_dir: flock'ed by the live driver, JSON naming it


class RunFolderBusy(FolderError):
    """Another live driver holds the run folder (message names it: host, pid, start time)."""


class RunLock:
    """The hold of one driver on its run folder: an exclusive ``flock`` on ``RUN_LOCK_FILE``, which also
    names the holder in JSON (host, pid, start time). The kernel drops the flock when the process dies,
    however it dies, so a folder left by ``kill -9`` is free again at once. Where the filesystem refuses
    ``flock`` (some NFS and Lustre mounts), the JSON alone decides: a holder on this host whose pid is gone
    is taken over; a live one, or one on another host (whose liveness cannot be seen), is refused."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir).absolute() / RUN_LOCK_FILE
        self.fd: Optional[int] = None
        self.flock = True

    @staticmethod
    def _me() -> dict:
        import datetime
        import socket

        return {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        return holder if isinstance(holder, dict) else {}

    def _refuse(self, holder: dict, extra: str = "") -> RunFolderBusy:
        who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
               if holder else "its lock file names no holder")
        return RunFolderBusy(f"{self.path.parent} is in use by another maskllm-train ({who}){extra}: wait for "
                             "that run to end or stop it, or set another run.out_dir")

    def acquire(self) -> "RunLock":
        import errno
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refuse(self._holder()) from None
        except OSError as e:  # the filesystem has no flock (ENOLCK, EOPNOTSUPP, ENOSYS, EINVAL): the JSON decides
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            self.flock = False
            holder = self._holder()
            if holder.get("pid") is not None and holder.get("pid") != os.getpid():
                if holder.get("host") != socket.gethostname():
                    os.close(fd)
                    raise self._refuse(holder, f"; this filesystem has no flock, so a dead holder on another host "
                                               f"cannot be told from a live one: if it is dead, delete {self.path}")
                if _pid_alive(int(holder["pid"])):
                    os.close(fd)
                    raise self._refuse(holder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self._me()) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Let the folder go (process exit does it too). Without flock the JSON is removed, so that the next
        driver does not take this process's pid, reused later, for a holder."""
        if self.fd is None:
            return
        if not self.flock:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self.fd)
        self.fd = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


_RUN_LOCKS: dict = {}  # out_dir -> RunLock held by this process (for the process's life)


def hold_run_folder(out_dir: str | Path) -> RunLock:
    """Hold ``out_dir`` for this process until it exits (``RunLock``); ``RunFolderBusy`` when another live
    driver holds it. Holding it again in the same process is a no-op."""
    key = str(Path(out_dir).absolute())
    if key not in _RUN_LOCKS:
        _RUN_LOCKS[key] = RunLock(key).acquire()
    return _RUN_LOCKS[key]


# ----------------------------------------------------------------------------- checkpoints that prove their bytes

DIGESTS_DIR = "digests"  # in a run checkpoint: rank_XXXXX.json per rank, the digests of the files it wrote
DIGEST_ALGORITHM = "crc32"  # zlib's, streamed: 3.9 GB/s here, ~2x sha256 with SHA-NI (benchmarks/RESULTS.md)
_DIGEST_CHUNK = 8 << 20
_OWNER = re.compile(r"__(\d+)_\d+\.distcp$")  # torch's dist-checkpoint data file of global rank N
_VERIFIED: set = set()  # checkpoints this process verified (export and eval open one several times)


def file_crc32(path: str | Path) -> str:
    """The file's CRC-32 (zlib), streamed, as 8 hex digits."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_DIGEST_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _checkpoint_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).parts[0] != DIGESTS_DIR)


def write_digests(folder: str | Path, rank: int, world: int) -> Path:
    """Record the digests of the files of a checkpoint (being assembled in ``folder``, every rank's writes
    done) that rank ``rank`` of ``world`` wrote: its own ``__<rank>_*.distcp`` data files, and on rank 0
    everything else (indexes, common state, extra state), in ``digests/rank_<rank>.json``."""
    folder = Path(folder)
    mine = []
    for name in _checkpoint_files(folder):
        owner = _OWNER.search(name)
        owner = int(owner.group(1)) if owner and int(owner.group(1)) < world else 0
        if owner == rank:
            mine.append(name)
    files = {name: {"bytes": (folder / name).stat().st_size, DIGEST_ALGORITHM: file_crc32(folder / name)}
             for name in mine}
    out = folder / DIGESTS_DIR / f"rank_{rank:05d}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rank": rank, "world": world, "algorithm": DIGEST_ALGORITHM, "files": files}) + "\n")
    return out


def read_digests(folder: str | Path) -> Optional[dict]:
    """``{file: {"bytes", "crc32"}}`` of every rank's manifest of the checkpoint ``folder``; None for a
    checkpoint saved without digests (before they existed). A missing or unreadable manifest is a
    ``CheckpointMismatch`` naming it."""
    folder = Path(folder)
    manifests = sorted((folder / DIGESTS_DIR).glob("rank_*.json"))
    if not manifests:
        return None
    files, world = {}, None
    for path in manifests:
        try:
            m = json.loads(path.read_text())
            world = int(m["world"])
            files.update(m["files"])
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointMismatch(f"{path} is not a digest manifest: the checkpoint is damaged") from None
    names = {p.name for p in manifests}
    missing = [f"rank_{r:05d}.json" for r in range(world) if f"rank_{r:05d}.json" not in names]
    if missing:
        raise CheckpointMismatch(f"{folder / DIGESTS_DIR / missing[0]} is missing: the checkpoint is incomplete")
    return files


def digest_problem(folder: str | Path, rank: int = 0, world: int = 1) -> Optional[str]:
    """Check the files of the checkpoint ``folder`` against its digests: this rank's share (file i of the
    sorted list when i % world == rank), so that the ranks of a run read it once between them. Returns the
    first problem as one line naming the file (None when the share verifies, or the checkpoint has no
    digests)."""
    folder = Path(folder)
    try:
        files = read_digests(folder)
    except CheckpointMismatch as e:
        return str(e)
    for i, (name, want) in enumerate(sorted((files or {}).items())):
        if i % world != rank:
            continue
        path = folder / name
        if not path.is_file():
            return f"{path} is missing: the checkpoint is damaged"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path} holds {size} bytes, its digest manifest {want['bytes']}: the file is damaged"
        got = file_crc32(path)
        if got != want[DIGEST_ALGORITHM]:
            return (f"{path} fails its digest ({DIGEST_ALGORITHM} {got}, written as {want[DIGEST_ALGORITHM]}): "
                    "the file is damaged")
    return None


def whole_digest_problem(folder: str | Path) -> Optional[str]:
    """``digest_problem`` of every file of the checkpoint ``folder``, once per process: a checkpoint that
    verified is remembered (export and eval open a checkpoint several times)."""
    key = str(Path(folder).absolute())
    if key in _VERIFIED:
        return None
    problem = digest_problem(folder)
    if problem is None:
        _VERIFIED.add(key)
    return problem


def verify_checkpoint(folder: str | Path) -> None:
    """Every file of the checkpoint ``folder`` against its digests (``whole_digest_problem``);
    ``CheckpointMismatch`` naming the first damaged file."""
    problem = whole_digest_problem(folder)
    if problem:
        raise CheckpointMismatch(f"{problem}; resume or export from another checkpoint")


# ----------------------------------------------------------------------------- disk full, said plainly

class DiskFull(FolderError):
    """A write does not fit, or did not fit, on its filesystem (message: the folder, space needed and free)."""


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def tree_bytes(folder: str | Path) -> int:
    """Bytes of the files under ``folder`` (0 if it does not exist)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def free_bytes(path: str | Path) -> int:
    """Free bytes (for this user) on the filesystem that holds ``path``, or would hold it."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_room(folder: str | Path, needed: int, what: str = "a checkpoint", basis: str = "") -> None:
    """``DiskFull`` naming ``folder``, the space needed and the space free when ``needed`` bytes do not fit on
    its filesystem: called before anything is written."""
    free = free_bytes(folder)
    if free < needed:
        raise DiskFull(room_message(folder, needed, free, what, basis))


def room_message(folder, needed: int, free: int, what: str = "a checkpoint", basis: str = "") -> str:
    return (f"not enough disk space for {what} in {Path(folder).absolute().parent}: about {_size(needed)} needed"
            f"{f' ({basis})' if basis else ''}, {_size(free)} free; nothing was written: free space there or "
            "write elsewhere, then run again")


def disk_full_error(error: BaseException, folder: Path, needed: int = 0, out: Optional[Path] = None) -> Optional[DiskFull]:
    """The one-line ``DiskFull`` (naming ``out``, by default ``folder``) for a write into ``folder`` that failed with ``error`` because its filesystem
    filled up, None for any other failure. Seen as ENOSPC or EDQUOT anywhere in the exception chain, or,
    when a writer wrapped it (torch.save under megatron's writer processes: "unexpected pos ..."), as a
    filesystem with less room left than the rest of the write would have needed."""
    import errno

    seen, e = set(), error
    full = False
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or \
                any(text in str(e) for text in ("No space left on device", "Disk quota exceeded")):
            full = True
        e = e.__cause__ or e.__context__
    free = free_bytes(folder)
    if not full:
        full = free < max(needed - tree_bytes(folder), 0) + (1 << 20)
    if not full:
        return None
    return DiskFull(f"the disk filled up while writing {Path(out or folder).absolute()} ({_size(free)} free"
                    + (f", about {_size(needed)} needed" if needed else "") + "): the partial output was removed; "
                    "free space there or write elsewhere, then run again")
