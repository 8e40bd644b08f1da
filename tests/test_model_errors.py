"""Models and data that do not fit each other end in one ``normlab: error:`` paragraph naming
the key and the fix, exit 2, no run dir: checked in the config (before torch is imported), in the
net's constructor arguments, or with the first batch before anything is set up, in process."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import open_dict

from tests.test_configs import compose_train

USER = "tests.user_code"
SMALL = ["trainer=cpu", "callbacks=none", "logger=csv"]
NET_ONLY = ["model=torchvision", "model.arch=null", "norm=none"]  # only the net _target_ below
# fmt: off
# (id, overrides, substrings of the one-paragraph error)
CASES: list[tuple[str, list[str], list[str]]] = [
    ("cnn_with_arch", ["model=cnn", "model.arch=resnet18"],
     ["model.arch='resnet18'", "model=torchvision model.arch=resnet18"]),
    ("torchvision_without_arch", ["model=torchvision", "model.arch=null"],
     ["model.arch=None", "give one, e.g. model.arch=resnet18"]),
    ("cnn_weights_download", ["+model.net.weights=DEFAULT"],
     ["model.net.weights='DEFAULT'", "downloads nothing", "model.weights=<file"]),
    ("torchvision_weights_download", ["model=torchvision", "+model.net.weights=DEFAULT"],
     ["model.net.weights='DEFAULT'", "model.weights=<file"]),
    ("timm_pretrained", ["model=timm", "+model.net.pretrained=true"],
     ["model.net.pretrained=True", "model.weights=<file"]),
    ("vit_on_16px", ["model=torchvision", "model.arch=vit_b_16", "data=synthetic",
                     "data.synthetic.shape=[3,16,16]", "data.synthetic.num_samples=64"],
     ["model.net._target_='normlab.models.torchvision_net'", "shape [3, 16, 16]",
      "Expected 224 but got 16", "+model.net.image_size="]),
    ("net_takes_n_cls", [*NET_ONLY, f"model.net._target_={USER}.ClassesNamedNCls"],
     ["needs 'n_cls'", "it takes: n_cls, chans", "n_cls: ${data.num_classes}",
      "+model.net.n_cls=10"]),
    ("net_unknown_argument", [f"model.net._target_={USER}.SevenOutputs"],
     ["model.net.widths=[32, 64, 128]", f"{USER}.SevenOutputs takes no argument 'widths'",
      "it takes: in_channels"]),
    ("net_seven_outputs", [*NET_ONLY, f"model.net._target_={USER}.SevenOutputs"],
     ["returns outputs of shape [2, 7]", "needs [2, 10]", "num_classes=10"]),
    ("labels_beyond_classes", [f"data._target_={USER}.Blobs", "+data.num_classes=2",
                               "+data.label_range=5"],
     [f"data._target_='{USER}.Blobs'", "labels from 0 to 4", "num_classes=2"]),
    ("one_class", [f"data._target_={USER}.Blobs", "+data.num_classes=1", "+data.label_range=1"],
     [f"data._target_='{USER}.Blobs'", "num_classes=1", "at least two classes"]),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_model_and_data_that_do_not_fit_are_one_paragraph(
    case: tuple, tmp_path: Path, capsys
) -> None:
    from normlab.cli import run_task

    name, overrides, expected = case
    run_dir = tmp_path / "run"
    _, cfg = compose_train([*SMALL, *overrides], run_dir)
    if cfg.data._target_.startswith(USER):  # a user's data config: its own keys only
        given = {o.split("=")[0].removeprefix("+data.") for o in overrides}
        with open_dict(cfg):
            cfg.data = {k: v for k, v in cfg.data.items() if k in given or k == "_target_"}
    with pytest.raises(SystemExit) as info:
        run_task("train", cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("normlab: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], f"{text!r} missing from {lines[0]!r}"
    assert not run_dir.exists()
