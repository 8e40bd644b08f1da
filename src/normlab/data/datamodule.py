"""The LightningDataModule: in-memory uint8 images, a fixed seeded split, scaling on the device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from normlab.data.scaling import FeatureScaler, resolve_scaling
from normlab.data.sources import ImageData, load_source


class InMemoryImages(Dataset):
    """uint8 images and labels held as tensors; a whole batch is fetched with one indexing op."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # DataLoader calls this with the whole batch of indices (torch >= 2.0)
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_fn for InMemoryImages: the batch is already stacked."""
    return batch


class EpochSeededSampler(RandomSampler):
    """A shuffle whose order is a function of (seed, epoch) alone, so a resumed run sees the same
    batches as an uninterrupted one. Lightning calls ``set_epoch`` at every epoch start; under DDP
    it swaps this RandomSampler for a DistributedSampler, which is seeded the same way."""

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class NormLabDataModule(L.LightningDataModule):
    """Loads a data set into memory, splits it and scales batches per channel on the device.

    Args mirror ``configs/data/*.yaml``. The scaling statistics (``data.scaling=dataset``) come from
    the training split only; they are saved in every checkpoint (``state_dict``) and reused by
    ``eval.py``, so a model is always evaluated with the statistics it was trained with.

    Example::

        dm = NormLabDataModule(name="digits", data_dir="data", batch_size=64)
        dm.setup("fit")
        x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    """

    def __init__(
        self,
        name: str = "digits",
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        scaling: str = "dataset",
        mean: list[float] | None = None,
        std: list[float] | None = None,
        image_size: list[int] | None = None,
        synthetic: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.scaler: FeatureScaler | None = None
        self.data: ImageData | None = None
        self.splits: dict[str, InMemoryImages] = {}

    # -- data -------------------------------------------------------------------------------
    def _load(self, download: bool = False) -> ImageData:
        hp = self.hparams
        return load_source(
            hp.name,
            hp.data_dir,
            download=download,
            image_size=tuple(hp.image_size) if hp.image_size else None,
            synthetic=hp.synthetic,
            seed=hp.split_seed,
        )

    def prepare_data(self) -> None:
        # called on one process per node: the only place that may download
        if self.hparams.download:
            self._load(download=True)

    def load(self) -> ImageData:
        """Load the data set once (cached); also called before setup to size the model."""
        if self.data is None:
            self.data = self._load()
        return self.data

    @property
    def num_classes(self) -> int:
        return self.load().num_classes

    @property
    def num_channels(self) -> int:
        return self.load().num_channels

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp, data = self.hparams, self.load()
        n = data.train_x.shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(hp.split_seed))
        n_val = max(1, round(hp.val_fraction * n))
        has_test = data.test_x is not None
        n_test = 0 if has_test else max(1, round(hp.test_fraction * n))
        val_idx, test_idx, train_idx = (
            order[:n_val],
            order[n_val : n_val + n_test],
            order[n_val + n_test :],
        )
        self.splits["train"] = InMemoryImages(data.train_x[train_idx], data.train_y[train_idx])
        self.splits["val"] = InMemoryImages(data.train_x[val_idx], data.train_y[val_idx])
        if has_test:
            self.splits["test"] = InMemoryImages(data.test_x, data.test_y)
        else:
            self.splits["test"] = InMemoryImages(data.train_x[test_idx], data.train_y[test_idx])
        if self.scaler is None:
            mean, std = resolve_scaling(
                hp.scaling, self.splits["train"].images, data.num_channels, hp.mean, hp.std
            )
            self.scaler = FeatureScaler(mean, std)

    # -- loaders ----------------------------------------------------------------------------
    def _loader(self, split: str, batch_size: int, train: bool = False) -> DataLoader:
        dataset = self.splits[split]
        # BatchNorm cannot normalize a training batch of one sample: drop such a last batch
        drop_last = train and len(dataset) % batch_size == 1
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochSeededSampler(dataset, self.hparams.seed) if train else None,
            drop_last=drop_last,
            num_workers=self.hparams.num_workers,
            collate_fn=keep_batch,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        return self.scaler(images), labels

    # -- checkpointing: the scaling statistics travel with the model -------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.scaler is None:
            return {}
        return {"scaling": self.hparams.scaling, "mean": self.scaler.mean, "std": self.scaler.std}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mean") is not None:
            self.scaler = FeatureScaler(state_dict["mean"], state_dict["std"])
