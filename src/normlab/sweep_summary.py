"""A table and a picture of a Hydra multirun: ``summary.csv`` and ``summary.png`` in the sweep dir.

``SweepSummary`` is a Hydra callback (``configs/hydra/default.yaml``, ``hydra.callbacks``): at the
end of every ``python train.py -m ...`` it reads each job's ``results.json``, ``.hydra/`` and
TensorBoard event files and writes

- ``summary.csv``: one row per job, in job order: its dir name (``norm=frozen``), status, its
  overrides, norm, val/acc, test/acc, epochs, wall time, best checkpoint, run dir. A job
  without ``results.json`` (it failed or was stopped) gets a row whose status says so and empty
  metrics.
- ``summary.png``: the final val/acc and test/acc of every job as bars, and every job's
  validation accuracy per epoch read from its event files (matplotlib's Agg backend).

The same from a shell, e.g. after a sweep that stopped early; ``--scalars 'norm/*mode*'`` also
prints the last value of those TensorBoard scalars for every job, ``--curve TAG --png PATH``
draws another scalar's curves::

    python -m normlab.sweep_summary logs/compare_norms/multiruns/<timestamp>_<pid>

Hydra imports this module in every run (single runs and DDP children too), so it imports neither
torch nor matplotlib at module level; only the multirun's own process calls ``on_multirun_end``.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("normlab")

# summary.csv's columns, in order
COLUMNS = tuple(
    "job status overrides norm val/acc test/acc epochs wall_time_s best_checkpoint run_dir".split()
)
CURVE_TAG = "val/acc"


def _job_number(job_dir: Path) -> int | None:
    """Hydra's ``hydra.job.num`` of a job dir (named ``norm=frozen`` or ``3``), None if unknown."""
    path = job_dir / ".hydra" / "hydra.yaml"
    num = OmegaConf.select(OmegaConf.load(path), "hydra.job.num") if path.is_file() else None
    if isinstance(num, int):
        return num
    return int(job_dir.name) if job_dir.name.isdigit() else None


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job dirs of a sweep dir (those Hydra wrote a ``.hydra/`` into), in job order."""
    dirs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    numbers = {p: _job_number(p) for p in dirs}
    return sorted(dirs, key=lambda p: (numbers[p] is None, numbers[p] or 0, p.name))


def _job_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def _job_norm(job_dir: Path, overrides: Sequence[str]) -> str:
    path = job_dir / ".hydra" / "config.yaml"
    if path.is_file():
        name = OmegaConf.select(OmegaConf.load(path), "norm.name", default=None)
        if name is not None:
            return str(name)
    for override in overrides:
        if override.startswith("norm="):
            return override.removeprefix("norm=")
    return ""


def job_row(job_dir: Path) -> dict[str, Any]:
    """One ``summary.csv`` row for a job dir (see ``COLUMNS``)."""
    overrides = _job_overrides(job_dir)
    row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
    row.update(job=job_dir.name, overrides=" ".join(overrides), norm=_job_norm(job_dir, overrides))
    results_path = job_dir / "results.json"
    if not results_path.is_file():
        logs = sorted(p.name for p in job_dir.glob("*.log"))
        where = f"; see {job_dir.name}/{logs[0]}" if logs else ""
        row.update(status=f"failed: no results.json{where}", run_dir=str(job_dir))
        return row
    results = json.loads(results_path.read_text())
    metrics = results.get("metrics") or {}
    row.update(
        status="ok",
        epochs=results.get("epochs", ""),
        wall_time_s=results.get("wall_time_s", ""),
        best_checkpoint=(results.get("checkpoints") or {}).get("best") or "",
        run_dir=results.get("run_dir") or str(job_dir),
    )
    for key in ("val/acc", "test/acc"):
        row[key] = metrics.get(key, "")
    return row


def _events(run_dir: Path) -> Any:
    """A loaded ``EventAccumulator`` of ``run_dir/tensorboard`` (all its event files), or None."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    event_dir = Path(run_dir) / "tensorboard"
    if not any(event_dir.glob("events.out.tfevents.*")):
        return None
    events = EventAccumulator(str(event_dir), size_guidance={SCALARS: 0})
    tb_log = logging.getLogger("tensorboard")  # one INFO line per event file otherwise
    level = tb_log.level
    tb_log.setLevel(logging.WARNING)
    try:
        events.Reload()
    finally:
        tb_log.setLevel(level)
    return events


