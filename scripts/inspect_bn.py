"""Print every normalization layer of a normlab checkpoint as the trained network holds it.

    python scripts/inspect_bn.py logs/train/runs/<run>/checkpoints/last.ckpt
    python scripts/inspect_bn.py CKPT --layer net.features.1

The checkpoint is read with ``torch.load(weights_only=True)`` (no code in it runs); the model is
rebuilt from the checkpoint's own hyperparameters as ``eval.py`` does (``NormLabModule``, with
the norm conversion, the layers the run froze with ``norm.freeze_at_epoch``), and its weights
are loaded. Each layer is then printed from the model: its class (a fused activation such as
timm's ``act`` shows as a child), running_mean, running_var, num_batches_tracked, weight (gamma),
bias (beta), momentum, eps, affine, track_running_stats, num_groups and, for a frozen layer,
freeze_affine and the momentum of the BatchNorm it was frozen from (``source_momentum``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

# shown in this order when the layer has them (BatchNorm's, then GroupNorm's and frozen's extras)
ATTRIBUTES = (
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "weight",
    "bias",
    "momentum",
    "eps",
    "affine",
    "track_running_stats",
    "num_groups",
    "freeze_affine",
    "source_momentum",
)


def norm_layers(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """``{qualified name: layer}`` for each normalization layer of the model ``checkpoint`` holds,
    rebuilt from its hyperparameters with its weights loaded (in eval mode).

    Raises:
        CheckpointError: the checkpoint has no NormLabModule hyperparameters to rebuild it from.
    """
    from normlab.errors import CheckpointError
    from normlab.models import NormLabModule
    from normlab.norm import is_norm_layer

    hparams = dict(checkpoint.get("hyper_parameters") or {})
    target = (((checkpoint.get("normlab") or {}).get("config") or {}).get("model") or {}).get(
        "_target_", "normlab.models.NormLabModule"
    )
    if "norm" not in hparams or not target.startswith("normlab.models"):
        raise CheckpointError(
            f"the checkpoint holds no NormLabModule hyperparameters (its model is {target});"
            " inspect_bn rebuilds normlab's models only (train.py's model._target_)"
        )
    hparams["weights"] = None  # the checkpoint's own weights replace them below
    model = NormLabModule(**hparams)
    model.on_load_checkpoint(dict(checkpoint))  # layers frozen during training
    model.load_state_dict(checkpoint["state_dict"])
    return {name: m for name, m in model.eval().named_modules() if is_norm_layer(m)}


def describe(name: str, layer: Any) -> str:
    """``name: repr(layer)`` then one line per attribute, tensors in full."""
    lines = [f"{name}: {layer!r}"]
    for attr in ATTRIBUTES:
        if not hasattr(layer, attr):
            continue
        value = getattr(layer, attr)
        text = repr(value.detach() if hasattr(value, "detach") else value)
        label = {"weight": "weight (gamma)", "bias": "bias (beta)"}.get(attr, attr)
        lines.append(f"  {label:<20} " + text.replace("\n", "\n" + " " * 23))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print the norm layers of a normlab checkpoint as the model holds them."
    )
    parser.add_argument("ckpt", help="a .ckpt written by train.py")
    parser.add_argument("--layer", help="only this layer, e.g. net.features.1")
    args = parser.parse_args(argv)

    import torch

    from normlab.errors import NormlabError
    from normlab.utils.checkpoints import load_checkpoint

    torch.set_printoptions(precision=4, sci_mode=False, linewidth=76)
    try:
        checkpoint = load_checkpoint(args.ckpt, key="CKPT")
        layers = norm_layers(checkpoint)
        if args.layer is not None and args.layer not in layers:
            available = ", ".join(layers) or "none (the run used norm=none)"
            raise NormlabError(
                f"--layer {args.layer}: no normalization layer of that name in {args.ckpt};"
                f" choose one of: {available}."
            )
    except NormlabError as err:
        print(f"inspect_bn: error: {err}", file=sys.stderr)
        return 2
    if not layers:
        print(f"{args.ckpt}: no normalization layers (the run used norm=none)")
        return 0
    for name, layer in layers.items():
        if args.layer in (None, name):
            print(describe(name, layer), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
