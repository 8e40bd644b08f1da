"""What train.py and eval.py share: validate first, then import the heavy recipe, and turn user
errors into one paragraph on stderr with exit status 2.

Exit statuses: 0 done; 2 bad input, missing data, not a checkpoint, or a diverged loss (one
paragraph on stderr, prefixed ``normlab: error:``); 143 stopped by SIGTERM and 130 by Ctrl-C
(the shell's ``128 + signal`` convention): during training after saving ``checkpoints/last.ckpt``,
at any other time with one line that says what was saved and how to go on.
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
from normlab.errors import ConfigError, DivergenceError, NormlabError, SweepJobError
from normlab.extras import apply_extras
from normlab.run_dir import (
    check_resumes_here,
    created_by_this_run,
    is_rank_zero_process,
    release_run_dir,
)
from normlab.utils.process import keep_freed_memory

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


class _Terminated(BaseException):
    """SIGTERM outside Lightning's fit/test (which turn it into SIGTERMException themselves)."""


def _terminate(signum: int, frame: Any) -> None:
    # while Lightning runs, its handler is installed and calls this one after its own, and it
    # stops at the next batch boundary: raise only when this is the process's handler itself
    if signal.getsignal(signal.SIGTERM) is _terminate:
        raise _Terminated


def _reported(exc: BaseException) -> bool:
    """Whether PreemptionCheckpoint saved a checkpoint for this interruption and said so."""
    return any(getattr(e, "normlab_reported", False) for e in (exc, exc.__context__))


def _stopped(task: str, cfg: DictConfig, signum: int) -> str:
    """What an interruption outside training left on disk and how to go on; a run dir with no
    checkpoint in it is removed."""
    what = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
    saved = sorted(Path(cfg.paths.output_dir).glob("checkpoints/*.ckpt"))
    if task != "train" or not saved:
        _discard_empty_run_dir(cfg)
        return (
            f"normlab: interrupted by {what} before the {'training' if task == 'train' else 'test'}"
            " finished; nothing was saved: run the same command again"
        )
    best = next((p for p in saved if p.name != "last.ckpt"), saved[0])
    return (
        f"normlab: interrupted by {what} outside training; saved: {', '.join(map(str, saved))},"
        f" but no results.json: test the trained model with `python eval.py ckpt_path={best}`"
        " (or train on from checkpoints/last.ckpt with ckpt_path= and a larger trainer.max_epochs)"
    )


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_task(task: str, cfg: DictConfig) -> Any:
    """Run ``train`` or ``evaluate`` on a composed config."""
    started = False
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (a threaded launcher): the default stays
        previous = None
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
        keep_freed_memory()
        from normlab import run

        started = True
        return run.train(cfg) if task == "train" else run.evaluate(cfg)
    except NormlabError as err:
        if _in_multirun():
            # fail this job only (its dir and log stay): Hydra runs the sweep's other jobs, then
            # SweepSummary names every failed job in one paragraph
            log.error("normlab: error: %s", err)
            raise SweepJobError(str(err)) from None
        print(f"normlab: error: {err}", file=sys.stderr)
        if not started or not (Path(cfg.paths.output_dir) / "checkpoints").exists():
            _discard_empty_run_dir(cfg, err)
        sys.exit(2)
    except (KeyboardInterrupt, _Terminated) as exc:
        # outside Lightning's fit and test: imports, data loading, checks, eval.py's setup
        signum = int(signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT)
        print(_stopped(task, cfg, signum), file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    except SystemExit as exc:
        signum = _interrupt_signal(exc)
        if signum is None:
            raise
        if not _reported(exc):  # the test phase: Lightning stopped, nothing was saved for it
            print(_stopped(task, cfg, signum), file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
