"""An experiment's own table and picture of a sweep: metrics laid out by two config keys.

``SweepSummary(table={...})`` (an experiment's ``hydra.callbacks.sweep_summary.table``) writes,
beside ``summary.csv``/``summary.png``, into the sweep dir:

- ``table.csv``: one line per finished job: the ``rows`` key, the ``columns`` key, each metric;
- ``table.md``: per metric, a Markdown grid of ``rows`` x ``columns`` (mean over repeated cells);
- ``table.png``: per metric, one line per ``rows`` value against the ``columns`` value (numeric
  columns; ``log_x`` for batch sizes), or grouped bars when there is no ``columns`` key;
- ``curves.png`` (with ``curves``): each job's TensorBoard scalars per epoch, one panel a job.

Example (``configs/experiment/batch_size.yaml``)::

    hydra:
      callbacks:
        sweep_summary:
          table: {rows: norm.name, columns: data.batch_size, values: [val/acc], log_x: true}

or from a shell: ``python -m normlab.sweep_table SWEEP_DIR --rows norm.name --columns
data.batch_size --values val/acc``. Imports neither torch nor matplotlib at module level.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from normlab.sweep_summary import job_dirs, read_curve


def table_records(
    sweep_dir: Path, rows: str, columns: str | None, values: Sequence[str]
) -> list[dict[str, Any]]:
    """One record per job with a results.json: its ``rows`` / ``columns`` config values and its
    final ``values`` metrics (NaN where missing), plus ``run_dir``."""
    records = []
    for job in job_dirs(Path(sweep_dir)):
        results, config = job / "results.json", job / ".hydra" / "config.yaml"
        if not results.is_file() or not config.is_file():
            continue
        cfg, metrics = OmegaConf.load(config), json.loads(results.read_text())["metrics"]
        record = {rows: OmegaConf.select(cfg, rows), "run_dir": str(job)}
        if columns:
            record[columns] = OmegaConf.select(cfg, columns)
        record.update({v: float(metrics.get(v, math.nan)) for v in values})
        records.append(record)
    return records


def _key(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, int | float) else (1, 0, str(value))


def markdown(records: Sequence[Mapping[str, Any]], rows: str, columns: str | None,
             values: Sequence[str]) -> str:  # fmt: skip
    """Per metric, a grid of ``rows`` x ``columns`` (one column per metric without columns)."""
    row_values = sorted({r[rows] for r in records}, key=_key)
    if not columns:
        lines = [f"| {rows} | " + " | ".join(values) + " |", "|---" * (len(values) + 1) + "|"]
        for rv in row_values:
            cells = [_mean(records, {rows: rv}, v) for v in values]
            lines.append(f"| {rv} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
    col_values = sorted({r[columns] for r in records}, key=_key)
    out = []
    for value in values:
        out += [f"{value} ({rows} x {columns})", ""]
        out.append(f"| {rows} \\ {columns} | " + " | ".join(map(str, col_values)) + " |")
        out.append("|---" * (len(col_values) + 1) + "|")
        for rv in row_values:
            cells = [_mean(records, {rows: rv, columns: cv}, value) for cv in col_values]
            out.append(f"| {rv} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _mean(records: Sequence[Mapping[str, Any]], where: Mapping[str, Any], value: str) -> str:
    found = [r[value] for r in records if all(r[k] == v for k, v in where.items())]
    found = [f for f in found if not math.isnan(f)]
    return f"{statistics.fmean(found):.3f}" if found else ""


def plot_table(records: Sequence[Mapping[str, Any]], path: Path, rows: str,
               columns: str | None, values: Sequence[str], log_x: bool = False,
               title: str = "") -> Path:  # fmt: skip
    """Per metric, one line per ``rows`` value against ``columns`` (or grouped bars)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    row_values = sorted({r[rows] for r in records}, key=_key)
    if not columns:
        fig, axes = plt.subplots(figsize=(max(6, 1.4 * len(row_values)), 4))
        width = 0.8 / len(values)
        for i, value in enumerate(values):
            heights = [float(_mean(records, {rows: rv}, value) or "nan") for rv in row_values]
            xs = [j + (i - (len(values) - 1) / 2) * width for j in range(len(row_values))]
            axes.bar_label(axes.bar(xs, heights, width, label=value), fmt="%.3f", fontsize=7)
        axes.set_xticks(range(len(row_values)), [str(v) for v in row_values])
        axes.set_xlabel(rows)
        axes.set_ylabel("accuracy")
        axes.set_ylim(0, 1.1)
        axes.legend(fontsize=8)
        axes_list = [axes]
    else:
        fig, axes_list = plt.subplots(1, len(values), figsize=(6 * len(values), 4), squeeze=False)
        axes_list = list(axes_list[0])
        for axes, value in zip(axes_list, values, strict=True):
            for rv in row_values:
                points = sorted((r[columns], r[value]) for r in records if r[rows] == rv)
                axes.plot(*zip(*points, strict=True), marker="o", label=str(rv))
            axes.set_xlabel(columns)
            axes.set_ylabel(value)
            if log_x:
                axes.set_xscale("log", base=2)
            axes.grid(alpha=0.3)
            axes.legend(fontsize=8, title=rows)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(records: Sequence[Mapping[str, Any]], path: Path, tags: Sequence[str],
                label_keys: Sequence[str]) -> Path:  # fmt: skip
    """Each job's scalars ``tags`` per epoch, one panel a job, titled by ``label_keys``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cols = min(3, len(records))
    nrows = math.ceil(len(records) / cols)
    fig, grid = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.3 * nrows), squeeze=False)
    for axes, record in zip(grid.flat, records, strict=False):
        for tag in tags:
            xs, ys, kind = read_curve(Path(record["run_dir"]), tag)
            axes.plot(xs, ys, marker="o", markersize=3, label=tag)
            axes.set_xlabel(kind)
        axes.set_title(", ".join(f"{k}={record[k]}" for k in label_keys if k in record), fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    for axes in list(grid.flat)[len(records) :]:
        axes.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_table(sweep_dir: Path, rows: str, columns: str | None = None,
                values: Sequence[str] = ("val/acc",), log_x: bool = False,
                curves: Sequence[str] = (), png: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """Write table.csv, table.md and (``png``) table.png / curves.png; returns the records."""
    sweep_dir = Path(sweep_dir)
    records = table_records(sweep_dir, rows, columns, values)
    if not records:
        return records
    keys = [rows, *([columns] if columns else []), *values, "run_dir"]
    with (sweep_dir / "table.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)
    (sweep_dir / "table.md").write_text(markdown(records, rows, columns, values))
    if png:
        plot_table(records, sweep_dir / "table.png", rows, columns, values, log_x, sweep_dir.name)
        if curves:
            labels = [rows, *([columns] if columns else [])]
            plot_curves(records, sweep_dir / "curves.png", curves, labels)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m normlab.sweep_table SWEEP_DIR --rows KEY [--columns KEY] --values TAG...``"""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--rows", required=True, help="a config key, e.g. norm.name")
    parser.add_argument("--columns", help="a config key, e.g. data.batch_size")
    parser.add_argument("--values", nargs="+", default=["val/acc"], help="metrics")
    parser.add_argument("--log-x", action="store_true")
    parser.add_argument("--curves", nargs="*", default=[], help="TensorBoard scalars per epoch")
    args = parser.parse_args(argv)
    records = write_table(args.sweep_dir, args.rows, args.columns, args.values, args.log_x,
                          args.curves)  # fmt: skip
    if not records:
        print(f"normlab: error: {args.sweep_dir} holds no finished jobs (results.json)",
              file=sys.stderr)  # fmt: skip
        return 2
    print(markdown(records, args.rows, args.columns, args.values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
