"""The LightningDataModule: uint8 images in memory (or streamed from an image folder), a fixed
seeded split, augmentation and scaling on the device."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from normlab.data.augment import BatchAugment, batch_seed, log_augmented_batch
from normlab.data.scaling import FeatureScaler, resolve_scaling
from normlab.data.shift import shift_images
from normlab.data.sources import (
    DataSourceError,
    FolderIndex,
    ImageData,
    decode_image,
    index_imagefolder,
    load_source,
)

log = logging.getLogger("normlab")

# images per chunk when the scaling statistics are accumulated (bounded float64 copies)
STATS_CHUNK = 4096


class InMemoryImages(Dataset):
    """uint8 images and labels held as tensors; a whole batch is fetched with one indexing op.

    A split is a view: ``index`` selects its rows of the shared tensors, so the train and val
    splits of a data set do not copy its images (memory stays N*C*H*W bytes).
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None
    ) -> None:
        self._images, self._labels, self.index = images, labels, index

    @property
    def images(self) -> torch.Tensor:
        """This split's images (a copy when the split is a view)."""
        return self._images if self.index is None else self._images[self.index]

    @property
    def labels(self) -> torch.Tensor:
        """This split's labels."""
        return self._labels if self.index is None else self._labels[self.index]

    def __len__(self) -> int:
        return self._labels.shape[0] if self.index is None else self.index.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = index if self.index is None else self.index[index]
        return self._images[row], self._labels[row]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # DataLoader calls this with the whole batch of indices (torch >= 2.0)
        rows = torch.as_tensor(indices)
        if self.index is not None:
            rows = self.index[rows]
        return self._images[rows], self._labels[rows]

    def chunks(self, size: int = STATS_CHUNK):
        """Yield the split's images ``size`` at a time (for the scaling statistics)."""
        for start in range(0, len(self), size):
            stop = min(start + size, len(self))
            rows = slice(start, stop) if self.index is None else self.index[start:stop]
            yield self._images[rows]


