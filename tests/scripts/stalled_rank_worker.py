"""Two gloo ranks with a 3-second process-group timeout; rank 1 stops making progress (sleeps) before a
collective on megatron's data-parallel group. Rank 0 prints ``RESULT {...}``: how long its all-reduce
waited and the one line ``parallel.collective_failure`` makes of the error."""
import json
import os
import sys
import time

import torch

from maskllm_megatron.megatron.parallel import all_reduce_floats, collective_failure, init_parallel, timeout_minutes

if __name__ == "__main__":
    from megatron.core import parallel_state

    from maskllm_megatron.megatron.parallel import init_process_group

    init_process_group(timeout_minutes=0.05)
    init_parallel(1, 1, data_parallel=True)
    all_reduce_floats([1.0], group=parallel_state.get_data_parallel_group())  # both ranks arrive once
    if torch.distributed.get_rank() == 1:
        time.sleep(9)  # stalled
        os._exit(0)
    t0 = time.time()
    try:
        all_reduce_floats([1.0], group=parallel_state.get_data_parallel_group())
        line = None
    except Exception as e:
        line = collective_failure(e)
    print("RESULT " + json.dumps({"line": line, "waited": time.time() - t0, "timeout": timeout_minutes()}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # no teardown: the other rank never comes back
