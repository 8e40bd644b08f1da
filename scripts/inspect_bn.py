"""Print every normalization layer of a normlab checkpoint the way ``vars(layer)`` shows it.

    python scripts/inspect_bn.py logs/train/runs/<run>/checkpoints/last.ckpt
    python scripts/inspect_bn.py CKPT --layer net.features.1

The checkpoint is read with ``torch.load(weights_only=True)`` (no code in it runs); each layer is
rebuilt with the run's own norm config and loaded from the checkpoint's state_dict, so what is
printed is what the model would hold: running_mean, running_var, num_batches_tracked, weight
(gamma), bias (beta), momentum, eps, affine, track_running_stats. Works for norm=batchnorm,
frozen, groupnorm and layernorm checkpoints; torch only, no Lightning.
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
)


def norm_layers(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """``{qualified name: layer}`` for each normalization layer in ``checkpoint["state_dict"]``.

    A module of the state_dict is a normalization layer when a layer built by the run's norm
    factory with its channel count has exactly its keys and shapes; it is then loaded from them.
    """
    from normlab.norm import make_norm_factory

    norm = (checkpoint.get("hyper_parameters") or {}).get("norm")
    if norm is None:
        norm = checkpoint["normlab"]["config"]["norm"]
    if norm.get("name") == "none":
        return {}
    factory = make_norm_factory(norm)
    groups: dict[str, dict[str, Any]] = {}
    for key, value in checkpoint["state_dict"].items():
        module, _, leaf = key.rpartition(".")
        groups.setdefault(module, {})[leaf] = value
    layers = {}
    for name, tensors in groups.items():
        vectors = [t for t in tensors.values() if t.dim() == 1]
        if not vectors or any(t.dim() > 1 for t in tensors.values()):
            continue  # convolutions and linear layers have 2-d or 4-d weights
        try:
            layer = factory(vectors[0].shape[0])
        except ValueError:  # e.g. a channel count that num_groups does not divide
            continue
        own = layer.state_dict()
        if own.keys() == tensors.keys() and all(own[k].shape == tensors[k].shape for k in own):
            layer.load_state_dict(tensors)
            layers[name] = layer.eval()
    return layers


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
        description="Print the normalization layers of a normlab checkpoint (like vars(layer))."
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
