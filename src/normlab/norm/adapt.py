"""Test-time adaptation of the normalization statistics (AdaBN, Li et al. 2016, "Revisiting
Batch Normalization For Practical Domain Adaptation"): the running statistics of every
BatchNorm-like layer are replaced by the exact population statistics of the test data, so a
test set whose inputs are shifted (brightness, contrast, noise, another domain) is normalized
with its own statistics. Weights, gamma and beta stay as trained."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from normlab.norm.stats import apply_population_stats, estimate_population_stats

log = logging.getLogger("normlab")
ADAPT_CHOICES = (None, "test")  # norm.adapt


def test_batches(datamodule: Any, device: Any = "cpu") -> Iterator[Tensor]:
    """The test split's scaled input images, batch by batch (never augmented)."""
    datamodule.setup("test")
    for batch in datamodule.test_dataloader():
        images, _ = datamodule.on_after_batch_transfer(batch, 0)
        yield images.to(device)


def adapt_to_test_data(model: nn.Module, datamodule: Any) -> float:
    """Replace the running statistics of ``model`` by the population statistics of the test
    split (``normlab.norm.estimate_population_stats`` over all of its batches, each layer seeing
    its input as in a training-mode forward). Returns the largest change of any statistic; a
    model without running statistics (GroupNorm, LayerNorm, none) is left as it is."""
    device = next(model.parameters()).device
    batches = list(test_batches(datamodule, device))
    stats = estimate_population_stats(model, batches, num_batches=len(batches))
    if not stats:
        log.info("norm.adapt=test: the model has no running statistics; nothing to adapt")
        return 0.0
    change = apply_population_stats(model, stats)
    log.info(
        "norm.adapt=test: running statistics of %d layers re-estimated on %d test batches"
        " (largest change %.4g)", len(stats), len(batches), change,
    )  # fmt: skip
    return change
