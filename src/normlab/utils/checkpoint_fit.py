"""Whether a checkpoint fits what this command built: the data's classes (eval.py) and the
model's tensors (train.py with ``ckpt_path``), checked before anything runs, so a mismatch is one
paragraph naming what differs instead of wrong labels or Lightning's ``Error(s) in loading
state_dict`` after the setup.

Example::

    check_classes(checkpoint, datamodule, "ckpt_path=run.ckpt", "data.data_dir=photos")
    check_resume_fits("run.ckpt", model, training=True)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from normlab.errors import CheckpointError
from normlab.utils.checkpoints import load_checkpoint

log = logging.getLogger("normlab")
CHECKPOINT_KEY = "normlab"
_SHOWN = 6  # names listed per kind of difference; the rest are counted


def data_classes(datamodule: Any) -> list[str] | None:
    """The class names of a DataModule in label order (its ``classes``), or None if it has none."""
    classes = getattr(datamodule, "classes", None)
    return [str(c) for c in classes] if isinstance(classes, list | tuple) else None


def _listed(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_classes(
    checkpoint: Mapping[str, Any], datamodule: Any, ckpt: str, data: str, other: str = ""
) -> None:
    """Refuse data whose classes are not those the checkpoint's model was trained on: another
    number of classes, or other names (or order) of the labels, which would score the model's
    predictions against other labels. A checkpoint from before class names were saved is checked
    on the number of classes only (logged).

    Args:
        checkpoint: the loaded checkpoint; ckpt: ``"ckpt_path=<file>"``; data: where the data
            comes from, e.g. ``"data.data_dir=photos"``; other: another way out, added to the fix.

    Raises:
        CheckpointError: naming both lists of classes and the fix.
    """
    entry = checkpoint.get(CHECKPOINT_KEY) or {}
    saved = entry.get("classes")
    saved_num = entry.get("num_classes") or (checkpoint.get("hyper_parameters") or {}).get(
        "num_classes"
    )
    names, num = data_classes(datamodule), datamodule.num_classes
    fix = f"give the data it was trained on ({data} holds other classes){other}"
    if saved_num is not None and saved_num != num:
        trained = f" ({_listed(saved)})" if saved else ""
        here = f" ({_listed(names)})" if names else ""
        raise CheckpointError(
            f"{ckpt} holds a model for {saved_num} classes{trained}, and the data has {num}"
            f"{here}: its outputs cannot be scored against these labels; {fix}."
        )
    if saved is None:
        log.info(
            "%s stores no class names (written before normlab saved them): only the number of"
            " classes (%s) is checked, not which class each label is",
            ckpt,
            num,
        )
        return
    if names is not None and names != saved:
        differ = [
            f"{i}: {a!r} vs {b!r}"
            for i, (a, b) in enumerate(zip(saved, names, strict=False))
            if a != b
        ]
        raise CheckpointError(
            f"{ckpt} was trained on the classes {_listed(saved)}, and the data's classes are"
            f" {_listed(names)} (label: checkpoint vs data: {_listed(differ)}): its predictions"
            f" would be scored against other labels; {fix}."
        )


def check_weights_fit(saved: Mapping[str, Any], model: Any, ckpt: str, fix: str) -> None:
    """Dry-run ``model.load_state_dict(saved)`` (strict, as Lightning loads a checkpoint): refuse
    tensors missing from ``saved``, tensors the model does not have, and tensors of another
    shape, naming them.

    Raises:
        CheckpointError: naming the keys of each kind and ``fix``.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [
        f"{k} {list(saved[k].shape)} vs {list(own[k].shape)}"
        for k in own
        if k in saved and hasattr(saved[k], "shape") and saved[k].shape != own[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = [
        f"{what}: {_listed(keys)}"
        for what, keys in (
            ("missing from the checkpoint", missing),
            ("not in this model", unexpected),
            ("another shape (checkpoint vs model)", shapes),
        )
        if keys
    ]
    raise CheckpointError(
        f"{ckpt}: its weights do not fit the model this command builds ({'; '.join(parts)}); {fix}."
    )


def check_resume_fits(
    path: str | Path, model: Any, training: bool, datamodule: Any = None, data: str = ""
) -> None:
    """train.py's ``ckpt_path`` (``last`` resolved): refuse, before the Trainer is set up, a
    checkpoint whose weights do not fit the model the command built (with ``ckpt_strict=false``
    the settings may differ; the tensors must not), and, given the ``datamodule`` (read from
    ``data``), data with other classes than it was trained on. ``training``: train=true
    (resume), else train=false (test the checkpoint).

    Raises:
        CheckpointError: naming the keys (:func:`check_weights_fit`) or classes, and the fix.
    """
    fix = "rebuild the model it holds (without ckpt_strict=false, the settings that differ are"
    fix += " listed)"
    if not training:
        fix += f", or test it with python eval.py ckpt_path={path}, which rebuilds its model"
    checkpoint = load_checkpoint(path)
    if datamodule is not None:
        other = ", or add ckpt_strict=false to train on these classes anyway"
        check_classes(checkpoint, datamodule, f"ckpt_path={path}", data, other)
    check_weights_fit(checkpoint["state_dict"], model, f"ckpt_path={path}", fix)
