"""Test a checkpoint in eval mode: `python eval.py ckpt_path=PATH [overrides]`.

The model and data (including the training split's scaling statistics) are rebuilt from the
checkpoint itself; trainer, logger and `data.data_dir` / `data.batch_size` can be overridden.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("NORMLAB_ROOT", str(Path(__file__).resolve().parent))

from normlab.config import register_resolvers  # noqa: E402
from normlab.preflight import check_launcher_installed  # noqa: E402
from normlab.utils.process import skip_collection_at_exit  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    from normlab.cli import run_task

    metrics = run_task("eval", cfg)
    return (metrics or {}).get("test/acc")


if __name__ == "__main__":
    check_launcher_installed(sys.argv[1:])  # before Hydra composes a launcher it cannot find
    main()
    skip_collection_at_exit()  # the run is done: exit without walking every object (1.1 s)
