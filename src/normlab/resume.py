"""Resuming a run, in one place: what a checkpoint must match and what may change (one table),
``ckpt_path=last``, and the layers frozen in training.

How a resumed run goes on exactly where it stopped, and where each part lives:

- **the model**: the checkpoint's run config must build the same model as the resuming command:
  every ``model.*``, ``norm.*`` and identity ``data.*`` key not in :data:`RESUME_MAY_CHANGE`
  must match (:func:`check_resumable`, called by ``normlab.cli`` before anything is built);
  ``ckpt_strict=false`` lifts the check. The norm keys' rules come from ``normlab.norm.spec``.
- **layers frozen in training** (``norm.freeze_at_epoch``): :func:`save_frozen_layers` lists them
  in the checkpoint and :func:`restore_frozen_layers` freezes them again before the weights load
  (``NormLabModule.on_save_checkpoint`` / ``on_load_checkpoint``: Lightning restores callbacks
  only after the weights, so this is the model's).
- **the learning-rate schedule** follows the resuming command's horizon:
  ``callbacks/schedule_horizon.py`` (``ScheduleHorizon``, one of the model's callbacks).
- **random state** (dropout masks, batch order): ``callbacks/rng_state_checkpoint.py``
  (``RNGStateCheckpoint``, ``callbacks.rng_state`` in configs/callbacks/default.yaml).
- **preemption** (SIGTERM, Ctrl-C): ``callbacks/preemption_checkpoint.py`` writes a resumable
  ``last.ckpt`` (``callbacks.preemption``); :func:`find_last_checkpoint` finds it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from normlab.errors import CheckpointError
from normlab.norm.spec import RESUME_MAY_CHANGE as NORM_RESUME_MAY_CHANGE
from normlab.utils.checkpoints import CHECKPOINT_KEY, load_checkpoint

log = logging.getLogger("normlab")
FROZEN_LAYERS = "frozen_layers"  # the checkpoint entry (under CHECKPOINT_KEY) that lists them

# The table. Settings a resumed run may change: how it is optimized, sped up or how its
# statistics are (re)estimated (the norm keys: normlab.norm.spec). Every other model.*, norm.*
# and DATA_IDENTITY setting must match: it makes another model.
RESUME_MAY_CHANGE = (
    "model.optimizer",
    "model.scheduler",
    "model.compile",
    "model.channels_last",
    "model.weights",
    *NORM_RESUME_MAY_CHANGE,
)
# data settings that decide the model's input and output (the rest: where and how it is read)
DATA_IDENTITY = ("data._target_", "data.name", "data.image_size", "data.synthetic")


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}"))
        return out
    return {prefix: tree}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _identity(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened settings that decide which model a run config builds."""
    flat = {**_flatten(cfg.get("model") or {}, "model"), **_flatten(cfg.get("norm") or {}, "norm")}
    flat.update(_flatten(cfg.get("data") or {}, "data"))
    return {
        k: v
        for k, v in flat.items()
        if not _under(k, RESUME_MAY_CHANGE)
        and (not k.startswith("data.") or _under(k, DATA_IDENTITY))
    }


def _override(key: str, value: Any) -> str:
    """``key=value`` as it is typed on a Hydra command line."""
    if key == "norm.name":
        return f"norm={value}"
    text = "null" if value is None else json.dumps(value, separators=(",", ":"))
    return f"{key}={text.strip(chr(34)) if isinstance(value, str) else text}"


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The model, norm and data settings in which a checkpoint's run config (``saved``) and the
    current one differ, as ``key=<checkpoint's value>`` overrides that would rebuild the
    checkpoint's model; empty when the checkpoint holds the model this command builds. When the
    norm (or data set) itself differs, only ``norm=<name>`` (``data=<name>``) is listed."""
    old, new = _identity(saved), _identity(current)
    keys = sorted(set(old) | set(new))
    for group in ("norm", "data"):
        if old.get(f"{group}.name") != new.get(f"{group}.name"):
            keys = [k for k in keys if not k.startswith(f"{group}.") or k == f"{group}.name"]
    return [_override(k, old.get(k)) for k in keys if old.get(k) != new.get(k)]


def _refused_differences(checkpoint: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """:func:`config_differences` of the checkpoint's run config and ``current``; none with
    ``ckpt_strict=false``."""
    if not current.get("ckpt_strict", True):
        return []
    saved = (checkpoint.get(CHECKPOINT_KEY) or {}).get("config") or {}
    return config_differences(saved, current)


def _another_model(differences: list[str]) -> str:
    return f"it holds another model than this command builds, trained with {' '.join(differences)}"


def model_mismatch(checkpoint: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Why ``checkpoint`` holds another model than the ``current`` config builds (its
    model/norm/data settings differ), or None; None as well with ``ckpt_strict=false``."""
    differences = _refused_differences(checkpoint, current)
    if not differences:
        return None
    return (
        f"{_another_model(differences)}: to resume it, add those overrides; to go on with this "
        "command's settings anyway (the weights must still fit, e.g. norm=batchnorm <-> "
        "norm=frozen), add ckpt_strict=false"
    )


