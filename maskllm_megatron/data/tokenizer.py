"""One small tokenizer interface over SentencePiece ``.model`` files and Hugging Face ``tokenizer.json``.

Preprocessing and the datasets need only: text -> ids (no special tokens added), the end-of-document
(EOS) id, an optional BOS id, the vocabulary size and ids -> text for inspection. ``load_tokenizer``
picks the backend from the path; neither backend needs ``transformers``.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

# Names tried, in order, when a bare tokenizer.json comes without tokenizer_config.json.
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")


class TokenizerError(ValueError):
    """A tokenizer file is missing, of an unknown kind, or lacks a needed special token."""


class TextTokenizer(ABC):
    """What the data pipeline needs from a tokenizer."""

    path: Path
    eos_id: int
    bos_id: int | None
    vocab_size: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special token added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, bos_id={self.bos_id})")


class SentencePieceTokenizer(TextTokenizer):
    """A SentencePiece ``.model`` file; EOS/BOS are the model's own ``eos_id``/``bos_id``."""

    def __init__(self, path: str | Path):
        import sentencepiece

        self.path = Path(path)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{self.path}: not a readable SentencePiece model ({err})") from None
        self.vocab_size = int(self._sp.get_piece_size())
        eos, bos = int(self._sp.eos_id()), int(self._sp.bos_id())
        if eos < 0:
            raise TokenizerError(f"{self.path}: SentencePiece model has no EOS token")
        self.eos_id = eos
        self.bos_id = bos if bos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])


class HFTokenizer(TextTokenizer):
    """A Hugging Face ``tokenizer.json`` read with the ``tokenizers`` library.

    EOS/BOS come from ``eos_token``/``bos_token`` arguments, else from a ``tokenizer_config.json``
    next to the file, else from common token names (``</s>``, ``<|endoftext|>``, ...).
    """

    def __init__(self, path: str | Path, eos_token: str | None = None, bos_token: str | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"{self.path}: not a readable tokenizer.json ({err})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        config = self._config_tokens()
        eos = self._token_id(eos_token or config.get("eos_token"), _EOS_CANDIDATES)
        if eos is None:
            raise TokenizerError(f"{self.path}: no EOS token found; pass eos_token= (e.g. '</s>')")
        self.eos_id = eos
        self.bos_id = self._token_id(bos_token or config.get("bos_token"), _BOS_CANDIDATES)

    def _config_tokens(self) -> dict[str, str]:
        """``eos_token``/``bos_token`` strings of the sibling tokenizer_config.json, if any."""
        cfg_path = self.path.with_name("tokenizer_config.json")
        if not cfg_path.is_file():
            return {}
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{cfg_path} is not valid JSON ({e}): the file is damaged; write or download it "
                                 "again") from None
        if not isinstance(cfg, dict):
            raise TokenizerError(f"{cfg_path} is not a JSON object: the file is damaged")
        out = {}
        for key in ("eos_token", "bos_token"):
            value = cfg.get(key)
            if isinstance(value, dict):  # older format: {"content": "</s>", ...}
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
        return out

    def _token_id(self, token: str | None, candidates: Sequence[str]) -> int | None:
        if token is not None:
            tid = self._tok.token_to_id(token)
            if tid is None:
                raise TokenizerError(f"{self.path}: token {token!r} is not in the vocabulary")
            return int(tid)
        for name in candidates:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return int(tid)
        return None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def resolve_tokenizer_file(path: str | Path) -> Path:
    """The tokenizer file ``path`` names: the file itself, or ``tokenizer.json`` / ``tokenizer.model``
    (in that order) inside a folder."""
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                return p / name
        raise TokenizerError(f"{p}: folder has neither tokenizer.json nor tokenizer.model")
    if not p.is_file():
        raise TokenizerError(f"{p}: tokenizer file not found")
    return p


def load_tokenizer(path: str | Path, eos_token: str | None = None,
                   bos_token: str | None = None) -> TextTokenizer:
    """Load a SentencePiece ``*.model``, an HF ``*.json``, or a folder holding either.

    ``eos_token``/``bos_token`` override the HF special tokens (SentencePiece uses its own ids).
    """
    file = resolve_tokenizer_file(path)
    if file.suffix == ".json":
        return HFTokenizer(file, eos_token=eos_token, bos_token=bos_token)
    if file.suffix == ".model":
        if eos_token is not None or bos_token is not None:
            raise TokenizerError(f"{file}: eos_token/bos_token overrides apply to tokenizer.json only")
        return SentencePieceTokenizer(file)
    raise TokenizerError(f"{file}: unknown tokenizer kind (expected a SentencePiece .model or a tokenizer.json)")
