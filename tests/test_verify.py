"""maskllm-verify: passes valid exports, names the tensor and group of every violation."""
import json

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from maskllm_megatron.export.verify import main
from maskllm_megatron.export.formats import apply_mask_hf, save_compressed_tensors, save_masks
from maskllm_megatron.masks.patterns import NMSpec, patterns_to_mask

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"


def random_mask(shape, spec=NMSpec(2, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, spec.num_patterns, (*shape[:-1], shape[-1] // spec.m), generator=g)
    return patterns_to_mask(index, spec, dtype=torch.bool)


def llama_state(masked=True):
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(32, 16, generator=g),
          Q: torch.randn(16, 16, generator=g),
          DOWN: torch.randn(16, 24, generator=g),
          "model.layers.0.mlp.up_proj.weight": torch.randn(24, 16, generator=g),
          "model.norm.weight": torch.ones(16),
          "lm_head.weight": torch.randn(32, 16, generator=g)}
    if masked:
        for i, name in enumerate([Q, DOWN, "model.layers.0.mlp.up_proj.weight"]):
            sd[name] = apply_mask_hf(sd[name], random_mask(tuple(sd[name].shape), seed=i))
    return sd


def write_hf(folder, sd, config=None):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    save_file(sd, str(folder / "model.safetensors"))
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_valid_hf_folder_passes(tmp_path, capsys):
    code, out = run(capsys, write_hf(tmp_path / "m", llama_state()))
    assert code == 0, out
    assert "3 tensors checked for 2:4" in out and "sparsity 50.00%" in out and out.rstrip().endswith("OK")
    assert "not targeted (left dense): 2" in out


def test_planted_violation_names_tensor_and_group(tmp_path, capsys):
    sd = llama_state()
    sd[DOWN][3, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # 3 non-zeros in (row 3, group 2)
    code, out = run(capsys, write_hf(tmp_path / "m", sd))
    assert code == 1
    assert f"FAIL {DOWN}: not 2:4 at row 3, group 2" in out and "3 non-zeros of 4" in out
    assert Q not in out.split("FAIL")[1]


def test_negative_zero_is_caught(tmp_path, capsys):
    sd = llama_state()
    zero = (sd[Q] == 0).nonzero()[5].tolist()
    sd[Q][zero[0], zero[1]] = -0.0
    code, out = run(capsys, write_hf(tmp_path / "m", sd))
    assert code == 1
    assert f"FAIL {Q}: -0.0 at row {zero[0]}, group {zero[1] // 4}" in out


def test_dense_folder_fails_and_skips_are_listed(tmp_path, capsys):
    folder = write_hf(tmp_path / "m", llama_state(masked=False))
    code, out = run(capsys, folder)
    assert code == 1 and out.count("FAIL ") == 3 and "FAILED: 3 of 3 tensors" in out
    code, out = run(capsys, folder, "--skip", r"layers\.0\.")
    assert code == 1 and "0 tensors checked" in out and f"skipped {Q}: matches --skip" in out


def test_input_dim_not_multiple_of_m_is_skipped(tmp_path, capsys):
    sd = llama_state()
    sd["model.layers.0.self_attn.o_proj.weight"] = torch.randn(16, 10)
    code, out = run(capsys, write_hf(tmp_path / "m", sd))
    assert code == 0, out
    assert "skipped model.layers.0.self_attn.o_proj.weight: input dim 10 is not a multiple of M=4" in out


def test_gpt2_conv1d_is_checked_along_its_input_dim(tmp_path, capsys):
    w = torch.randn(16, 24)  # Conv1D c_fc: [in=16, out=24]
    good = {"h.0.mlp.c_fc.weight": apply_mask_hf(w, random_mask((24, 16)).t())}
    code, out = run(capsys, write_hf(tmp_path / "g", good, {"model_type": "gpt2"}))
    assert code == 0, out
    wrong = {"h.0.mlp.c_fc.weight": apply_mask_hf(w, random_mask((16, 24)))}  # N:M along the output dim
    code, out = run(capsys, write_hf(tmp_path / "w", wrong, {"model_type": "gpt2"}))
    assert code == 1 and "FAIL h.0.mlp.c_fc.weight: not 2:4" in out


def test_compressed_tensors_folder(tmp_path, capsys):
    sd = llama_state()
    folder = save_compressed_tensors(tmp_path / "ct", sd, {"model_type": "llama"}, [Q, DOWN])
    code, out = run(capsys, folder)
    assert code == 0, out
    assert "compressed-tensors sparse-24-bitmask folder: 2 tensors checked" in out
    # A bitmask with 3 bits in one group (and 1 in another, so the value count still fits).
    stored = load_file(folder / "model.safetensors")
    bm = stored["model.layers.0.self_attn.q_proj.bitmask"]
    keep = np.unpackbits(bm.numpy(), axis=-1, bitorder="little").astype(bool)
    keep[2, 0:4] = [True, True, True, False]
    keep[2, 4:8] = [True, False, False, False]
    stored["model.layers.0.self_attn.q_proj.bitmask"] = torch.from_numpy(np.packbits(keep, axis=-1, bitorder="little"))
    stored["model.layers.0.self_attn.q_proj.compressed"][2] = 1.0
    save_file(stored, str(folder / "model.safetensors"))
    code, out = run(capsys, folder)
    assert code == 1 and f"FAIL {Q}: not 2:4 at row 2, group 0" in out


def test_mask_files(tmp_path, capsys):
    spec = NMSpec(2, 4)
    masks = {Q: random_mask((16, 16)), DOWN: random_mask((16, 24), seed=1)}
    save_masks(tmp_path / "m.safetensors", masks, spec)
    code, out = run(capsys, tmp_path / "m.safetensors")
    assert code == 0 and "maskllm mask file: 2 tensors checked for 2:4" in out, out
    packed = {f"{k}.mask": np.packbits(v.numpy()) for k, v in masks.items()}
    np.savez_compressed(tmp_path / "pub.npz", **packed)
    code, out = run(capsys, tmp_path / "pub.npz")
    assert code == 0 and "published MaskLLM mask file" in out, out
    bad = masks[DOWN].clone()
    bad[0, 4:8] = True
    packed[f"{DOWN}.mask"] = np.packbits(bad.numpy())
    np.savez_compressed(tmp_path / "bad.npz", **packed)
    code, out = run(capsys, tmp_path / "bad.npz")
    assert code == 1 and f"FAIL {DOWN}: not 2:4 at flat group 1" in out
    code, out = run(capsys, tmp_path / "m.safetensors", "--nm", "1:4")
    assert code == 2 and "holds 2:4 masks" in out


def test_unreadable_input_exits_2(tmp_path, capsys):
    code, out = run(capsys, tmp_path / "missing")
    assert code == 2 and "does not exist" in out
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 16)
    code, out = run(capsys, tmp_path / "junk.bin")
    assert code == 2 and "not a safetensors mask file" in out


def test_targets_and_ignore_come_from_the_config(tmp_path, capsys):
    sd = llama_state()
    sd[DOWN] = torch.randn(16, 24)  # left dense on purpose, and listed in the config's ignore
    config = {"model_type": "llama", "quantization_config": {"quant_method": "compressed-tensors", "sparsity_config": {
        "format": "dense", "sparsity_structure": "2:4", "targets": ["Linear"], "ignore": ["re:.*down_proj$"]}}}
    folder = write_hf(tmp_path / "m", sd, config)
    code, out = run(capsys, folder)
    assert code == 0 and "2 tensors checked" in out and f"skipped {DOWN}: in the config's sparsity ignore list" in out
    code, out = run(capsys, folder, "--targets", r"down_proj\.weight$")
    assert code == 1 and f"FAIL {DOWN}" in out and "1 tensors checked" in out


def test_structure_and_targets_come_from_our_export_record(tmp_path, capsys):
    """maskllm-export / apply-masks write config["sparsity"]: the N:M and the exact tensors masked.
    A 4:8 export whose attention was left dense passes with it, and fails the default 2:4 check."""
    spec = NMSpec(4, 8)
    sd = llama_state(masked=False)
    sd[DOWN] = apply_mask_hf(sd[DOWN], random_mask(tuple(sd[DOWN].shape), spec))
    assert not bool(((sd[DOWN].reshape(16, -1, 4) != 0).sum(-1) <= 2).all())  # not 2:4
    config = {"model_type": "llama", "sparsity": {"structure": "4:8", "targets": [DOWN], "mask_source": "learned"}}
    folder = write_hf(tmp_path / "m", sd, config)
    code, out = run(capsys, folder)
    assert code == 0 and "1 tensors checked for 4:8" in out and "not targeted (left dense): 4" in out, out
    sd[DOWN][0, :8] = 1.0
    code, out = run(capsys, write_hf(tmp_path / "bad", sd, config))
    assert code == 1 and f"FAIL {DOWN}" in out, out
    code, out = run(capsys, folder, "--nm", "2:4")  # the command line still overrides the record
    assert code == 1 and f"FAIL {DOWN}" in out, out


def write_mcore(folder, tensors, structure="2:4"):
    """A megatron-core torch_dist folder as maskllm-export --format mcore writes it: the DCP files,
    megatron's metadata.json and our sparsity.json (layers stacked, as megatron-core stores them)."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    folder.mkdir()
    save(tensors, storage_writer=FileSystemWriter(str(folder)), no_dist=True)
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                      "common_backend": "torch", "common_backend_version": 1}))
    (folder / "sparsity.json").write_text(json.dumps({"structure": structure, "mask_tensor": "prior_mask"}))
    return folder


def test_megatron_core_export_folder(tmp_path, capsys):
    """Stacked [layers, out, in] weights with their boolean masks: each block checked by name; a planted
    violation and a weight kept where its mask is unset are both named; a run checkpoint (logits) is
    refused with the export command to run first."""
    fc1, proj = "decoder.layers.mlp.linear_fc1.weight", "decoder.layers.self_attention.linear_proj.weight"
    mask = {fc1: random_mask((2, 8, 16), seed=1), proj: random_mask((2, 16, 8), seed=2)}
    good = {k: torch.where(m, torch.randn(m.shape), 0.0) for k, m in mask.items()}
    tensors = {**good, **{k.replace(".weight", ".prior_mask"): m for k, m in mask.items()},
               "embedding.word_embeddings.weight": torch.randn(32, 16)}
    code, out = run(capsys, write_mcore(tmp_path / "ok", tensors))
    assert code == 0 and "megatron-core checkpoint: 4 tensors checked for 2:4 (512 weights), sparsity 50.00%" in out
    bad = dict(tensors)
    bad[fc1] = good[fc1].clone()
    bad[fc1][1, 3, 4:8] = 1.0  # block 1, row 3, group 1: four non-zeros, two where the mask is unset
    code, out = run(capsys, write_mcore(tmp_path / "bad", bad))
    assert code == 1 and "FAILED: 1 of 4 tensors" in out
    assert "FAIL decoder.layers.1.mlp.linear_fc1.weight: not 2:4 at row 3, group 1 (input columns 4..7)" in out
    assert "FAIL decoder.layers.1.mlp.linear_fc1.weight: non-zero weights where the stored mask is unset" in out
    code, out = run(capsys, write_mcore(tmp_path / "run", {**tensors, "decoder.layers.mlp.linear_fc1.mask_logits":
                                                           torch.zeros(2, 8, 4, 6)}))
    assert code == 2 and "is a mask-learning checkpoint" in out and "maskllm-export --ckpt" in out
    code, out = run(capsys, write_mcore(tmp_path / "dense", {fc1: torch.randn(2, 8, 16)}))
    assert code == 2 and "without masks (prior_mask)" in out
    (tmp_path / "neither").mkdir()
    code, out = run(capsys, tmp_path / "neither")
    assert code == 2 and "neither a Hugging Face / compressed-tensors folder" in out
