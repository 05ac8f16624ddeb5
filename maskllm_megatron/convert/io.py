"""Streaming safetensors I/O for the converter (atomic output folders: ``checkpoint_folders``).

``SafetensorsFile`` parses the safetensors header itself and reads one tensor at a time with plain
file reads (no mmap), so converting never maps a whole shard into memory and a truncated or corrupt
file is reported before anything is written. ``HFCheckpoint`` is a Hugging Face model folder
(config, index, shards); ``ShardWriter`` streams tensors into size-capped shards plus an index.
"""
from __future__ import annotations

import json
import math
import shutil
import struct
import sys
from pathlib import Path

import torch

from maskllm_megatron.checkpoint_folders import FolderError


class ConversionError(FolderError):
    """A problem with the input or the request; the message names it and the fix, on one line. (Every error
    class for bad input derives from ValueError: the tools print those as one line, without a traceback.)"""


SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One .safetensors file: header parsed and checked against the file size on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConversionError(f"missing shard {self.path}: re-download the checkpoint or fix its index")
        size = self.path.stat().st_size
        bad = f"corrupt or truncated safetensors file {self.path}"
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ConversionError(f"{bad} (no header): re-download it")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise ConversionError(f"{bad} (header length {n} > file size {size}): re-download it")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConversionError(f"{bad} (unreadable header: {e}): re-download it") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                start, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f"{bad} (bad header entry for {name!r}): re-download it") from None
            numel = 1
            for s in shape:
                numel *= s
            if end - start != numel * dtype.itemsize or start < 0:
                raise ConversionError(f"{bad} ({name!r} has {end - start} bytes for shape {shape}): re-download it")
            if self._data_start + end > size:
                raise ConversionError(
                    f"{bad} ({name!r} ends at byte {self._data_start + end}, file has {size}): re-download it")
            self.entries[name] = (dtype, shape, start, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory."""
        dtype, shape, start, end = self.entries[name]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            if f.readinto(memoryview(buf.numpy())) != end - start:
                raise ConversionError(f"truncated safetensors file {self.path} while reading {name!r}: re-download it")
        return buf.view(dtype).reshape(shape)


class HFCheckpoint:
    """A Hugging Face model folder: ``config.json`` plus one safetensors file or sharded ones with an
    index. Opening checks that every shard exists and has a sound header."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.exists():
            raise ConversionError(f"{self.folder} does not exist: pass a Hugging Face model folder to --hf")
        if not (self.folder / "config.json").is_file():
            raise ConversionError(f"{self.folder} has no config.json: pass a Hugging Face model folder to --hf")
        self.config: dict = read_json(self.folder / "config.json")
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no weight_map: the index is damaged; write or download it again")
        elif (self.folder / "model.safetensors").is_file():
            weight_map = {k: "model.safetensors" for k in SafetensorsFile(self.folder / "model.safetensors").keys()}
        elif list(self.folder.glob("*.bin")):
            raise ConversionError(
                f"{self.folder} holds PyTorch .bin weights only: re-save it with save_pretrained(safe_serialization=True)")
        else:
            raise ConversionError(f"{self.folder} has no model.safetensors or model.safetensors.index.json")
        self.files = {name: SafetensorsFile(self.folder / name) for name in sorted(set(weight_map.values()))}
        for key, fname in weight_map.items():
            if key not in self.files[fname].entries:
                raise ConversionError(f"index says {key!r} is in {fname} but it is not: re-download the checkpoint")
        self.weight_map = weight_map

        self.aliases: dict[str, str] = {}

    def add_prefix_aliases(self, prefix: str) -> None:
        """Also answer to ``prefix + name`` for stored names lacking it (GPT-2 files from the hub
        store ``h.0.attn...`` where transformers writes ``transformer.h.0.attn...``)."""
        self.aliases.update({prefix + k: k for k in self.weight_map if not k.startswith(prefix)})

    def _stored(self, name: str) -> str:
        return self.aliases.get(name, name)

    def __contains__(self, name: str) -> bool:
        return self._stored(name) in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        name = self._stored(name)
        return self.files[self.weight_map[name]].shape(name)

    def read(self, name: str) -> torch.Tensor:
        name = self._stored(name)
        return self.files[self.weight_map[name]].read(name)

    def shard_order(self, name: str) -> tuple[str, int]:
        """Sort key that visits tensors shard by shard, in file order."""
        name = self._stored(name)
        f = self.files[self.weight_map[name]]
        return f.path.name, f.entries[name][2]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files that exist in ``src``; return their names."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def shard_plan(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[tuple[str, list[str]]]:
    """Hugging Face's sharding of tensors (``(name, bytes)`` in order) into files of at most
    ``max_shard_bytes`` (a larger tensor gets a file of its own): ``[(file name, [tensor names])]``, one
    ``model.safetensors`` when everything fits, else ``model-0000i-of-0000n.safetensors``."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return list(zip(names, shards))


def write_shard_index(folder: Path, plan: list[tuple[str, list[str]]], total_bytes: int) -> None:
    """``model.safetensors.index.json`` for a ``shard_plan`` of several files (none for one file)."""
    if len(plan) > 1:
        index = {"metadata": {"total_size": total_bytes},
                 "weight_map": {name: fname for fname, names in plan for name in sorted(names)}}
        (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


class ShardWriter:
    """Stream tensors straight into ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` (one ``model.safetensors`` when everything fits) plus
    ``model.safetensors.index.json``. The tensors' names, shapes and dtype are known in advance,
    so each shard's header is written first and every tensor goes to disk as soon as it is given:
    nothing is buffered."""

    def __init__(self, folder: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_bytes: int = 5 * 2**30):
        self.folder, self.dtype = Path(folder), dtype
        shapes = {name: tuple(shape) for name, shape in entries}
        nbytes = {name: dtype.itemsize * math.prod(shape) for name, shape in shapes.items()}
        self._plan = [(fname, [(name, shapes[name], nbytes[name]) for name in names])
                      for fname, names in shard_plan(list(nbytes.items()), max_shard_bytes)]
        self._expected = [(name, shape, fname) for fname, shard in self._plan for name, shape, _ in shard]
        self._next, self._file, self._file_name = 0, None, None
        self.total_bytes = sum(nbytes.values())

    def _open(self, fname: str) -> None:
        if self._file is not None:
            self._file.close()
        shard = dict(self._plan)[fname]
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, nbytes in shard:
            header[name] = {"dtype": _DTYPE_NAMES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.folder / fname, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file_name = fname

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; names must come in the order given to the constructor."""
        exp_name, exp_shape, fname = self._expected[self._next]
        if name != exp_name or tuple(tensor.shape) != exp_shape or tensor.dtype != self.dtype:
            raise ConversionError(f"writing {name} {list(tensor.shape)} {tensor.dtype}, expected {exp_name} "
                                  f"{list(exp_shape)} {self.dtype} (bug)")
        if fname != self._file_name:
            self._open(fname)
        self._file.write(memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy()))
        self._next += 1

    def close(self) -> list[str]:
        """Check every tensor was written, write the index (several shards); return the file names."""
        if self._file is not None:
            self._file.close()
        if self._next != len(self._expected):
            raise ConversionError(f"only {self._next} of {len(self._expected)} tensors written (bug)")
        names = [fname for fname, _ in self._plan]
        write_shard_index(self.folder, [(fname, [n for n, *_ in shard]) for fname, shard in self._plan], self.total_bytes)
        return names


def read_json(path: str | Path) -> dict:
    """A JSON object file (config.json, an index, a record); malformed or not an object: one
    ``ConversionError`` line naming the file and where it breaks."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): the file is "
                              "damaged; write or download it again") from None
    except UnicodeDecodeError:
        raise ConversionError(f"{path} is not text: the file is damaged; write or download it again") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} holds a JSON {type(value).__name__}, not an object: the file is damaged")
    return value


def progress(done: int, total: int, label: str, stream=sys.stderr) -> None:
    """One-line progress display (rewritten in place on a terminal, every 10% otherwise)."""
    if stream.isatty():
        stream.write(f"\r{label}: {done}/{total}" + ("\n" if done == total else ""))
        stream.flush()
    elif done == total or done * 10 // total != (done - 1) * 10 // total:
        stream.write(f"{label}: {done}/{total}\n")
        stream.flush()
