"""Why BatchNorm was introduced: saturated sigmoid/tanh units and per-layer gradient norms."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from normlab.callbacks._tensorboard import (
    check_count,
    lightning_step,
    log_scalars,
    scalar_loggers,
    to_host,
)

log = logging.getLogger("normlab")

SATURATING = (nn.Sigmoid, nn.Tanh)


def saturation_threshold(activation: nn.Module, margin: float) -> float:
    """The pre-activation magnitude beyond which ``activation``'s output lies within ``margin``
    of its range (as a fraction of the range) of either end: ``ln((1 - m) / m)`` for sigmoid
    (2.944 for m=0.05: outputs below 0.05 or above 0.95), ``atanh(1 - 2m)`` for tanh (1.472 for
    m=0.05: outputs beyond +-0.9)."""
    if isinstance(activation, nn.Sigmoid):
        return math.log((1 - margin) / margin)
    if isinstance(activation, nn.Tanh):
        return math.atanh(1 - 2 * margin)
    raise TypeError(f"{type(activation).__name__} is not a saturating activation (sigmoid, tanh)")


def saturated_fraction(pre_activation: Tensor, threshold: float) -> Tensor:
    """Fraction of entries with ``|x| > threshold``, as a 0-d tensor (no host sync)."""
    return (pre_activation.detach().abs() > threshold).float().mean()


def layer_grad_norms(model: nn.Module) -> dict[str, Tensor]:
    """``{module name: L2 norm of the gradients of its own parameters}`` for every module with
    parameters that have gradients (0-d tensors on the parameters' device, no host sync)."""
    norms = {}
    for name, module in model.named_modules():
        grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
        if grads:
            norms[name] = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
            )
    return norms


class SaturationMonitor(Callback):
    """Every ``every_n_steps`` optimizer steps, logs the fraction of saturated units of each
    sigmoid/tanh activation and the gradient norm of each layer: deep sigmoid networks without
    normalization saturate and their early layers' gradients vanish.

    Scalars through every logger at Lightning's step of the batch (where its ``train/loss`` is):
    ``saturation/<activation module>``, the fraction of the activation's inputs (pre-activations)
    in the saturated range (see :func:`saturation_threshold`; averaged over the micro-batches of
    that step) and, with ``grad_norms``, ``grad_norm/<module>``, the L2 norm of the gradients of
    the module's own parameters, read just before the optimizer step (after AMP unscaling).
    Module names are those of the LightningModule's ``named_modules()``. One host copy per
    logging step. Only global rank 0 measures. Networks without sigmoid/tanh (ReLU, the default)
    log gradient norms only.

    Args:
        every_n_steps: cadence in optimizer steps (>= 1).
        margin: an output within this fraction of the activation's range of either end counts as
            saturated (0 < margin < 0.5).
        grad_norms: also log per-layer gradient norms.

    Raises:
        ConfigError: ``every_n_steps`` not an integer >= 1 or ``margin`` outside (0, 0.5).

    Example::

        from normlab.callbacks.saturation_monitor import SaturationMonitor
        trainer = Trainer(callbacks=[SaturationMonitor(every_n_steps=20)])
        trainer.fit(model)  # saturation/* and grad_norm/* in TensorBoard
    """

    def __init__(self, every_n_steps: int = 20, margin: float = 0.05, grad_norms: bool = True):
        from normlab.errors import ConfigError

        self.every_n_steps = check_count("callbacks.saturation.every_n_steps", every_n_steps)
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 < margin < 0.5:
            key, allowed = "callbacks.saturation.margin", "expected a number in (0, 0.5)"
            raise ConfigError(key, margin, allowed)
        self.margin, self.grad_norms = float(margin), bool(grad_norms)
        self._handles: list[Any] = []
        self._sums: dict[str, list[Tensor]] = {}  # name -> [sum of fractions, micro-batches]
        self._step = -1
        self._told = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = lightning_step(trainer)
        if step % self.every_n_steps or not scalar_loggers(trainer):
            return
        if self._step != step:  # the first micro-batch of a logging step
            self._remove_hooks()
            self._sums, self._step = {}, step
            acts = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, SATURATING)]
            if not acts and not self._told:
                log.debug("SaturationMonitor: no sigmoid/tanh activations; logging gradient norms")
            self._told = True
            for name, act in acts:
                hook = self._hook(name, saturation_threshold(act, self.margin))
                self._handles.append(act.register_forward_pre_hook(hook))

    def _hook(self, name: str, threshold: float) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            if not torch.is_grad_enabled():  # training forwards only, not extra no-grad passes
                return
            fraction = saturated_fraction(args[0], threshold)
            if name in self._sums:
                self._sums[name][0] += fraction
                self._sums[name][1] += 1
            else:
                self._sums[name] = [fraction, torch.ones_like(fraction)]

        return hook

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if self._step != lightning_step(trainer) or self._step < 0:
            return
        self._remove_hooks()
        grads = layer_grad_norms(pl_module) if self.grad_norms else {}
        tags = [f"saturation/{n}" for n in self._sums] + [f"grad_norm/{n}" for n in grads]
        fractions = [s / n for s, n in self._sums.values()]
        values = to_host([*fractions, *grads.values()])
        log_scalars(trainer, {t: float(v) for t, v in zip(tags, values, strict=True)}, self._step)
        self._sums, self._step = {}, -1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()  # a step whose optimizer step was skipped leaves none behind

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
