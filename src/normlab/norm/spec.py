"""Every ``norm.*`` key, once: its default, its check, which norms use it, whether a resumed run
may change it and whether it is a column of TensorBoard's HPARAMS table.

Everything else is derived from :data:`KEYS`: the checks of ``validate_norm_config`` (``schema``),
what an unset key means for a freshly built layer (``registry``), the resume table
(``normlab.resume``), the HPARAMS columns (``utils/results.py``) and the lifecycle's defaults
(``NormLifecycle.from_config``). ``configs/norm/<name>.yaml`` lists exactly the keys whose
``norms`` name it, with these defaults (``tests/test_norm.py`` holds them to it).

Adding a key: one :class:`NormKey` below, the line in the YAML of each norm that uses it, and the
code that reads it. Adding a norm: its name in :data:`NORMS` and in ``norms`` of the keys it
uses, its constructor in ``registry.py``, its YAML.

Imports nothing but the standard library: config errors answer before torch is imported.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NORMS: tuple[str, ...] = (
    "none",
    "batchnorm",
    "frozen",
    "groupnorm",
    "layernorm",
    "groupnorm1",
    "layernorm2d",
    "instancenorm",
    "batchrenorm",
    "ghostbatchnorm",
    "gn_ws",
)
# norm.momentum's spelling of PyTorch's momentum=None (a cumulative average): null means unset
CUMULATIVE = "cumulative"
# the norms that share BatchNorm's settings (the converted layers keep them)
_SCALED = NORMS[1:]
# the norms that normalize with the batch's statistics in training mode and keep BatchNorm's
# running statistics (a batch of one sample cannot be normalized; no SyncBatchNorm for the variants)
BATCH_STATS: tuple[str, ...] = ("batchnorm", "batchrenorm", "ghostbatchnorm")
_AFFINE = tuple(n for n in NORMS if n not in ("none", "frozen"))


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bool(value: Any) -> bool:
    return isinstance(value, bool)


@dataclass(frozen=True)
class NormKey:
    """One ``norm.*`` key.

    Attributes:
        name: the key, without ``norm.``.
        default: the value in ``configs/norm/<norm>.yaml`` (and what code uses when it is absent).
        norms: the norms whose config group lists the key.
        check: whether a set (not null) value is valid; ``allowed`` says what is, in errors.
        resume_may_change: a resumed run may give another value (it changes how the run goes
            on, not which model the checkpoint holds); otherwise the checkpoint must match.
        hparam: a column of TensorBoard's HPARAMS table in every run (a sweep over norms lines
            up); a key without it appears in the rows of the runs that set it.
        fresh: what null means for a freshly built layer (PyTorch's default); None: no layer
            setting (a converted layer keeps its own value when the key is null).
    """

    name: str
    default: Any
    norms: tuple[str, ...]
    check: Callable[[Any], bool]
    allowed: str
    resume_may_change: bool = False
    hparam: bool = True
    fresh: Any = None


_KEEP = "or null to keep each layer's own"
# in the order of the HPARAMS columns
KEYS: tuple[NormKey, ...] = (
    NormKey("name", None, NORMS, lambda v: v in NORMS, f"choose one of {', '.join(NORMS)}"),
    NormKey(
        "momentum",
        None,
        BATCH_STATS,
        lambda v: v == CUMULATIVE or (is_real(v) and 0 <= v <= 1),
        f"expected a number in [0, 1], {CUMULATIVE!r} for a cumulative average, {_KEEP}",
        fresh=0.1,
    ),
    NormKey(
        "eps",
        None,
        _SCALED,
        lambda v: is_real(v) and math.isfinite(v) and v > 0,
        f"expected a number > 0, {_KEEP}",
        fresh=1e-5,
    ),
    NormKey(
        "affine",
        None,
        _AFFINE,
        _bool,
        "expected true or false",
        fresh=True,
    ),
    NormKey(
        "track_running_stats",
        None,
        ("batchnorm",),
        _bool,
        "expected true or false",
        hparam=False,
        fresh=True,
    ),
    NormKey(
        "num_groups",
        8,
        ("groupnorm", "gn_ws"),
        lambda v: is_int(v) and v >= 1,
        "expected an integer >= 1 (GroupNorm needs it; configs/norm/groupnorm.yaml has 8)",
    ),
    NormKey(
        "precise_bn_batches",
        0,
        ("batchnorm",),
        lambda v: is_int(v) and v >= 0,
        "expected an integer >= 0 (0: off)",
        resume_may_change=True,
    ),
    NormKey(
        "distribute_bn",
        False,
        ("batchnorm",),
        _bool,
        "expected true or false",
        resume_may_change=True,
    ),
    NormKey(
        "freeze_at_epoch",
        None,
        ("batchnorm",),
        lambda v: is_int(v) and v >= 1,
        "expected null or an epoch number >= 1",
        resume_may_change=True,
    ),
    NormKey(
        "calibration_batches",
        20,
        ("frozen",),
        lambda v: is_int(v) and v >= 1,
        "expected an integer >= 1 (the statistics need data), or set norm.init_from",
        resume_may_change=True,
    ),
    NormKey(
        "init_from",
        None,
        ("frozen",),
        lambda v: isinstance(v, str | os.PathLike),
        "expected the path of a normlab checkpoint, or null",
        resume_may_change=True,
    ),
    NormKey("freeze_affine", False, ("frozen",), _bool, "expected true or false"),
    # converting a model's norm layers: carry gamma/beta into the new layers (null: when the
    # running statistics come along too, or the layer computes the same; true: whenever the
    # shapes allow; false: never)
    NormKey(
        "keep_affine",
        None,
        _SCALED,
        _bool,
        "expected true or false, or null (carry gamma/beta when the statistics come along)",
        hparam=False,
    ),
    # AdaBN (Li et al. 2016): re-estimate the running statistics on the test split before
    # testing (eval.py; in training, a second test reported as test_adapted/*); a norm without
    # running statistics has nothing to adapt
    NormKey(
        "adapt",
        None,
        NORMS,
        lambda v: v == "test",
        "choose test (AdaBN: statistics of the test data) or null",
        resume_may_change=True,
        hparam=False,
    ),
    # norm=none: fold each BatchNorm's eval-mode transform into the conv that alone feeds it
    NormKey("fold", True, ("none",), _bool, "expected true or false", hparam=False),
    # Batch Renormalization's limits and their linear warm-up from BatchNorm (r_max 1, d_max 0)
    NormKey(
        "r_max",
        3.0,
        ("batchrenorm",),
        lambda v: is_real(v) and math.isfinite(v) and v >= 1,
        "expected a number >= 1 (1 with d_max=0 is BatchNorm; the paper ends at 3)",
        hparam=False,
    ),
    NormKey(
        "d_max",
        5.0,
        ("batchrenorm",),
        lambda v: is_real(v) and math.isfinite(v) and v >= 0,
        "expected a number >= 0 (0 with r_max=1 is BatchNorm; the paper ends at 5)",
        hparam=False,
    ),
    NormKey(
        "renorm_warmup_steps",
        5000,
        ("batchrenorm",),
        lambda v: is_int(v) and v >= 0,
        "expected an integer >= 0 (training steps to reach r_max/d_max; 0: from the start)",
        hparam=False,
    ),
    NormKey(
        "virtual_batch_size",
        32,
        ("ghostbatchnorm",),
        lambda v: is_int(v) and v >= 1,
        "expected an integer >= 1 (samples per ghost batch; data.batch_size or more is BatchNorm)",
        hparam=False,
    ),
)
SPEC: dict[str, NormKey] = {key.name: key for key in KEYS}
assert all(set(key.norms) <= set(NORMS) for key in KEYS)

# PyTorch's defaults: what an unset (null) key means for a freshly built layer
FRESH: dict[str, Any] = {key.name: key.fresh for key in KEYS if key.fresh is not None}
# norm keys a resumed run may change, and the HPARAMS columns every run declares
RESUME_MAY_CHANGE: tuple[str, ...] = tuple(f"norm.{k.name}" for k in KEYS if k.resume_may_change)
HPARAM_KEYS: tuple[str, ...] = tuple(key.name for key in KEYS if key.hparam)


def defaults(norm: str) -> dict[str, Any]:
    """The config group ``configs/norm/<norm>.yaml`` holds: ``{"name": norm, key: default}``
    for every key the norm uses."""
    return {"name": norm, **{k.name: k.default for k in KEYS[1:] if norm in k.norms}}


def value(cfg: Any, key: str) -> Any:
    """``cfg[key]``, or the spec's default when the config lacks the key (a config built in
    Python need not list every key)."""
    return cfg.get(key, SPEC[key].default)
