"""``maskllm-preprocess``: JSONL or plain text -> megatron-core indexed dataset (``PREFIX.bin/.idx``).

Every document becomes ``[BOS] tokens EOD`` (BOS optional, EOD on by default) in one megatron-core
``IndexedDataset`` that ``GPTDataset`` reads. Documents are numbered in input order and tokenised in
chunks of ``--chunk-docs``; each finished chunk is a small indexed dataset in ``PREFIX.partial/``,
marked complete by a ``chunk-N.json`` written last. A killed run started again with the same inputs
and options resumes after the last complete chunk (other inputs or options start over). When all
chunks are done they are merged into temporary files that are renamed to ``PREFIX.bin`` and then
``PREFIX.idx`` (an earlier output is deleted when a run starts): an ``.idx`` next to its ``.bin``
always means a complete dataset of the last run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from maskllm_megatron.data.tokenizer import TextTokenizer, TokenizerError, load_tokenizer, resolve_tokenizer_file

EXAMPLES = """examples:
  maskllm-preprocess --input corpus.jsonl --tokenizer models/llama --output-prefix data/corpus
  maskllm-preprocess --input books/*.txt --split-blank-lines --tokenizer tokenizer.model \\
      --output-prefix data/books --workers 8 --add-bos
"""

STATE_VERSION = 1


class PreprocessError(ValueError):
    """Bad input or options (the message names the file and the problem)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """What to tokenise and how; validated on construction."""

    inputs: tuple[Path, ...]
    output_prefix: Path
    tokenizer: Path
    json_key: str = "text"
    input_format: str = "auto"
    """``jsonl`` (one JSON object per line), ``text``, or ``auto``: ``.jsonl``/``.json`` files are JSONL."""
    split_blank_lines: bool = False
    """Text files: one document per blank-line-separated block instead of one per file."""
    append_eod: bool = True
    add_bos: bool = False
    workers: int = 1
    chunk_docs: int = 10_000
    """Documents per resumable chunk (a killed run loses at most one chunk of work)."""
    eos_token: str | None = None
    bos_token: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(Path(p) for p in self.inputs))
        object.__setattr__(self, "output_prefix", Path(self.output_prefix))
        object.__setattr__(self, "tokenizer", Path(self.tokenizer))
        if not self.inputs:
            raise PreprocessError("no input files given")
        for p in self.inputs:
            if not p.is_file():
                raise PreprocessError(f"{p}: input file not found")
        if self.input_format not in ("auto", "jsonl", "text"):
            raise PreprocessError(f"input_format must be auto, jsonl or text, got {self.input_format!r}")
        if self.workers < 1:
            raise PreprocessError(f"workers must be >= 1, got {self.workers}")
        if self.chunk_docs < 1:
            raise PreprocessError(f"chunk_docs must be >= 1, got {self.chunk_docs}")
        if not self.output_prefix.name or self.output_prefix.suffix in (".bin", ".idx"):
            raise PreprocessError(f"{self.output_prefix}: give the output prefix without .bin/.idx")

    def format_of(self, path: Path) -> str:
        if self.input_format != "auto":
            return self.input_format
        return "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "text"


@dataclass
class PreprocessResult:
    bin_path: Path
    idx_path: Path
    documents: int
    tokens: int
    skipped_empty: int
    dtype: str
    resumed_from_document: int = 0


# --------------------------------------------------------------------------------------------- input
def iter_documents(config: PreprocessConfig) -> Iterator[str]:
    """The documents of all inputs, in order (empty ones included, so that numbering is stable)."""
    for path in config.inputs:
        if config.format_of(path) == "jsonl":
            yield from _jsonl_documents(path, config.json_key)
        else:
            text = path.read_text(encoding="utf-8")
            if config.split_blank_lines:
                yield from (block.strip("\n") for block in re.split(r"\n[ \t]*\n", text))
            else:
                yield text


def _jsonl_documents(path: Path, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PreprocessError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict) or key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise PreprocessError(f"{path}:{lineno}: no key {key!r} (found {keys}); set --json-key")
            if not isinstance(record[key], str):
                raise PreprocessError(f"{path}:{lineno}: {key!r} is a {type(record[key]).__name__}, not a string")
            yield record[key]


# --------------------------------------------------------------------------------------------- tokenising
class DocumentEncoder:
    """Document text -> ``[BOS] ids EOD`` array (empty array for an empty or blank document)."""

    def __init__(self, tokenizer: TextTokenizer, add_bos: bool, append_eod: bool, dtype: np.dtype):
        if add_bos and tokenizer.bos_id is None:
            raise PreprocessError(f"{tokenizer.path}: --add-bos given but the tokenizer has no BOS token")
        self.tokenizer, self.add_bos, self.append_eod, self.dtype = tokenizer, add_bos, append_eod, dtype

    def __call__(self, text: str) -> np.ndarray:
        ids = self.tokenizer.encode(text) if text.strip() else []
        if not ids:
            return np.empty(0, dtype=self.dtype)
        if self.add_bos:
            ids = [self.tokenizer.bos_id, *ids]
        if self.append_eod:
            ids.append(self.tokenizer.eos_id)
        return np.asarray(ids, dtype=self.dtype)


# Pool workers hold their own encoder (set once by the initializer; tokenizers are not shared).
_worker_encoder: DocumentEncoder | None = None


def _init_worker(config: PreprocessConfig, dtype: np.dtype) -> None:
    global _worker_encoder
    tok = load_tokenizer(config.tokenizer, config.eos_token, config.bos_token)
    _worker_encoder = DocumentEncoder(tok, config.add_bos, config.append_eod, dtype)


def _encode_in_worker(text: str) -> np.ndarray:
    assert _worker_encoder is not None
    return _worker_encoder(text)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (ids up to 65,535), else int32. (Megatron-LM switches at a vocabulary of
    65,500; for sizes in between, both dtypes hold every id and the files read back the same.)"""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


# --------------------------------------------------------------------------------------------- progress
class Progress:
    """Documents and tokens per second on stderr, at most once per ``interval`` seconds."""

    def __init__(self, enabled: bool, interval: float = 1.0, start_docs: int = 0):
        self.enabled, self.interval = enabled, interval
        self.t0 = self.last = time.monotonic()
        self.docs, self.tokens, self.start_docs = 0, 0, start_docs
        self.tty = sys.stderr.isatty()

    def update(self, docs: int, tokens: int, force: bool = False) -> None:
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < self.interval):
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        line = (f"{self.start_docs + self.docs:,} documents ({self.docs / dt:,.0f} docs/s), "
                f"{self.tokens:,} tokens ({self.tokens / dt:,.0f} tokens/s)")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.update(0, 0, force=True)
            if self.tty:
                print(file=sys.stderr)


# --------------------------------------------------------------------------------------------- state
def _fingerprint(config: PreprocessConfig, tokenizer: TextTokenizer, dtype: np.dtype) -> str:
    """Hash of everything that determines the output: inputs (path, size, mtime), tokenizer file, options."""
    def stat(p: Path) -> list:
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]

    ignored = ("inputs", "output_prefix", "tokenizer", "workers")
    options = {k: str(v) for k, v in asdict(config).items() if k not in ignored}
    blob = json.dumps({"version": STATE_VERSION, "inputs": [stat(p) for p in config.inputs],
                       "tokenizer": stat(resolve_tokenizer_file(config.tokenizer)),
                       "eos": tokenizer.eos_id, "bos": tokenizer.bos_id, "dtype": dtype.name,
                       "options": options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class _WorkDir:
    """``PREFIX.partial/``: state.json plus chunk-N.{bin,idx,json}; a chunk exists iff its .json does."""

    path: Path
    fingerprint: str
    chunks: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, prefix: Path, fingerprint: str) -> "_WorkDir":
        path = prefix.with_name(prefix.name + ".partial")
        state = path / "state.json"
        if path.is_dir():
            same = state.is_file() and json.loads(state.read_text()).get("fingerprint") == fingerprint
            if not same:
                print(f"{path}: left by a run with other inputs or options; starting over", file=sys.stderr)
                shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        if not state.is_file():
            _write_atomic(state, json.dumps({"fingerprint": fingerprint}).encode())
        work = cls(path, fingerprint)
        while (meta := work.chunk_prefix(len(work.chunks)).with_suffix(".json")).is_file():
            work.chunks.append(json.loads(meta.read_text()))
        for stale in path.glob(".tmp-*"):  # pieces of a chunk that was being written when killed
            stale.unlink()
        return work

    def chunk_prefix(self, index: int) -> Path:
        return self.path / f"chunk-{index:06d}"

    def write_chunk(self, arrays: Sequence[np.ndarray], input_docs: int, dtype: np.dtype) -> dict:
        """Write one chunk's documents as an indexed dataset; the .json marker goes last."""
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        final = self.chunk_prefix(len(self.chunks))
        tmp = self.path / f".tmp-{final.name}"
        builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=dtype.type)
        for a in arrays:
            builder.add_document(a, [a.size])
        builder.finalize(str(tmp) + ".idx")
        os.replace(str(tmp) + ".bin", str(final) + ".bin")
        os.replace(str(tmp) + ".idx", str(final) + ".idx")
        meta = {"input_docs": input_docs, "documents": len(arrays), "tokens": int(sum(a.size for a in arrays)),
                "max_token_id": max((int(a.max()) for a in arrays if a.size), default=-1)}
        _write_atomic(final.with_suffix(".json"), json.dumps(meta).encode())
        self.chunks.append(meta)
        return meta


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- main work
def preprocess(config: PreprocessConfig, progress: bool = True) -> PreprocessResult:
    """Tokenise ``config.inputs`` into ``config.output_prefix``.bin/.idx (resuming a killed run)."""
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (slow: before forking and timing)

    tokenizer = load_tokenizer(config.tokenizer, config.eos_token, config.bos_token)
    dtype = token_dtype(tokenizer.vocab_size)
    encoder = DocumentEncoder(tokenizer, config.add_bos, config.append_eod, dtype)
    prefix = config.output_prefix
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for old in (".idx", ".bin"):  # an earlier output must not pass for this run's until it completes
        Path(str(prefix) + old).unlink(missing_ok=True)
    work = _WorkDir.open(prefix, _fingerprint(config, tokenizer, dtype))
    skip = sum(c["input_docs"] for c in work.chunks)
    if skip:
        print(f"resuming {prefix}: {len(work.chunks)} chunks ({skip:,} documents) already done", file=sys.stderr)

    meter = Progress(progress, start_docs=skip)
    documents = iter_documents(config)
    for _ in range(skip):
        next(documents)
    pool = None
    if config.workers > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = ctx.Pool(config.workers, initializer=_init_worker, initargs=(config, dtype))
    try:
        while True:
            texts = [t for _, t in zip(range(config.chunk_docs), documents)]
            if not texts:
                break
            encoded = pool.imap(_encode_in_worker, texts, chunksize=16) if pool else map(encoder, texts)
            arrays = []
            for a in encoded:
                if a.size:
                    arrays.append(a)
                meter.update(1, int(a.size))
            work.write_chunk(arrays, len(texts), dtype)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        meter.close()

    docs = sum(c["documents"] for c in work.chunks)
    if docs == 0:
        raise PreprocessError(f"no non-empty documents in {', '.join(map(str, config.inputs))}")
    bin_path, idx_path = _merge(work, prefix, dtype)
    maxima = [c.get("max_token_id") for c in work.chunks]
    write_token_record(prefix, tokenizer.vocab_size, None if None in maxima else max(maxima))
    shutil.rmtree(work.path)
    return PreprocessResult(bin_path, idx_path, docs, sum(c["tokens"] for c in work.chunks),
                            sum(c["input_docs"] - c["documents"] for c in work.chunks), dtype.name, skip)


def write_token_record(prefix: Path, vocab_size: int, max_token_id: int | None) -> None:
    """``PREFIX.tokens.json``: the tokenizer's vocabulary size and the largest token id written, keyed by
    the ``.idx`` digest, so that a training run checks its vocabulary against the data without reading
    the ``.bin`` (``datasets.check_prefix``)."""
    from maskllm_megatron.cache import file_digest

    record = {"format": TOKEN_RECORD_FORMAT, "vocab_size": int(vocab_size), "max_token_id": max_token_id,
              "idx_digest": file_digest(f"{prefix}.idx")}
    _write_atomic(Path(f"{prefix}.tokens.json"), json.dumps(record).encode())


TOKEN_RECORD_FORMAT = "maskllm-megatron/token-record-v1"


def _merge(work: _WorkDir, prefix: Path, dtype: np.dtype) -> tuple[Path, Path]:
    """Concatenate the chunks into temporary files, then rename them into place, the .idx last.

    Documents are copied one by one: ``IndexedDatasetBuilder.add_index`` would be simpler but runs
    a full ``gc.collect()`` per chunk (about a second each with torch loaded).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    tmp = work.path / ".tmp-merged"
    builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=dtype.type)
    for i, chunk in enumerate(work.chunks):
        if chunk["documents"]:
            part = IndexedDataset(str(work.chunk_prefix(i)))
            for j in range(len(part)):
                doc = part[j]
                builder.add_document(doc, [doc.size])
            del part
    builder.finalize(str(tmp) + ".idx")
    bin_path, idx_path = Path(str(prefix) + ".bin"), Path(str(prefix) + ".idx")
    os.replace(str(tmp) + ".bin", bin_path)
    os.replace(str(tmp) + ".idx", idx_path)
    return bin_path, idx_path


# --------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="maskllm-preprocess", description=__doc__.split("\n\n")[0],
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, type=Path, help="JSONL or text files, in order")
    ap.add_argument("--output-prefix", required=True, type=Path, help="writes PREFIX.bin and PREFIX.idx")
    ap.add_argument("--tokenizer", required=True, type=Path,
                    help="SentencePiece .model, HF tokenizer.json, or a folder holding one")
    ap.add_argument("--json-key", default="text", help="JSONL field holding the text (default: text)")
    ap.add_argument("--format", dest="input_format", default="auto", choices=("auto", "jsonl", "text"),
                    help="input format (default auto: .jsonl/.json are JSONL, others text)")
    ap.add_argument("--split-blank-lines", action="store_true",
                    help="text files: one document per blank-line-separated block (default: per file)")
    ap.add_argument("--append-eod", dest="append_eod", action="store_true", default=True,
                    help="append EOD to every document (the default; accepted as Megatron-LM's flag)")
    ap.add_argument("--no-eod", dest="append_eod", action="store_false", help="do not append EOD to documents")
    ap.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS to every document")
    ap.add_argument("--eos-token", help="EOD token string of a tokenizer.json (default from its config)")
    ap.add_argument("--bos-token", help="BOS token string of a tokenizer.json (default from its config)")
    ap.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1)")
    ap.add_argument("--chunk-docs", type=int, default=10_000,
                    help="documents per resumable chunk (default 10000)")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress lines")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from maskllm_megatron.launch import quiet_known_warnings, user_error

    quiet_known_warnings()
    args = vars(_parser().parse_args(argv))
    show = args.pop("progress")
    inputs = args.pop("input")
    try:
        result = preprocess(PreprocessConfig(inputs=tuple(inputs), **args), progress=show)
    except (PreprocessError, TokenizerError) as err:
        return user_error(f"error: {err}")
    except OSError as err:  # e.g. an output prefix under a file or in a read-only place
        return user_error(f"error: {err.strerror or err}: {err.filename}: check that --output-prefix's folder can be "
                          "created and written")
    size = result.bin_path.stat().st_size
    print(f"wrote {result.bin_path} ({size / 2**20:,.1f} MiB) and {result.idx_path}: "
          f"{result.documents:,} documents, {result.tokens:,} tokens ({result.dtype})"
          + (f", {result.skipped_empty:,} empty documents skipped" if result.skipped_empty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
