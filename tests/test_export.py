"""maskllm-export: a tiny LLaMA converted at TP=2, sparsified (magnitude prior + changed logits + Adam
state) and saved as a run checkpoint, exported in every format at TP=2 and TP=1. Each export gives
the masked megatron-core model's logits (transformers for HF and compressed-tensors), is verified,
and leaves nothing behind when the verifier fails. Real SmolLM2 masks: file size near the floor."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import built_once
from tests.torchrun_util import printed_result, torchrun

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "scripts" / "export_worker.py")
SMOLLM2_WORKER = str(ROOT / "tests" / "scripts" / "export_smollm2.py")



def save_tiny_llama(folder: Path) -> Path:
    """A random LLaMA (GQA, untied head, vocab 1000 padded to 1024 by megatron) with the botchan
    SentencePiece tokenizer, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from maskllm_megatron import assets

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    shutil.copy(assets.sentencepiece_test_model("bpe"), folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """Built once per session for every worker (test_perplexity uses it too): the worker's results and the
    folder."""
    def build(work: Path) -> None:
        save_tiny_llama(work / "hf")
        made = printed_result(torchrun(WORKER, "make", str(work), nproc=2))
        tp1 = printed_result(torchrun(WORKER, "tp1", str(work), nproc=1))
        (work / "results.json").write_text(json.dumps({"make": made, "tp1": tp1}))

    work = built_once(tmp_path_factory, "export_tiny_run", build)
    r = json.loads((work / "results.json").read_text())
    r["work"] = work
    r["ref"] = torch.load(work / "ref.pt")
    return r


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---------------------------------------------------------------------------------------------- mcore
def test_run_checkpoint_masks_differ_from_prior(tiny_run):
    """The run's learned masks are not just the prior (else prior/learned exports could not be told apart)."""
    assert tiny_run["make"]["flipped"] > 100
    assert tiny_run["make"]["prior_vs_learned"] > 0.1


def test_mcore_export_gives_the_masked_models_logits_at_tp2_and_tp1(tiny_run):
    make, tp1 = tiny_run["make"], tiny_run["tp1"]
    assert make["exported_diff"] <= 1e-5  # exported at TP=2, loaded by the converter's dense loader at TP=2
    assert tp1["rc"] == [0, 0]
    assert tp1["diff"] <= 1e-5  # exported at TP=1 from the TP=2 run
    assert tp1["learned_diff"] <= 1e-5 and tp1["prior_diff"] <= 1e-5  # the run itself resharded to TP=1
    assert tp1["tp_saved"] == 1
    rec = tp1["sparsity_json"]
    assert rec["structure"] == "2:4" and rec["mask_source"] == "learned" and rec["mask_tensor"] == "prior_mask"
    assert len(rec["targets"]) == 8 and rec["sparsity"] == pytest.approx(0.5)
    work = tiny_run["work"]
    assert (work / "mcore_tp2" / "tokenizer" / "tokenizer.model").is_file()
    # no logits and no optimizer state in the export; masks are kept
    meta = json.loads((work / "mcore_tp2" / "metadata.json").read_text())
    assert meta  # a dist checkpoint
    from megatron.core import dist_checkpointing

    keys = set(dist_checkpointing.load_tensors_metadata(str(work / "mcore_tp2")))
    run_keys = set(dist_checkpointing.load_tensors_metadata(str(work / "run" / "checkpoints" / "iter_0000003")))
    assert not any(k.endswith("mask_logits") for k in keys)
    assert any(k.endswith("mask_logits") for k in run_keys) and any("optimizer" in k for k in run_keys)
    assert not any("optimizer" in k for k in keys)
    # one mask per linear (megatron stacks the layers into one global tensor)
    assert sorted(k for k in keys if k.endswith(".prior_mask")) == sorted(
        f"decoder.layers.{m}.prior_mask" for m in ("self_attention.linear_qkv", "self_attention.linear_proj",
                                                   "mlp.linear_fc1", "mlp.linear_fc2"))
    # maskllm-verify reads the export by itself (no megatron): every block's weight against its mask
    from maskllm_megatron.export.verify import verify_path

    report = verify_path(work / "mcore_tp2")
    assert report.ok and report.checked == 8 and report.zeros * 2 == report.weights


def test_export_prints_what_it_wrote(tiny_run):
    out = tiny_run["tp1"]["stdout"]
    assert "wrote mcore export" in out and "verify: OK" in out and "sparsity 50.00%" in out
    assert "bits/weight (floor log2(C)/M = 0.6462" in out


# ---------------------------------------------------------------------------------------------- hf
def test_hf_export_loads_in_transformers_with_the_masked_logits(tiny_run):
    work, ref = tiny_run["work"], tiny_run["ref"]
    for name, key in (("hf_tp2", "ref"), ("hf_prior", "ref_prior")):
        logits = hf_logits(work / name, ref["tokens"])
        diff = float((logits - ref[key][..., :1000]).abs().max())
        assert diff <= 1e-4, (name, diff)
    cfg = json.loads((work / "hf_tp2" / "config.json").read_text())
    assert cfg["sparsity"]["structure"] == "2:4" and cfg["sparsity"]["mask_source"] == "learned"
    assert len(cfg["sparsity"]["targets"]) == 14 and "model.layers.0.mlp.gate_proj.weight" in cfg["sparsity"]["targets"]
    assert json.loads((work / "hf_prior" / "config.json").read_text())["sparsity"]["mask_source"] == "prior"
    sd = weights(work / "hf_tp2")
    for t in sd.values():
        assert not bool(((t == 0) & torch.signbit(t)).any())  # never -0.0
    dense = weights(work / "hf")
    assert torch.equal(sd["lm_head.weight"], dense["lm_head.weight"])  # untouched


def test_hf_export_equals_the_mask_file_applied_to_the_dense_model(tiny_run, capsys):
    """Mask file round trip: apply-masks(original dense HF, exported masks) == the HF export, bit for bit;
    exported at TP=2 and TP=1 the mask files hold the same masks."""
    from maskllm_megatron.export.cli import main
    from maskllm_megatron.export.formats import load_masks, save_masks

    work = tiny_run["work"]
    masks2, spec = load_masks(work / "masks_tp2.safetensors")
    masks1, _ = load_masks(work / "masks_tp1.safetensors")
    assert set(masks1) == set(masks2) and all(torch.equal(masks1[k], masks2[k]) for k in masks1)
    save_masks(work / "resaved.safetensors", masks2, spec)
    again, _ = load_masks(work / "resaved.safetensors")
    assert all(torch.equal(again[k], masks2[k]) for k in masks2)
    out = work / "applied_hf"
    shutil.rmtree(out, ignore_errors=True)
    assert main(["apply-masks", "--hf", str(work / "hf"), "--masks", str(work / "masks_tp2.safetensors"),
                 "--out", str(out)]) == 0
    applied, exported = weights(out), weights(work / "hf_tp2")
    assert set(applied) == set(exported)
    for k in exported:
        assert torch.equal(applied[k].view(torch.uint8), exported[k].view(torch.uint8)), k  # bit-exact
    assert set(json.loads((out / "config.json").read_text())["sparsity"]["targets"]) == set(masks2)
    # the same file over the wrong folder, and an existing output: one line each, naming the fix
    assert main(["apply-masks", "--hf", str(work / "mcore_tp2"), "--masks", str(work / "masks_tp2.safetensors"),
                 "--out", str(work / "applied_wrong")]) == 2
    assert main(["apply-masks", "--hf", str(work / "hf"), "--masks", str(work / "masks_tp2.safetensors"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mcore_tp2 is not a Hugging Face model folder (no config.json)" in err
    assert "already exists: remove it, choose another --out, or pass --overwrite" in err


# ---------------------------------------------------------------------------------------------- compressed-tensors
def test_compressed_tensors_export_decompresses_to_the_hf_export(tiny_run):
    from maskllm_megatron.export.formats import decompress_24_bitmask

    work, ref = tiny_run["work"], tiny_run["ref"]
    stored, hf = weights(work / "ct_tp2"), weights(work / "hf_tp2")
    cfg = json.loads((work / "ct_tp2" / "config.json").read_text())
    targets = cfg["sparsity"]["targets"]
    assert cfg["quantization_config"]["sparsity_config"]["format"] == "sparse-24-bitmask"
    for name in targets:
        mod = name[: -len(".weight")]
        dense = decompress_24_bitmask({k: stored[f"{mod}.{k}"] for k in ("compressed", "bitmask", "shape")})
        assert torch.equal(dense.view(torch.int32), hf[name].view(torch.int32)), name
    b = tiny_run["make"]["summaries"]["ct_tp2:bytes"]
    assert b[0] < b[1]  # smaller than the dense folder
    # the compressed-tensors library's own decompressor, then the weights in a transformers model
    lib = pytest.importorskip("compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask")
    from compressed_tensors.config import SparsityCompressionConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    sc = cfg["quantization_config"]["sparsity_config"]
    decompressed = dict(lib.Sparse24BitMaskCompressor(
        config=SparsityCompressionConfig.load_from_registry(sc["format"], **sc)).decompress(str(work / "ct_tp2")))
    assert set(decompressed) == set(hf)
    for name in hf:
        assert torch.equal(decompressed[name].view(torch.int32), hf[name].view(torch.int32)), name
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(work / "hf_tp2"), dtype=torch.float32)
    model.load_state_dict(decompressed, strict=True)
    with torch.no_grad():
        logits = model.eval()(ref["tokens"]).logits
    assert float((logits - ref["ref"][..., :1000]).abs().max()) <= 1e-4


# ---------------------------------------------------------------------------------------------- verifier
def test_verifier_passes_exports_and_fails_a_planted_violation(tiny_run, tmp_path):
    from maskllm_megatron.export.verify import verify_path

    work = tiny_run["work"]
    for name in ("hf_tp2", "ct_tp2", "masks_tp2.safetensors"):
        assert verify_path(work / name).ok, name
    planted = tmp_path / "planted"
    shutil.copytree(work / "hf_tp2", planted)
    sd = weights(planted)
    w = sd["model.layers.1.mlp.down_proj.weight"]
    zero = (w[0, :4] == 0).nonzero()[0, 0]
    w[0, zero] = 0.5
    from safetensors.torch import save_file

    save_file(sd, str(planted / "model.safetensors"), metadata={"format": "pt"})
    report = verify_path(planted)
    assert not report.ok and "model.layers.1.mlp.down_proj.weight" in report.failures[0]


def test_failed_verification_leaves_nothing_and_errors_are_one_line(tiny_run):
    tp1 = tiny_run["tp1"]
    assert tp1["rc_bad"] == [2, 2]
    lines = tp1["bad_err"].strip().splitlines()
    assert len(lines) == 2 and all(l.startswith("error: verification failed, nothing written") for l in lines)
    assert tp1["leftovers"] == []
    assert tp1["rc_exists"] == 2 and tp1["err_exists"].count("\n") == 1 and "already exists" in tp1["err_exists"]
    assert tp1["rc_notrun"] == 2 and "not a mask-learning checkpoint" in tp1["err_notrun"]
    assert not list(tiny_run["work"].glob(".*.work"))


@pytest.mark.parametrize("module,args", [
    ("maskllm_megatron.export.cli", ["--ckpt", "{missing}", "--out", "{out}", "--format", "hf"]),
    ("maskllm_megatron.eval.perplexity", ["--ckpt", "{missing}", "--text-file", __file__]),
])
def test_a_missing_input_is_the_only_line_on_stderr(module, args, tmp_path):
    """The real command on a machine without CUDA: no megatron import warnings before the one-line error."""
    args = [a.format(missing=tmp_path / "missing", out=tmp_path / "out") for a in args]
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {tmp_path / 'missing'} does not exist: pass "), r.stderr


def _record_digests_again(run: Path) -> None:
    """A checkpoint edited on purpose: its digests recorded again (else export refuses the changed file)."""
    from maskllm_megatron.checkpoint_folders import DIGESTS_DIR, write_digests

    shutil.rmtree(run / DIGESTS_DIR)
    write_digests(run, 0, 1)


def test_compressed_tensors_refuses_non_24_before_loading(tiny_run, tmp_path):
    """A 1:4 run: compressed-tensors is refused with a one-line error (exit 2) and nothing is written."""
    from maskllm_megatron.export.cli import main

    work = tiny_run["work"]
    run = tmp_path / "run14"
    shutil.copytree(work / "run" / "checkpoints" / "iter_0000003", run)
    extra = json.loads((run / "extra_state.json").read_text())
    extra["config"]["mask"]["nm"] = "1:4"
    (run / "extra_state.json").write_text(json.dumps(extra))
    _record_digests_again(run)
    assert main(["--ckpt", str(run), "--out", str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 2
    assert not (tmp_path / "ct").exists()


def test_export_refuses_a_disk_without_room_before_loading(tiny_run, small_disk, capsys):
    """An hf export writes a trimmed mcore copy and the HF conversion beside it: with less room than twice
    the dense checkpoint it is refused in one line naming the folder, the space needed and free, and
    nothing is written."""
    from maskllm_megatron.export.cli import main

    run = tiny_run["work"] / "run" / "checkpoints" / "iter_0000003"
    base = Path(json.loads((run / "extra_state.json").read_text())["config"]["model"]["checkpoint"])
    dense = sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
    subprocess.run(["mount", "-o", "remount,size=64k", str(small_disk)], check=True)
    assert main(["--ckpt", str(run), "--out", str(small_disk / "hf"), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: not enough disk space for the hf export in {small_disk}: "
                                                f"about {2 * dense / 1e6:.1f} MB needed (2 x the dense checkpoint "
                                                f"{base.name}), "), err
    assert err[0].endswith(" free; nothing was written: free space there or write elsewhere, then run again")
    assert list(small_disk.iterdir()) == []


def test_a_prior_only_checkpoint_needs_use_prior(tiny_run, tmp_path, capsys):
    """A run saved at iteration 0 (``run.train_iters=0``) learned nothing: its logits' argmax is the prior
    blurred by the initial noise (2,669 held-out PPL for SmolLM2's SparseGPT prior of 131). Export and eval
    refuse it in one line without --use-prior, writing nothing; with it, the prior's masks are exported."""
    from maskllm_megatron.eval.perplexity import main as eval_main
    from maskllm_megatron.export.cli import main

    run = tmp_path / "prior_only"
    shutil.copytree(tiny_run["work"] / "run" / "checkpoints" / "iter_0000003", run)
    extra = json.loads((run / "extra_state.json").read_text())
    extra["iteration"], extra["config"]["prior"] = 0, {"method": "magnitude"}
    (run / "extra_state.json").write_text(json.dumps(extra))
    _record_digests_again(run)
    assert main(["--ckpt", str(run), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {run} is a prior-only checkpoint (iteration 0) and holds no learned masks: pass "
                   f"--use-prior to export its one-shot prior"], err
    assert not (tmp_path / "hf").exists()
    assert eval_main(["--ckpt", str(run), "--corpus", "shakespeare"]) == 2
    assert "--use-prior to evaluate its one-shot prior" in capsys.readouterr().err
    rc, _, err = _export_cli(["--ckpt", run, "--out", tmp_path / "prior.masks", "--format", "masks", "--use-prior"])
    assert rc == 0, err[-3000:]  # (a process of its own: an export in this one leaves its ranks' environment)
    assert (tmp_path / "prior.masks").exists()


# ---------------------------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_smollm2_magnitude_mask_file_near_the_floor(smollm2_export):
    """Real SmolLM2-135M, magnitude 2:4 prior exported with --use-prior: within 10% of log2(6)/4 bits."""
    r = smollm2_export["results"]["masks"]
    print(r["summary"])
    assert r["weights"] == 106_168_320
    assert r["floor"] == pytest.approx(0.6462, abs=1e-4)
    assert r["floor"] <= r["bits_per_weight"] <= 1.10 * r["floor"]
    assert r["bytes"] < 0.03 * r["dense_bytes"]


@pytest.fixture(scope="session")
def smollm2_export(tmp_path_factory, smollm2_mcore) -> dict:
    """SmolLM2 converted at TP=1, magnitude prior run checkpoint, exports and mcore perplexities (shared
    with test_perplexity)."""
    def build(work: Path) -> None:
        proc = subprocess.run([sys.executable, SMOLLM2_WORKER, str(smollm2_mcore[1]), str(work), "384"],
                              capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        (work / "results.json").write_text(json.dumps(printed_result(proc.stdout)))

    work = built_once(tmp_path_factory, "export_smollm2", build)
    r = json.loads((work / "results.json").read_text())
    r["work"] = work
    return r


# ---------------------------------------------------------------------------------------------- reconstruction
def _calib_text(tmp_path: Path) -> Path:
    from maskllm_megatron.assets import botchan_text

    path = tmp_path / "calib.txt"
    path.write_text(botchan_text()[6000:40000])  # not the text test_perplexity scores (its first 6,000 characters)
    return path


def _export_cli(args: list[str]) -> tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-m", "maskllm_megatron.export.cli", *map(str, args)], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return r.returncode, r.stdout, r.stderr


def test_reconstructed_export_refits_the_kept_weights_at_tp2_as_at_tp1(tiny_run, tmp_path):
    """--reconstruct: the same masks (zeros where the plain export has them), refitted kept weights, verified,
    recorded in config.json; TP=2 (two ranks) writes TP=1's weights; held-out perplexity drops."""
    work = tiny_run["work"]
    text = _calib_text(tmp_path)
    common = ["--ckpt", work / "run", "--format", "hf", "--reconstruct", "--calib-text", text, "--calib-samples", "24",
              "--calib-seq-len", "32", "--calib-batch-size", "4"]
    outs = {}
    for tp in (1, 2):
        outs[tp] = tmp_path / f"recon_tp{tp}"
        rc, out, err = _export_cli([*common, "--out", outs[tp], "--tp", tp])
        assert rc == 0, err[-3000:]
        assert "Warning" not in err, err[-3000:]  # stderr holds our lines, not library warnings
        assert "reconstructed (lstsq, percdamp 0.01) on 24 x 32 tokens of text" in out, out
    plain, rec1, rec2 = weights(work / "hf_tp2"), weights(outs[1]), weights(outs[2])
    record = json.loads((outs[1] / "config.json").read_text())["sparsity"]
    assert record["weights"] == "reconstructed" and record["reconstruction"]["method"] == "lstsq"
    assert record["reconstruction"]["error_after"] < record["reconstruction"]["error_before"]
    assert json.loads((work / "hf_tp2" / "config.json").read_text())["sparsity"]["weights"] == "original"
    changed = 0
    for name in record["targets"]:
        assert torch.equal(rec1[name] == 0, plain[name] == 0), name  # the same N:M pattern, nothing else zeroed
        changed += int((rec1[name] != plain[name]).sum())
        torch.testing.assert_close(rec2[name], rec1[name], rtol=1e-4, atol=1e-5)  # TP=2 equals TP=1
    assert changed > 0.9 * sum(int((plain[n] != 0).sum()) for n in record["targets"])
    for name in set(rec1) - set(record["targets"]):  # embeddings, norms, head: untouched
        assert torch.equal(rec1[name], plain[name]), name
    from maskllm_megatron.export.verify import verify_path

    assert verify_path(outs[2]).ok
    from maskllm_megatron.eval.perplexity import EvalRequest, hf_perplexity

    req = EvalRequest(text.read_text()[-8000:], seq_len=32, bos=True)  # text the calibration did not use
    assert hf_perplexity(outs[1], req).ppl < hf_perplexity(work / "hf_tp2", req).ppl


def test_reconstruction_refuses_bad_calibration_in_one_line_and_writes_nothing(tiny_run, tmp_path):
    work = tiny_run["work"]
    base = ["--ckpt", work / "run", "--format", "hf", "--out", tmp_path / "out"]
    cases = [
        ([*base, "--reconstruct", "--calib-seq-len", "32"], "needs calibration data and the run names none"),
        ([*base, "--reconstruct", "--calib-data", tmp_path / "nowhere", "--calib-seq-len", "32"], "missing"),
        ([*base, "--reconstruct", "--calib-text", _calib_text(tmp_path), "--calib-samples", "5000",
          "--calib-seq-len", "32"], "fewer than 5000 samples x 32 tokens"),
        ([*base, "--reconstruct", "--calib-text", _calib_text(tmp_path), "--calib-seq-len", "500"],
         "exceeds the model's maximum sequence length"),
        ([*base, "--calib-text", _calib_text(tmp_path)], "--calib-text is a reconstruction option: add --reconstruct"),
        ([*base[:4], "--format", "masks", "--out", tmp_path / "m", "--reconstruct"], "a masks file holds none"),
    ]
    for args, message in cases:
        rc, _, err = _export_cli(args)
        assert rc == 2 and err.count("\n") == 1 and message in err, (args, err)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*.work"))


class _Planted:
    """Unpickling this runs a shell command: what a checkpoint from a stranger could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("tool", ["verify", "eval", "export"])
def test_a_planted_pickle_in_checkpoint_metadata_is_refused_unrun(tiny_run, tmp_path, tool):
    import pickle

    work = tiny_run["work"]
    source = work / "mcore_tp1" if tool != "export" else work / "run" / "checkpoints" / "iter_0000003"
    evil = tmp_path / "evil"
    shutil.copytree(source, evil)
    marker = tmp_path / "ran"
    (evil / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    if tool == "export":  # a run checkpoint: an attacker who plants a pickle can record its digests too
        _record_digests_again(evil)
    cmd = {"verify": ["-m", "maskllm_megatron.export.verify", str(evil)],
           "eval": ["-m", "maskllm_megatron.eval.perplexity", "--ckpt", str(evil), "--text-file", __file__,
                    "--seq-len", "32"],
           "export": ["-m", "maskllm_megatron.export.cli", "--ckpt", str(evil), "--out", str(tmp_path / "o"),
                      "--format", "hf"]}[tool]
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode != 0 and not marker.exists(), r.stderr[-2000:]
    assert "references posix.system" in r.stderr and "refusing to read a checkpoint that could run code" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_overwrite_replaces_only_an_earlier_output_of_the_same_tool(tiny_run, tmp_path):
    """--overwrite refuses a folder it does not recognise and one that holds the input, leaving both as they
    were; an earlier export it replaces."""
    work = tiny_run["work"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    run_copy = tmp_path / "run"
    shutil.copytree(work / "run", run_copy)
    cases = [(foreign, "--overwrite replaces only an earlier output of maskllm-export"),
             (run_copy, f"--out {run_copy} holds the input {run_copy}/checkpoints/iter_0000003"),
             (work / "base", "holds the input")]
    for out, message in cases:
        rc, _, err = _export_cli(["--ckpt", run_copy, "--out", out, "--format", "masks", "--overwrite"])
        assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert (foreign / "thesis.tex").read_text() == "years of work"
    assert (run_copy / "checkpoints" / "iter_0000003" / "metadata.json").is_file()
    # an earlier export of the same tool is replaced (a mask file, recognised by its header; an HF folder)
    masks = tmp_path / "m.safetensors"
    for _ in range(2):
        rc, _, err = _export_cli(["--ckpt", run_copy, "--out", masks, "--format", "masks", "--overwrite"])
        assert rc == 0, err[-2000:]
    from maskllm_megatron.checkpoint_folders import written_by

    assert written_by(work / "hf_tp2") == "maskllm-export" and written_by(foreign) is None
    assert written_by(work / "base") == "maskllm-convert"
