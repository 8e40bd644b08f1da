"""The job `python train.py` does, written by hand in plain PyTorch: the baseline of the
whole-process benchmark (`scripts/bench.py --process`).

    python scripts/plain_train.py --epochs 5                       # digits, like train.py
    python scripts/plain_train.py --synthetic 1,28,28 --num-samples 60000 --num-test 512 --epochs 1

Same model (3 stages of conv3x3 -> BatchNorm -> ReLU, max-pooling between them, global average
pooling, linear classifier), same data (uint8 in memory, the same seeded split, per-channel
scaling with the training split's statistics, applied to whole batches), AdamW with norm
parameters out of weight decay and a per-epoch cosine schedule, validation and a checkpoint every
epoch, a test at the end. What it leaves out is what a template adds: configs, callbacks, logging,
checkpoint management. It imports normlab only to load the same data.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from normlab.data.sources import load_source


def convnet(in_channels: int, num_classes: int, widths=(32, 64, 128)) -> nn.Module:
    layers: list[nn.Module] = []
    channels = in_channels
    for stage, width in enumerate(widths):
        if stage:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
        layers.append(nn.ReLU())
        channels = width
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
    )


def split_rows(data, val_fraction: float, test_fraction: float) -> tuple[tuple, tuple, tuple]:
    """((train_x, train_y), (val_x, val_y), (test_x, test_y)) as uint8/int64 tensors: normlab's
    split, a permutation fixed by split_seed 0 (``NormLabDataModule._split_indices``); a data set
    with an official test split holds out only the validation rows."""
    n = data.train_x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_val = max(1, round(val_fraction * n))
    has_test = data.test_x is not None
    n_test = 0 if has_test or test_fraction == 0 else max(1, round(test_fraction * n))
    train_idx, val_idx = order[n_val + n_test :], order[:n_val]
    test_idx = order[n_val : n_val + n_test]
    x, y = data.train_x, data.train_y
    test = (data.test_x, data.test_y) if has_test else (x[test_idx], y[test_idx])
    return (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx]), test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--synthetic", help="C,H,W of data=synthetic (default: digits)")
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--num-test", type=int, default=256)
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(args.seed)

    if args.synthetic:
        shape = [int(s) for s in args.synthetic.split(",")]
        options = {"shape": shape, "num_samples": args.num_samples, "num_test": args.num_test}
        data = load_source("synthetic", "data", synthetic=options, seed=0)
    else:
        data = load_source("digits", "data")
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = split_rows(
        data, args.val_fraction, args.test_fraction
    )
    pixels = train_x.double().div(255)
    mean = pixels.mean((0, 2, 3)).float().reshape(1, -1, 1, 1)
    std = pixels.std((0, 2, 3), unbiased=False).float().reshape(1, -1, 1, 1)

    def scale(x: torch.Tensor) -> torch.Tensor:
        return (x.float().div(255) - mean) / std

    model = convnet(data.num_channels, data.num_classes)
    norm_params = [
        p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    ]
    other = [p for p in model.parameters() if all(p is not q for q in norm_params)]
    optimizer = torch.optim.AdamW(
        [{"params": other, "weight_decay": 1e-4}, {"params": norm_params, "weight_decay": 0.0}],
        lr=3e-3,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(y), 512):
                logits = model(scale(x[start : start + 512]))
                correct += (logits.argmax(1) == y[start : start + 512]).sum().item()
        return correct / len(y)

    checkpoints = Path(tempfile.mkdtemp(prefix="plain_train_"))
    steps = 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(perm), args.batch_size):
            rows = perm[start : start + args.batch_size]
            if len(rows) < 2:
                continue  # BatchNorm cannot normalize one sample
            loss = F.cross_entropy(model(scale(train_x[rows])), train_y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        schedule.step()
        val_acc = accuracy(val_x, val_y)
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
            checkpoints / "last.ckpt",
        )
    test_acc = accuracy(test_x, test_y)
    seconds = round(time.perf_counter() - started, 2)
    report = {"val/acc": val_acc, "test/acc": test_acc, "steps": steps, "main_s": seconds}
    print(json.dumps({**report, "batch_size": args.batch_size, "train_samples": len(train_y)}))


if __name__ == "__main__":
    main()
