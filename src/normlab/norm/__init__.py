"""Normalization, for any model: the registry of norms (``registry``), their layers and
conversions (``layers``), population statistics (``stats``), every ``norm.*`` key (``spec``) and
the ``norm`` config checks derived from it (``schema``; both torch-free).

The public names are importable from ``normlab.norm`` itself; they are loaded on first use, so
``normlab.norm.schema`` checks a config without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "schema": "NORMS CUMULATIVE validate_norm_config divisors_hint".split(),
    "spec": "KEYS SPEC NormKey".split(),
    "layers": (
        "FrozenBatchNorm2d convert_to_frozen convert_to_batchnorm"
        " replace_modules is_batchnorm is_frozen_batchnorm batchnorm_layers"
        " is_norm_layer param_groups frozen_layer_names freeze_named_layers"
    ).split(),
    "variants": "BatchNorm2dAct GroupNormAct keep_children".split(),
    "convert": ["source_kind"],
    "registry": "CONSTRUCTORS convert_norm make_norm_factory norm_has_bias".split(),
    "stats": ["estimate_population_stats", "apply_population_stats", "update_population_stats"],
}
_WHERE = {name: home for home, names in _HOMES.items() for name in names}
__all__ = [*_WHERE, "NormConfigError"]


def __getattr__(name: str) -> Any:
    if name == "NormConfigError":
        from normlab.errors import NormConfigError

        return NormConfigError
    if name not in _WHERE:
        raise AttributeError(f"module 'normlab.norm' has no attribute {name!r}")
    return getattr(importlib.import_module(f"normlab.norm.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
