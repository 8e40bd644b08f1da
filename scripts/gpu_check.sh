#!/usr/bin/env bash
# One prepared check for a single-GPU machine (the tests never need one):
#   1. a short training run on CIFAR-shaped synthetic data in fp32, and with bf16 mixed precision
#      plus channels_last, through train.py; and a torchvision ResNet-18 with frozen statistics
#      (model=torchvision norm=frozen) in bf16;
#   2. the SyncBatchNorm conversion Lightning applies for trainer.sync_batchnorm=true: outputs and
#      running statistics equal BatchNorm2d's in a one-process group, FrozenBatchNorm2d untouched;
#   3. a short table of the results.
# Usage: bash scripts/gpu_check.sh [extra train.py overrides]   (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=${GPU_CHECK_DIR:-logs/gpu_check}

if ! "$PY" -c "import torch, normlab" 2>/dev/null; then
  echo "gpu_check: $PY cannot import torch and normlab; run 'make install' or set PYTHON=" >&2
  exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU is visible to torch (torch.cuda.is_available() is False);" \
       "run this on a GPU machine. The test suite itself needs none." >&2
  exit 2
fi
rm -rf "$OUT"
mkdir -p "$OUT"
COMMON=(trainer=gpu data=synthetic trainer.max_epochs=3 callbacks.rich_progress_bar=null "$@")

"$PY" train.py "${COMMON[@]}" hydra.run.dir="$OUT/fp32" > "$OUT/fp32.log" 2>&1
"$PY" train.py "${COMMON[@]}" trainer.precision=bf16-mixed model.channels_last=true \
  hydra.run.dir="$OUT/bf16_channels_last" > "$OUT/bf16_channels_last.log" 2>&1
"$PY" train.py "${COMMON[@]}" model=torchvision model.arch=resnet18 norm=frozen \
  trainer.precision=bf16-mixed hydra.run.dir="$OUT/resnet18_frozen_bf16" \
  > "$OUT/resnet18_frozen_bf16.log" 2>&1

cat > "$OUT/sync_check.py" <<'EOF'
"""2 ranks on cuda:0 over gloo: normlab's LayerSync, SyncBatchNorm vs a one-process reference."""
import json, os, socket, sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from normlab.norm import FrozenBatchNorm2d, keep_children
from normlab.norm.sync import SyncBatchNormKeepingActivations

B = 16


def model() -> nn.Module:
    """conv -> BatchNorm2d with a fused ReLU (as timm's BatchNormAct2d) -> conv -> frozen BN."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.act = nn.ReLU()
    bn = keep_children(holder, nn.BatchNorm2d(8, momentum=0.3))
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.3)
    frozen = FrozenBatchNorm2d(8)
    frozen.running_mean.fill_(0.5)
    return nn.Sequential(nn.Conv2d(3, 8, 3), bn, nn.Conv2d(8, 8, 1), frozen)


def batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2 * B, 3, 16, 16, generator=gen) * 2 + 1


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    net = SyncBatchNormKeepingActivations().apply(model()).cuda().train()
    y = net(batch()[rank * B : (rank + 1) * B].cuda())
    if rank == 0:
        state = {k: v.cpu() for k, v in net.state_dict().items()}
        torch.save({"y": y.detach().cpu(), "types": [type(m).__name__ for m in net],
                    "act": isinstance(getattr(net[1], "act", None), nn.ReLU), **state}, out)
    dist.barrier()
    dist.destroy_process_group()


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.cpu() - b.cpu()).abs().max().item()


if __name__ == "__main__":
    out = sys.argv[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, f"{out}/sync_rank0.pt"), nprocs=2, join=True)
    synced = torch.load(f"{out}/sync_rank0.pt", weights_only=True)
    reference, half = model().cuda().train(), model().cuda().train()
    with torch.no_grad():
        y_ref = reference(batch().cuda())  # one process, the whole batch
        y_half = half(batch()[:B].cuda())  # unsynced: rank 0's samples alone
    stats = ("running_mean", "running_var")
    result = {
        "types": synced["types"],
        "act_kept": synced["act"],
        "output_vs_reference": gap(synced["y"], y_ref[:B]),
        "output_vs_unsynced": gap(synced["y"], y_half),
        "stats_vs_reference": max(gap(synced[f"1.{k}"], getattr(reference[1], k)) for k in stats),
        "stats_vs_unsynced": max(gap(synced[f"1.{k}"], getattr(half[1], k)) for k in stats),
        "frozen_unchanged": gap(synced["3.running_mean"], torch.full((8,), 0.5)) == 0.0,
    }
    with open(f"{out}/sync_check.json", "w") as f:
        json.dump(result, f)
EOF
if ! "$PY" "$OUT/sync_check.py" "$OUT" > "$OUT/sync_check.log" 2>&1; then
  echo "gpu_check: the SyncBatchNorm check crashed ($OUT/sync_check.log):" >&2
  cat "$OUT/sync_check.log" >&2
  exit 1
fi

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
rows = []
for name in ("fp32", "bf16_channels_last", "resnet18_frozen_bf16"):
    r = json.loads((out / name / "results.json").read_text())
    m = r["metrics"]
    rows.append((name, m.get("val/acc"), m.get("test/acc"), r.get("wall_time_s")))
sync = json.loads((out / "sync_check.json").read_text())

print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
print(f"{'run':<22}{'val/acc':>10}{'test/acc':>10}{'wall s':>10}")
for name, val, test, wall in rows:
    print(f"{name:<22}{val:>10.4f}{test:>10.4f}{wall:>10.1f}")
print(f"SyncBatchNorm, 2 processes x 16 samples (gloo): layers {sync['types']}, activation kept:"
      f" {sync['act_kept']}, frozen layer unchanged: {sync['frozen_unchanged']}")
print(f"  max |diff| vs one process on 32 samples: output {sync['output_vs_reference']:.2e},"
      f" running stats {sync['stats_vs_reference']:.2e}")
print(f"  max |diff| vs unsynced BatchNorm on 16 samples (must be large): output"
      f" {sync['output_vs_unsynced']:.2e}, running stats {sync['stats_vs_unsynced']:.2e}")
ok = (
    sync["types"][1] == "SyncBatchNormAct" and sync["act_kept"] and sync["frozen_unchanged"]
    and sync["output_vs_reference"] < 1e-4 and sync["stats_vs_reference"] < 1e-5
    and sync["output_vs_unsynced"] > 1e-3 and sync["stats_vs_unsynced"] > 1e-3
)
print("gpu_check:", "OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF
