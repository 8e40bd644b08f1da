"""The ``norm`` config: the list of norms and the checks of each key, before any layer is built.

Imports no torch (config errors answer before the heavy imports). A key left null (the YAML
default) or absent is *unset*: a converted layer keeps the model's own value (MobileNetV3's
BatchNorm keeps eps=0.001, momentum=0.01) and a freshly built layer gets PyTorch's default.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab.errors import CheckpointError, NormConfigError

NORMS: tuple[str, ...] = ("none", "batchnorm", "frozen", "groupnorm", "layernorm")
# the norm.* keys each norm takes (besides name); any other key set is refused, not ignored
NORM_KEYS: dict[str, tuple[str, ...]] = {
    "none": (),
    "batchnorm": (
        "momentum",
        "eps",
        "affine",
        "track_running_stats",
        "freeze_at_epoch",
        "precise_bn_batches",
        "distribute_bn",
    ),
    "frozen": ("eps", "affine", "momentum", "freeze_affine", "calibration_batches", "init_from"),
    "groupnorm": ("num_groups", "eps", "affine"),
    "layernorm": ("eps", "affine"),
}
# norm.momentum's spelling of PyTorch's momentum=None (a cumulative average): null means unset
CUMULATIVE = "cumulative"


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise NormConfigError(f"norm.{key}", value, allowed)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def divisors_hint(channels: Sequence[int]) -> str:
    """``"divisors of all of [24, 32]: [1, 2, 4, 8]"``: the num_groups values that fit."""
    common = functools.reduce(math.gcd, channels)
    divisors = [d for d in range(1, common + 1) if not common % d]
    return f"divisors of all of {list(channels)}: {divisors}"


def validate_norm_config(
    cfg: Mapping[str, Any],
    channels: Sequence[int] = (),
    max_epochs: int | None = None,
    check_files: bool = True,
) -> None:
    """Check a ``norm`` config (a mapping such as ``{"name": "groupnorm", "num_groups": 8}``)
    before any layer is built. ``channels``: channel counts of the normalized layers when known
    before the model is built (the ConvNet's widths; other models are checked at conversion);
    ``max_epochs``: ``trainer.max_epochs`` (-1 or None: unbounded); ``check_files``: also check
    that ``norm.init_from`` is a normlab checkpoint holding BatchNorm statistics (a training-time
    concern: a model rebuilt from a checkpoint skips it; this one imports torch).
    A key set that the norm does not take (:data:`NORM_KEYS`) is refused.

    Raises:
        NormConfigError: naming the key (``norm.momentum`` ...), the value and what is allowed.
        CheckpointError: ``norm.init_from`` is not a normlab checkpoint.
    """
    name = cfg.get("name") if isinstance(cfg, Mapping) else None
    _check(name in NORMS, "name", name, f"choose one of {', '.join(NORMS)} (e.g. norm=batchnorm)")
    _check_keys_taken(cfg, name)
    get = cfg.get
    m = get("momentum")
    allowed = f"expected a number in [0, 1], {CUMULATIVE!r} for a cumulative average, or null"
    allowed += " to keep each layer's own"
    _check(m in (None, CUMULATIVE) or (_is_real(m) and 0 <= m <= 1), "momentum", m, allowed)
    eps = get("eps")
    ok = eps is None or (_is_real(eps) and math.isfinite(eps) and eps > 0)
    _check(ok, "eps", eps, "expected a number > 0, or null to keep each layer's own")
    for key in ("affine", "track_running_stats", "freeze_affine", "distribute_bn"):
        _check(
            get(key) is None or isinstance(get(key), bool), key, get(key), "expected true or false"
        )
    n = get("precise_bn_batches") or 0
    _check(_is_int(n) and n >= 0, "precise_bn_batches", n, "expected an integer >= 0 (0: off)")
    if name == "frozen" and get("init_from") is None:
        n = get("calibration_batches", 20)
        allowed = "expected an integer >= 1 (the statistics need data), or set norm.init_from"
        _check(_is_int(n) and n >= 1, "calibration_batches", n, allowed)
    if name == "groupnorm":
        groups = get("num_groups")
        allowed = "expected an integer >= 1 (GroupNorm needs it; configs/norm/groupnorm.yaml has 8)"
        _check(_is_int(groups) and groups >= 1, "num_groups", groups, allowed)
        bad = [c for c in channels if c % groups]
        if bad:
            allowed = f"it does not divide the channel count {bad[0]} of a normalized layer; use"
            allowed += " one of the "
            _check(False, "num_groups", groups, allowed + divisors_hint(channels))
    _check_freeze_at(get("freeze_at_epoch"), max_epochs)
    for key in ("freeze_at_epoch", "precise_bn_batches"):
        needs_stats = get(key) not in (None, 0) and get("track_running_stats") is False
        _check(not needs_stats, key, get(key), "it needs norm.track_running_stats=true")
    path = get("init_from")
    if path is None or not check_files:
        return
    exists = isinstance(path, str | os.PathLike) and Path(path).expanduser().is_file()
    _check(exists, "init_from", path, "no such file; give a checkpoint or null")
    init_from_state_dict(path)


def _check_keys_taken(cfg: Mapping[str, Any], name: str) -> None:
    """A key set (not null) that norm ``name`` does not use would be silently ignored."""
    taken = NORM_KEYS.get(name, ())
    for key, value in cfg.items():
        if key == "name" or key in taken or value is None:
            continue
        others = [n for n, keys in NORM_KEYS.items() if key in keys]
        allowed = f"norm={name} does not use it (it takes {', '.join(taken) or 'no keys'});"
        allowed += f" drop it, or choose a norm that does ({', '.join(others) or 'none does'})"
        _check(False, key, value, allowed)


def _check_freeze_at(epoch: Any, max_epochs: int | None) -> None:
    bounded = max_epochs is not None and max_epochs >= 0
    ok = epoch is None or (_is_int(epoch) and 1 <= epoch and not (bounded and epoch >= max_epochs))
    if bounded and max_epochs < 2:
        allowed = f"trainer.max_epochs={max_epochs} leaves no later epoch to freeze at; raise it"
    else:
        upper = f"in [1, {max_epochs - 1}] (trainer.max_epochs={max_epochs})" if bounded else ">= 1"
        allowed = f"expected null or an epoch number {upper}; epoch 0 would freeze the"
        allowed += " initial zeros/ones (norm=frozen estimates statistics before the first step)"
    _check(ok, "freeze_at_epoch", epoch, allowed)


def init_from_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The ``state_dict`` of the normlab checkpoint ``norm.init_from`` names, checked to hold
    BatchNorm running statistics (it was trained with ``norm=batchnorm`` or ``norm=frozen``).

    Raises:
        CheckpointError: the file is not a normlab checkpoint, or has no running statistics.
    """
    from normlab.utils.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(Path(path).expanduser(), key="norm.init_from")
    state = checkpoint.get("state_dict") or {}
    if not any(k.endswith(".running_mean") for k in state):
        trained = ((checkpoint["normlab"].get("config") or {}).get("norm") or {}).get("name")
        raise CheckpointError(
            f"norm.init_from={path} holds no BatchNorm running statistics (its run used"
            f" norm={trained}); give a checkpoint of a norm=batchnorm or norm=frozen run"
            " with the same model, or leave norm.init_from=null to estimate them."
        )
    return state
