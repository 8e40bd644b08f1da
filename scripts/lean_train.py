"""The leanest hand-written loop a user would write for data that fits in memory: the second
baseline of the whole-process benchmark (`scripts/bench.py --process`).

    python scripts/lean_train.py --epochs 5                      # digits, like train.py
    python scripts/lean_train.py --synthetic 1,28,28 --num-samples 60000 --num-test 512 \
        --epochs 1 --batch-size 128 --val-fraction 0.1 --test-fraction 0

Where `scripts/plain_train.py` keeps the images as uint8 and scales each batch (as normlab does),
this one converts the whole data set to float once and scales it once with the training split's
per-channel statistics, then takes shuffled batches by index. Same ConvNet as plain_train.py
(widths 32/64/128, one conv3x3-BatchNorm-ReLU block per stage), AdamW with norm parameters out of
weight decay, a per-epoch cosine schedule, validation and a checkpoint every epoch, and the best
checkpoint (by validation accuracy) tested at the end. It prints one JSON line with the number
of optimizer steps, so the benchmark can check that both sides ran the same job.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from plain_train import convnet, split_rows
from torch import nn

from normlab.data.sources import load_source


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
    # float once, scaled once with the training split's statistics
    train_x = train_x.float().div_(255)
    mean = train_x.mean((0, 2, 3), keepdim=True)
    std = train_x.std((0, 2, 3), unbiased=False, keepdim=True)
    train_x = train_x.sub_(mean).div_(std)
    val_x = val_x.float().div_(255).sub_(mean).div_(std)
    test_x = test_x.float().div_(255).sub_(mean).div_(std)

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
        with torch.no_grad():
            correct = sum(
                (model(x[i : i + 512]).argmax(1) == y[i : i + 512]).sum().item()
                for i in range(0, len(y), 512)
            )
        return correct / len(y)

    checkpoints = Path(tempfile.mkdtemp(prefix="lean_train_"))
    best_acc, steps = -1.0, 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train_y))
        for start in range(0, len(perm), args.batch_size):
            rows = perm[start : start + args.batch_size]
            if len(rows) < 2:
                continue  # BatchNorm cannot normalize one sample
            loss = F.cross_entropy(model(train_x[rows]), train_y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        schedule.step()
        val_acc = accuracy(val_x, val_y)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
        torch.save(state, checkpoints / "last.ckpt")
        if val_acc > best_acc:
            best_acc = val_acc
            torch.save(state, checkpoints / "best.ckpt")
    model.load_state_dict(torch.load(checkpoints / "best.ckpt", weights_only=True)["model"])
    test_acc = accuracy(test_x, test_y)
    seconds = round(time.perf_counter() - started, 2)
    print(
        json.dumps(
            {
                "val/acc": best_acc,
                "test/acc": test_acc,
                "steps": steps,
                "batch_size": args.batch_size,
                "train_samples": len(train_y),
                "main_s": seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
