"""BatchNorm variants that normalize with batch statistics in training and keep BatchNorm's
running statistics: ``BatchRenorm2d`` (Ioffe 2017) and ``GhostBatchNorm2d`` (Hoffer et al. 2017).

Both are ``_BatchNorm`` subclasses with exactly ``nn.BatchNorm2d``'s state_dict keys (``weight``,
``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), so inspection shows their
``norm/<layer>/running_mean`` etc., ``norm=frozen`` and ``norm.init_from`` read their statistics,
and checkpoints move to and from ``norm=batchnorm``. Eval mode is BatchNorm's eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


class _BatchStatsNorm(_BatchNorm):
    """Shared by the variants: input (N, C, ...), BatchNorm's running-statistics update (EMA with
    ``momentum``, cumulative average with ``momentum=None``; unbiased variance), BatchNorm's eval
    mode, then any child modules (an activation kept from a replaced norm+activation layer)."""

    applies_children = True  # a conversion moving an activation here needs no wrapper class

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, ...), got {tuple(x.shape)}")

    def _train_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def _update_running(self, mean: Tensor, unbiased_var: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if self.training:
            x = self._train_forward(x)
        else:
            x = F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        for child in self.children():
            x = child(x)
        return x


def _values_per_channel(x: Tensor) -> int:
    n = x.numel() // x.shape[1]
    if n < 2:  # as BatchNorm: one value has no variance
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {list(x.shape)}"
        )
    return n


class BatchRenorm2d(_BatchStatsNorm):
    """Batch Renormalization (Ioffe 2017, arXiv:1702.03275). In training mode

    ``y = gamma * ((x - mu_B) / sigma_B * r + d) + beta`` with
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
    ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``,

    where ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` are the batch's per-channel mean and (biased)
    standard deviation, ``mu``, ``sigma = sqrt(running_var + eps)`` the running ones before this
    step's update, and ``r``, ``d`` carry no gradient. The running statistics are then updated
    exactly as BatchNorm's (``momentum``, unbiased variance); eval mode normalizes with them, as
    BatchNorm. With ``r_max=1, d_max=0`` it is BatchNorm.

    Warm-up (the paper starts as BatchNorm and relaxes the limits): after ``t`` training steps
    (``num_batches_tracked``, a buffer in the checkpoint, so a resumed run continues the schedule
    exactly) the limits are ``1 + (r_max - 1) * p`` and ``d_max * p`` with
    ``p = min(1, t / warmup_steps)`` (``warmup_steps=0``: the full limits from the first step).

    DDP: each process uses its own batch's statistics (trainer.sync_batchnorm would turn the layer
    into a plain SyncBatchNorm, so normlab refuses that combination); ``norm.distribute_bn``-style
    averaging is not applied, and checkpoints hold rank 0's running statistics.

    Example::

        layer = BatchRenorm2d(16, r_max=3.0, d_max=5.0, warmup_steps=5000)
        y = layer(torch.randn(8, 16, 4, 4))
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
    ) -> None:
        if r_max < 1 or d_max < 0 or warmup_steps < 0:
            raise ValueError(
                f"expected r_max >= 1, d_max >= 0, warmup_steps >= 0; got {r_max}, {d_max},"
                f" {warmup_steps}"
            )
        super().__init__(num_features, eps, momentum, affine)
        self.r_max, self.d_max, self.warmup_steps = r_max, d_max, warmup_steps

    def limits(self) -> tuple[Tensor, Tensor]:
        """``(r_max, d_max)`` at the current step of the warm-up, as tensors (no host sync)."""
        steps = self.num_batches_tracked.to(self.running_mean.dtype)
        p = (steps / self.warmup_steps).clamp(max=1.0) if self.warmup_steps else steps.new_ones(())
        return 1 + (self.r_max - 1) * p, self.d_max * p

    def _train_forward(self, x: Tensor) -> Tensor:
        n = _values_per_channel(x)
        var, mean = torch.var_mean(x, _reduce_dims(x), correction=0)
        std = (var + self.eps).sqrt()
        with torch.no_grad():
            r_max, d_max = self.limits()
            running_std = (self.running_var + self.eps).sqrt()
            r = torch.minimum(torch.maximum(std / running_std, 1 / r_max), r_max)
            d = ((mean - self.running_mean) / running_std).clamp(-d_max, d_max)
            self._update_running(mean, var * (n / (n - 1)))
        shape = _channel_shape(x)
        y = (x - mean.reshape(shape)) * (r / std).reshape(shape) + d.reshape(shape)
        if self.weight is not None:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max},"
            f" warmup_steps={self.warmup_steps}"
        )


class GhostBatchNorm2d(_BatchStatsNorm):
    """Ghost Batch Normalization (Hoffer et al. 2017, arXiv:1705.08741): in training mode the
    batch is split along N into virtual ("ghost") batches of ``virtual_batch_size`` samples, in
    order, and each is normalized with its own per-channel mean and biased variance, then
    ``gamma``/``beta`` apply. A batch that is not a multiple of the size ends with a smaller
    virtual batch (the remainder; it must hold more than one value per channel, as BatchNorm's
    batch). Eval mode is BatchNorm's (running statistics).

    Running statistics: one BatchNorm update per training step with the virtual batches' mean
    and unbiased variance averaged (weighted by their sample counts), not one update per virtual
    batch: ``momentum`` then means what it means for BatchNorm (per step) whatever the virtual
    size, the statistics estimate the same population quantity, and a virtual batch as large as
    the batch gives exactly BatchNorm, running statistics included.

    DDP: each process splits its own batch (the virtual batches are per device, which is what the
    method wants); trainer.sync_batchnorm would make it a plain SyncBatchNorm, so normlab refuses
    that combination. Checkpoints hold rank 0's running statistics.

    Example::

        layer = GhostBatchNorm2d(16, virtual_batch_size=32)
        y = layer(torch.randn(128, 16, 8, 8))  # four ghost batches of 32
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        virtual_batch_size: int = 32,
    ) -> None:
        if virtual_batch_size < 1:
            raise ValueError(f"expected virtual_batch_size >= 1, got {virtual_batch_size}")
        super().__init__(num_features, eps, momentum, affine)
        self.virtual_batch_size = virtual_batch_size

    def _train_forward(self, x: Tensor) -> Tensor:
        chunks = x.split(self.virtual_batch_size)
        outputs, means, variances, counts = [], [], [], []
        for chunk in chunks:
            n = _values_per_channel(chunk)
            outputs.append(
                F.batch_norm(chunk, None, None, self.weight, self.bias, True, 0.0, self.eps)
            )
            with torch.no_grad():
                var, mean = torch.var_mean(chunk, _reduce_dims(chunk), correction=1)
            means.append(mean)
            variances.append(var)
            counts.append(float(n))
        with torch.no_grad():
            w = torch.tensor(counts, dtype=means[0].dtype, device=x.device)
            w = (w / w.sum()).reshape(-1, 1)
            self._update_running(
                (torch.stack(means) * w).sum(0), (torch.stack(variances) * w).sum(0)
            )
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"
