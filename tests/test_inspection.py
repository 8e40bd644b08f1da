"""TensorBoard inspection end to end: real train.py runs, their event files read back with
EventAccumulator, compared with the checkpoint they saved; plus the two inspection scripts."""

from __future__ import annotations

import csv
import importlib.util
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import FAST, ROOT, Run, run_script
from tests.test_diagnostics import read_events, scalars

STATS = ("running_mean", "running_var", "weight", "bias")
# 2 epochs of 7 steps; histograms every 5 steps, scalars every 2, plus the start and epoch ends;
# precise BN rewrites the statistics before each validation; TensorBoard and CSV loggers
CADENCE = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=7",
    "callbacks.bn_stats.histograms_every_n_steps=5",
    "callbacks.bn_stats.scalars_every_n_steps=2",
    "callbacks.bn_stats.per_channel=true",
    "callbacks.bn_heatmap.every_n_epochs=1",
    "norm.precise_bn_batches=2",
    "logger=many",
]
# Lightning's steps: batch k at k; the epoch ends (and val/acc) at 6 and 13
HISTOGRAM_STEPS = [0, 5, 6, 10, 13]
SCALAR_STEPS = [0, 2, 4, 6, 8, 10, 12, 13]
EPOCH_ENDS = [6, 13]


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
    expected = {f"norm/{layer}/{stat}" for layer in layers for stat in STATS}
    assert set(bn_events.Tags()["histograms"]) == expected
    for tag in expected:
        assert [e.step for e in bn_events.Histograms(tag)] == HISTOGRAM_STEPS, tag
    values = scalars(bn_events)
    for layer in layers:
        assert [s for s, _ in values[f"norm/{layer}/running_var/std"]] == SCALAR_STEPS
        tracked = values[f"norm/{layer}/num_batches_tracked"]
        # after batch k (step k) the layer has seen k + 1 batches; step 0 is the initial state
        assert tracked == [(s, float(s + 1 if s else 0)) for s in SCALAR_STEPS]
    # everything normalization logs is in one section: norm/
    assert not [t for t in values if t.startswith("bn")]


def test_last_logged_values_equal_the_checkpoint_buffers(bn_events, checkpoint, state):
    # precise BN rewrote the statistics before the last validation: the last points must be the
    # rewritten values, which last.ckpt saves (issue 11 item 7)
    steps = 2 * 7  # CADENCE: 2 epochs of 7 batches
    assert checkpoint["global_step"] == steps  # last.ckpt is the end of training
    values = scalars(bn_events)
    assert values["norm/precise_bn_max_shift"][-1][1] > 0  # it did move them
    for layer in bn_layers(state):
        for stat in STATS:
            saved = state[f"{layer}.{stat}"].double().numpy()
            last = bn_events.Histograms(f"norm/{layer}/{stat}")[-1]
            assert last.step == EPOCH_ENDS[-1] == steps - 1
            h = last.histogram_value
            assert (h.num, h.min, h.max) == (saved.size, saved.min(), saved.max())
            assert h.sum == pytest.approx(saved.sum(), abs=1e-9)
            width = len(str(saved.size - 1))  # zero-padded channel numbers
            per_channel = [
                values[f"norm/{layer}/{stat}/channel_{c:0{width}d}"][-1] for c in range(saved.size)
            ]
            assert per_channel == [(steps - 1, x) for x in saved.astype(np.float32).tolist()]
            mean, std = saved.mean(), saved.std()
            assert values[f"norm/{layer}/{stat}/mean"][-1] == (steps - 1, pytest.approx(mean))
            assert values[f"norm/{layer}/{stat}/std"][-1] == (steps - 1, pytest.approx(std))
            band = values[f"norm/{layer}/{stat}/mean_plus_std"][-1][1]
            assert band == pytest.approx(mean + std, abs=1e-6)
        assert values[f"norm/{layer}/num_batches_tracked"][-1] == (steps - 1, float(steps))
        assert state[f"{layer}.num_batches_tracked"].item() == steps


