"""Benchmark normlab against a plain PyTorch loop and torchvision's data pipeline, in one process.

    python scripts/bench.py [--json PATH] [--quick] [--docs PATH] [--knobs]
    python scripts/bench.py --process [--repeats N] [--json PATH] [--docs PATH]

Prints a table and, with --json, writes the figures (template_vs_plain, bn_logging_overhead,
datapath_speedup, peak_rss_mib, help_latency_s, details); --docs PATH writes the Markdown page
(docs/benchmarks.md is generated this way). Ratios come from variants run side by side in this
process, in rotating order, as medians of paired repeats: the machine may be noisy.
--process instead times whole processes side by side: `python train.py` against
scripts/plain_train.py, the same job in plain PyTorch (wall and CPU time, medians, A B A B).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# (comparison, target) of the figures the issue sets targets for
TARGETS = {
    "template_vs_plain": (">=", 0.95),
    "bn_logging_overhead": ("<=", 0.03),
    "datapath_speedup": (">=", 20.0),
}
BATCH = 128  # configs/data/mnist.yaml's batch size
MNIST_STEPS = 422  # training steps of an MNIST epoch (54,000 images after the 10% val split)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--docs", type=Path, help="write the Markdown page (docs/benchmarks.md)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (~3 min)")
    parser.add_argument("--knobs", action="store_true", help="time channels_last/bf16/compile")
    parser.add_argument(
        "--process",
        action="store_true",
        help="only the whole-process comparison with scripts/plain_train.py and lean_train.py",
    )
    parser.add_argument("--steps", type=int, help="training steps a run (default 105, quick 45)")
    parser.add_argument("--repeats", type=int, help="rounds of the training variants (5, quick 3)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        help="time training steps by this process's CPU time (default on CPU: other processes'"
        " load does not count) or by wall clock (default on GPU)",
    )
    return parser.parse_args(argv)


def machine() -> dict[str, Any]:
    import lightning
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def bench_training(args: argparse.Namespace, tmp: Path, device: Any) -> dict[str, Any]:
    import _bench_runs as runs
    from hydra.utils import instantiate

    steps, repeats = (45, 3) if args.quick else (105, 5)
    steps, repeats = args.steps or steps, args.repeats or repeats
    if steps <= runs.WARMUP:
        raise SystemExit(f"--steps must be more than the {runs.WARMUP} warm-up steps")
    # the validation split holds the 4 batches of 512 the epoch-end diagnostics look at
    n = steps * BATCH + 2050
    overrides = [
        "data=synthetic",
        "data.synthetic.shape=[1,28,28]",
        f"data.synthetic.num_samples={n}",
        "data.synthetic.num_test=256",
        f"data.val_fraction={2048 / n}",
        f"data.batch_size={BATCH}",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
    ]
    cfg = runs.compose_config(overrides, tmp / "train")
    dm = instantiate(cfg.data, seed=cfg.seed, _convert_="all")
    dm.setup("fit")
    inspection = [c._target_ for c in cfg.callbacks.values() if runs.is_inspection(c)]

    def variants(k: int) -> dict[str, Any]:
        return {  # each runs the plain loop interleaved, step by step
            "template": lambda: runs.run_template(cfg, dm, k, device, inspection=True),
            "no_inspection": lambda: runs.run_template(cfg, dm, k, device, inspection=False),
        }

    runs.interleaved(variants(runs.WARMUP + 2), 1)  # first-use costs, discarded
    rounds = runs.interleaved(variants(steps), repeats)
    clock = args.clock or ("wall" if device.type == "cuda" else "cpu")

    def median(values) -> float:
        return statistics.median(list(values))

    ratios = {
        c: {
            "template_vs_plain": median(
                r["template"][f"plain_step_s_{c}"] / r["template"][f"step_s_{c}"] for r in rounds
            ),
            "no_inspection_vs_plain": median(
                r["no_inspection"][f"plain_step_s_{c}"] / r["no_inspection"][f"step_s_{c}"]
                for r in rounds
            ),
            "bn_logging_overhead": median(direct_overhead(r["template"], c) for r in rounds),
            "bn_logging_overhead_ab": runs.median_ratio(
                rounds, "template", "no_inspection", f"step_s_{c}"
            )
            - 1,
        }
        for c in ("cpu", "wall")
    }
    step_s = {k: median(r[k][f"step_s_{clock}"] for r in rounds) for k in rounds[0]}
    step_s["plain"] = median(r[k][f"plain_step_s_{clock}"] for r in rounds for k in r)
    end_s = {k: median(r[k][f"epoch_end_s_{clock}"] for r in rounds) for k in rounds[0]}
    hooks = {
        part: median(r["template"][f"hooks_{part}_s_{clock}"] for r in rounds)
        for part in ("step", "epoch_end")
    }
    return {
        **ratios[clock],
        "training": {
            "clock": clock,
            "ratios_by_clock": ratios,
            "data": "synthetic MNIST-shaped (1x28x28 uint8, in memory), batch 128",
            "model": "configs/model/cnn.yaml (widths 32,64,128), norm=batchnorm, AdamW",
            "batch_size": BATCH,
            "mnist_epoch_steps": MNIST_STEPS,
            "steps": steps,
            "timed_steps": steps - runs.WARMUP,
            "repeats": repeats,
            "inspection_callbacks": inspection,
            "samples_per_s": {k: BATCH / v for k, v in step_s.items()},
            "epoch_end_s": end_s,
            "inspection_hooks_s": hooks,
            "val_images": len(dm.splits["val"]),
            "rounds": rounds,
        },
        **(
            {"knobs": bench_knobs(overrides, tmp, dm, device, steps, max(1, repeats - 2), clock)}
            if args.knobs or device.type == "cuda"
            else {}
        ),
    }


def direct_overhead(run: dict[str, float], clock: str) -> float:
    """Seconds the inspection callbacks' hooks take in a 422-step MNIST epoch (per-step hooks
    times 422, plus their epoch-end hooks once) over the rest of the epoch's training steps."""
    hooks = MNIST_STEPS * run[f"hooks_step_s_{clock}"] + run[f"hooks_epoch_end_s_{clock}"]
    return hooks / (MNIST_STEPS * (run[f"step_s_{clock}"] - run[f"hooks_step_s_{clock}"]))


