"""Checks that must answer before Hydra creates the run dir or starts a launcher: a log dir that
cannot be written, a run dir that another run holds or has finished in (normlab/run_dir.py), a
SLURM launcher on a machine without SLURM, and an option whose optional extra (``.[slurm]``,
``.[optuna]``, ``.[wandb]``, ``.[mlflow]``) is not installed.

Each failure is one paragraph ``normlab: error: ...`` on stderr and exit status 2, with nothing
created. Imports neither torch nor Lightning.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# a run writes its config, log and checkpoints (the default ConvNet's: about 1 MiB each)
MIN_FREE_BYTES = 10 * 2**20


def _fail(message: str) -> NoReturn:
    print(f"normlab: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def unwritable_reason(directory: str | Path) -> str | None:
    """Why ``directory`` cannot be created or written (None if it can): the nearest existing
    ancestor is probed with a temp dir, removed at once (as root, permission bits say nothing),
    and its filesystem must have ``MIN_FREE_BYTES`` free."""
    path = Path(directory).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        Path(tempfile.mkdtemp(dir=existing, prefix=".normlab-probe-")).rmdir()
    except OSError as err:
        return f"{existing}: {err.strerror or err}"
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:  # else Hydra leaves a 0-byte config.yaml and a traceback
        return (
            f"{existing} has {free / 2**20:.1f} MiB free, too little for the run's config, log"
            f" and checkpoints (at least {MIN_FREE_BYTES >> 20} MiB)"
        )
    return None


def check_writable(directory: str | Path, key: str) -> None:
    """Exit 2 with a one-paragraph error when ``directory`` (the value of ``key``) cannot be
    created or written."""
    reason = unwritable_reason(directory)
    if reason is not None:
        _fail(
            f"{key}={directory} cannot be created ({reason}), so the run could save nothing."
            " Fix: set paths.log_dir to a writable directory with free space, e.g."
            " paths.log_dir=$HOME/normlab-logs"
        )


# what a command line may ask for that an optional extra installs: the option, the module it
# needs, the extra, what the extra is, and what to do instead
EXTRAS = (
    (
        "hydra/launcher=slurm",
        "hydra_plugins.hydra_submitit_launcher",
        "slurm",
        "the SLURM extra (Hydra's submitit launcher plugin)",
        "drop hydra/launcher=slurm to run the sweep's jobs on this machine",
    ),
    (
        "hparams_search=optuna",
        "hydra_plugins.hydra_optuna_sweeper",
        "optuna",
        "the Optuna extra (Hydra's Optuna sweeper plugin)",
        "sweep a list of values instead, e.g. -m model.optimizer.lr=0.001,0.003,0.01",
    ),
    (
        "logger=wandb",
        "wandb",
        "wandb",
        "the Weights & Biases extra (the wandb package)",
        "use logger=tensorboard or logger=csv",
    ),
    (
        "logger=mlflow",
        "mlflow",
        "mlflow",
        "the MLflow extra (the mlflow-skinny package)",
        "use logger=tensorboard or logger=csv",
    ),
)


def extra_command(extra: str) -> str:
    """The one command that installs an optional extra into the current environment."""
    return f'pip install -e ".[{extra}]"'


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (hydra_plugins) is not there either
        return False


def check_launcher_installed(argv: Sequence[str]) -> None:
    """An option that needs an optional extra which is not installed (``EXTRAS``): without this,
    Hydra stops with 'Could not load hydra/launcher/submitit_slurm' or Lightning with a
    ModuleNotFoundError, which do not say what to install."""
    given = {a.lstrip("+~") for a in argv}
    for option, module, extra, what, instead in EXTRAS:
        if option in given and not _installed(module):
            _fail(
                f"{option} needs {what}, which is not installed. Fix: {extra_command(extra)},"
                f" or {instead}"
            )


def _claim(config: DictConfig, run_dir: str, key: str, sweep: bool) -> None:
    """This run's dir is its own (see normlab.run_dir); eval.py never resumes into one."""
    from normlab.run_dir import RunDirError, claim_run_dir

    resume = config.hydra.job.name != "eval"
    try:
        claim_run_dir(run_dir, config.get("ckpt_path"), key, resume=resume, sweep=sweep)
    except RunDirError as err:
        _fail(str(err))


class Preflight(Callback):
    """Hydra callback (``configs/hydra/default.yaml``): before a run or sweep starts, check that
    its dir can be written and is no other run's, and that a SLURM launcher has SLURM to talk
    to."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(config.hydra.run.dir, "hydra.run.dir")
        _claim(config, config.hydra.run.dir, "hydra.run.dir", sweep=False)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(config.hydra.sweep.dir, "hydra.sweep.dir")
        target = str(config.hydra.launcher.get("_target_", ""))
        if "submitit" in target and "Slurm" in target and shutil.which("sbatch") is None:
            _fail(
                "hydra/launcher=slurm submits every job with SLURM's sbatch, which is not on this"
                " machine's PATH (not a SLURM login node?). Fix: run the command on a SLURM login"
                " node, or drop hydra/launcher=slurm to run the sweep's jobs here one after"
                f" another (the launcher itself comes with {extra_command('slurm')})"
            )
        _claim(config, config.hydra.sweep.dir, "hydra.sweep.dir", sweep=True)  # creates it
