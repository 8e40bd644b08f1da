"""Run-start extras (``configs/extras/default.yaml``), as lightning-hydra-template has them:
``extras.enforce_tags`` refuses a run without tags, ``extras.print_config`` prints the composed
config as a tree. Imports neither torch nor Lightning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normlab.errors import ConfigError

# the tree's branches in this order, then every other top-level key
TREE_ORDER = ("data", "model", "norm", "trainer", "callbacks", "logger", "paths", "extras")


def apply_extras(cfg: DictConfig) -> None:
    """Check and print what ``cfg.extras`` asks for; nothing without an ``extras`` key.

    Raises:
        ConfigError: ``extras.enforce_tags`` is on and ``tags`` is empty or null.
    """
    extras = cfg.get("extras") or {}
    if extras.get("enforce_tags") and not cfg.get("tags"):
        tags = cfg.get("tags")
        raise ConfigError(
            "tags",
            OmegaConf.to_container(tags) if tags is not None else None,
            "extras.enforce_tags is on and the run has no tags; name what the run is for, e.g."
            " tags=[baseline,bn], or turn the check off with extras.enforce_tags=false",
        )
    if extras.get("print_config"):
        print_config_tree(cfg)


def print_config_tree(cfg: DictConfig, order: Sequence[str] = TREE_ORDER) -> None:
    """Print ``cfg`` (resolved) as a rich tree: one branch per config group, as YAML."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        value: Any = cfg[key]
        text = (
            OmegaConf.to_yaml(value, resolve=True)
            if isinstance(value, DictConfig)
            else str(OmegaConf.to_container(OmegaConf.create({key: value}), resolve=True)[key])
        )
        tree.add(key, style="dim", guide_style="dim").add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
