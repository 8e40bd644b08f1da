"""The diagnostics callbacks, checked numerically on small models built here (in-process Trainer,
TensorBoard events read back): a known gap between batch and running statistics, a known
accuracy gap between BatchNorm's modes, a known saturation fraction, exact gradient norms."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normlab.callbacks.batch_norm_heatmap import BatchNormHeatmap
from normlab.callbacks.batch_norm_stats import BatchNormStats
from normlab.callbacks.eval_mode_gap import EvalModeGap, batch_statistics
from normlab.callbacks.saturation_monitor import (
    SaturationMonitor,
    saturated_fraction,
    saturation_threshold,
)
from normlab.callbacks.train_test_gap import TrainTestGap, batch_stat_gap
from normlab.errors import ConfigError


def read_events(logdir: Path):
    """All events of every event file under ``logdir`` (histograms and images kept in full)."""
    from tensorboard.backend.event_processing.event_accumulator import (
        HISTOGRAMS,
        IMAGES,
        SCALARS,
        TENSORS,
        EventAccumulator,
    )

    guidance = {HISTOGRAMS: 0, SCALARS: 0, IMAGES: 0, TENSORS: 0}
    events = EventAccumulator(str(logdir), size_guidance=guidance)
    events.Reload()
    return events


def scalars(events) -> dict[str, list[tuple[int, float]]]:
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


class Tiny(L.LightningModule):
    """A LightningModule around ``net`` with batches ``(x, y)`` and lr 0 (weights stay put)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def trainer(tmp_path: Path, callbacks: list, **kw) -> L.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="tb", version="", default_hp_metric=False)
    return L.Trainer(
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def test_batch_stat_gap_known_values():
    # channel 0: 1,3,5,7 (mean 4, unbiased var 20/3); channel 1: 0,0,2,2 (mean 1, var 4/3)
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 2.0], [7.0, 2.0]])
    shift, ratio = batch_stat_gap(x, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 4.0]), eps=0.0)
    assert shift.item() == pytest.approx((4 / 1 + 0 / 2) / 2)  # 2.0
    assert ratio.item() == pytest.approx((20 / 3 / 1 + 4 / 3 / 4) / 2)  # 3.5


def test_train_test_gap_logs_known_gap(tmp_path):
    bn = nn.BatchNorm1d(2, eps=0.0)
    bn.running_mean.copy_(torch.tensor([0.0, 1.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0]))
    model = Tiny(nn.Sequential(bn, nn.Linear(2, 2)))
    first = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 2.0], [7.0, 2.0]])
    second = first * 100  # a very different second batch: num_batches=1 must ignore it
    data = loader(torch.cat([first, second]), torch.zeros(8, dtype=torch.long), batch_size=4)
    trainer(tmp_path, [TrainTestGap(num_batches=1)]).validate(model, data, verbose=False)
    values = scalars(read_events(tmp_path / "tb"))
    assert values["norm/net.0/gap_mean_shift"] == [(0, pytest.approx(2.0))]
    assert values["norm/net.0/gap_var_ratio"] == [(0, pytest.approx(3.5))]
    assert bn.running_mean.tolist() == [0.0, 1.0]  # measuring changed nothing


