"""Precise BatchNorm statistics (fvcore ``update_bn_stats``; Wu & Johnson 2021, "Rethinking
'Batch' in BatchNorm"): the exact population mean and variance of every BatchNorm-like layer's
input over a number of batches, instead of the EMA that training leaves in ``running_mean`` and
``running_var``. Used to calibrate ``FrozenBatchNorm2d`` and by the precise-BN callback."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.norm.layers import FrozenBatchNorm2d, batchnorm_layers


def estimate_population_stats(
    model: nn.Module, batches: Iterable[Tensor], num_batches: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """Precise-BN (fvcore ``update_bn_stats``; Wu & Johnson 2021): exact per-channel mean and
    variance of every BatchNorm-like layer's input over up to ``num_batches`` batches.

    The pass is a training-mode forward: every BatchNorm-like layer normalizes with the batch's own
    statistics (``FrozenBatchNorm2d`` included, through a temporary hook), so each layer sees inputs
    as in training and stale running statistics of earlier layers do not leak into later ones.
    Batches are pooled by element count (N*H*W) in float64, not averaged with an EMA. The returned
    variance is the unbiased pooled variance (n/(n-1)), what ``running_var`` means in PyTorch.
    Buffers and every module's train/eval mode are restored: this function changes nothing; use
    :func:`apply_population_stats` to write the result. Statistics are per process (no all-reduce).

    Args:
        batches: input tensors, scaled and on the model's device (of ``(x, y)`` pairs x is used).
        num_batches: the most batches to use (>= 1).

    Returns:
        ``{qualified_name: (mean, var)}`` in the dtype/device of each layer's ``running_mean``;
        layers without running statistics or not reached by the forward pass are omitted.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches!r} must be >= 1")
    layers = [(n, m) for n, m in batchnorm_layers(model) if m.running_mean is not None]
    acc: dict[str, tuple[int, Tensor, Tensor]] = {}  # name -> (count, mean, sum of squared dev.)

    def collect(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            x = x.to("cpu" if x.device.type == "mps" else x.device, torch.float64)  # MPS: no fp64
            dims = [0, *range(2, x.dim())]
            n_b = x.numel() // x.shape[1]
            mean_b = x.mean(dims)
            m2_b = (x - mean_b.reshape(1, -1, *[1] * (x.dim() - 2))).square().sum(dims)
            if name not in acc:
                acc[name] = (n_b, mean_b, m2_b)
                return
            n_a, mean_a, m2_a = acc[name]  # Chan et al.'s pairwise update: exact and stable
            n, delta = n_a + n_b, mean_b - mean_a
            acc[name] = (n, mean_a + delta * n_b / n, m2_a + m2_b + delta.square() * n_a * n_b / n)

        return hook

    def batch_normalize(m: nn.Module, args: tuple[Any, ...], _: Tensor) -> Tensor:
        out = F.batch_norm(args[0], None, None, m.weight, m.bias, training=True, eps=m.eps)
        for child in m.children():  # an activation kept from a norm+activation layer
            out = child(out)
        return out

    modes = {m: m.training for m in model.modules()}
    saved = {n: [t.clone() for t in m.buffers(recurse=False)] for n, m in layers}
    handles = [m.register_forward_pre_hook(collect(n)) for n, m in layers]
    handles += [
        m.register_forward_hook(batch_normalize)
        for _, m in layers
        if isinstance(m, FrozenBatchNorm2d)
    ]
    try:
        model.train()
        seen = 0
        # no_grad as a block, not a decorator: mutmut (make mutants) skips decorated functions
        with torch.no_grad():
            for batch in itertools.islice(batches, num_batches):  # takes none beyond the last
                model(batch[0] if isinstance(batch, tuple | list) else batch)
                seen += 1
        if seen == 0:
            raise ValueError("estimate_population_stats got no batches")
    finally:
        for h in handles:
            h.remove()
        for n, m in layers:
            for buf, old in zip(m.buffers(recurse=False), saved[n], strict=True):
                buf.copy_(old)
        for m, mode in modes.items():
            m.training = mode
    out = {}
    for name, m in layers:
        if name in acc:
            n, mean, m2 = acc[name]
            var = m2 / max(n - 1, 1)
            out[name] = (mean.to(m.running_mean), var.to(m.running_var))
    return out


def apply_population_stats(model: nn.Module, stats: Mapping[str, tuple[Tensor, Tensor]]) -> float:
    """Write ``{name: (mean, var)}`` into the layers' ``running_mean``/``running_var``.

    Returns the largest absolute change of any entry (how far the statistics moved).
    """
    modules = dict(model.named_modules())
    change = 0.0
    for name, (mean, var) in stats.items():
        layer = modules.get(name)
        if layer is None or getattr(layer, "running_mean", None) is None:
            raise KeyError(f"{name!r} is not a layer with running statistics in this model")
        for buf, new in ((layer.running_mean, mean), (layer.running_var, var)):
            new = new.detach().to(buf)
            change = max(change, (new - buf).abs().max().item())
            buf.copy_(new)  # detached: the buffer stays out of any autograd graph
    return change


def update_population_stats(
    model: nn.Module,
    batches: Iterable[Tensor],
    num_batches: int,
    layers: Collection[str] | None = None,
) -> dict[str, float]:
    """:func:`estimate_population_stats` written into the running statistics of ``layers``
    (qualified names; None: every layer estimated) by :func:`apply_population_stats`: the one
    statistics pass of frozen-statistics calibration and of precise BN.

    Returns ``{layer: largest absolute change of its running_mean or running_var}``.
    """
    stats = estimate_population_stats(model, batches, num_batches)
    chosen = stats if layers is None else {n: s for n, s in stats.items() if n in layers}
    return {name: apply_population_stats(model, {name: s}) for name, s in chosen.items()}
