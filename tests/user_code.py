"""A user's nets and data that do not fit normlab, for tests/test_model_errors.py (each must be
refused with one paragraph that names the problem, not a library's traceback), and signals
sent at chosen phases of a run, for tests/test_preemption.py."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class ClassesNamedNCls(nn.Module):
    """A net whose constructor names the number of classes ``n_cls`` (not ``num_classes``)."""

    def __init__(self, n_cls: int, chans: int = 1) -> None:
        super().__init__()
        self.head = nn.Linear(chans, n_cls)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x.mean((2, 3)))


class SevenOutputs(nn.Module):
    """A net that ignores the data's classes: seven logits whatever the data."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_channels, 7)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x.mean((2, 3)))


class Blobs(L.LightningDataModule):
    """Random 1-channel 8x8 images whose labels run from 0 to ``label_range - 1`` while the
    module reports ``num_classes``."""

    def __init__(self, num_classes: int = 3, label_range: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.num_classes, self.num_channels = num_classes, 1
        gen = torch.Generator().manual_seed(seed)
        images = torch.randn(64, 1, 8, 8, generator=gen)
        self.data = TensorDataset(images, torch.arange(64) % label_range)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16, shuffle=True)

    val_dataloader = test_dataloader = train_dataloader


class TermDuringSetup(Blobs):
    """Data whose setup is stopped by SIGTERM (a job preempted while it loads its data); takes
    normlab's data keys and ignores them."""

    def __init__(self, **ignored: object) -> None:
        super().__init__()

    def setup(self, stage: str | None = None) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


class SignalOnTestStart(Callback):
    """Sends ``signum`` to this process when the test phase starts."""

    def __init__(self, signum: int = int(signal.SIGTERM)) -> None:
        self.signum = signum

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        os.kill(os.getpid(), self.signum)
