"""Data pipeline: tokenizers, preprocessing to indexed datasets (round trip, EOD/BOS, resume,
errors) and megatron-core datasets with blends, seeds, resume-from-sample and data-parallel slices.

Uses the real SentencePiece BPE model and text of the sentencepiece sdist (fetched once by pip).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from maskllm_megatron import assets
from maskllm_megatron.data.datasets import (DataConfig, DataConfigError, DataParallelSampler, build_datasets,
                                            micro_batches, parse_blend)
from maskllm_megatron.data.preprocess import PreprocessConfig, PreprocessError, main, preprocess
from maskllm_megatron.data.tokenizer import SentencePieceTokenizer, TokenizerError, load_tokenizer
from tests.torchrun_util import torchrun

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def indexed(prefix: Path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


@pytest.fixture(scope="module")
def sp_model() -> Path:
    return assets.sentencepiece_test_model("bpe")


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    """Non-empty lines of botchan.txt, grouped by 5 into paragraphs (about 900 documents)."""
    lines = [l for l in assets.botchan_text().splitlines() if l.strip()]
    return [" ".join(lines[i:i + 5]) for i in range(0, len(lines), 5)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sp_model, paragraphs) -> Path:
    """botchan paragraphs as JSONL, preprocessed once with BOS and EOD (shared by the dataset tests)."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    preprocess(PreprocessConfig(inputs=(d / "docs.jsonl",), output_prefix=d / "botchan", tokenizer=sp_model,
                                add_bos=True, chunk_docs=300), progress=False)
    return d / "botchan"


