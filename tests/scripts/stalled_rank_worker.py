"""Two gloo ranks with a 12-second process-group timeout (parallel.timeout_minutes=0.2). Rank 0 prints
``RESULT {...}``: the timeout every group was made with (torch's default group, megatron's data-, tensor-,
pipeline- and model-parallel groups, a ``cpu_compat`` shadow group), then, with rank 1 stalled (asleep)
before a collective on megatron's data-parallel group, how long its all-reduce waited and the one line
``parallel.collective_failure`` makes of the error."""
import json
import os
import time

import torch

from maskllm_megatron.megatron.parallel import (all_reduce_floats, collective_failure, init_parallel,
                                                init_process_group)

if __name__ == "__main__":
    from megatron.core import parallel_state

    from maskllm_megatron.megatron import cpu_compat

    init_process_group(timeout_minutes=0.2)
    init_parallel(1, 1, data_parallel=True)
    groups = {"world": torch.distributed.group.WORLD, "dp": parallel_state.get_data_parallel_group(),
              "tp": parallel_state.get_tensor_model_parallel_group(),
              "pp": parallel_state.get_pipeline_model_parallel_group(),
              "mp": parallel_state.get_model_parallel_group(),
              "shadow": cpu_compat._shadow_group(parallel_state.get_data_parallel_group())}
    timeouts = {name: g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for name, g in groups.items()}
    all_reduce_floats([1.0], group=parallel_state.get_data_parallel_group())  # both ranks arrive once
    if torch.distributed.get_rank() == 1:
        time.sleep(20)  # stalled
        os._exit(0)
    t0 = time.time()
    try:
        all_reduce_floats([1.0], group=parallel_state.get_data_parallel_group())
        line = None
    except Exception as e:
        line = collective_failure(e)
    print("RESULT " + json.dumps({"line": line, "waited": time.time() - t0, "timeouts": timeouts}), flush=True)
    os._exit(0)  # no teardown: the other rank never comes back
