"""A user's own data: any LightningDataModule with ``num_classes`` and ``num_channels``."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class BlobsDataModule(L.LightningDataModule):
    """Images whose class sets the mean of each channel: ``num_samples`` training and
    ``num_samples // 4`` validation and test images of ``channels`` x ``size`` x ``size``.

    normlab reads ``num_classes`` and ``num_channels`` before training (to build the model) and
    passes ``seed`` because the constructor takes it.
    """

    def __init__(
        self,
        num_classes: int = 4,
        channels: int = 3,
        size: int = 12,
        num_samples: int = 256,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_classes, self.num_channels = num_classes, channels
        self.size, self.num_samples, self.batch_size, self.seed = (
            size,
            num_samples,
            batch_size,
            seed,
        )

    def _split(self, n: int, offset: int) -> TensorDataset:
        gen = torch.Generator().manual_seed(self.seed + offset)
        labels = torch.randint(self.num_classes, (n,), generator=gen)
        centers = torch.linspace(-1, 1, self.num_classes)[labels]
        shift = centers[:, None, None, None] * torch.arange(1, self.num_channels + 1)[:, None, None]
        noise = torch.randn(n, self.num_channels, self.size, self.size, generator=gen)
        return TensorDataset(noise + shift, labels)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._split(self.num_samples, 0)
        self.val_set = self._split(self.num_samples // 4, 1)
        self.test_set = self._split(self.num_samples // 4, 2)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, self.batch_size)