def bench_knobs(overrides, tmp, dm, device, steps, repeats, clock) -> dict[str, float]:
    """Samples/s of the template with each accelerator knob over the template without."""
    import _bench_runs as runs

    knobs = {
        "baseline": [],
        "channels_last": ["model.channels_last=true"],
        "bf16_mixed": ["trainer.precision=bf16-mixed"],
        "compile": ["model.compile=true"],
    }
    cfgs = {k: runs.compose_config([*overrides, *o], tmp / k) for k, o in knobs.items()}
    variants = {
        k: (lambda c=c: runs.run_template(c, dm, steps, device, plain=False))
        for k, c in cfgs.items()
    }
    rounds = runs.interleaved(variants, repeats)
    key = f"step_s_{clock}"
    return {k: runs.median_ratio(rounds, "baseline", k, key) for k in knobs if k != "baseline"}


def bench_datapath(quick: bool, tmp: Path, device: Any) -> dict[str, Any]:
    import _bench_runs as runs

    root = runs.write_mnist_idx(tmp / "mnist", 60_000, 10_000)
    tv_batches, nl_batches, repeats = (30, 1000, 2) if quick else (60, 2000, 3)
    rates: dict[str, list[float]] = {"torchvision_0_workers": [], "torchvision_2_workers": []}
    rates["normlab"] = []
    for _ in range(repeats):
        rates["torchvision_0_workers"].append(runs.torchvision_rate(root, BATCH, 0, tv_batches))
        rates["normlab"].append(runs.normlab_rate(root, BATCH, device, nl_batches))
        rates["torchvision_2_workers"].append(runs.torchvision_rate(root, BATCH, 2, tv_batches))
    med = {k: statistics.median(v) for k, v in rates.items()}
    baseline = max(med["torchvision_0_workers"], med["torchvision_2_workers"])
    return {
        "datapath_speedup": med["normlab"] / baseline,
        "datapath": {"samples_per_s": med, "repeats": repeats, "batch_size": BATCH},
    }


def bench_process(quick: bool, tmp: Path) -> dict[str, Any]:
    import _bench_runs as runs

    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp / 'rss' / 'run'}"]
    cmd += [f"paths.log_dir={tmp / 'rss' / 'logs'}"] + (["trainer.max_epochs=1"] if quick else [])
    rss, wall, code = runs.peak_rss_of(cmd)
    if code != 0:
        raise RuntimeError(f"the default training run failed (exit {code}): {' '.join(cmd)}")
    # what importing the libraries alone costs (shared libraries count as resident memory)
    import_rss = runs.peak_rss_of([sys.executable, "-c", "import lightning"])[0]
    return {
        "peak_rss_mib": rss,
        "import_lightning_rss_mib": import_rss,
        "help_latency_s": runs.help_latency(3),
        "default_run": {
            "command": "python train.py" + (" trainer.max_epochs=1" * quick),
            "wall_s": wall,
        },
    }


