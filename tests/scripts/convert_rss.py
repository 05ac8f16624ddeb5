"""Worker (plain process): convert at TP=1 and print peak memory.

Prints ``RESULT {"baseline_mb", "peak_mb", "model_mb", "peak_reset"}``: resident set size after importing
everything the conversion uses, with the high-water mark reset there (baseline), the high-water mark
after converting (peak), and the size of the HF weights (read, or written). The peak is this process's
own (``VmHWM``), never the ``ru_maxrss`` that a child inherits from a large parent.

    python tests/scripts/convert_rss.py HF_DIR OUT [DTYPE]          # hf-to-mcore
    python tests/scripts/convert_rss.py mcore-to-hf CKPT OUT        # the way back
"""
import json
import sys
from pathlib import Path


def main():
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401

    from maskllm_megatron.convert.hf_to_mcore import hf_to_mcore, plan
    from maskllm_megatron.convert.mcore_to_hf import mcore_to_hf
    from maskllm_megatron.train.metrics import host_peak_rss_bytes, host_rss_bytes, reset_host_peak_rss

    def start() -> tuple[float, bool]:
        reset = reset_host_peak_rss()
        return (host_rss_bytes() if reset else host_peak_rss_bytes()) / 2**20, reset

    if sys.argv[1] == "mcore-to-hf":
        ckpt, out = sys.argv[2], sys.argv[3]
        baseline, reset = start()
        mcore_to_hf(ckpt, out, show_progress=False)
        model_mb = sum(f.stat().st_size for f in Path(out).glob("*.safetensors")) / 2**20
    else:
        hf, out, dtype = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "fp32"
        model_mb = sum(f.path.stat().st_size for f in plan(hf).hf.files.values()) / 2**20
        baseline, reset = start()
        hf_to_mcore(hf, out, dtype=dtype, show_progress=False)
    print("RESULT " + json.dumps({"baseline_mb": baseline, "peak_mb": host_peak_rss_bytes() / 2**20,
                                  "model_mb": model_mb, "peak_reset": reset}), flush=True)


if __name__ == "__main__":
    main()