def nothing_left(checkpoint: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Why resuming ``checkpoint`` would train nothing (it has trained ``trainer.max_epochs``
    epochs already), or None."""
    epochs = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    done = epochs.get("current", {}).get("processed", 0)
    max_epochs = (current.get("trainer") or {}).get("max_epochs", -1)
    if max_epochs is None or not 0 <= max_epochs <= done:
        return None
    return (
        f"it has already trained {done} epoch(s) and trainer.max_epochs={max_epochs}, so "
        f"resuming it would train nothing: raise trainer.max_epochs above {done} to train "
        "on, or test it with eval.py"
    )


def check_resumable(
    checkpoint: Mapping[str, Any],
    path: Path,
    current: Mapping[str, Any],
    key: str = "ckpt_path",
    resuming: bool = True,
) -> None:
    """Refuse a checkpoint that would not continue the run the ``current`` config describes
    (:func:`model_mismatch`; with ``resuming``, i.e. ``train=true``, :func:`nothing_left` too).

    Raises:
        CheckpointError: naming the settings that differ, or the epochs, and the fix.
    """
    problem = model_mismatch(checkpoint, current)
    problem = problem or (nothing_left(checkpoint, current) if resuming else None)
    if problem:
        raise CheckpointError(f"{key}={path}: {problem}.")


def find_last_checkpoint(
    task_dir: Path,
    exclude: Path | None = None,
    current: Mapping[str, Any] | None = None,
    resuming: bool = True,
) -> tuple[Path, list[str]]:
    """``ckpt_path=last``: the most recently written ``checkpoints/last.ckpt`` under ``task_dir``
    (the task's runs and sweep jobs) that loads as a normlab checkpoint and, given the
    ``current`` config, holds the model it builds (:func:`check_resumable`; ``resuming``:
    training goes on from it, so it must have epochs left).

    Returns the path and a line for each newer candidate passed over, saying why.

    Raises:
        CheckpointError: no candidate, or none usable (each one listed with its reason).
    """
    candidates = sorted(
        (
            p
            for p in task_dir.glob("**/checkpoints/last.ckpt")
            if exclude is None or exclude.resolve() not in p.resolve().parents
        ),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    if not candidates:
        raise CheckpointError(
            f"ckpt_path=last: no checkpoints/last.ckpt under {task_dir}; train a run of this"
            " task_name first, or give the checkpoint's path."
        )
    passed_over: list[str] = []
    for path in candidates:
        try:
            checkpoint = load_checkpoint(path, key="ckpt_path=last")
        except CheckpointError as err:
            passed_over.append(str(err))
            continue
        differences = _refused_differences(checkpoint, current) if current is not None else []
        if differences:
            passed_over.append(f"{path}: {_another_model(differences)}")
            continue
        finished = nothing_left(checkpoint, current) if current and resuming else None
        if finished:  # the newest run of this model is finished: say so, do not go back
            raise CheckpointError(f"ckpt_path=last picked {path}: {finished}.")
        return path, passed_over
    listed = "; ".join(passed_over[:5]) + ("; ..." if len(passed_over) > 5 else "")
    raise CheckpointError(
        f"ckpt_path=last: none of the {len(candidates)} checkpoints/last.ckpt under {task_dir}"
        f" can be resumed by this command: {listed}. Give a checkpoint's path, or use another"
        " task_name for a new experiment."
    )


def save_frozen_layers(model: Any, entry: dict[str, Any]) -> None:
    """List ``model``'s frozen BatchNorm layers in the checkpoint ``entry``: which layers are
    frozen is part of the model's state (``norm.freeze_at_epoch``)."""
    from normlab.norm.layers import frozen_layer_names

    entry[FROZEN_LAYERS] = frozen_layer_names(model)


def restore_frozen_layers(model: Any, entry: Mapping[str, Any]) -> None:
    """Before the weights load: a layer frozen in the checkpoint stays frozen, whatever the
    command line says (a run resumed past ``norm.freeze_at_epoch`` without repeating it)."""
    from normlab.norm.layers import freeze_named_layers

    frozen = freeze_named_layers(model, entry.get(FROZEN_LAYERS, []))
    if frozen:
        log.info("checkpoint: %d BatchNorm layers frozen as in the checkpoint", len(frozen))