def test_points_share_lightnings_steps_and_lr_tags_are_named(bn_events):
    values = scalars(bn_events)
    assert [s for s, _ in values["val/acc"]] == EPOCH_ENDS
    for tag in (
        "norm/acc_eval_mode",
        "norm/mode_gap",
        "norm/net.features.1/gap_mean_shift",
        "norm/precise_bn_max_shift",
    ):
        assert [s for s, _ in values[tag]] == EPOCH_ENDS, tag
    assert [i.step for i in bn_events.Images("norm/running_stats_heatmap")] == EPOCH_ENDS
    assert [s for s, _ in values["train/acc"]] == EPOCH_ENDS  # Lightning's epoch-end metric
    # Lightning's train/loss of batch k sits at step k (logged every 10 steps: at 9)
    assert values["train/loss"][0][0] == 9 and 9 not in {s for s, _ in values["norm/mode_gap"]}
    assert {"lr-AdamW/weights", "lr-AdamW/norm"} <= set(values)  # named parameter groups


def test_histogram_buckets_resolve_the_values(bn_events):
    for layer in ("net.features.1", "net.features.5"):
        h = bn_events.Histograms(f"norm/{layer}/running_var")[-1].histogram_value
        filled = sum(c > 0 for c in h.bucket)
        assert filled >= min(h.num, 30) // 3, (layer, list(h.bucket))
        assert h.bucket_limit[-1] >= h.max and h.bucket_limit[0] <= h.max


def test_dashboard_layout_charts_logged_tags(bn_events):
    from tensorboard.plugins.custom_scalar import layout_pb2

    (event,) = bn_events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    titles = [c.title for c in layout.category]
    assert titles == [
        "norm: run",
        "norm/net.features.1",
        "norm/net.features.5",
        "activations and gradients",
    ]
    logged = set(scalars(bn_events))
    layer = layout.category[1]
    margins = [c.margin.series[0] for c in layer.chart if c.HasField("margin")]
    assert [m.value for m in margins] == [f"norm/net.features.1/{s}/mean" for s in STATS]
    for m in margins:
        assert {m.value, m.lower, m.upper} <= logged
        assert m.lower.endswith("mean_minus_std") and m.upper.endswith("mean_plus_std")
    (gap,) = [c.multiline.tag for c in layer.chart if c.HasField("multiline")]
    assert sorted(t for t in logged if any(re.search(p, t) for p in gap)) == [
        "norm/net.features.1/gap_mean_shift",
        "norm/net.features.1/gap_var_ratio",
    ]


def test_hparams_tab_holds_the_config_and_real_final_metrics(bn_run, bn_events):
    from tensorboard.plugins.hparams import metadata

    content = bn_events.PluginTagToContent("hparams")
    experiment = metadata.parse_experiment_plugin_data(content["_hparams_/experiment"])
    columns = [m.name.tag for m in experiment.metric_infos]
    assert {"hparams/val_acc", "hparams/test_acc"} <= set(columns)
    start = metadata.parse_session_start_info_plugin_data(content["_hparams_/session_start_info"])
    cells = {k: v.string_value or v.number_value or v.bool_value for k, v in start.hparams.items()}
    assert cells["norm.name"] == "batchnorm"
    assert cells["norm.precise_bn_batches"] == 2  # distinguishes it from plain BatchNorm
    # norm.momentum is null in configs/norm/batchnorm.yaml: each layer keeps its own (0.1 here)
    assert start.hparams["norm.momentum"].string_value == ""
    assert cells["model.optimizer.lr"] == pytest.approx(0.003)
    assert cells["model._target_"] == "normlab.models.NormLabModule"
    assert cells["task_name"] == "train" and cells["tags"] == "dev"
    assert start.hparams["norm.num_groups"].string_value == ""  # declared, blank for BatchNorm
    metrics, values = bn_run.results["metrics"], scalars(bn_events)
    assert "hp_metric" not in values  # no Lightning -1 placeholder
    for key in ("val/acc", "test/acc", "val/loss", "test/loss"):
        ((_, logged),) = values["hparams/" + key.replace("/", "_")]
        assert logged == pytest.approx(metrics[key], rel=1e-6) and logged != -1


