"""TensorBoard inspection end to end: real train.py runs, their event files read back with
EventAccumulator, compared with the checkpoint they saved; plus the two inspection scripts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import FAST, ROOT, Run, run_script
from tests.test_diagnostics import read_events, scalars

STATS = ("running_mean", "running_var", "weight", "bias")
# 2 epochs of 7 steps; histograms every 5 steps, scalars every 2, plus start and epoch ends
CADENCE = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=7",
    "callbacks.bn_stats.histograms_every_n_steps=5",
    "callbacks.bn_stats.scalars_every_n_steps=2",
    "callbacks.bn_stats.per_channel=true",
]
HISTOGRAM_STEPS = [0, 5, 7, 10, 14]
SCALAR_STEPS = [0, 2, 4, 6, 7, 8, 10, 12, 14]


def train(tmp_path_factory, name: str, *overrides: str) -> Run:
    run = run_script("train.py", *FAST, *overrides, run_dir=tmp_path_factory.mktemp(name) / "run")
    assert run.returncode == 0, run.output[-3000:]
    return run


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory) -> Run:
    return train(tmp_path_factory, "bn", *CADENCE)


@pytest.fixture(scope="module")
def bn_events(bn_run):
    return read_events(bn_run.run_dir / "tensorboard")


@pytest.fixture(scope="module")
def checkpoint(bn_run) -> dict:
    path = bn_run.run_dir / "checkpoints" / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def state(checkpoint) -> dict[str, torch.Tensor]:
    return checkpoint["state_dict"]


def bn_layers(state: dict[str, torch.Tensor]) -> list[str]:
    return [k.removesuffix(".running_mean") for k in state if k.endswith(".running_mean")]


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``scripts/<name> args`` as a user does (a subprocess: a few seconds each)."""
    cmd = [sys.executable, str(ROOT / "scripts" / name), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def script_main(name: str, *args: str, capsys) -> tuple[int, str, str]:
    """Call ``main(args)`` of ``scripts/<name>`` in this process (fast): (status, out, err)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    status = module.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_every_batchnorm_layer_has_four_histograms_one_per_logging_step(bn_events, state):
    layers = bn_layers(state)
    assert layers == ["net.features.1", "net.features.5"]  # named as in named_modules()
    expected = {f"bn/{layer}/{stat}" for layer in layers for stat in STATS}
    assert set(bn_events.Tags()["histograms"]) == expected
    for tag in expected:
        assert [e.step for e in bn_events.Histograms(tag)] == HISTOGRAM_STEPS, tag
    values = scalars(bn_events)
    for layer in layers:
        assert [s for s, _ in values[f"bn_stats/{layer}/running_var/std"]] == SCALAR_STEPS
        tracked = values[f"bn_stats/{layer}/num_batches_tracked"]
        assert tracked == [(s, float(s)) for s in SCALAR_STEPS]  # one update per step


def test_last_logged_values_equal_the_checkpoint_buffers(bn_events, checkpoint, state):
    assert checkpoint["global_step"] == 14  # last.ckpt is the end of training
    values = scalars(bn_events)
    for layer in bn_layers(state):
        for stat in STATS:
            saved = state[f"{layer}.{stat}"].double().numpy()
            last = bn_events.Histograms(f"bn/{layer}/{stat}")[-1]
            assert last.step == 14
            h = last.histogram_value
            assert (h.num, h.min, h.max) == (saved.size, saved.min(), saved.max())
            assert h.sum == pytest.approx(saved.sum(), abs=1e-9)
            width = len(str(saved.size - 1))  # zero-padded channel numbers
            per_channel = [
                values[f"bn_channels/{layer}/{stat}/{c:0{width}d}"][-1] for c in range(saved.size)
            ]
            assert per_channel == [(14, x) for x in saved.astype(np.float32).tolist()]
            assert values[f"bn_stats/{layer}/{stat}/mean"][-1][1] == pytest.approx(saved.mean())
            assert values[f"bn_stats/{layer}/{stat}/std"][-1][1] == pytest.approx(saved.std())
        assert values[f"bn_stats/{layer}/num_batches_tracked"][-1] == (14, 14.0)
        assert state[f"{layer}.num_batches_tracked"].item() == 14


def test_hparams_tab_holds_the_config_and_real_final_metrics(bn_run, bn_events):
    from tensorboard.plugins.hparams import metadata

    content = bn_events.PluginTagToContent("hparams")
    experiment = metadata.parse_experiment_plugin_data(content["_hparams_/experiment"])
    columns = [m.name.tag for m in experiment.metric_infos]
    assert {"hparams/val_acc", "hparams/test_acc"} <= set(columns)
    start = metadata.parse_session_start_info_plugin_data(content["_hparams_/session_start_info"])
    assert start.hparams["norm.name"].string_value == "batchnorm"
    assert start.hparams["model.optimizer.lr"].number_value == pytest.approx(0.003)
    metrics, values = bn_run.results["metrics"], scalars(bn_events)
    assert "hp_metric" not in values  # no Lightning -1 placeholder
    for key in ("val/acc", "test/acc", "val/loss", "test/loss"):
        ((_, logged),) = values["hparams/" + key.replace("/", "_")]
        assert logged == pytest.approx(metrics[key], rel=1e-6) and logged != -1


def test_heatmap_image_each_epoch_and_diagnostics_in_a_real_run(bn_events, state):
    images = bn_events.Images("bn_heatmap/running_mean_running_var")
    assert [i.step for i in images] == [7, 14]
    assert images[-1].encoded_image_string.startswith(b"\x89PNG")
    values = scalars(bn_events)
    for layer in bn_layers(state):
        assert [s for s, _ in values[f"bn_gap/{layer}/mean_shift"]] == [7, 14]
        assert all(r > 0 for _, r in values[f"bn_gap/{layer}/var_ratio"])
    acc = dict(values["bn_mode/acc_eval_mode"])[14]
    assert dict(values["bn_mode/gap"])[14] == pytest.approx(
        dict(values["bn_mode/acc_train_mode"])[14] - acc, abs=1e-6
    )
    assert "grad_norm/net.features.0" in values and "grad_norm/net.classifier" in values
    assert not any(t.startswith("saturation/") for t in values)  # ReLU does not saturate


def test_inspect_bn_prints_the_checkpoint_buffers(bn_run, state, capsys):
    ckpt = bn_run.run_dir / "checkpoints" / "last.ckpt"
    out = script("inspect_bn.py", ckpt)
    assert out.returncode == 0, out.stderr
    assert "net.features.1: BatchNorm2d(8" in out.stdout
    assert "net.features.5: BatchNorm2d(16" in out.stdout
    for line in ("num_batches_tracked  tensor(14)", "momentum             0.1", "eps     "):
        assert line in out.stdout
    status, one, _ = script_main("inspect_bn.py", ckpt, "--layer", "net.features.1", capsys=capsys)
    assert status == 0 and "net.features.5" not in one
    gamma = state["net.features.1.weight"]
    assert f"{gamma[0].item():.4f}" in one.split("weight (gamma)")[1].split("\n")[0]
    status, _, err = script_main("inspect_bn.py", ckpt, "--layer", "net.nope", capsys=capsys)
    assert status == 2 and "choose one of: net.features.1, net.features.5" in err
    status, _, err = script_main("inspect_bn.py", ROOT / "train.py", capsys=capsys)
    assert status == 2 and "train.py is not a normlab checkpoint" in err


def test_plot_bn_stats_renders_a_png(bn_run, tmp_path, capsys):
    out = tmp_path / "bn.png"
    done = script("plot_bn_stats.py", bn_run.run_dir, "-o", out)
    assert done.returncode == 0, done.stderr
    assert "2 layers" in done.stdout
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 20_000
    status, _, err = script_main(
        "plot_bn_stats.py", tmp_path, "-o", tmp_path / "x.png", capsys=capsys
    )
    assert status == 2 and "no TensorBoard event files" in err


def test_norm_none_logs_one_info_line_and_no_statistics(tmp_path_factory, tmp_path, capsys):
    run = train(tmp_path_factory, "none", "norm=none", "trainer.limit_train_batches=3")
    events = read_events(run.run_dir / "tensorboard")
    tags = [t for kind in ("scalars", "histograms", "images") for t in events.Tags()[kind]]
    assert not [t for t in tags if t.startswith(("bn", "bn_"))], tags
    assert "val/acc" in tags and "hparams/val_acc" in tags and "grad_norm/net.features.0" in tags
    log = (run.run_dir / "train.log").read_text()
    assert log.count("BatchNormStats: the model has no BatchNorm layers") == 1
    status, _, err = script_main(
        "plot_bn_stats.py", run.run_dir, "-o", tmp_path / "x.png", capsys=capsys
    )
    assert status == 2 and "no bn_stats/<layer>/<stat>/mean scalars" in err


@pytest.mark.slow
def test_frozen_checkpoint_statistics_and_inspection(tmp_path_factory, capsys):
    run = train(tmp_path_factory, "frozen", "norm=frozen", "trainer.limit_train_batches=3")
    events = read_events(run.run_dir / "tensorboard")
    state = torch.load(run.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for layer in bn_layers(state):
        for stat in STATS:
            assert [e.step for e in events.Histograms(f"bn/{layer}/{stat}")] == [0, 3]
        mean = scalars(events)[f"bn_stats/{layer}/running_mean/mean"]
        assert mean[0][1] == mean[-1][1]  # frozen: statistics never move in training
        assert mean[-1][1] == pytest.approx(state[f"{layer}.running_mean"].double().mean())
    status, out, err = script_main(
        "inspect_bn.py", run.run_dir / "checkpoints" / "last.ckpt", capsys=capsys
    )
    assert status == 0, err
    assert "net.features.1: FrozenBatchNorm2d(8" in out
    assert "momentum             None" in out


def test_fast_dev_run_with_the_inspection_callbacks(train_run):
    run = train_run("debug=fdr")
    assert run.returncode == 0, run.output[-3000:]
    assert "Traceback" not in run.output


def test_bad_cadence_is_a_one_paragraph_error(train_run):
    run = train_run("callbacks.bn_stats.histograms_every_n_steps=0")
    assert run.returncode == 2
    assert "callbacks.bn_stats.histograms_every_n_steps=0 is not valid" in run.stderr
    assert "Traceback" not in run.output and not run.run_dir.exists()


def test_inspect_bn_finds_groupnorm_layers(tmp_path, capsys):
    from normlab.models import NormLabModule

    norm = {"name": "groupnorm", "num_groups": 4}
    model = NormLabModule(num_classes=10, in_channels=1, norm=norm, net={"widths": [8, 16]})
    ckpt = tmp_path / "groupnorm.ckpt"
    payload = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    torch.save({**payload, "normlab": {"format": 1, "config": None}}, ckpt)
    status, out, err = script_main("inspect_bn.py", ckpt, capsys=capsys)
    assert status == 0, err
    assert "net.features.1: GroupNorm(4, 8" in out and "net.features.5: GroupNorm(4, 16" in out
    assert "classifier" not in out and "num_groups           4" in out
