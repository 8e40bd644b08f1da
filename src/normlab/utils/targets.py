"""Which ``_target_`` normlab may import and call: the gate every data and model config passes
before anything in it is imported or built.

A config names Python callables (``_target_``), and building it calls them with the config's
values. The data and model configs of a checkpoint are data someone else may have written, so:

- normlab's own builders (:data:`NORMLAB_TARGETS`) and torch's optimizers and schedulers
  (classes of ``torch.optim`` / ``torch.optim.lr_scheduler``) are always allowed;
- from a checkpoint, any other target must be named by the user, in ``trusted_targets`` (a
  target, or a package or module that holds it); nothing of it is imported before that;
- from the user's own command line or config files (and for trusted checkpoint targets), a
  target must be a class of the kind its place builds: a ``LightningDataModule`` for ``data``, a
  ``LightningModule`` for ``model``, an ``nn.Module`` for ``model.net`` and nested targets, an
  optimizer or scheduler class for ``model.optimizer`` / ``model.scheduler``. A function (a
  factory of the user's) is allowed when ``trusted_targets`` names it exactly.

So ``os.system``, ``torch.load``, ``torch.save``, ``builtins.eval`` or ``subprocess.Popen`` are
never called unless the user wrote that very name into ``trusted_targets``.
A checkpoint's config is also refused when it holds a ``${...}`` interpolation (configs are saved
resolved); the adapters' own arguments are checked by the adapters (``timm_net`` reads no file).

Example::

    check_targets(saved["model"], "model", trusted=["my_project"], checkpoint="ckpt_path=x.ckpt")
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from normlab.errors import CheckpointError, ConfigError

NORMLAB_TARGETS = frozenset(
    {
        "normlab.data.NormLabDataModule",
        "normlab.data.datamodule.NormLabDataModule",
        "normlab.models.NormLabModule",
        "normlab.models.module.NormLabModule",
        "normlab.models.ConvNet",
        "normlab.models.backbone.ConvNet",
        "normlab.models.torchvision_net",
        "normlab.models.adapters.torchvision_net",
        "normlab.models.timm_net",
        "normlab.models.adapters.timm_net",
        "normlab.models.WarmupCosineLR",
        "normlab.models.schedules.WarmupCosineLR",
    }
)
TORCH_OPTIM_MODULES = ("torch.optim", "torch.optim.lr_scheduler")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
# what each place builds, as (module, class) so torch and lightning load only when needed
_KINDS = {
    "data": ("lightning", "LightningDataModule"),
    "model": ("lightning", "LightningModule"),
    "model.optimizer": ("torch.optim", "Optimizer"),
    "model.scheduler": ("torch.optim.lr_scheduler", "LRScheduler"),
}
_NESTED = ("torch.nn", "Module")  # model.net, and any target nested in another's arguments


def _targets(tree: Any, key: str) -> Iterator[tuple[str, Any]]:
    """Each ``(key, _target_)`` in a config tree, nested ones (``_args_``, lists) included."""
    if isinstance(tree, Mapping):
        if "_target_" in tree:
            yield f"{key}._target_", tree["_target_"]
        for name, value in tree.items():
            yield from _targets(value, f"{key}.{name}")
    elif isinstance(tree, Sequence) and not isinstance(tree, str | bytes):
        for i, value in enumerate(tree):
            yield from _targets(value, f"{key}[{i}]")


def _refuse_interpolations(tree: Any, key: str, checkpoint: str) -> None:
    """A checkpoint's config is saved resolved, so a ``${...}`` in it was put there by hand:
    building the config would resolve it (``${oc.env:SECRET}`` copies an environment variable
    into the run's logs)."""
    if isinstance(tree, Mapping):
        for name, value in tree.items():
            _refuse_interpolations(value, f"{key}.{name}", checkpoint)
    elif isinstance(tree, Sequence) and not isinstance(tree, str | bytes):
        for i, value in enumerate(tree):
            _refuse_interpolations(value, f"{key}[{i}]", checkpoint)
    elif isinstance(tree, str) and "${" in tree:
        raise CheckpointError(
            f"{checkpoint}: its saved config sets {key}={tree!r}, an interpolation that building"
            " it would resolve (normlab saves configs resolved, so this one was edited by hand);"
            " do not open it with normlab, or write the value itself into a copy of the file."
        )


def _kind(key: str) -> type:
    module, name = _KINDS.get(key.removesuffix("._target_"), _NESTED)
    return getattr(importlib.import_module(module), name)


def builtin_target(target: str) -> bool:
    """Whether normlab builds ``target`` itself: its builders, or a torch optimizer/scheduler."""
    if target in NORMLAB_TARGETS:
        return True
    module, _, name = target.rpartition(".")
    if module not in TORCH_OPTIM_MODULES:
        return False
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler

    found = getattr(importlib.import_module(module), name, None)
    return isinstance(found, type) and issubclass(found, Optimizer | LRScheduler)


def trusted_targets(value: Any) -> list[str]:
    """The ``trusted_targets`` key checked: a list of dotted names (targets, modules, packages).

    Raises:
        ConfigError: not a list of dotted names.
    """
    names = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if value is None:
        return []
    if names is None or not all(isinstance(n, str) and _DOTTED.fullmatch(n) for n in names):
        raise ConfigError(
            "trusted_targets",
            value,
            "expected a list of dotted names of your own classes, modules or packages, e.g."
            " trusted_targets=[my_project] or trusted_targets=[my_project.models.SmallNet]",
        )
    return names


def _named(target: str, trusted: Sequence[str]) -> bool:
    return any(target == t or target.startswith(f"{t}.") for t in trusted)


def import_target(key: str, target: str) -> Any:
    """The object ``target`` names; a module that is not on the path is named with the fix.

    Raises:
        ConfigError: the module cannot be imported, or has no such attribute.
    """
    from hydra.utils import get_object

    top = target.split(".")[0]
    try:
        return get_object(target)
    except Exception as err:
        missing = err if isinstance(err, ModuleNotFoundError) else err.__cause__
        if isinstance(missing, ModuleNotFoundError) and missing.name == top:
            raise ConfigError(
                key,
                target,
                f"Python cannot import its package {top!r}: put the directory that holds"
                f" {top}/ on PYTHONPATH (e.g. PYTHONPATH=path/to/project python eval.py ...) or"
                " install it",
            ) from None
        reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise ConfigError(key, target, f"it cannot be imported ({reason})") from None


def check_targets(
    cfg: Any,
    key: str,
    trusted: Sequence[str] = (),
    checkpoint: str | None = None,
) -> None:
    """Refuse any ``_target_`` in ``cfg`` (the config at ``key``, e.g. ``"model"``) that normlab
    may not call, before anything is imported from it (see the module docstring).

    Args:
        cfg: a data or model config (plain data or an OmegaConf node).
        key: its place in the run config: ``"data"`` or ``"model"``.
        trusted: the user's ``trusted_targets`` (targets, or packages/modules holding them).
        checkpoint: ``"ckpt_path=<file>"`` when ``cfg`` comes from a checkpoint: only builtin and
            trusted targets pass, and the others are not even imported.

    Raises:
        CheckpointError: a checkpoint's target the user has not named.
        ConfigError: a target that is not a class of the kind its place builds.
    """
    trusted = [str(t) for t in trusted or ()]
    if checkpoint is not None:
        _refuse_interpolations(cfg, key, checkpoint)
    for where, target in _targets(cfg, key):
        if not isinstance(target, str) or not _DOTTED.fullmatch(target):
            raise ConfigError(where, target, "expected the dotted name of a class, e.g. pkg.Class")
        if builtin_target(target):
            continue
        if checkpoint is not None and not _named(target, trusted):
            raise CheckpointError(
                f"{checkpoint}: its saved config sets {where}={target!r}, which is not one of"
                " normlab's own builders; opening a checkpoint imports and calls nothing else it"
                " names (anyone can write a checkpoint). If the checkpoint comes from your own"
                " run of your own code, trust that code by name: add"
                f" trusted_targets=[{target.split('.')[0]}] (your package or module; only classes"
                " of the kind each place builds are called from it)."
            )
        if target in trusted:  # named exactly: the user vouches for it, a factory function too
            continue
        found, kind = import_target(where, target), _kind(where)
        if not (isinstance(found, type) and issubclass(found, kind)):
            what = f"class {found.__name__}" if isinstance(found, type) else type(found).__name__
            raise ConfigError(
                where,
                target,
                f"it is a {what}, not a subclass of {kind.__module__}.{kind.__qualname__},"
                f" which is what {where.removesuffix('._target_')} builds; normlab calls only"
                " classes of that kind from a config. If it is your own factory and you trust it,"
                f" add trusted_targets=[{target}]",
            )


def check_saved_hyperparameters(
    checkpoint_path: Any, given: Mapping[str, Any], trusted: Sequence[str] = ()
) -> None:
    """``NormLabModule.load_from_checkpoint``: the checkpoint's saved hyperparameters (those
    ``given`` does not replace: net, optimizer, scheduler, ...) pass :func:`check_targets` as a
    checkpoint's config does in eval.py.

    Raises:
        CheckpointError: the file is not a normlab checkpoint, or names a target not trusted.
    """
    import torch

    if hasattr(checkpoint_path, "read"):  # a file object: read it, then rewind for Lightning
        start = checkpoint_path.tell()
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        checkpoint_path.seek(start)
    else:
        from normlab.utils.checkpoints import load_checkpoint

        checkpoint = load_checkpoint(checkpoint_path, key="checkpoint_path")
    hparams = checkpoint.get("hyper_parameters") or {}
    saved = {k: v for k, v in hparams.items() if k not in given}
    check_targets(saved, "model", trusted, checkpoint=f"checkpoint_path={checkpoint_path}")