# --------------------------------------------------------------------------------------------- tokenizer
def test_sentencepiece_tokenizer(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (1000, 2, 1)
    text = "I had a rather bad temper."
    ids = tok.encode(text)
    assert ids and tok.eos_id not in ids and tok.bos_id not in ids
    assert tok.decode(ids) == text


def test_hf_tokenizer_json(tmp_path, paragraphs):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|eot|>"]
    hf.train_from_iterator(paragraphs[:200], trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)  # folder -> tokenizer.json; common names -> <s>, </s>
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.vocab_size == hf.get_vocab_size()
    assert tok.encode("a temper") == hf.encode("a temper", add_special_tokens=False).ids
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|eot|>"}}))
    assert load_tokenizer(tmp_path).eos_id == 3
    assert load_tokenizer(tmp_path / "tokenizer.json", eos_token="</s>").eos_id == 2
    with pytest.raises(TokenizerError, match="'<nope>' is not in the vocabulary"):
        load_tokenizer(tmp_path, eos_token="<nope>")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(TokenizerError, match="unknown tokenizer kind"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a readable SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")


# --------------------------------------------------------------------------------------------- preprocess
def test_preprocess_jsonl_round_trip_with_workers(tmp_path, sp_model, paragraphs):
    """Every non-empty document comes back as [BOS] encode(text) EOD, in order; empties skipped."""
    docs = paragraphs[:120]
    docs[5] = "   "
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    result = preprocess(PreprocessConfig(inputs=(tmp_path / "a.jsonl",), output_prefix=tmp_path / "out/a",
                                         tokenizer=sp_model, json_key="body", add_bos=True, workers=2,
                                         chunk_docs=25), progress=False)
    tok = load_tokenizer(sp_model)
    expected = [[tok.bos_id, *tok.encode(d), tok.eos_id] for d in docs if d.strip()]
    ds = indexed(tmp_path / "out/a")
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert ds[0].dtype == np.uint16
    assert (result.documents, result.skipped_empty, result.tokens) == (119, 1, sum(map(len, expected)))
    assert not (tmp_path / "out/a.partial").exists()


def test_preprocess_text_files_per_file_and_per_block(tmp_path, sp_model):
    tok = load_tokenizer(sp_model)
    (tmp_path / "one.txt").write_text("First block line.\nStill first.\n\n  \nSecond block.\n")
    (tmp_path / "two.txt").write_text("Third document.")
    files = (tmp_path / "one.txt", tmp_path / "two.txt")
    preprocess(PreprocessConfig(inputs=files, output_prefix=tmp_path / "per_file", tokenizer=sp_model), progress=False)
    per_file = indexed(tmp_path / "per_file")
    assert [per_file[i].tolist() for i in range(len(per_file))] == [
        tok.encode(f.read_text()) + [tok.eos_id] for f in files]
    preprocess(PreprocessConfig(inputs=files, output_prefix=tmp_path / "blocks", tokenizer=sp_model,
                                split_blank_lines=True, append_eod=False), progress=False)
    blocks = indexed(tmp_path / "blocks")
    assert [blocks[i].tolist() for i in range(len(blocks))] == [
        tok.encode(t) for t in ("First block line.\nStill first.", "Second block.", "Third document.")]


def test_interrupted_preprocess_leaves_nothing_complete_and_resumes(tmp_path, sp_model, paragraphs, monkeypatch,
                                                                    capsys):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:200]))
    cfg = PreprocessConfig(inputs=(tmp_path / "d.jsonl",), output_prefix=tmp_path / "d", tokenizer=sp_model,
                           chunk_docs=30)
    reference = preprocess(PreprocessConfig(**{**cfg.__dict__, "output_prefix": tmp_path / "ref"}), progress=False)
    preprocess(cfg, progress=False)  # a complete earlier output: must not survive the next run's start

    calls, real_encode = [0], SentencePieceTokenizer.encode

    def dying_encode(self, text):
        calls[0] += 1
        if calls[0] > 100:
            raise KeyboardInterrupt("killed")
        return real_encode(self, text)

    monkeypatch.setattr(SentencePieceTokenizer, "encode", dying_encode)
    with pytest.raises(KeyboardInterrupt):
        preprocess(cfg, progress=False)
    assert not (tmp_path / "d.idx").exists() and not (tmp_path / "d.bin").exists()
    assert sorted(p.name for p in (tmp_path / "d.partial").glob("*.json")) == [
        "chunk-000000.json", "chunk-000001.json", "chunk-000002.json", "state.json"]

    monkeypatch.setattr(SentencePieceTokenizer, "encode", real_encode)
    capsys.readouterr()
    resumed = preprocess(cfg, progress=False)
    assert "3 chunks (90 documents) already done" in capsys.readouterr().err
    assert resumed.resumed_from_document == 90 and resumed.tokens == reference.tokens
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"d{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


