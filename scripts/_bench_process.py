"""Whole processes, side by side: `python train.py ...` against two hand-written loops of the same
job, `scripts/plain_train.py` (uint8 data scaled per batch, as normlab does) and
`scripts/lean_train.py` (the data converted and scaled once: the leanest loop a user would
write). A user times the process, start-up included, so this is the figure that says what the
template costs.

Each job runs the three processes in rotating order (A B C, B C A, ...), ``repeats`` times, and
reports min / median / max of wall, user and system time. A baseline must do the same work as
train.py: the same batch size and the same number of optimizer steps on the same training split,
which is checked on every run (a mismatch stops the benchmark).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _bench_docs

ROOT = Path(__file__).resolve().parents[1]
MNIST_SIZED = ["data.synthetic.shape=[1,28,28]", "data.synthetic.num_samples=60000"]
# the same job's arguments for the hand-written loops (data=synthetic: batch 128, 10% validation,
# the official 512-image test split; digits: batch 64, 15% validation, 15% test)
SYNTHETIC_ARGS = ["--synthetic", "1,28,28", "--num-samples", "60000", "--num-test", "512"]
SYNTHETIC_ARGS += ["--batch-size", "128", "--val-fraction", "0.1", "--test-fraction", "0"]
# name -> (train.py overrides, baseline arguments, targets of the median ratios to lean)
JOBS: dict[str, tuple[list[str], list[str], dict[str, float]]] = {
    "digits_5_epochs": (["trainer.max_epochs=5"], ["--epochs", "5", "--batch-size", "64"], {}),
    "mnist_sized_1_epoch": (
        ["data=synthetic", *MNIST_SIZED, "data.synthetic.num_test=512", "trainer.max_epochs=1"],
        [*SYNTHETIC_ARGS, "--epochs", "1"],
        {"wall": 1.10, "cpu": 1.10, "sys": 1.5},
    ),
}
VARIANTS = ("normlab", "plain", "lean")


def _timed(cmd: list[str]) -> tuple[dict[str, float], str]:
    """Wall, user and system seconds of one process run to its end, and its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"wall": wall, "user": user, "sys": system, "cpu": user + system}, proc.stdout


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def _work(variant: str, stdout: str, run_dir: Path) -> dict[str, int]:
    """The optimizer steps and batch size a process reports (train.py: its results.json)."""
    if variant == "normlab":
        results = json.loads((run_dir / "results.json").read_text())
        return {"steps": results["steps"]}
    report = json.loads(stdout.strip().splitlines()[-1])
    return {"steps": report["steps"]}


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
    }


def _ratio(spread: dict[str, Any], variant: str, clock: str) -> float:
    return round(spread[variant][clock]["median"] / spread["lean"][clock]["median"], 3)


def import_floor(repeats: int = 5) -> dict[str, float]:
    """Median wall seconds of ``python -c "import torch"`` and of ``import lightning.pytorch``:
    the start-up any Lightning program pays beyond a plain PyTorch one."""
    out = {}
    for name, code in (("torch", "import torch"), ("lightning", "import lightning.pytorch")):
        out[name] = statistics.median(
            _timed([sys.executable, "-c", code])[0]["wall"] for _ in range(repeats)
        )
    out["floor"] = out["lightning"] - out["torch"]
    return {k: round(v, 2) for k, v in out.items()}


