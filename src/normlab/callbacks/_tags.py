"""The one tag scheme of everything normlab logs about normalization, and the TensorBoard
custom-scalars dashboard built from it (docs/inspection.md shows the table).

Layer first, then statistic: ``norm/<layer>/<stat>`` with ``<layer>`` the LightningModule's
``named_modules()`` name (``net.features.1``, ``net.layer1.0.bn1``) and ``<stat>`` PyTorch's
name (``running_mean``, ``running_var``, ``weight`` = gamma, ``bias`` = beta,
``num_batches_tracked``); run-level quantities are ``norm/<name>``. So TensorBoard shows all of it
in one section, ``norm``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

# PyTorch's names of a norm layer's tensors (gamma is `weight`, beta is `bias`)
STATS = ("running_mean", "running_var", "weight", "bias")
# scalars summarizing a statistic over its channels; the margin chart draws mean +- std
SUMMARIES = ("mean", "std", "mean_minus_std", "mean_plus_std")
# per-layer diagnostics (TrainTestGap)
GAP_MEAN_SHIFT, GAP_VAR_RATIO = "gap_mean_shift", "gap_var_ratio"
# run-level (EvalModeGap, BatchNormHeatmap; NormLifecycle logs norm/precise_bn_max_shift,
# norm/distribute_bn_shift and norm/frozen)
ACC_EVAL_MODE, ACC_TRAIN_MODE, MODE_GAP = (
    "norm/acc_eval_mode",
    "norm/acc_train_mode",
    "norm/mode_gap",
)
HEATMAP = "norm/running_stats_heatmap"
LABELS = {"weight": "gamma (weight)", "bias": "beta (bias)"}


def layer_tag(layer: str, *parts: str) -> str:
    """``norm/<layer>/<part>/...``: the tag of a layer's statistic or diagnostic."""
    return "/".join(("norm", layer, *parts))


def summary_scalars(layer: str, stat: str, mean: float, std: float) -> dict[str, float]:
    """The four summary scalars of one statistic (mean and population std over channels, and
    the margin chart's band ``mean - std`` .. ``mean + std``)."""
    values = (mean, std, mean - std, mean + std)
    return {layer_tag(layer, stat, s): v for s, v in zip(SUMMARIES, values, strict=True)}


def _exact(*tags: str) -> list[str]:
    """Multiline charts take regular expressions; layer names contain dots."""
    return [f"^{re.escape(t)}$" for t in tags]


def dashboard_layout(layers: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The custom-scalars layout (``SummaryWriter.add_custom_scalars``) for ``{layer: the STATS
    it has}``: a run-level category (accuracy in eval vs train mode, loss, learning rate), one
    category per layer (margin charts of each statistic's mean +- std over channels and the
    train/test gap of its statistics) and one for activations and gradients (saturation,
    grad_norm)."""
    run = {
        "accuracy: eval mode (running stats) vs train mode (batch stats)": [
            "Multiline",
            _exact("val/acc", ACC_EVAL_MODE, ACC_TRAIN_MODE),
        ],
        "loss": ["Multiline", _exact("train/loss", "val/loss")],
        "learning rate": ["Multiline", [r"^lr-"]],
    }
    layout: dict[str, Any] = {"norm: run": run}
    for layer, stats in layers.items():
        charts = {}
        for stat in stats:
            tags = [layer_tag(layer, stat, s) for s in ("mean", "mean_minus_std", "mean_plus_std")]
            charts[f"{LABELS.get(stat, stat)}: mean +- std over channels"] = ["Margin", tags]
        if "running_mean" in stats:
            gap = _exact(layer_tag(layer, GAP_MEAN_SHIFT), layer_tag(layer, GAP_VAR_RATIO))
            charts["train/test gap: validation batch vs running statistics"] = ["Multiline", gap]
        if charts:
            layout[f"norm/{layer}"] = charts
    layout["activations and gradients"] = {
        "saturated fraction (sigmoid/tanh)": ["Multiline", [r"^saturation/"]],
        "gradient norm per layer": ["Multiline", [r"^grad_norm/"]],
    }
    return layout