def test_killed_preprocess_process(tmp_path, sp_model, paragraphs, capsys):
    """SIGKILL a real run mid-way: the prefix never looks complete; the rerun resumes and matches."""
    (tmp_path / "k.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs * 4))
    args = ["--input", str(tmp_path / "k.jsonl"), "--tokenizer", str(sp_model), "--chunk-docs", "10", "--no-progress"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), *args,
                             "--output-prefix", str(tmp_path / "k")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "k.partial" / "chunk-000001.json"
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    assert marker.exists(), "the run ended before it could be killed"
    assert not (tmp_path / "k.idx").exists()
    assert main(args + ["--output-prefix", str(tmp_path / "k")]) == 0
    assert "already done" in capsys.readouterr().err
    assert main(args + ["--output-prefix", str(tmp_path / "ref")]) == 0
    assert (tmp_path / "k.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    assert (tmp_path / "k.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()


@pytest.mark.parametrize("content, args, message", [
    ('{"text": "ok"}\n{"text": broken\n', [], r"bad.jsonl:2: invalid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', [], r"bad.jsonl:2: no key 'text' \(found \['body'\]\); set --json-key"),
    ('{"text": 3}\n', [], r"bad.jsonl:1: 'text' is a int, not a string"),
    ('\n\n', [], r"no non-empty documents"),
    ('{"text": "ok"}\n', ["--tokenizer", "nowhere.model"], r"nowhere.model: tokenizer file not found"),
    ('{"text": "ok"}\n', ["--input", "missing.jsonl"], r"missing.jsonl: input file not found"),
    ('{"text": "ok"}\n', ["--output-prefix", "bad.jsonl/o"],  # a folder that is a file
     r"error: (File exists|Not a directory): .*bad.jsonl.*: check that --output-prefix's folder can be created"),
])
def test_preprocess_errors_are_one_line(tmp_path, sp_model, capsys, content, args, message):
    import re

    (tmp_path / "bad.jsonl").write_text(content)
    argv = {"--input": str(tmp_path / "bad.jsonl"), "--tokenizer": str(sp_model),
            "--output-prefix": str(tmp_path / "o")}
    argv.update(dict(zip(args[::2], (str(tmp_path / a) for a in args[1::2]))))
    assert main([x for kv in argv.items() for x in kv] + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(message, err), err
    assert not (tmp_path / "o.idx").exists()


def test_megatron_lms_append_eod_flag_is_the_default(tmp_path, sp_model):
    (tmp_path / "a.jsonl").write_text('{"text": "one document"}\n{"text": "and another"}\n')
    tok = load_tokenizer(sp_model)
    for name, flags in (("default", []), ("flag", ["--append-eod"]), ("none", ["--no-eod"])):
        assert main(["--input", str(tmp_path / "a.jsonl"), "--tokenizer", str(sp_model), "--output-prefix",
                     str(tmp_path / name), "--no-progress", *flags]) == 0
    docs = {name: indexed(tmp_path / name) for name in ("default", "flag", "none")}
    for i, text in enumerate(("one document", "and another")):
        assert docs["default"][i].tolist() == docs["flag"][i].tolist() == tok.encode(text) + [tok.eos_id]
        assert docs["none"][i].tolist() == tok.encode(text)


def test_preprocess_config_validation(tmp_path, sp_model):
    (tmp_path / "x.txt").write_text("x")
    ok = dict(inputs=(tmp_path / "x.txt",), output_prefix=tmp_path / "o", tokenizer=sp_model)
    for bad, message in [({"workers": 0}, "workers must be >= 1"), ({"chunk_docs": 0}, "chunk_docs must be >= 1"),
                         ({"input_format": "csv"}, "input_format must be"), ({"inputs": ()}, "no input files"),
                         ({"output_prefix": tmp_path / "o.bin"}, "without .bin/.idx")]:
        with pytest.raises(PreprocessError, match=message):
            PreprocessConfig(**{**ok, **bad})


# --------------------------------------------------------------------------------------------- datasets
def test_gpt_dataset_reads_back_the_token_stream(corpus, sp_model):
    """One epoch of GPTDataset samples, unshuffled, is the documents' tokens in its document order."""
    tok = load_tokenizer(sp_model)
    seq = 64
    splits = build_datasets(DataConfig(prefixes=[str(corpus)], split="100,0,0", seq_length=seq, seed=3),
                            tok, train_samples=1)
    ds, docs = splits.train, indexed(corpus)
    assert splits.valid is None and splits.test is None
    stream = np.concatenate([docs[int(d)] for d in ds.document_index])
    order = np.argsort(ds.shuffle_index)
    got = []
    for k in range(len(ds)):
        sample = ds[int(order[k])]
        assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
        assert torch.equal(sample["position_ids"], torch.arange(seq))
        assert bool(sample["loss_mask"].all())
        got.append(sample["tokens"].numpy())
    assert len(ds) == (len(stream) - 1) // seq
    assert np.array_equal(np.concatenate(got), stream[: len(ds) * seq])
    # EOD ends every document and BOS starts it; the text itself never contains either
    for i in range(len(docs)):
        d = docs[i]
        assert d[0] == tok.bos_id and d[-1] == tok.eos_id
        assert tok.eos_id not in d[1:-1] and tok.bos_id not in d[1:-1]


def test_a_prefix_preprocessed_again_gets_fresh_sample_indices(tmp_path, sp_model, paragraphs):
    """megatron caches sample indices under the prefix, keyed by path: a prefix rewritten with more
    documents, or with BOS added, must be read through new indices, not the old ones."""
    tok = load_tokenizer(sp_model)

    def write(n_docs: int, add_bos: bool = False):
        (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:n_docs]))
        preprocess(PreprocessConfig(inputs=(tmp_path / "docs.jsonl",), output_prefix=tmp_path / "docs",
                                    tokenizer=sp_model, add_bos=add_bos), progress=False)
        config = DataConfig(prefixes=[str(tmp_path / "docs")], split="100,0,0", seq_length=32, seed=1)
        train = build_datasets(config, tok, train_samples=1).train
        docs = indexed(tmp_path / "docs")  # kept alive: its documents view its memory map
        stream = np.concatenate([docs[int(d)] for d in train.document_index])
        assert len(train) == (len(stream) - 1) // 32  # one epoch of the data as it is now
        assert sorted(set(train.document_index.tolist())) == list(range(n_docs))
        for k in range(len(train)):
            train[k]  # every sample reads (stale indices point past the documents or at wrong lengths)
        return len(train)

    few = write(40)
    assert (tmp_path / "docs" / "cache").is_dir()  # megatron's default index cache, under the prefix
    more = write(80)
    assert more > few
    assert write(80, add_bos=True) > more


def write_synthetic(prefix: Path, low: int, n_docs: int, seed: int) -> None:
    """An indexed dataset whose tokens all lie in [low, low + 90), each document ending in EOD 2."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for _ in range(n_docs):
        doc = np.append(rng.integers(low, low + 90, size=int(rng.integers(20, 120))), 2)
        b.add_document(doc, [doc.size])
    b.finalize(str(prefix) + ".idx")


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("sources")
    write_synthetic(d / "a", 10, 150, 0)
    write_synthetic(d / "b", 500, 300, 1)
    return str(d / "a"), str(d / "b")


def test_blend_follows_weights(two_sources, sp_model):
    a, b = two_sources
    config = DataConfig(prefixes=[a, b], weights=[1, 3], split="90,10,0", seq_length=32, seed=5)
    splits = build_datasets(config, load_tokenizer(sp_model), train_samples=400, valid_samples=40)
    ids = []
    for batch in micro_batches(splits.train, 8):
        for dataset_id, tokens in zip(batch["dataset_id"].tolist(), batch["tokens"]):
            body = tokens[tokens != 2]
            assert bool(((body >= 10) & (body < 100)).all()) if dataset_id == 0 else bool((body >= 500).all())
            ids.append(dataset_id)
    assert len(ids) == 400 and abs(ids.count(0) - 100) <= 1
    assert len(splits.valid) == 40 and abs(sum(int(splits.valid[i]["dataset_id"]) for i in range(40)) - 30) <= 1


def _tokens(dataset, n_batches: int, **kw) -> list[torch.Tensor]:
    return [b["tokens"] for _, b in zip(range(n_batches), micro_batches(dataset, 4, **kw))]


def test_order_is_deterministic_for_a_seed(two_sources, sp_model):
    a, b = two_sources
    tok = load_tokenizer(sp_model)

    def train(seed: int):
        return build_datasets(DataConfig(prefixes=[a, b], weights=[1, 1], split="100", seq_length=32, seed=seed),
                              tok, train_samples=64).train

    first, again, other = _tokens(train(11), 8), _tokens(train(11), 8), _tokens(train(12), 8)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))


def test_resume_and_data_parallel_slices(two_sources, sp_model):
    a, b = two_sources
    train = build_datasets(DataConfig(prefixes=[a, b], weights=[2, 1], split="100", seq_length=32, seed=2),
                           load_tokenizer(sp_model), train_samples=100).train
    straight = _tokens(train, 10)
    assert all(torch.equal(x, y) for x, y in zip(_tokens(train, 7, consumed_samples=12), straight[3:]))
    # DP=2 with micro-batch 2: the two ranks' micro-batches make up each step of 4 samples
    r0 = [b["tokens"] for _, b in zip(range(10), micro_batches(train, 2, dp_rank=0, dp_size=2))]
    r1 = [b["tokens"] for _, b in zip(range(10), micro_batches(train, 2, dp_rank=1, dp_size=2))]
    assert all(torch.equal(torch.cat([x, y]), s) for x, y, s in zip(r0, r1, straight))
    assert len(DataParallelSampler(100, 2, 1, 2)) == 25  # whole steps only
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        DataParallelSampler(100, 2, 0, 2, consumed_samples=6)
    with pytest.raises(ValueError, match="dp_rank 2"):
        DataParallelSampler(100, 2, 2, 2)


def test_torchrun_dp2_shared_cache(tmp_path, two_sources, sp_model):
    """Two real ranks build the blend through megatron's cache (rank 0 writes, rank 1 reads) and
    take complementary halves of each step, from a resumed position."""
    from tests.scripts.data_dp_worker import MBS, SEQ, STEPS

    a, b = two_sources
    out = torchrun(str(ROOT / "tests/scripts/data_dp_worker.py"), sp_model, tmp_path / "cache", tmp_path,
                   8, 1, a, 3, b)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert any(f.name.endswith("dataset_index.npy") for f in (tmp_path / "cache").iterdir()), out
    train = build_datasets(DataConfig(prefixes=[a, b], weights=[1, 3], split="90,10,0", seq_length=SEQ, seed=7),
                           load_tokenizer(sp_model), train_samples=200, valid_samples=8).train
    reference = [b["tokens"] for _, b in zip(range(STEPS), micro_batches(train, MBS * 2, consumed_samples=8))]
    for step, ref in enumerate(reference):
        assert torch.equal(torch.tensor(ranks[0][step]["tokens"] + ranks[1][step]["tokens"]), ref)


def test_data_config_errors(tmp_path, two_sources, sp_model):
    a, b = two_sources
    tok = load_tokenizer(sp_model)
    with pytest.raises(DataConfigError, match=r"missing .*nothere\.bin and .*nothere\.idx"):
        DataConfig(prefixes=[str(tmp_path / "nothere")])
    (tmp_path / "half.bin").write_bytes(b"")
    with pytest.raises(DataConfigError, match=r"missing .*half\.idx \(write it with maskllm-preprocess\)"):
        DataConfig(prefixes=[str(tmp_path / "half")])
    with pytest.raises(DataConfigError, match=r"give the prefix without \.bin/\.idx, i\.e\. .*half$"):
        DataConfig(prefixes=[str(tmp_path / "half.bin")])  # half.bin exists: the file, not its prefix
    with pytest.raises(DataConfigError, match="weights: required to blend 2 prefixes"):
        DataConfig(prefixes=[a, b])
    with pytest.raises(DataConfigError, match="weights: 1 given for 2 prefixes"):
        DataConfig(prefixes=[a, b], weights=[1])
    with pytest.raises(DataConfigError, match="must be positive"):
        DataConfig(prefixes=[a, b], weights=[1, -1])
    for split in ("98;2", "a,b", "0,1", "1,1,1,1"):
        with pytest.raises(DataConfigError, match="split"):
            DataConfig(prefixes=[a], split=split)
    with pytest.raises(DataConfigError, match="seq_length"):
        DataConfig(prefixes=[a], seq_length=0)
    with pytest.raises(DataConfigError, match="needs torch.distributed initialised"):
        build_datasets(DataConfig(prefixes=[a], cache_dir=str(tmp_path)), tok, 10)
    few = tmp_path / "few"
    write_synthetic(few, 10, 10, 0)
    with pytest.raises(DataConfigError, match=r"few: the valid part of split '99,1' holds no tokens \(10 documents"):
        build_datasets(DataConfig(prefixes=[str(few)], split="99,1"), tok, 10, 5)
    assert parse_blend(["0.3", a, "0.7", b]) == ((a, b), (0.3, 0.7))
    with pytest.raises(DataConfigError, match="weight prefix"):
        parse_blend([a, b])
