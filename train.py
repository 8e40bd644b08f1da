"""Train a CNN with configurable normalization: `python train.py norm=batchnorm [overrides]`.

Configs live in configs/ (see `python train.py --help`); torch and Lightning are imported only
after the config is composed and validated, so help and config errors answer fast.
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


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from normlab.cli import run_task

    metrics = run_task("train", cfg)
    # returned to Hydra's sweepers (e.g. an Optuna sweep optimizing val/acc)
    return (metrics or {}).get("val/acc")


if __name__ == "__main__":
    check_launcher_installed(sys.argv[1:])  # before Hydra composes a launcher it cannot find
    main()
    skip_collection_at_exit()  # the run is done: exit without walking every object (1.1 s)