class StreamingImages(Dataset):
    """Image files decoded one at a time, in the DataLoader workers (``data.in_memory=false``).

    Each sample is a uint8 ``(3, H, W)`` tensor resized to ``image_size``, so the default collate
    stacks uint8 batches and scaling still happens on the device, after the transfer.
    ``transform`` (training split, ``data.augment``) is a torchvision.transforms.v2 transform run
    in the worker; an index given as ``(index, seed)`` (EpochSeededSampler) seeds its draws.
    """

    def __init__(
        self, samples: list[tuple[str, int]], image_size: tuple[int, int], transform: Any = None
    ) -> None:
        self.samples, self.image_size, self.transform = samples, image_size, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = index if isinstance(index, tuple) else (index, None)
        path, label = self.samples[index]
        array = decode_image(path, self.image_size)
        image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        if self.transform is not None:
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                image = self.transform(image)
        return image, torch.tensor(label, dtype=torch.int64)


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_fn for InMemoryImages: the batch is already stacked."""
    return batch


class EpochSeededSampler(RandomSampler):
    """A shuffle whose order is a function of (seed, epoch) alone, so a resumed run sees the same
    batches as an uninterrupted one. Lightning calls ``set_epoch`` at every epoch start; under DDP
    it swaps this RandomSampler for a DistributedSampler, which is seeded the same way.
    ``with_seeds`` yields ``(index, seed)`` pairs, the seed a function of (seed, epoch, position),
    for a dataset that augments each sample in a worker (StreamingImages)."""

    def __init__(self, data_source: Dataset, seed: int, with_seeds: bool = False) -> None:
        super().__init__(data_source)
        self.seed, self.epoch, self.with_seeds = seed, 0, with_seeds

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        if not self.with_seeds:
            yield from order
            return
        for position, index in enumerate(order):
            yield index, batch_seed(self.seed, 0, self.epoch, position)


class NormLabDataModule(L.LightningDataModule):
    """Loads a data set into memory (or indexes an image folder), splits it and scales batches
    per channel on the device.

    Args mirror ``configs/data/*.yaml``. The scaling statistics (``data.scaling=dataset``) come from
    the training split only; they are saved in every checkpoint (``state_dict``) and reused by
    ``eval.py``, so a model is always evaluated with the statistics it was trained with.
    ``in_memory=False`` (``data=imagefolder`` only) decodes images in the DataLoader workers
    (``num_workers``) batch by batch; the statistics then cost one pass over the training split,
    also decoded in the workers. ``augment`` (``data.augment``, see ``normlab.data.augment``)
    augments training batches: crops and flips per batch on the device (in the workers when
    streaming), then erasing and MixUp/CutMix on the scaled batch, seeded by (seed, epoch, batch).
    ``test_shift`` (``{"brightness": 0.3, "contrast": 0.5, "noise": 0.1}``) shifts the test
    split's pixels (``normlab.data.shift``); training, validation and scaling statistics keep the
    original images.

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
        in_memory: bool = True,
        augment: Mapping[str, Any] | None = None,
        test_shift: Mapping[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # the training batches only; val and test are never augmented
        self.augment = BatchAugment.from_config(augment)
        self._shown = False  # the TensorBoard image of an augmented batch is written once
        self.scaler: FeatureScaler | None = None
        self.data: ImageData | FolderIndex | None = None
        self.splits: dict[str, InMemoryImages | StreamingImages] = {}

    # -- data -------------------------------------------------------------------------------
    def _load(self, download: bool = False) -> ImageData | FolderIndex:
        hp = self.hparams
        if not hp.in_memory:
            return index_imagefolder(hp.data_dir)
        return load_source(
            hp.name,
            hp.data_dir,
            download=download,
            image_size=tuple(hp.image_size) if hp.image_size else None,
            synthetic=hp.synthetic,
            seed=hp.split_seed,
        )

    def prepare_data(self) -> None:
        """Download the data set if ``download`` is set (Lightning calls this on one process per
        node; ``run.train`` calls it before the model is sized from the data). Keeps what it
        loaded, so the data set is read once."""
        if self.hparams.download and self.data is None:
            self.data = self._load(download=True)

    def load(self) -> ImageData | FolderIndex:
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

    @property
    def classes(self) -> list[str]:
        """The class names in label order (saved in checkpoints; eval.py checks them)."""
        return list(self.load().classes)

    def _split_indices(self, n: int, has_test: bool) -> tuple[torch.Tensor, ...]:
        """(train, val, test) row indices: a permutation fixed by ``split_seed``."""
        hp = self.hparams
        order = torch.randperm(n, generator=torch.Generator().manual_seed(hp.split_seed))
        n_val = max(1, round(hp.val_fraction * n))
        # test_fraction=0 holds out nothing (a run with test=true then stops in check_usable)
        n_test = 0 if has_test or hp.test_fraction == 0 else max(1, round(hp.test_fraction * n))
        return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]

    def check_usable(self, train: bool = True, test: bool = True) -> None:
        """Refuse data a run cannot use before anything runs: fewer than two classes, a
        training split too small for one training step (``train``), or no test images
        (``test``). Raises DataSourceError naming the key to change."""
        hp, data = self.hparams, self.load()
        source = f"data.name={hp.name}"
        if data.num_classes < 2:
            where = (
                " (one sub-folder per class in data.data_dir)" if hp.name == "imagefolder" else ""
            )
            raise DataSourceError(
                f"{source}: the data has {data.num_classes} class(es) ({', '.join(data.classes)});"
                f" a classifier needs at least two. Fix: give a data set with two or more"
                f" classes{where}."
            )
        if isinstance(data, FolderIndex):
            n, has_test = len(data.train), data.test is not None
        else:
            n, has_test = data.train_x.shape[0], data.test_x is not None
        rows, _, held_out = self._split_indices(n, has_test)
        size_key = {"synthetic": "data.synthetic.num_samples", "imagefolder": "data.data_dir"}
        # a last batch of one sample is dropped (see _loader), so a split of one gives no step
        if train and (len(rows) == 0 or (len(rows) == 1 and hp.batch_size > 1)):
            raise DataSourceError(
                f"{source}: the training split holds {len(rows)} image(s) of {n} (the rest is"
                f" data.val_fraction={hp.val_fraction} and data.test_fraction={hp.test_fraction}),"
                " too few for one training step with a BatchNorm-safe batch of at least two."
                f" Fix: more images ({size_key.get(hp.name, 'data.name')}) or smaller"
                " data.val_fraction / data.test_fraction."
            )
        if test and not has_test and len(held_out) == 0:
            raise DataSourceError(
                f"{source}: there is no test split (no official one, and"
                f" data.test_fraction={hp.test_fraction} holds out no images), so test=true has"
                " nothing to test. Fix: set data.test_fraction (e.g. 0.1), or test=false."
            )

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        data = self.load()
        if isinstance(data, FolderIndex):
            self._setup_streaming(data)
        else:
            has_test = data.test_x is not None
            train, val, test = self._split_indices(data.train_x.shape[0], has_test)
            self.splits["train"] = InMemoryImages(data.train_x, data.train_y, train)
            self.splits["val"] = InMemoryImages(data.train_x, data.train_y, val)
            self.splits["test"] = (
                InMemoryImages(data.test_x, data.test_y)
                if has_test
                else InMemoryImages(data.train_x, data.train_y, test)
            )
            if self.hparams.test_shift:
                test_split = self.splits["test"]
                shifted = shift_images(test_split.images, **self.hparams.test_shift,
                                       seed=self.hparams.split_seed)  # fmt: skip
                self.splits["test"] = InMemoryImages(shifted, test_split.labels)
        if self.scaler is None:
            hp = self.hparams
            # the generator is consumed (one pass over the training split) only for "dataset"
            chunks = self._train_chunks()
            mean, std = resolve_scaling(hp.scaling, chunks, data.num_channels, hp.mean, hp.std)
            self.scaler = FeatureScaler(mean, std)

    def _setup_streaming(self, index: FolderIndex) -> None:
        size = tuple(int(s) for s in self.hparams.image_size)
        train, val, test = self._split_indices(len(index.train), index.test is not None)
        for split, rows in (("train", train), ("val", val), ("test", test)):
            self.splits[split] = StreamingImages([index.train[i] for i in rows.tolist()], size)
        self.splits["train"].transform = self.augment.worker_transform(size)
        if index.test is not None:
            self.splits["test"] = StreamingImages(index.test, size)
        if self.hparams.num_workers == 0:
            log.warning(
                "data.in_memory=false with data.num_workers=0: images are decoded in the main "
                "process, between training steps; set data.num_workers to the free CPU cores"
            )

    def _train_chunks(self) -> Iterator[torch.Tensor]:
        """The training split's uint8 images, chunk by chunk (decoded in workers if streaming)."""
        train = self.splits["train"]
        if isinstance(train, InMemoryImages):
            yield from train.chunks()
            return
        # the statistics of the images themselves, not of augmented ones
        plain = StreamingImages(train.samples, train.image_size)
        loader = DataLoader(plain, batch_size=256, num_workers=self.hparams.num_workers)
        log.info("data.scaling=dataset: one pass over %d streamed training images", len(train))
        for images, _ in loader:
            yield images

    # -- loaders ----------------------------------------------------------------------------
    def _loader(self, split: str, batch_size: int, train: bool = False) -> DataLoader:
        dataset = self.splits[split]
        in_memory = isinstance(dataset, InMemoryImages)
        # BatchNorm cannot normalize a training batch of one sample: drop such a last batch
        drop_last = train and len(dataset) % batch_size == 1
        # page-locked batches let Lightning's non_blocking copy to the GPU overlap compute
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        # a streamed training split augments in the workers, each sample seeded by the sampler
        seeds = getattr(dataset, "transform", None) is not None
        sampler = EpochSeededSampler(dataset, self.hparams.seed, seeds) if train else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.hparams.num_workers,
            collate_fn=keep_batch if in_memory else None,
            pin_memory=pin,
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
        trainer = self.trainer
        augment = trainer is not None and trainer.training and self.augment.active
        if augment:
            # a function of where the batch is in the run, so resuming repeats it exactly
            batch_idx = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            generator = self.augment.generator(
                self.hparams.seed, trainer.current_epoch, batch_idx, trainer.global_rank
            )
            if isinstance(self.splits.get("train"), InMemoryImages):  # streamed: in the workers
                images = self.augment.geometric(images, generator)
        scaled = self.scaler(images)  # float32
        if augment:
            scaled, labels = self.augment.mix(scaled, labels, self.num_classes, generator)
            if not self._shown:
                self._shown = True
                log_augmented_batch(trainer, scaled)
        if trainer is not None:  # trainer.precision=64-true / 16-true: the model's dtype
            scaled = trainer.precision_plugin.convert_input(scaled)
            labels = trainer.precision_plugin.convert_input(labels)  # soft targets only
        return scaled, labels

    # -- checkpointing: the scaling statistics travel with the model -------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.scaler is None:
            return {}
        return {"scaling": self.hparams.scaling, "mean": self.scaler.mean, "std": self.scaler.std}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mean") is not None:
            self.scaler = FeatureScaler(state_dict["mean"], state_dict["std"])
