"""Worker (plain process): convert at TP=1 and print peak memory.

Prints ``RESULT {"baseline_mb", "peak_mb", "model_mb"}``: resident set size after importing
everything the conversion uses (baseline), the process's peak after converting, and the size of
the HF weights (read, or written).

    python tests/scripts/convert_rss.py HF_DIR OUT [DTYPE]          # hf-to-mcore
    python tests/scripts/convert_rss.py mcore-to-hf CKPT OUT        # the way back
"""
import json
import resource
import sys
from pathlib import Path


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401

    from maskllm_megatron.convert.hf_to_mcore import hf_to_mcore, plan
    from maskllm_megatron.convert.mcore_to_hf import mcore_to_hf

    if sys.argv[1] == "mcore-to-hf":
        ckpt, out = sys.argv[2], sys.argv[3]
        baseline = peak_mb()
        mcore_to_hf(ckpt, out, show_progress=False)
        model_mb = sum(f.stat().st_size for f in Path(out).glob("*.safetensors")) / 2**20
    else:
        hf, out, dtype = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "fp32"
        model_mb = sum(f.path.stat().st_size for f in plan(hf).hf.files.values()) / 2**20
        baseline = peak_mb()
        hf_to_mcore(hf, out, dtype=dtype, show_progress=False)
    print("RESULT " + json.dumps({"baseline_mb": baseline, "peak_mb": peak_mb(), "model_mb": model_mb}), flush=True)


if __name__ == "__main__":
    main()