def compare(tmp: Path, repeats: int = 5, jobs: list[str] | None = None) -> dict[str, Any]:
    """Run each job's three processes in rotating order, ``repeats`` times; report min / median /
    max of wall, user and system seconds and the median ratios normlab / lean and plain / lean.

    Raises:
        RuntimeError: a process failed, or a baseline did not run the optimizer steps train.py ran.
    """
    out: dict[str, Any] = {}
    for name in jobs or list(JOBS):
        overrides, args, targets = JOBS[name]
        commands = {
            "normlab": [sys.executable, str(ROOT / "train.py"), *overrides],
            "plain": [sys.executable, str(ROOT / "scripts" / "plain_train.py"), *args],
            "lean": [sys.executable, str(ROOT / "scripts" / "lean_train.py"), *args],
        }
        times: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        steps: dict[str, set[int]] = {v: set() for v in VARIANTS}
        for k in range(repeats):
            order = VARIANTS[k % 3 :] + VARIANTS[: k % 3]
            for variant in order:
                run_dir = tmp / name / f"{variant}{k}"
                cmd = list(commands[variant])
                if variant == "normlab":
                    cmd += [f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp / 'logs'}"]
                t, stdout = _timed(cmd)
                times[variant].append(t)
                steps[variant].add(_work(variant, stdout, run_dir)["steps"])
        if len({frozenset(s) for s in steps.values()}) != 1 or len(steps["normlab"]) != 1:
            raise RuntimeError(f"{name}: the processes ran different numbers of steps: {steps}")
        spread = {
            v: {clock: _spread([t[clock] for t in ts]) for clock in ("wall", "user", "sys", "cpu")}
            for v, ts in times.items()
        }

        out[name] = {
            "commands": {
                "normlab": "python train.py " + " ".join(overrides),
                "plain": "python scripts/plain_train.py " + " ".join(args),
                "lean": "python scripts/lean_train.py " + " ".join(args),
            },
            "steps": steps["normlab"].pop(),
            **spread,
            "ratios_to_lean": {
                v: {c: _ratio(spread, v, c) for c in ("wall", "cpu", "sys")}
                for v in ("normlab", "plain")
            },
            "targets": targets,
            "repeats": repeats,
        }
    return out


def verdicts(jobs: dict[str, Any], floor: dict[str, float]) -> dict[str, bool]:
    """Whether each target is met: the median ratios normlab / lean of each job, and the short
    digits run no more than 0.5 s above the lean loop plus Lightning's import floor."""
    ok = {}
    for name, job in jobs.items():
        for clock, target in job["targets"].items():
            ok[f"{name}.{clock}"] = job["ratios_to_lean"]["normlab"][clock] <= target
    digits = jobs.get("digits_5_epochs")
    if digits:
        allowed = digits["lean"]["wall"]["median"] + floor["floor"] + 0.5
        ok["digits_5_epochs.start_up"] = digits["normlab"]["wall"]["median"] <= allowed
    return ok


def table(jobs: dict[str, Any], floor: dict[str, float]) -> str:
    lines = [
        "| job | process | steps | wall s min / median / max | user s | sys s | median ratio to"
        " lean: wall / CPU / sys |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, job in jobs.items():
        for variant in VARIANTS:
            s = job[variant]
            r = job["ratios_to_lean"].get(variant)
            ratios = f"{r['wall']:.3f} / {r['cpu']:.3f} / {r['sys']:.3f}" if r else "1"
            cells = [
                f"{s[c]['min']:.1f} / {s[c]['median']:.1f} / {s[c]['max']:.1f}"
                for c in ("wall", "user", "sys")
            ]
            lines.append(
                f"| {name} | `{job['commands'][variant]}` | {job['steps']} | "
                + " | ".join(cells)
                + f" | {ratios} |"
            )
    lines.append("")
    lines.append(
        f"Import floor (medians of 5): `import torch` {floor['torch']:.2f} s, `import"
        f" lightning.pytorch` {floor['lightning']:.2f} s: Lightning's floor {floor['floor']:.2f} s."
    )
    return "\n".join(lines)


SECTION = _bench_docs.SECTIONS[0]  # written by `scripts/bench.py --process --docs PAGE`


def write_section(page: Path, results: dict[str, Any]) -> None:
    """Write the page's Whole process section (in place, before the Augmentation section)."""
    m = results["machine"]
    passed = ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in results["passed"].items())
    section = f"""{SECTION}

Generated by `{results["command"]}` on {results["date"]} ({m.get("cpu", "")}, \
{m.get("cpu_cores", "")} cores, torch threads {m.get("torch_threads", "")}; load average at the \
end {", ".join(str(x) for x in m["load_average_end"])}). Each job runs its three processes in \
rotating order, {next(iter(results["whole_process"].values()))["repeats"]} rounds; every run's \
optimizer steps are checked against train.py's. Ratios are of the medians, to the lean loop. \
Targets: {passed}.

{table(results["whole_process"], results["import_floor_s"])}

"""
    _bench_docs.put_section(page, section)
