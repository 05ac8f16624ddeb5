"""One data-parallel rank: build the blended datasets with a shared index cache (rank 0 writes it,
the other rank reads it) and dump this rank's micro-batches as JSON.

Usage: torchrun --nproc-per-node 2 data_dp_worker.py TOKENIZER CACHE_DIR OUT_DIR CONSUMED W1 PREFIX1 [W2 PREFIX2 ...]
"""
import json
import sys
import warnings
from pathlib import Path

import torch

from maskllm_megatron.data.datasets import DataConfig, build_datasets, micro_batches, parse_blend
from maskllm_megatron.data.tokenizer import load_tokenizer

SEQ, MBS, STEPS = 32, 2, 6


def main() -> None:
    warnings.filterwarnings("ignore")
    tokenizer_path, cache_dir, out_dir, consumed, *blend = sys.argv[1:]
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    prefixes, weights = parse_blend(blend)
    config = DataConfig(prefixes=prefixes, weights=weights, split="90,10,0", seq_length=SEQ, seed=7,
                        cache_dir=cache_dir)
    splits = build_datasets(config, load_tokenizer(tokenizer_path), train_samples=200, valid_samples=8)
    batches = micro_batches(splits.train, MBS, dp_rank=rank, dp_size=world, consumed_samples=int(consumed))
    out = [{"tokens": b["tokens"].tolist(), "dataset_id": b["dataset_id"].tolist()}
           for _, b in zip(range(STEPS), batches)]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
