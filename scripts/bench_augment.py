"""Benchmark normlab's per-batch device augmentation against torchvision's per-sample transforms.

    python scripts/bench_augment.py [--repeats N] [--device cpu|cuda]
    python scripts/bench_augment.py --recipe-throughput [--steps N]     (a GPU; for gpu_check.sh)

The first form prints a Markdown table (docs/benchmarks.md, "Augmentation"): for an MNIST-shaped
(128x1x28x28) and a CIFAR-shaped (128x3x32x32) uint8 batch, the time to augment it with
``normlab.data.augment.BatchAugment`` on ``--device`` (the whole batch at once) and with
torchvision.transforms.v2 on the CPU, one sample at a time as a Dataset's ``__getitem__`` does
(0 workers), and the share of a training step (the default ConvNet for MNIST, torchvision's
ResNet-18 for CIFAR; forward, backward and SGD step) that the device augmentation takes.
Medians of ``--repeats`` timings.

``--recipe-throughput`` prints the training images/s of the CIFAR-10 ResNet-18 recipe (SGD
nesterov, label smoothing) in fp32 and in bf16 autocast + channels_last, without and with device
augmentation (crop+flip), as a plain PyTorch loop and through Lightning with NormLabModule.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from normlab.data.augment import BatchAugment  # noqa: E402

BATCH = 128
SHAPES = {"MNIST": (1, 28, 28), "CIFAR-10": (3, 32, 32)}
SETS = {  # the configs/augment/*.yaml sets
    "crop": dict(crop_padding=1),
    "crop_flip": dict(crop_padding=4, flip=0.5),
    "resized_crop_flip": dict(resized_crop_scale=(0.08, 1.0), flip=0.5),
    "mixup_cutmix": dict(crop_padding=4, flip=0.5, erasing=0.25, mixup_alpha=0.2,
                         cutmix_alpha=1.0, label_smoothing=0.1),
}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def torchvision_transform(name: str, size: tuple[int, int]):
    """The same set as torchvision.transforms.v2, per sample (erasing after scaling)."""
    from torchvision.transforms import v2

    cfg = SETS[name]
    steps: list = []
    if cfg.get("resized_crop_scale"):
        steps.append(v2.RandomResizedCrop(list(size), cfg["resized_crop_scale"], antialias=True))
    if cfg.get("crop_padding"):
        steps.append(v2.RandomCrop(list(size), padding=cfg["crop_padding"]))
    if cfg.get("flip"):
        steps.append(v2.RandomHorizontalFlip(cfg["flip"]))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if cfg.get("erasing"):
        steps.append(v2.RandomErasing(cfg["erasing"]))
    return v2.Compose(steps)


def train_step(shape: tuple[int, ...], device: torch.device) -> Callable[[torch.Tensor], None]:
    """One SGD step of the default ConvNet (1 channel) or ResNet-18 (3 channels)."""
    from normlab.models import NormLabModule

    net = {} if shape[0] == 1 else {"_target_": "normlab.models.torchvision_net"}
    arch = None if shape[0] == 1 else "resnet18"
    net = NormLabModule(10, shape[0], {"name": "batchnorm"}, net=net, arch=arch).net.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    labels = torch.randint(0, 10, (BATCH,), device=device)

    def step(images: torch.Tensor) -> None:
        loss = torch.nn.functional.cross_entropy(net(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_set(name: str, images: torch.Tensor, repeats: int, device: torch.device) -> tuple:
    """(normlab ms, torchvision ms) to augment one batch with the set ``name``."""
    from torchvision.transforms import v2

    augment, transform = BatchAugment(**SETS[name]), torchvision_transform(name, images.shape[2:])
    labels = torch.randint(0, 10, (images.shape[0],))
    on_device, device_labels = images.to(device), labels.to(device)
    counter = iter(range(10**9))
    mix = v2.RandomChoice(
        [v2.MixUp(alpha=0.2, num_classes=10), v2.CutMix(alpha=1.0, num_classes=10)]
    )

    def ours() -> None:
        g = augment.generator(0, 0, next(counter))
        augment.mix(augment.geometric(on_device, g).float() / 255, device_labels, 10, g)

    def theirs() -> None:
        batch = torch.stack([transform(image) for image in images])
        if SETS[name].get("mixup_alpha"):
            mix(batch, labels)

    return median_ms(ours, repeats, device), median_ms(theirs, repeats, torch.device("cpu"))


def augmentation_table(repeats: int, device: torch.device) -> str:
    rows = ["| data | augment | normlab, batch on " + device.type + " (ms) | torchvision v2, "
            "per sample on CPU (ms) | speed-up | share of a training step |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for data, shape in SHAPES.items():
        images = torch.randint(0, 256, (BATCH, *shape), dtype=torch.uint8)
        step, scaled = train_step(shape, device), images.to(device).float() / 255
        step_ms = median_ms(lambda: step(scaled), max(3, repeats // 4), device)  # noqa: B023
        for name in SETS:
            a, b = time_set(name, images, repeats, device)
            rows.append(
                f"| {data} {BATCH}x{'x'.join(map(str, shape))} | {name} | {a:.2f} | {b:.2f} |"
                f" {b / a:.0f}x | {a / (a + step_ms):.1%} of {a + step_ms:.0f} ms |"
            )
    return "\n".join(rows)


def recipe_throughput(steps: int = 50, batch: int = 256, device: str = "cuda") -> str:
    """images/s of the CIFAR-10 ResNet-18 recipe on the GPU: a plain PyTorch loop and Lightning
    with NormLabModule, fp32 and bf16 autocast + channels_last, without and with device
    augmentation (crop+flip, label smoothing). Synthetic CIFAR-shaped uint8 data (``device=cpu``
    only checks that it runs)."""
    import lightning as L

    from normlab.models import NormLabModule

    device = torch.device(device)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    mean = torch.tensor([0.49, 0.48, 0.45], device=device)[:, None, None]
    std = torch.tensor([0.25, 0.24, 0.26], device=device)[:, None, None]
    recipe = BatchAugment(crop_padding=4, flip=0.5, label_smoothing=0.1)

    def inputs(step: int, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = images, labels
        if augment:
            g = recipe.generator(0, 0, step)
            x = recipe.geometric(x, g)
        x = (x.float() / 255 - mean) / std
        return recipe.mix(x, y, 10, g) if augment else (x, y)

    def model(channels_last: bool) -> NormLabModule:
        return NormLabModule(
            10, 3, {"name": "batchnorm"}, net={"_target_": "normlab.models.torchvision_net"},
            arch="resnet18", channels_last=channels_last, scheduler=None,
            optimizer={"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9,
                       "nesterov": True, "weight_decay": 5e-4},
        )  # fmt: skip

    def plain(bf16: bool, augment: bool) -> float:
        module = model(bf16).to(device)
        opt = module.configure_optimizers()
        start = 0.0
        for step in range(steps + 5):
            if step == 5:  # after warm-up (cuDNN autotuning, allocator)
                _sync(device)
                start = time.perf_counter()
            x, y = inputs(step, augment)
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(module(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        return steps * batch / (time.perf_counter() - start)

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from range(steps + 5)

    class Timed(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 5:
                _sync(device)
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            _sync(device)
            self.rate = steps * batch / (time.perf_counter() - self.start)

    def lightning(bf16: bool, augment: bool) -> float:
        module = model(bf16)
        module.on_after_batch_transfer = lambda step, _: inputs(int(step), augment)
        timed = Timed()
        trainer = L.Trainer(
            accelerator=device.type, devices=1, max_epochs=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[timed],
            precision="bf16-mixed" if bf16 else "32-true",
        )  # fmt: skip
        trainer.fit(module, torch.utils.data.DataLoader(Batches(), batch_size=None))
        return timed.rate

    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    rows = [f"{card}: ResNet-18, batch {batch}, {steps} steps",
            "| precision | augment | plain loop (images/s) | Lightning + NormLabModule |",
            "|---|---|---|---|"]  # fmt: skip
    for bf16 in (False, True):
        for augment in (False, True):
            label = "bf16 + channels_last" if bf16 else "fp32"
            rows.append(
                f"| {label} | {'crop_flip' if augment else 'none'} |"
                f" {plain(bf16, augment):,.0f} | {lightning(bf16, augment):,.0f} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--recipe-throughput", action="store_true")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--docs", type=Path, help="replace the page's Augmentation section")
    args = parser.parse_args(argv)
    if args.recipe_throughput:
        if not torch.cuda.is_available():
            sys.exit("bench_augment: --recipe-throughput needs a CUDA GPU")
        print(recipe_throughput(args.steps))
        return
    table = augmentation_table(args.repeats, torch.device(args.device))
    print(table)
    if args.docs:
        write_section(args.docs, table, args)


def write_section(page: Path, table: str, args: argparse.Namespace) -> None:
    """Replace (or append) the page's last section, ``## Augmentation``, with this run's table."""
    import datetime
    import os

    from _bench_docs import put_section

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    section = f"""## Augmentation

Generated by `python scripts/bench_augment.py --repeats {args.repeats} --docs {page}` on
{datetime.datetime.now().isoformat(timespec="seconds")} ({os.cpu_count()} CPU cores, load average
{load} at the end: the machine was shared with other jobs, so the absolute times are noisy and
should be re-measured on an idle machine; the ratios are side by side). Batch of {BATCH}; the
sets are those of `configs/augment/`; "share of a training step" is the device augmentation's
time over augmentation + one SGD step (ConvNet for MNIST, ResNet-18 for CIFAR-10) on the same
device. torchvision's column is the per-sample cost a Dataset pays in its workers.

{table}
"""
    put_section(page, section)


if __name__ == "__main__":
    main()
