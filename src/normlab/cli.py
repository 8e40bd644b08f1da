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

from normlab.config import expand_user_paths, validate_eval_config, validate_train_config
from normlab.errors import ConfigError, DivergenceError, NormlabError
from normlab.extras import apply_extras
from normlab.run_dir import (
    check_resumes_here,
    created_by_this_run,
    is_rank_zero_process,
    release_run_dir,
)

log = logging.getLogger("normlab")


def _discard_empty_run_dir(cfg: DictConfig, err: BaseException | None = None) -> None:
    """A run that never started leaves nothing behind: remove its dir if it holds only the
    composed config and the log Hydra created, or, when this run created the dir, anything but a
    checkpoint (a refusal at the start of fit leaves TensorBoard files) unless it diverged. A
    dir that existed before this run, or a DDP rank > 0's, is never removed."""
    try:
        run_dir = Path(cfg.paths.output_dir)
    except Exception:
        return
    created = created_by_this_run(run_dir)
    if created is False or not is_rank_zero_process():
        return
    nothing_saved = not (run_dir / "checkpoints").exists()
    if created and nothing_saved and not isinstance(err, DivergenceError):
        release_run_dir(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
    elif run_dir.is_dir() and all(
        p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()
    ):
        shutil.rmtree(run_dir, ignore_errors=True)


def check_checkpoint_arg(
    task: str, cfg: DictConfig, container: dict[str, Any]
) -> list[tuple[int, str]]:
    """Fail before the heavy imports when ``ckpt_path`` cannot be used: a file that
    ``torch.load(weights_only=True)`` cannot read as a normlab checkpoint, or (train.py) one that
    holds another model than the command builds, or has nothing left to train. ``last`` is
    resolved here, once, to the checkpoint it picks; returns the log lines that say which and
    why, ``(level, message)``, for the caller to print after the run dir."""
    from normlab.resume import check_resumable, find_last_checkpoint
    from normlab.utils.checkpoints import load_checkpoint

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return []
    if task != "train":
        load_checkpoint(ckpt_path)
        return []
    resuming = bool(container.get("train", True))  # train=false only tests the checkpoint
    if ckpt_path == "last":
        task_dir = Path(cfg.paths.log_dir) / cfg.task_name
        path, passed_over = find_last_checkpoint(
            task_dir, Path(cfg.paths.output_dir), current=container, resuming=resuming
        )
        lines = [(logging.WARNING, f"ckpt_path=last: passed over {line}") for line in passed_over]
        verb = "resuming" if resuming else "testing"
        lines.append(
            (
                logging.INFO,
                f"ckpt_path=last: {verb} {path}, the newest last.ckpt under {task_dir} that holds"
                " this command's model",
            )
        )
        cfg.ckpt_path = str(path)
        return lines
    check_resumable(load_checkpoint(ckpt_path), Path(ckpt_path), container, resuming=resuming)
    return []


def config_groups_help() -> str:
    """``--help``'s list of config groups and their options, as Hydra's ``$APP_CONFIG_GROUPS``
    writes it (a user's own config dirs included) but without the structured configs that model
    files start from (``normlab_cnn``, ``normlab_module``), which are no choice of their own."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    from normlab.models.defaults import INTERNAL_MODEL_CONFIGS

    loader = GlobalHydra.instance().config_loader()

    def groups(parent: str) -> list[str]:
        found = []
        for name in loader.list_groups(parent):
            group = f"{parent}/{name}" if parent else name
            if loader.get_group_options(group, ObjectType.CONFIG):
                found.append(group)
            found += groups(group)
        return found

    lines = []
    for group in sorted(g for g in groups("") if not g.startswith("hydra")):
        options = sorted(loader.get_group_options(group))
        if group == "model":
            options = [o for o in options if o not in INTERNAL_MODEL_CONFIGS]
        lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


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
        expand_user_paths(cfg)
        container = OmegaConf.to_container(cfg, resolve=True)
        if task == "train":
            validate_train_config(container)
        else:
            validate_eval_config(container)
        apply_extras(cfg)
        checkpoint_notes = check_checkpoint_arg(task, cfg, container)
        if task == "train":
            check_resumes_here(cfg.paths.output_dir, cfg.get("ckpt_path"))
        log.info("run dir: %s", Path(cfg.paths.output_dir).resolve())
        for level, message in checkpoint_notes:
            log.log(level, message)
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
            _discard_empty_run_dir(cfg, err)
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
