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

"$PY" - "$OUT" <<'EOF'
import json, os, sys, tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from normlab.models.backbone import ConvNet
from normlab.norm import FrozenBatchNorm2d, convert_to_frozen, make_norm_factory

out = Path(sys.argv[1])
rows = []
for name in ("fp32", "bf16_channels_last", "resnet18_frozen_bf16"):
    r = json.loads((out / name / "results.json").read_text())
    m = r["metrics"]
    rows.append((name, m.get("val/acc"), m.get("test/acc"), r.get("wall_time_s")))

# SyncBatchNorm in a one-process NCCL group: must match BatchNorm2d exactly in train mode
store = tempfile.NamedTemporaryFile(delete=False).name
dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
torch.manual_seed(0)
cfg = {"name": "batchnorm"}


def convnet() -> ConvNet:
    return ConvNet(
        3, 10, widths=(16, 32), blocks_per_stage=1, activation="relu", dropout=0.0,
        norm_layer=make_norm_factory(cfg), conv_bias=False,
    )


bn_model = convnet().cuda()
sync_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(convnet()).cuda()
sync_model.load_state_dict(bn_model.state_dict())
x = torch.randn(32, 3, 32, 32, device="cuda")
diff_out = (bn_model(x) - sync_model(x)).abs().max().item()
diff_stats = max(
    (a - b).abs().max().item()
    for (ka, a), (kb, b) in zip(bn_model.state_dict().items(), sync_model.state_dict().items())
    if "running" in ka
)
n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in sync_model.modules())
frozen = convert_to_frozen(convnet())
frozen = torch.nn.SyncBatchNorm.convert_sync_batchnorm(frozen)
n_frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
dist.destroy_process_group()
os.unlink(store)

print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
print(f"{'run':<22}{'val/acc':>10}{'test/acc':>10}{'wall s':>10}")
for name, val, test, wall in rows:
    print(f"{name:<22}{val:>10.4f}{test:>10.4f}{wall:>10.1f}")
print(f"SyncBatchNorm layers after conversion: {n_sync}; max |output diff| vs BatchNorm2d:"
      f" {diff_out:.2e}; max |running stat diff|: {diff_stats:.2e}")
print(f"FrozenBatchNorm2d layers left alone by convert_sync_batchnorm: {n_frozen} of 2")
ok = diff_out < 1e-4 and diff_stats < 1e-5 and n_sync == 2 and n_frozen == 2
print("gpu_check:", "OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF
