"""Worker (torchrun, 2 ranks, gloo): megatron-core's groups at TP=2, a cpu_compat shadow group and a few
collectives on each, then ``parallel.teardown``. Each rank prints one JSON line: the gloo worker threads
while the groups lived, after torch's ``destroy_process_group`` alone would have run (counted on a copy of
the same state), and after ``teardown``."""
import json
import os

import torch


def main():
    from maskllm_megatron.megatron import cpu_compat
    from maskllm_megatron.megatron.parallel import gloo_worker_threads, init_parallel, teardown
    from megatron.core import parallel_state

    init_parallel(tp=2)
    x = torch.ones(3)
    torch.distributed.all_reduce(x, group=parallel_state.get_tensor_model_parallel_group())
    torch.distributed.all_reduce(x, group=cpu_compat._shadow_group(None))
    rows = [None, None]
    torch.distributed.all_gather_object(rows, {"rank": torch.distributed.get_rank()})  # tensors made and dropped
    live = gloo_worker_threads()
    left = teardown(sync=True)
    line = json.dumps({"rank": int(os.environ["RANK"]), "sum": x.tolist(), "live": live, "after_teardown": left,
                       "initialized": torch.distributed.is_initialized(),
                       "megatron_initialized": parallel_state.model_parallel_is_initialized()})
    os.write(1, (line + "\n").encode())  # one write per rank: no collective is left to order the ranks' lines


if __name__ == "__main__":
    main()
