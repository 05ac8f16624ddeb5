"""Bad inputs to maskllm-convert: one line naming the problem and the fix, exit status 2, nothing
written (neither the output folder nor a partial one)."""
from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskllm_megatron.checkpoint_folders import FolderError, atomic_dir, partial_path
from maskllm_megatron.megatron.model_builder import ModelConfig, ModelConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> Path:
    """A tiny LLaMA saved in several safetensors shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("bad") / "llama"
    LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="60KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def convert(hf: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "maskllm_megatron.convert.cli", "hf-to-mcore", "--hf", str(hf),
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def convert_in_process(capsys, hf: Path, out: Path, *extra: str) -> tuple[int, str]:
    """``cli.main`` in this process (these inputs fail before megatron is imported); (status, stderr)."""
    from maskllm_megatron.convert.cli import main

    capsys.readouterr()
    rc = main(["hf-to-mcore", "--hf", str(hf), "--out", str(out), *extra])
    return rc, capsys.readouterr().err


def break_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def first_shard(folder: Path) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[0]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))


CASES = {
    "unknown_architecture": (lambda f: break_config(f, model_type="bert", architectures=["BertModel"]), (),
                             ["unknown architecture BertModel", "supported model types are"]),
    "missing_shard": (lambda f: first_shard(f).unlink(), (), ["missing shard", "model-00001-of-"]),
    "shape_mismatch": (lambda f: break_config(f, intermediate_size=128), (),
                       ["has shape [96, 64] but config.json implies [128, 64]", "do not match config.json"]),
    "tp_not_dividing_heads": (lambda f: None, ("--tp", "3"),
                              ["tensor-parallel size 3 does not divide num_attention_heads=4",
                               "shards at tensor-parallel sizes [1, 2]"]),
    "truncated_safetensors": (lambda f: truncate(sorted(f.glob("model-*.safetensors"))[-1]), (),
                              ["corrupt or truncated safetensors file", "re-download it"]),
    "corrupt_header": (lambda f: garble_header(first_shard(f)), (), ["corrupt or truncated safetensors file"]),
    "bad_dtype": (lambda f: None, ("--dtype", "int8"), ["unknown --dtype 'int8'", "fp32, bf16, fp16"]),
    "deepseek_mla": (lambda f: break_config(f, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"]), (),
                     ["model_type 'deepseek_v3'", "multi-head latent attention (MLA)", "supported model types are"]),
    "moe_with_dense_layers": (lambda f: break_config(f, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, mlp_only_layers=[0]), (),
                              ["mlp_only_layers [0]", "every layer must be MoE"]),
    "ep_on_a_dense_model": (lambda f: None, ("--ep", "2"), ["expert-parallel size 2 for a model without experts"]),
    "qwen3_per_layer_sliding_window": (lambda f: break_config(f, model_type="qwen3", use_sliding_window=True), (),
                                       ["use_sliding_window=true", "max_window_layers"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_error_nothing_written(case, sharded_llama, tmp_path, capsys):
    breaker, extra, phrases = CASES[case]
    hf = copy_model(sharded_llama, tmp_path / "hf")
    breaker(hf)
    out = tmp_path / "out"
    rc, err = convert_in_process(capsys, hf, out, *extra)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for phrase in phrases:
        assert phrase in err, err
    assert not out.exists() and not partial_path(out).exists()


def test_command_line_error_before_launching_ranks(sharded_llama, tmp_path):
    """--tp 2 would launch torchrun; a bad request is refused first, in one line."""
    hf = copy_model(sharded_llama, tmp_path / "hf")
    break_config(hf, intermediate_size=128)
    r = convert(hf, tmp_path / "out", "--tp", "2")
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "launching" not in r.stderr
    assert not (tmp_path / "out").exists() and not partial_path(tmp_path / "out").exists()


def test_bad_input_at_tp1_is_the_only_line_on_stderr(sharded_llama, tmp_path):
    """At TP=1 the command converts in-process: a bad request is refused before megatron's import warnings."""
    r = convert(sharded_llama, tmp_path / "out", "--dtype", "int8")
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown --dtype 'int8': use one of fp32, bf16, fp16", \
        r.stderr[-3000:]


