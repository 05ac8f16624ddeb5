"""One-shot priors computed in place on sparsified GPTModels, sequentially, at TP=1 and TP=2."""
import torch

from tests.torchrun_util import printed_result, torchrun

WORKER = "tests/scripts/priors_worker.py"


def test_priors_are_valid_hand_checked_and_tp2_equals_tp1(tmp_path):
    # Each run checks: valid N:M, magnitude == top-N |W|, weights untouched (or OBS-updated),
    # logits moved to the prior, and sequential calibration changing deeper blocks' masks.
    # At TP=1 the one-pass Wanda and SparseGPT masks also equal those formed directly from the dense
    # model's hooked layer inputs.
    errors = [printed_result(torchrun(WORKER, tp, tmp_path, nproc=tp)) for tp in (1, 2)]
    tp1, tp2 = torch.load(tmp_path / "priors_tp1.pt"), torch.load(tmp_path / "priors_tp2.pt")
    # SparseGPT's reconstruction error of every layer is the whole layer's at either TP size
    for name, per_layer in errors[0].items():
        assert (len(per_layer) == 8) == name.split("/")[1].startswith("sparsegpt"), name
        assert set(per_layer) == set(errors[1][name]), name
        for layer, value in per_layer.items():
            assert value > 0 and abs(errors[1][name][layer] - value) <= 1e-4 * value, (name, layer)
    assert set(tp1) == set(tp2) and len(tp1) == 10
    for name in tp1:
        for key in tp1[name]:
            if key.endswith(".weight"):  # SparseGPT's OBS-updated weights
                torch.testing.assert_close(tp1[name][key], tp2[name][key], rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(tp1[name][key], tp2[name][key]), (name, key)