def read_curve(run_dir: Path, tag: str = CURVE_TAG) -> tuple[list[float], list[float], str]:
    """``(x, values, x label)`` of scalar ``tag`` in ``run_dir/tensorboard``: x is the number of
    completed epochs (Lightning logs ``epoch`` at the same steps), or the step where it is not."""
    events = _events(run_dir)
    tags = events.Tags()["scalars"] if events else []
    if tag not in tags:
        return [], [], ""
    values = {e.step: e.value for e in events.Scalars(tag)}  # the last value per step wins
    epochs = {e.step: e.value for e in events.Scalars("epoch")} if "epoch" in tags else {}
    steps = sorted(values)
    if steps and all(s in epochs for s in steps):
        return [epochs[s] + 1 for s in steps], [values[s] for s in steps], "epoch"
    return [float(s) for s in steps], [values[s] for s in steps], "optimizer step"


def last_scalars(run_dir: Path, patterns: Sequence[str]) -> dict[str, float]:
    """``{tag: last value}`` of the scalars in ``run_dir/tensorboard`` whose tag matches one of
    the shell-style ``patterns`` (``saturation/*``, ``norm/acc_eval_mode``)."""
    events = _events(run_dir)
    tags = events.Tags()["scalars"] if events else []
    chosen = [t for t in tags if any(fnmatch.fnmatchcase(t, p) for p in patterns)]
    return {t: events.Scalars(t)[-1].value for t in sorted(chosen)}


def job_labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Short labels: the overrides that differ between jobs (the swept ones), else the job."""
    per_job = [row["overrides"].split() for row in rows]
    shared = set.intersection(*map(set, per_job)) if len(per_job) > 1 else set()
    labels = []
    for row, overrides in zip(rows, per_job, strict=True):
        own = [o for o in overrides if o not in shared]
        labels.append(" ".join(own) if own else f"job {row['job']}")
    return labels


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def plot_summary(
    rows: Sequence[dict[str, Any]], path: Path, title: str = "", curve_tag: str = CURVE_TAG
) -> Path:
    """Draw final accuracies (bars) and every job's scalar ``curve_tag`` (validation accuracy by
    default, read from its event files) into ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    labels = job_labels(rows)
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.38
    for offset, key in ((-width / 2, "val/acc"), (width / 2, "test/acc")):
        heights = [_number(row[key]) for row in rows]
        drawn = bars.bar([i + offset for i in range(len(rows))], heights, width, label=key)
        bars.bar_label(drawn, labels=[f"{h:.3f}" if h == h else "" for h in heights], fontsize=7)
    for i, row in enumerate(rows):
        if row["status"] != "ok":
            bars.text(i, 0.02, "failed", ha="center", rotation=90, color="red")
    bars.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    bars.set_ylim(0, 1.12)  # room for the legend above 1.0
    bars.set_ylabel("accuracy")
    bars.set_title("val/acc: last epoch; test/acc: best checkpoint")
    bars.legend(loc="upper left", fontsize=8, ncols=2)

    x_label = "epoch"
    for row, label in zip(rows, labels, strict=True):
        if row["status"] == "ok":
            xs, ys, kind = read_curve(Path(row["run_dir"]), curve_tag)
            if xs:
                curves.plot(xs, ys, marker="o", markersize=3, label=label)
                x_label = kind
    curves.set_xlabel(x_label)
    curves.xaxis.get_major_locator().set_params(integer=True)
    curves.set_ylabel(curve_tag)
    curves.set_title("validation accuracy" if curve_tag == CURVE_TAG else curve_tag)
    curves.grid(alpha=0.3)
    if curves.get_legend_handles_labels()[0]:
        curves.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(
    sweep_dir: Path, png: bool = True, curve_tag: str = CURVE_TAG, png_path: Path | None = None
) -> list[dict[str, Any]]:
    """Write ``summary.csv`` and, with ``png``, ``summary.png`` (or ``png_path``) whose right
    panel shows scalar ``curve_tag`` into ``sweep_dir``; returns the rows."""
    sweep_dir = Path(sweep_dir)
    jobs = job_dirs(sweep_dir)
    rows = [job_row(d) for d in jobs]
    tmp = sweep_dir / "summary.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(sweep_dir / "summary.csv")
    if png and rows:
        config = jobs[0] / ".hydra" / "config.yaml"
        task = OmegaConf.select(OmegaConf.load(config), "task_name") if config.is_file() else None
        title = f"{task or ''} {sweep_dir.name}"
        plot_summary(rows, png_path or sweep_dir / "summary.png", title, curve_tag)
    return rows


