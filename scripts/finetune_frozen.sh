#!/usr/bin/env bash
# Train a CNN with BatchNorm, then fine-tune its best checkpoint with frozen statistics
# (experiment=finetune_frozen). Both runs land in logs/finetune_frozen/pairs/<timestamp>_<pid>/
# {batchnorm,frozen}; each has its results.json. Extra arguments go to both runs, e.g.
#   scripts/finetune_frozen.sh trainer=cpu data=mnist
# Environment: PYTHON (default: .venv/bin/python if present, else python), PRETRAIN_EPOCHS (5).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
PAIR=logs/finetune_frozen/pairs/$(date +%Y-%m-%d_%H-%M-%S)_$$

"$PYTHON" train.py norm=batchnorm task_name=finetune_frozen \
  trainer.max_epochs="${PRETRAIN_EPOCHS:-5}" "$@" hydra.run.dir="$PAIR/batchnorm"

BEST=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["checkpoints"]["best"])' \
  "$PAIR/batchnorm/results.json")
echo "fine-tuning from $BEST"

"$PYTHON" train.py experiment=finetune_frozen norm.init_from="$BEST" "$@" \
  hydra.run.dir="$PAIR/frozen"

"$PYTHON" - "$PAIR" <<'PY'
import json, sys
from pathlib import Path
for name in ("batchnorm", "frozen"):
    r = json.loads((Path(sys.argv[1]) / name / "results.json").read_text())
    m = r["metrics"]
    print(f"{name:9s} val/acc={m['val/acc']:.4f} test/acc={m['test/acc']:.4f}"
          f" epochs={r.get('epochs')} wall_time_s={r.get('wall_time_s')}  {r['run_dir']}")
PY
