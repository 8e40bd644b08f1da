"""What train.py and eval.py share: validate first, then import the heavy recipe, and turn user
errors into one paragraph on stderr with exit status 2.

Exit statuses: 0 done; 2 bad input, missing data, not a checkpoint, or a diverged loss (one
paragraph on stderr, prefixed ``normlab: error:``); 143 stopped by SIGTERM and 130 by Ctrl-C,
after saving ``checkpoints/last.ckpt`` (the shell's ``128 + signal`` convention).
"""

from __future__ import annotations

import logging
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normlab.config import validate_eval_config, validate_train_config
from normlab.errors import ConfigError, NormlabError

log = logging.getLogger("normlab")


def _discard_empty_run_dir(cfg: DictConfig) -> None:
    """A run that never started leaves nothing behind: remove its dir if it holds only the
    composed config and the log Hydra created."""
    try:
        run_dir = Path(cfg.paths.output_dir)
    except Exception:
        return
    if run_dir.is_dir() and all(
        p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()
    ):
        shutil.rmtree(run_dir, ignore_errors=True)


def check_checkpoint_arg(task: str, cfg: DictConfig, container: dict[str, Any]) -> None:
    """Fail before the heavy imports when ``ckpt_path`` cannot be used: a file that
    ``torch.load(weights_only=True)`` cannot read as a normlab checkpoint, or (train.py) one that
    holds another model than the command builds, or has nothing left to train. ``last`` is
    resolved here, once, to the checkpoint it picks, and the log says which and why."""
    from normlab.resume import check_resumable, find_last_checkpoint
    from normlab.utils.checkpoints import load_checkpoint

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return
    if task != "train":
        load_checkpoint(ckpt_path)
        return
    resuming = bool(container.get("train", True))  # train=false only tests the checkpoint
    if ckpt_path == "last":
        task_dir = Path(cfg.paths.log_dir) / cfg.task_name
        path, passed_over = find_last_checkpoint(
            task_dir, Path(cfg.paths.output_dir), current=container, resuming=resuming
        )
        for line in passed_over:
            log.warning("ckpt_path=last: passed over %s", line)
        log.info(
            "ckpt_path=last: %s %s, the newest last.ckpt under %s that holds this command's model",
            "resuming" if resuming else "testing",
            path,
            task_dir,
        )
        cfg.ckpt_path = str(path)
        return
    check_resumable(load_checkpoint(ckpt_path), Path(ckpt_path), container, resuming=resuming)


def _interrupt_signal(exc: SystemExit) -> int | None:
    """The signal behind Lightning's exit from ``Trainer.fit``: SIGTERM (``SIGTERMException``)
    or SIGINT (``sys.exit(1)`` while handling KeyboardInterrupt); None for any other exit."""
    if type(exc).__name__ == "SIGTERMException":
        return int(signal.SIGTERM)
    if isinstance(exc.__context__, KeyboardInterrupt):
        return int(signal.SIGINT)
    return None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_task(task: str, cfg: DictConfig) -> Any:
    """Run ``train`` or ``evaluate`` on a composed config."""
    started = False
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            example = (
                "logs/train/runs/<run>/checkpoints/last.ckpt"
                if missing[0] == "ckpt_path"
                else "..."
            )
            raise ConfigError(
                missing[0],
                "???",
                f"this key is required; add it to the command line, e.g. {missing[0]}={example}",
            )
        container = OmegaConf.to_container(cfg, resolve=True)
        if task == "train":
            validate_train_config(container)
        else:
            validate_eval_config(container)
        check_checkpoint_arg(task, cfg, container)
        log.info("run dir: %s", Path(cfg.paths.output_dir).resolve())
        from normlab import run

        started = True
        return run.train(cfg) if task == "train" else run.evaluate(cfg)
    except NormlabError as err:
        print(f"normlab: error: {err}", file=sys.stderr)
        if _in_multirun():
            # fail this job only (its dir and log stay for the sweep summary): Hydra runs the
            # sweep's other jobs, then reports the failure
            raise RuntimeError(f"normlab: error: {err}") from None
        if not started or not (Path(cfg.paths.output_dir) / "checkpoints").exists():
            _discard_empty_run_dir(cfg)
        sys.exit(2)
    except KeyboardInterrupt:
        # Ctrl-C outside Trainer.fit (which handles it itself, see PreemptionCheckpoint)
        _discard_empty_run_dir(cfg)
        print(
            "normlab: interrupted by Ctrl-C outside training; nothing more was saved",
            file=sys.stderr,
        )
        sys.exit(128 + int(signal.SIGINT))
    except SystemExit as exc:
        signum = _interrupt_signal(exc)
        if signum is None:
            raise
        sys.exit(128 + signum)