def test_existing_output_is_refused(sharded_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    rc, err = convert_in_process(capsys, sharded_llama, out, "--tp", "2")
    assert rc == 2 and "already exists" in err
    assert (out / "keep").read_text() == "x"


def test_mcore_to_hf_rejects_a_folder_that_is_no_checkpoint(tmp_path, capsys):
    from maskllm_megatron.convert.cli import main

    assert main(["mcore-to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert "has no model_config.json" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    assert main(["mcore-to-hf", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "hf")]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    run = tmp_path / "run" / "iter_0000012"
    run.mkdir(parents=True)
    (run / "extra_state.json").write_bytes(b"")
    assert main(["mcore-to-hf", "--ckpt", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert "is a mask-learning run checkpoint: turn it into a model with maskllm-export" in capsys.readouterr().err


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("killed")
    assert not out.exists() and not partial_path(out).exists()
    with atomic_dir(out) as tmp:
        (tmp / "done").write_text("x")
    assert (out / "done").is_file() and not partial_path(out).exists()
    with pytest.raises(FolderError, match="already exists"):
        with atomic_dir(out):
            pass


def test_model_config_parallel_validation():
    mc = ModelConfig(family="llama", num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                     num_query_groups=2, vocab_size=250, make_vocab_size_divisible_by=2, max_position_embeddings=64)
    assert mc.padded_vocab_size == 250
    mc.validate_parallel(2, 3)
    with pytest.raises(ModelConfigError, match=r"size 4 does not divide num_query_groups=2: this model shards at tensor-parallel sizes \[1, 2\]$"):
        mc.validate_parallel(4)
    vocab = ModelConfig(family="gpt", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                        vocab_size=250, make_vocab_size_divisible_by=2, max_position_embeddings=64)
    with pytest.raises(ModelConfigError, match="does not divide padded_vocab_size=250"):
        vocab.validate_parallel(4)
    with pytest.raises(ModelConfigError, match="pipeline-parallel size 2 does not divide num_layers=3"):
        mc.validate_parallel(1, 2)
    with pytest.raises(ModelConfigError, match="not a multiple of num_query_groups"):
        ModelConfig(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                    num_query_groups=3, vocab_size=250, max_position_embeddings=64)
    assert ModelConfig.from_dict(json.loads(json.dumps(mc.to_dict()))) == mc


def test_malformed_input_files_are_one_line_and_write_nothing(tmp_path):
    """Through the real commands: a damaged config.json (converter, verifier), a safetensors header that
    lies about its length, and a damaged .idx in the driver's data: one line each, no output."""
    import os
    import subprocess
    import sys

    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = tmp_path / "hf"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(hf)
    bad_config, bad_header = tmp_path / "bad_config", tmp_path / "bad_header"
    shutil.copytree(hf, bad_config)
    (bad_config / "config.json").write_text('{"model_type": "llama", oops')
    shutil.copytree(hf, bad_header)
    (bad_header / "model.safetensors").write_bytes((10**6).to_bytes(8, "little") + b'{"a": 1}')
    data = tmp_path / "d"
    builder = IndexedDatasetBuilder(f"{data}.bin", dtype=np.uint16)
    builder.add_document(np.arange(50, dtype=np.uint16), [50])
    builder.finalize(f"{data}.idx")
    Path(f"{data}.idx").write_bytes(Path(f"{data}.idx").read_bytes()[:40])
    cases = [
        (["maskllm_megatron.convert.cli", "hf-to-mcore", "--hf", bad_config, "--out", tmp_path / "o"],
         f"error: {bad_config}/config.json is not valid JSON (line 1, column 25"),
        (["maskllm_megatron.export.verify", bad_config], "is not valid JSON"),
        (["maskllm_megatron.convert.cli", "hf-to-mcore", "--hf", bad_header, "--out", tmp_path / "o"],
         "corrupt or truncated safetensors file"),
        (["maskllm_megatron.train", "model.checkpoint=/nowhere", f"data.train=[{data}]"],
         "does not exist"),  # the model is checked first ...
    ]
    for args, message in cases:
        r = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and message in r.stderr, (args, r.stderr[-2000:])
        assert not (tmp_path / "o").exists()
    from maskllm_megatron.data.datasets import DataConfigError, check_prefix

    with pytest.raises(DataConfigError, match=r"d\.idx cannot be read \(.*truncated\): re-run maskllm-preprocess"):
        check_prefix(str(data), 64)  # ... and the damaged index is refused before any step
