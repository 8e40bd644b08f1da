"""Render how BatchNorm's statistics evolved during a run into one PNG, from its event files.

    python scripts/plot_bn_stats.py logs/train/runs/<run> -o bn_stats.png

One row per BatchNorm layer (named as in the model's ``named_modules()``), one column per
statistic: running_mean, running_var, weight (gamma), bias (beta). Each panel shows the mean over
the layer's channels against the optimizer step, with a band of +-1 standard deviation across
channels, read from the ``norm/<layer>/<stat>/{mean,std}`` scalars that
``normlab.callbacks.batch_norm_stats.BatchNormStats`` logs. Needs no display (matplotlib's Agg).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

STATS = ("running_mean", "running_var", "weight", "bias")
TITLES = {"weight": "weight (gamma)", "bias": "bias (beta)"}
TAG = re.compile(r"^norm/(?P<layer>.+)/(?P<stat>running_mean|running_var|weight|bias)/mean$")


class PlotError(Exception):
    """The run dir holds nothing to plot; the message names it and the fix."""


def event_dir(run_dir: Path) -> Path:
    """The directory holding the run's TensorBoard event files (``RUN_DIR/tensorboard``)."""
    for candidate in (run_dir / "tensorboard", run_dir):
        if any(candidate.glob("events.out.tfevents.*")):
            return candidate
    raise PlotError(
        f"{run_dir}: no TensorBoard event files in it or in its tensorboard/ folder; give the"
        " run dir of a train.py run, e.g. logs/train/runs/<timestamp>."
    )


def read_series(path: Path) -> dict[str, dict[str, tuple[list[int], list[float], list[float]]]]:
    """``{layer: {stat: (steps, channel means, channel stds)}}`` from the event files of a dir."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(path), size_guidance={SCALARS: 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    series: dict[str, dict[str, tuple[list[int], list[float], list[float]]]] = {}
    for tag in sorted(tags):
        match = TAG.match(tag)
        if not match or tag.removesuffix("/mean") + "/std" not in tags:
            continue
        means = {e.step: e.value for e in events.Scalars(tag)}  # last value per step wins
        stds = {e.step: e.value for e in events.Scalars(tag.removesuffix("/mean") + "/std")}
        steps = sorted(means.keys() & stds.keys())
        series.setdefault(match["layer"], {})[match["stat"]] = (
            steps,
            [means[s] for s in steps],
            [stds[s] for s in steps],
        )
    return series


def plot(series: dict, out: Path, title: str) -> None:
    """Draw ``series`` (see :func:`read_series`) as a layers x statistics grid into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(series, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])
    fig, axes = plt.subplots(
        len(layers), len(STATS), figsize=(3.2 * len(STATS), 2.2 * len(layers) + 0.6),
        squeeze=False, sharex=True, layout="constrained",
    )  # fmt: skip
    for row, layer in enumerate(layers):
        for col, stat in enumerate(STATS):
            ax = axes[row][col]
            if stat not in series[layer]:
                ax.set_axis_off()
                continue
            steps, mean, std = series[layer][stat]
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(steps, low, high, alpha=0.3, color=f"C{col}", linewidth=0)
            ax.plot(steps, mean, color=f"C{col}", linewidth=1.5)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(TITLES.get(stat, stat))
            if col == 0:
                ax.set_ylabel(layer)
            if row == len(layers) - 1:
                ax.set_xlabel("step")
    fig.suptitle(f"{title}: channel mean, band = ±1 std over channels")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Plot the evolution of BatchNorm statistics of a run into a PNG."
    )
    parser.add_argument("run_dir", type=Path, help="a train.py run dir (holds tensorboard/)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        path = event_dir(args.run_dir)
        series = read_series(path)
        if not series:
            raise PlotError(
                f"{path}: the event files hold no norm/<layer>/<stat>/mean scalars; the run"
                " had no normalization layers (norm=none) or ran without the"
                " bn_stats callback (callbacks.bn_stats=null, callbacks=none, debug=fdr)."
            )
    except PlotError as err:
        print(f"plot_bn_stats: error: {err}", file=sys.stderr)
        return 2
    plot(series, args.output, args.run_dir.resolve().name)
    print(f"wrote {args.output} ({len(series)} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
