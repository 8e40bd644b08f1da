"""Whole processes, side by side: `python train.py ...` against `scripts/plain_train.py`, the same
job written by hand in plain PyTorch. A user times the process, start-up included, so this is the
figure that says what the template costs."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MNIST_SIZED = ["data.synthetic.shape=[1,28,28]", "data.synthetic.num_samples=60000"]
# name -> (train.py overrides, plain_train.py arguments, target of the wall-time ratio)
JOBS: dict[str, tuple[list[str], list[str], float]] = {
    "digits_5_epochs": (["trainer.max_epochs=5"], ["--epochs", "5"], 1.3),
    "mnist_sized_1_epoch": (
        ["data=synthetic", *MNIST_SIZED, "data.synthetic.num_test=512", "trainer.max_epochs=1"],
        ["--synthetic", "1,28,28", "--num-samples", "60000", "--num-test", "512", "--epochs", "1"],
        1.10,
    ),
}


def _timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child: user + system) of one process run to its end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def compare(tmp: Path, repeats: int = 3, jobs: list[str] | None = None) -> dict[str, Any]:
    """Run each job's two processes alternately (A B A B ...), ``repeats`` times, and report the
    medians of wall and CPU time and the wall-time ratio normlab / plain."""
    out: dict[str, Any] = {}
    for name in jobs or list(JOBS):
        overrides, plain_args, target = JOBS[name]
        normlab_cmd = [sys.executable, str(ROOT / "train.py"), *overrides]
        plain_cmd = [sys.executable, str(ROOT / "scripts" / "plain_train.py"), *plain_args]
        times: dict[str, list[tuple[float, float]]] = {"normlab": [], "plain": []}
        for k in range(repeats):
            run = [f"hydra.run.dir={tmp / name / str(k)}", f"paths.log_dir={tmp / 'logs'}"]
            pairs = [("normlab", normlab_cmd + run), ("plain", plain_cmd)]
            for variant, cmd in pairs if k % 2 == 0 else pairs[::-1]:
                times[variant].append(_timed(cmd))
        medians = {
            v: {
                "wall_s": round(statistics.median(t[0] for t in ts), 2),
                "cpu_s": round(statistics.median(t[1] for t in ts), 2),
            }
            for v, ts in times.items()
        }
        out[name] = {
            "normlab_command": "python train.py " + " ".join(overrides),
            "plain_command": "python scripts/plain_train.py " + " ".join(plain_args),
            **medians,
            "wall_ratio": round(medians["normlab"]["wall_s"] / medians["plain"]["wall_s"], 3),
            "target": target,
            "repeats": repeats,
        }
    return out


def table(results: dict[str, Any]) -> str:
    lines = [
        "| job | normlab wall / CPU s | plain wall / CPU s | wall ratio | target |",
        "|---|---|---|---|---|",
    ]
    for r in results.values():
        n, p = r["normlab"], r["plain"]
        lines.append(
            f"| `{r['normlab_command']}` | {n['wall_s']:.1f} / {n['cpu_s']:.1f} | "
            f"{p['wall_s']:.1f} / {p['cpu_s']:.1f} | {r['wall_ratio']:.2f} | <= {r['target']} |"
        )
    return "\n".join(lines)