class SweepSummary(Callback):
    """Hydra callback: after every multirun, write ``summary.csv`` and ``summary.png`` into the
    sweep dir (see the module docstring for their contents).

    Args:
        png: also draw ``summary.png`` (matplotlib; a few seconds).
        table: an experiment's own layout of the results (``normlab.sweep_table``): ``rows``,
            ``columns`` (config keys), ``values`` (metrics), ``log_x``, ``curves``; writes
            ``table.csv``, ``table.md``, ``table.png`` (and ``curves.png``).

    Example (``configs/hydra/default.yaml``)::

        callbacks:
          sweep_summary:
            _target_: normlab.sweep_summary.SweepSummary
    """

    def __init__(self, png: bool = True, table: dict[str, Any] | None = None) -> None:
        if not isinstance(png, bool):
            raise TypeError(f"SweepSummary(png={png!r}): expected true or false")
        self.png, self.table = png, dict(table or {})
        self.failed: list[str] = []  # one line per job normlab refused, said at the sweep's end

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        # Hydra skips on_multirun_end when a job failed: keep summary.csv current after every
        # job of a sweep, so a failed sweep still leaves its table (failed jobs included)
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        sweep_dir = Path(str(hydra_cfg.sweep.dir))
        if hydra_cfg.mode == RunMode.MULTIRUN and sweep_dir.is_dir():
            write_summary(sweep_dir, png=False)
        self._take_failure(hydra_cfg, job_return)

    def _take_failure(self, hydra_cfg: Any, job_return: Any) -> None:
        """A job normlab refused (SweepJobError) under Hydra's basic sweeper, which would stop at
        it with a traceback: marked done here, and named with the others at the sweep's end.
        Other sweepers (e.g. Optuna) keep the failure: they act on it."""
        from hydra.core.utils import JobStatus

        from normlab.errors import SweepJobError

        basic = str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper")
        failure = getattr(job_return, "_return_value", None)
        if basic and job_return.status == JobStatus.FAILED and isinstance(failure, SweepJobError):
            self.failed.append(
                f"job {hydra_cfg.job.num} ({' '.join(job_return.overrides)}; its dir"
                f" {hydra_cfg.runtime.output_dir}): {failure}"
            )
            job_return.status, job_return.return_value = JobStatus.COMPLETED, None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = write_summary(sweep_dir, png=self.png)
        if self.table:
            from normlab.sweep_table import write_table

            write_table(sweep_dir, png=self.png, **self.table)
        failed = sum(row["status"] != "ok" for row in rows)
        log.info(
            "sweep summary of %d job(s)%s: %s",
            len(rows),
            f" ({failed} failed)" if failed else "",
            sweep_dir / "summary.csv",
        )
        if self.failed:
            print(
                f"normlab: error: {len(self.failed)} of {len(rows)} sweep jobs failed (the others"
                f" ran; {sweep_dir / 'summary.csv'} lists them all): {'; '.join(self.failed)}",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(2)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m normlab.sweep_summary SWEEP_DIR``: (re)write a sweep dir's summary and print
    it (with ``--scalars``, also the last value of TensorBoard scalars of every job)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="logs/<task_name>/multiruns/<timestamp>_<pid>")
    parser.add_argument("--no-png", action="store_true", help="write summary.csv only")
    parser.add_argument("--curve", default=CURVE_TAG, help="scalar of the right panel (val/acc)")
    parser.add_argument("--png", type=Path, help="draw here instead of SWEEP_DIR/summary.png")
    parser.add_argument(
        "--scalars",
        nargs="+",
        default=[],
        metavar="TAG",
        help="print last values, e.g. 'norm/*mode*'",
    )
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir() or not job_dirs(args.sweep_dir):
        print(
            f"normlab: error: {args.sweep_dir} holds no Hydra job dirs (<job>/.hydra); give the"
            " sweep dir of a `python train.py -m ...` run, e.g."
            " logs/compare_norms/multiruns/<timestamp>_<pid>",
            file=sys.stderr,
        )
        return 2
    rows = write_summary(args.sweep_dir, not args.no_png, args.curve, args.png)
    for row, label in zip(rows, job_labels(rows), strict=True):
        numbers = [f"{k}={row[k]:.4f}" for k in ("val/acc", "test/acc") if row[k] != ""]
        numbers += [f"{k}={row[k]}" for k in ("epochs", "wall_time_s") if row[k] != ""]
        name = row["job"] if label == row["job"] else f"{row['job']}  {label}"
        print(f"job {name}  {row['status']}  {'  '.join(numbers)}")
        if args.scalars and row["status"] == "ok":
            for tag, value in last_scalars(Path(row["run_dir"]), args.scalars).items():
                print(f"    {tag} = {value:.4f}")
    print(f"wrote {args.sweep_dir / 'summary.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