def test_csv_logger_receives_the_normalization_scalars(bn_run, state):
    rows = list(csv.DictReader((bn_run.run_dir / "csv" / "metrics.csv").open()))
    columns = set(rows[0])
    for layer in bn_layers(state):
        for stat in STATS:
            assert f"norm/{layer}/{stat}/mean" in columns
        assert f"norm/{layer}/gap_mean_shift" in columns
    assert {"norm/acc_eval_mode", "grad_norm/net.features.0", "hparams/val_acc"} <= columns
    tracked = [
        (int(r["step"]), float(r["norm/net.features.1/num_batches_tracked"]))
        for r in rows
        if r["norm/net.features.1/num_batches_tracked"]
    ]
    assert tracked[-1] == (EPOCH_ENDS[-1], 2 * 7.0)  # 14 batches seen by the last step


def test_heatmap_image_each_epoch_and_diagnostics_in_a_real_run(bn_events, state):
    images = bn_events.Images("norm/running_stats_heatmap")
    assert images[-1].encoded_image_string.startswith(b"\x89PNG")
    values = scalars(bn_events)
    for layer in bn_layers(state):
        assert all(r > 0 for _, r in values[f"norm/{layer}/gap_var_ratio"])
    acc = dict(values["norm/acc_eval_mode"])[13]
    assert dict(values["norm/mode_gap"])[13] == pytest.approx(
        dict(values["norm/acc_train_mode"])[13] - acc, abs=1e-6
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
    assert not [t for t in tags if t.startswith(("bn", "norm/"))], tags
    assert "val/acc" in tags and "hparams/val_acc" in tags and "grad_norm/net.features.0" in tags
    assert "lr-AdamW/weights" in tags  # the same LR tag as with a norm
    assert "custom_scalars__config__" in events.Tags()["tensors"]  # the dashboard, run level
    log = (run.run_dir / "train.log").read_text()
    assert log.count("BatchNormStats: the model has no normalization layers") == 1
    status, _, err = script_main(
        "plot_bn_stats.py", run.run_dir, "-o", tmp_path / "x.png", capsys=capsys
    )
    assert status == 2 and "no norm/<layer>/<stat>/mean scalars" in err


def test_groupnorm_gamma_and_beta_are_logged(tmp_path_factory):
    run = train(
        tmp_path_factory,
        "gn",
        "norm=groupnorm",
        "norm.num_groups=4",
        "trainer.limit_train_batches=3",
    )
    events = read_events(run.run_dir / "tensorboard")
    state = torch.load(run.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    values = scalars(events)
    for layer in ("net.features.1", "net.features.5"):
        assert {f"norm/{layer}/weight", f"norm/{layer}/bias"} <= set(events.Tags()["histograms"])
        gamma = state[f"{layer}.weight"].double()
        assert values[f"norm/{layer}/weight/mean"][-1] == (2, pytest.approx(gamma.mean().item()))
        assert f"norm/{layer}/running_mean/mean" not in values  # GroupNorm has none


@pytest.mark.slow
def test_frozen_checkpoint_statistics_and_inspection(tmp_path_factory, capsys):
    run = train(tmp_path_factory, "frozen", "norm=frozen", "trainer.limit_train_batches=3")
    events = read_events(run.run_dir / "tensorboard")
    state = torch.load(run.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for layer in bn_layers(state):
        for stat in STATS:
            assert [e.step for e in events.Histograms(f"norm/{layer}/{stat}")] == [0, 2]
        mean = scalars(events)[f"norm/{layer}/running_mean/mean"]
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


@pytest.mark.slow
def test_tensorboard_serves_tags_layout_histograms_and_hparams(bn_run):
    """A real ``tensorboard`` on a free localhost port, asked through its HTTP API (what the
    browser asks), then stopped (scripts/tensorboard_screenshots.py's serve_tensorboard)."""
    spec = importlib.util.spec_from_file_location(
        "tensorboard_screenshots", ROOT / "scripts" / "tensorboard_screenshots.py"
    )
    tb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tb)
    with tb.serve_tensorboard(bn_run.run_dir) as url:
        scalar_tags = tb.get_json(f"{url}/data/plugin/scalars/tags")["tensorboard"]
        assert {"val/acc", "norm/net.features.5/running_var/mean_plus_std"} <= set(scalar_tags)
        layout = tb.get_json(f"{url}/data/plugin/custom_scalars/layout")
        layer = next(c for c in layout["category"] if c["title"] == "norm/net.features.5")
        series = [c["margin"]["series"][0] for c in layer["chart"] if "margin" in c]
        assert {s["lower"] for s in series} <= set(scalar_tags)
        histograms = tb.get_json(f"{url}/data/plugin/histograms/tags")["tensorboard"]
        assert "norm/net.features.5/weight" in histograms
        experiment = tb.get_json(f"{url}/data/plugin/hparams/experiment", {"experimentName": ""})
        columns = {h["name"] for h in experiment["hparamInfos"]}
        assert {"norm.name", "norm.precise_bn_batches", "model._target_", "tags"} <= columns
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"hparams/val_acc", "hparams/test_acc"} <= metrics


def _checkpoint(tmp_path, name: str, frozen_layers: tuple[str, ...] = (), **kwargs) -> str:
    """A normlab checkpoint of NormLabModule(**kwargs), written as train.py writes one."""
    from normlab.models import NormLabModule

    model = NormLabModule(num_classes=3, in_channels=3, **kwargs)
    ckpt = tmp_path / f"{name}.ckpt"
    entry = {"format": 1, "config": None, "frozen_layers": list(frozen_layers)}
    if frozen_layers:  # what norm.freeze_at_epoch leaves behind: those layers frozen
        from normlab.norm import freeze_named_layers

        freeze_named_layers(model, list(frozen_layers))
    payload = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    torch.save({**payload, "normlab": entry}, ckpt)
    return str(ckpt)


@pytest.mark.parametrize("norm", ["batchnorm", "frozen"])
def test_inspect_bn_shows_the_models_own_eps_and_momentum(norm, tmp_path, capsys):
    net = {"_target_": "normlab.models.torchvision_net"}
    ckpt = _checkpoint(tmp_path, norm, norm={"name": norm}, net=net, arch="mobilenet_v3_small")
    status, out, err = script_main(
        "inspect_bn.py", ckpt, "--layer", "net.features.0.1", capsys=capsys
    )
    assert status == 0, err
    assert "eps                  0.001" in out  # torchvision builds MobileNetV3 with these
    momentum = "source_momentum      0.01" if norm == "frozen" else "momentum             0.01"
    assert momentum in out


def test_inspect_bn_shows_fused_activations_and_late_frozen_layers(tmp_path, capsys):
    pytest.importorskip("timm")
    net = {"_target_": "normlab.models.timm_net"}
    ckpt = _checkpoint(
        tmp_path,
        "effnet",
        ("net.bn2",),
        norm={"name": "batchnorm"},
        net=net,
        arch="efficientnet_b0",
    )
    status, out, err = script_main("inspect_bn.py", ckpt, capsys=capsys)
    assert status == 0, err
    assert "net.bn1: BatchNormAct2d(\n  32, eps=1e-05" in out and "(act): SiLU(" in out
    assert "net.bn2: FrozenBatchNorm2d(\n  1280, eps=1e-05" in out  # frozen late