class Logits(nn.Module):
    """z -> logits (-z, z): class 1 when the normalized input is positive."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([-z, z], dim=1)


def test_eval_mode_gap_known_accuracies_and_untouched_statistics(tmp_path):
    bn = nn.BatchNorm1d(1)
    bn.running_mean.fill_(100.0)  # stale statistics: in eval mode every input looks negative
    model = Tiny(nn.Sequential(bn, Logits()))
    x = torch.arange(1.0, 9.0).unsqueeze(1)  # 1..8; batch mean 4.5 separates the classes
    y = (x.squeeze(1) > 4.5).long()
    trainer(tmp_path, [EvalModeGap(num_batches=4)]).validate(model, loader(x, y, 8), verbose=False)
    values = scalars(read_events(tmp_path / "tb"))
    assert values["norm/acc_eval_mode"] == [(0, 0.5)]  # always class 0: half right
    assert values["norm/acc_train_mode"] == [(0, 1.0)]  # batch statistics: all right
    assert values["norm/mode_gap"] == [(0, 0.5)]
    assert bn.running_mean.tolist() == [100.0] and bn.running_var.tolist() == [1.0]
    assert bn.num_batches_tracked.item() == 0
    with torch.no_grad(), batch_statistics(model) as hooked:
        assert hooked == 1
    model.eval()
    expected = torch.cat([100 - x, x - 100], 1) / math.sqrt(1 + bn.eps)  # eval mode is back
    assert torch.allclose(model(x), expected)


def test_saturation_threshold_and_fraction():
    assert saturation_threshold(nn.Sigmoid(), 0.05) == pytest.approx(math.log(19))  # 2.944
    assert saturation_threshold(nn.Tanh(), 0.05) == pytest.approx(math.atanh(0.9))  # 1.472
    assert torch.sigmoid(torch.tensor(math.log(19))).item() == pytest.approx(0.95)
    x = torch.tensor([-5.0, -4, -3, -2, -1, 0, 1, 2, 3, 4])
    assert saturated_fraction(x, math.log(19)).item() == pytest.approx(0.5)
    assert saturated_fraction(x, math.atanh(0.9)).item() == pytest.approx(0.7)
    with pytest.raises(TypeError, match="ReLU"):
        saturation_threshold(nn.ReLU(), 0.05)


class SatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(1, 1)
        self.sig, self.tanh = nn.Sigmoid(), nn.Tanh()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.pre.weight.fill_(1.0)  # pre-activations are the inputs themselves
            self.pre.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pre(x)
        return self.head(torch.cat([self.sig(p), self.tanh(p)], dim=1))


def test_saturation_monitor_known_fraction_and_grad_norms(tmp_path):
    torch.manual_seed(0)
    model = Tiny(SatNet())
    x = torch.tensor([-5.0, -4, -3, -2, -1, 0, 1, 2, 3, 4]).unsqueeze(1)
    y = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    reference = copy.deepcopy(model.net)
    F.cross_entropy(reference(x), y).backward()
    monitor = SaturationMonitor(every_n_steps=1)
    trainer(tmp_path, [monitor], max_steps=1, limit_val_batches=0).fit(model, loader(x, y, 10))
    values = scalars(read_events(tmp_path / "tb"))
    assert values["saturation/net.sig"] == [(0, pytest.approx(0.5))]  # |x| > 2.944: 5 of 10
    assert values["saturation/net.tanh"] == [(0, pytest.approx(0.7))]  # |x| > 1.472: 7 of 10
    for name in ("pre", "head"):
        layer = getattr(reference, name)
        norm = torch.cat([layer.weight.grad.flatten(), layer.bias.grad]).norm().item()
        assert values[f"grad_norm/net.{name}"] == [(0, pytest.approx(norm, rel=1e-5))]
    assert not any(t.startswith("grad_norm/net.sig") for t in values)  # no parameters


def test_histograms_resolve_gamma_and_groupnorm_layernorm_are_logged(tmp_path):
    # 128 gammas spread over 1.03..1.08, as in the last layer of a trained ConvNet: the default
    # exponential buckets (10% apart) put them all into one
    bn = nn.BatchNorm1d(128)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(1.03, 1.08, 128))
    net = nn.Sequential(bn, nn.Linear(128, 8), nn.GroupNorm(2, 8), nn.LayerNorm(8), Logits())
    x, y = torch.randn(16, 128), torch.zeros(16, dtype=torch.long)
    stats = BatchNormStats(histograms_every_n_steps=100)
    trainer(tmp_path, [stats], max_steps=1, limit_val_batches=0).fit(Tiny(net), loader(x, y, 16))
    events = read_events(tmp_path / "tb")
    gamma = events.Histograms("norm/net.0/weight")[0].histogram_value
    assert (gamma.num, gamma.min, gamma.max) == (128, pytest.approx(1.03), pytest.approx(1.08))
    counts = [int(c) for c in gamma.bucket]
    assert sum(counts) == 128 and sum(c > 0 for c in counts) >= 20, counts
    # any norm layer with gamma/beta: GroupNorm and LayerNorm like BatchNorm
    histograms, values = set(events.Tags()["histograms"]), scalars(events)
    for layer in ("net.2", "net.3"):
        assert {f"norm/{layer}/weight", f"norm/{layer}/bias"} <= histograms
        assert values[f"norm/{layer}/weight/mean"][0] == (0, pytest.approx(1.0))
        assert f"norm/{layer}/running_mean/mean" not in values


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: BatchNormStats(histograms_every_n_steps=0), "bn_stats.histograms_every_n_steps"),
        (lambda: BatchNormStats(scalars_every_n_steps=2.5), "bn_stats.scalars_every_n_steps"),
        (lambda: BatchNormHeatmap(every_n_epochs=-1), "bn_heatmap.every_n_epochs"),
        (lambda: TrainTestGap(num_batches=True), "train_test_gap.num_batches"),
        (lambda: EvalModeGap(num_batches=0), "eval_mode_gap.num_batches"),
        (lambda: SaturationMonitor(margin=0.5), "saturation.margin"),
    ],
)
def test_invalid_arguments_are_rejected_up_front(make, key):
    with pytest.raises(ConfigError, match=rf"callbacks\.{key}="):
        make()
