"""The ``norm`` config checks, before any layer is built, derived from the key table of
``normlab.norm.spec`` plus the rules that join keys.

Imports no torch (config errors answer before the heavy imports). A key left null (the YAML
default) or absent is *unset*: a converted layer keeps the model's own value (MobileNetV3's
BatchNorm keeps eps=0.001, momentum=0.01) and a freshly built layer gets PyTorch's default.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab.errors import NormConfigError
from normlab.norm.spec import CUMULATIVE, KEYS, NORMS, SPEC, is_int, value

__all__ = ["CUMULATIVE", "NORMS", "divisors_hint", "validate_norm_config"]


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise NormConfigError(f"norm.{key}", value, allowed)


def _require(key: str, v: Any) -> None:
    """A key the norm cannot do without (null is not allowed)."""
    _check(SPEC[key].check(v), key, v, SPEC[key].allowed)


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
    before any layer is built: every key of ``normlab.norm.spec`` that is set, then the rules
    that join keys. ``channels``: channel counts of the normalized layers when known before the
    model is built (the ConvNet's widths; other models are checked at conversion);
    ``max_epochs``: ``trainer.max_epochs`` (-1 or None: unbounded); ``check_files``: also check
    that ``norm.init_from`` is a file (a training-time concern: a model rebuilt from a checkpoint
    skips it; that the file holds BatchNorm statistics is the lifecycle's check,
    ``normlab.callbacks.norm_lifecycle.init_from_state_dict``). Unknown extra keys are ignored.

    Raises:
        NormConfigError: naming the key (``norm.momentum`` ...), the value and what is allowed.
    """
    name = cfg.get("name") if isinstance(cfg, Mapping) else None
    _check(name in NORMS, "name", name, SPEC["name"].allowed + " (e.g. norm=batchnorm)")
    get = cfg.get
    if name == "frozen" and get("init_from") is None:
        _require("calibration_batches", value(cfg, "calibration_batches"))
    if name in ("groupnorm", "gn_ws"):
        groups = get("num_groups")
        _require("num_groups", groups)
        bad = [c for c in channels if c % groups]
        if bad:
            allowed = f"it does not divide the channel count {bad[0]} of a normalized layer; use"
            allowed += " one of the "
            _check(False, "num_groups", groups, allowed + divisors_hint(channels))
    _check_freeze_at(get("freeze_at_epoch"), max_epochs)
    for key in KEYS[1:]:
        v = get(key.name)
        _check(v is None or key.check(v), key.name, v, key.allowed)
    for key in ("freeze_at_epoch", "precise_bn_batches"):
        needs_stats = get(key) not in (None, 0) and get("track_running_stats") is False
        _check(not needs_stats, key, get(key), "it needs norm.track_running_stats=true")
    path = get("init_from")
    if path is None or not check_files:
        return
    exists = isinstance(path, str | os.PathLike) and Path(path).expanduser().is_file()
    _check(exists, "init_from", path, "no such file; give a checkpoint or null")


def _check_freeze_at(epoch: Any, max_epochs: int | None) -> None:
    bounded = max_epochs is not None and max_epochs >= 0
    ok = epoch is None or (is_int(epoch) and 1 <= epoch and not (bounded and epoch >= max_epochs))
    if bounded and max_epochs < 2:
        allowed = f"trainer.max_epochs={max_epochs} leaves no later epoch to freeze at; raise it"
    else:
        upper = f"in [1, {max_epochs - 1}] (trainer.max_epochs={max_epochs})" if bounded else ">= 1"
        allowed = f"expected null or an epoch number {upper}; epoch 0 would freeze the"
        allowed += " initial zeros/ones (norm=frozen estimates statistics before the first step)"
    _check(ok, "freeze_at_epoch", epoch, allowed)