def verdicts(results: dict[str, Any]) -> dict[str, bool]:
    ok = {}
    for key, (op, target) in TARGETS.items():
        value = results[key]
        ok[key] = value >= target if op == ">=" else value <= target
    return ok


def table(results: dict[str, Any]) -> str:
    """The figures as a Markdown table (printed, and pasted into docs/benchmarks.md)."""
    t, d = results["training"], results["datapath"]["samples_per_s"]
    sps = t["samples_per_s"]
    rows = [
        (
            "template_vs_plain",
            f"{results['template_vs_plain']:.3f}",
            f"Trainer {sps['template']:.0f} / plain loop {sps['plain']:.0f} samples/s",
        ),
        (
            "bn_logging_overhead",
            f"{results['bn_logging_overhead']:+.3f}",
            f"{len(t['inspection_callbacks'])} inspection callbacks' hooks: "
            f"{t['inspection_hooks_s']['step'] * 1000:.2f} ms a step, "
            f"{t['inspection_hooks_s']['epoch_end']:.2f} s an epoch; side by side: "
            f"{results['bn_logging_overhead_ab']:+.3f}",
        ),
        (
            "datapath_speedup",
            f"{results['datapath_speedup']:.1f}",
            f"normlab {d['normlab']:,.0f} / torchvision {d['torchvision_0_workers']:,.0f} "
            f"(0 workers), {d['torchvision_2_workers']:,.0f} (2 workers) samples/s",
        ),
        (
            "peak_rss_mib",
            f"{results['peak_rss_mib']:.0f}",
            f"`{results['default_run']['command']}` ({results['default_run']['wall_s']:.0f} s); "
            f"`import lightning` alone: {results['import_lightning_rss_mib']:.0f} MiB",
        ),
        ("help_latency_s", f"{results['help_latency_s']:.2f}", "`python train.py --help`"),
    ]
    lines = ["| figure | value | target | met | measured as |", "|---|---|---|---|---|"]
    for key, value, how in rows:
        op, target = TARGETS.get(key, ("", None))
        met = "" if target is None else ("yes" if results["passed"][key] else "**no**")
        lines.append(
            f"| {key} | {value} | {op} {target if target is not None else ''} | {met} | {how} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.process:
        return whole_process(args)
    import lightning  # noqa: F401 - first, so that its loggers exist and can be quietened
    import torch

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, Any] = {"command": " ".join(["python scripts/bench.py", *sys.argv[1:]])}
    results["machine"] = machine()
    with tempfile.TemporaryDirectory(prefix="normlab-bench-") as tmp:
        results.update(bench_datapath(args.quick, Path(tmp), device))
        results.update(bench_training(args, Path(tmp), device))
        results.update(bench_process(args.quick, Path(tmp)))
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    results["targets"] = {k: f"{op} {v}" for k, (op, v) in TARGETS.items()}
    results["passed"] = verdicts(results)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.docs:
        from _bench_docs import later_sections, render

        # the sections `--process --docs` and scripts/bench_augment.py write at the end stay
        kept = later_sections(args.docs.read_text() if args.docs.is_file() else "")
        args.docs.write_text(render(results, table(results)) + ("\n" + kept if kept else ""))
    return 0 if all(results["passed"].values()) else 1


def whole_process(args: argparse.Namespace) -> int:
    import _bench_process

    floor = _bench_process.import_floor()
    with tempfile.TemporaryDirectory(prefix="normlab-bench-") as tmp:
        jobs = _bench_process.compare(Path(tmp), repeats=args.repeats or 5)
    results = {
        "command": " ".join(["python scripts/bench.py", *sys.argv[1:]]),
        "machine": machine(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "import_floor_s": floor,
        "whole_process": jobs,
        "passed": _bench_process.verdicts(jobs, floor),
    }
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(_bench_process.table(jobs, floor))
    print(
        "targets:",
        ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in results["passed"].items()),
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.docs:
        _bench_process.write_section(args.docs, results)
    return 0 if all(results["passed"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
