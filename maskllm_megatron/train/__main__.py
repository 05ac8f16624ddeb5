"""``python -m maskllm_megatron.train --config run.yaml [section.key=value ...]`` (also ``maskllm-train``).

Launch under torchrun, e.g. ``torchrun --nproc-per-node 8 -m maskllm_megatron.train --config run.yaml``;
launched plainly it runs as one process.
"""
import argparse
import sys

from ..run_config import ConfigError, TrainConfig


def main(argv=None) -> int:
    from ..launch import quiet_known_warnings, user_error

    quiet_known_warnings()
    p = argparse.ArgumentParser(prog="maskllm-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: torchrun --nproc-per-node 8 -m maskllm_megatron.train "
                                       "--config examples/llama2_7b.yaml run.train_iters=100 optim.lr=1e-4")
    p.add_argument("--config", help="YAML run configuration")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-4")
    args = p.parse_args(argv)
    try:
        cfg = TrainConfig.load(args.config, tuple(args.overrides)).validate()  # before megatron is imported
    except ConfigError as e:
        return user_error(f"maskllm-train: {e}")
    from ..data.datasets import DataConfigError
    from ..data.tokenizer import TokenizerError
    from ..checkpoint_folders import FolderError
    from ..megatron.model_builder import ModelConfigError
    from .metrics import MetricsError
    from .trainer import TrainingStopped, train

    from ..megatron.parallel import ProcessGroupScope, collective_failure

    from .rank_guards import hold

    groups = ProcessGroupScope()
    try:
        hold(cfg.run.out_dir, cfg.parallel.timeout_minutes)  # torch.distributed, and the run folder's lock
        train(cfg)
        groups.close(sync=True)
    except (ConfigError, FolderError, DataConfigError, TokenizerError, ModelConfigError, MetricsError) as e:
        return user_error(f"maskllm-train: {e}")  # what the user gave does not fit (a path, a layout, a dataset)
    except TrainingStopped as e:  # the run stopped itself (a non-finite step): the work failed, in one line
        print(f"maskllm-train: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        reason = collective_failure(e, cfg.parallel.timeout_minutes)  # a rank that never arrived, or died
        if reason is None:
            raise
        print(f"maskllm-train: {reason}", file=sys.stderr)
        return 1
    finally:
        groups.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
