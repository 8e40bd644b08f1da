"""The experiment configs sweep what they claim, and every multirun ends with summary.csv and
summary.png (normlab.sweep_summary.SweepSummary) whose numbers are the jobs' results.json."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from normlab.config import register_resolvers
from normlab.sweep_summary import COLUMNS, SweepSummary, job_labels, main, read_curve, write_summary
from tests.conftest import FAST, ROOT, run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# two tiny epochs: enough for a best checkpoint and a two-point validation curve
TINY = [
    *FAST,
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "callbacks=no_inspection",
]


def compose_with_hydra(*overrides: str):
    os.environ.setdefault("NORMLAB_ROOT", str(ROOT))
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# -- the experiment configs ------------------------------------------------------------------


@pytest.mark.parametrize(
    "experiment, key, values",
    [
        (
            "compare_norms",
            "norm",
            "none,batchnorm,frozen,groupnorm,layernorm,layernorm2d,instancenorm,batchrenorm,"
            "ghostbatchnorm,gn_ws",
        ),
        ("sigmoid_saturation", "norm", "none,batchnorm"),
        ("feature_scaling", "data.scaling", "none,dataset,imagenet,custom"),
    ],
)
def test_experiments_sweep_their_own_list(experiment: str, key: str, values: str) -> None:
    cfg = compose_with_hydra(f"experiment={experiment}")
    assert dict(cfg.hydra.sweeper.params) == {key: values}
    assert cfg.task_name == experiment
    assert cfg.hydra.callbacks.sweep_summary._target_ == "normlab.sweep_summary.SweepSummary"


def test_sigmoid_saturation_is_a_sigmoid_cnn_with_saturation_diagnostics() -> None:
    cfg = compose_with_hydra("experiment=sigmoid_saturation")
    assert cfg.model.net.activation == "sigmoid" and cfg.norm.name == "none"
    target = "normlab.callbacks.saturation_monitor.SaturationMonitor"
    assert cfg.callbacks.saturation._target_ == target
    assert cfg.callbacks.saturation.every_n_steps >= 1
    # a job of the sweep sets norm=batchnorm on its command line, over the file's norm: none
    assert compose_with_hydra("experiment=sigmoid_saturation", "norm=batchnorm").norm.name == (
        "batchnorm"
    )


@pytest.mark.parametrize(
    "scaling, mean", [("none", None), ("dataset", None), ("custom", [0.5, 0.5, 0.5])]
)
def test_feature_scaling_sets_mean_std_only_for_custom(scaling: str, mean) -> None:
    cfg = compose_with_hydra("experiment=feature_scaling", f"data.scaling={scaling}")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert data["name"] == "synthetic" and data["synthetic"]["shape"][0] == 3  # RGB
    assert data["mean"] == mean and data["std"] == mean  # 0.5 and 0.5: Normalize(0.5, 0.5)


def test_finetune_frozen_fine_tunes_with_frozen_statistics() -> None:
    cfg = compose_with_hydra("experiment=finetune_frozen", "norm.init_from=some.ckpt")
    assert cfg.norm.name == "frozen" and cfg.norm.init_from == "some.ckpt"
    assert cfg.model.optimizer.lr < compose_with_hydra().model.optimizer.lr


# -- the summary writer on hand-made job dirs ------------------------------------------------


def fake_job(sweep: Path, num: int, norm: str, val_curve: list[float] | None) -> Path:
    """A job dir as train.py leaves it; ``val_curve=None``: the job failed (no results.json)."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"norm={norm}", "experiment=compare_norms", "trainer.max_epochs=2"]
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    config = {"task_name": "compare_norms", "norm": {"name": norm}}
    OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
    (job / "compare_norms.log").write_text("")
    if val_curve is None:
        return job
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(job / "tensorboard"))
    for epoch, value in enumerate(val_curve):
        step = 10 * (epoch + 1) - 1  # Lightning logs at the last step of the epoch
        writer.add_scalar("val/acc", value, step)
        writer.add_scalar("epoch", epoch, step)
    writer.close()
    results = {
        "metrics": {"val/acc": val_curve[-1], "test/acc": val_curve[-1] - 0.01, "val/loss": 1.0},
        "checkpoints": {"best": str(job / "checkpoints/epoch_001.ckpt"), "last": None},
        "run_dir": str(job),
        "task_name": "compare_norms",
        "epochs": len(val_curve),
        "wall_time_s": 12.5 + num,
    }
    (job / "results.json").write_text(json.dumps(results))
    return job


def test_summary_has_one_row_per_job_and_says_which_failed(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, "none", [0.25, 0.5])
    fake_job(sweep, 1, "batchnorm", [0.75, 0.875])
    fake_job(sweep, 2, "groupnorm", None)
    (sweep / "multirun.yaml").write_text("{}\n")

    write_summary(sweep)

    rows = read_csv(sweep / "summary.csv")
    assert list(rows[0]) == list(COLUMNS)
    assert [(r["job"], r["norm"]) for r in rows] == [
        ("0", "none"),
        ("1", "batchnorm"),
        ("2", "groupnorm"),
    ]
    assert [r["status"] for r in rows[:2]] == ["ok", "ok"]
    assert rows[2]["status"] == "failed: no results.json; see 2/compare_norms.log"
    assert rows[2]["val/acc"] == rows[2]["test/acc"] == rows[2]["best_checkpoint"] == ""
    assert float(rows[1]["val/acc"]) == 0.875 and float(rows[1]["test/acc"]) == 0.865
    assert (rows[1]["epochs"], rows[1]["wall_time_s"]) == ("2", "13.5")
    assert rows[1]["best_checkpoint"] == str(sweep / "1" / "checkpoints/epoch_001.ckpt")
    assert rows[0]["overrides"] == "norm=none experiment=compare_norms trainer.max_epochs=2"
    assert (sweep / "summary.png").read_bytes()[:8] == PNG_MAGIC
    # the curve drawn for a job: validation accuracy per completed epoch
    assert read_curve(sweep / "1") == ([1.0, 2.0], [0.75, 0.875], "epoch")
    # bars and curves are labelled by what differs between jobs (the swept overrides)
    assert job_labels(rows) == ["norm=none", "norm=batchnorm", "norm=groupnorm"]


def test_summary_command_rewrites_a_sweep_dir_and_rejects_other_dirs(tmp_path, capsys) -> None:
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, "none", None)
    fake_job(sweep, 1, "batchnorm", [0.75, 0.875])
    assert main([str(sweep), "--no-png", "--scalars", "val/*"]) == 0
    assert read_csv(sweep / "summary.csv")[0]["status"].startswith("failed: no results.json")
    assert not (sweep / "summary.png").exists()
    out = capsys.readouterr().out
    assert "job 1  norm=batchnorm  ok  val/acc=0.8750  test/acc=0.8650  epochs=2" in out
    assert "    val/acc = 0.8750" in out and "epoch =" not in out
    assert main([str(sweep), "--curve", "epoch", "--png", str(tmp_path / "epochs.png")]) == 0
    assert (tmp_path / "epochs.png").read_bytes()[:8] == PNG_MAGIC
    assert main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "nothing holds no Hydra job dirs" in err and "python train.py -m" in err


def test_sweep_summary_rejects_a_non_boolean_png() -> None:
    with pytest.raises(TypeError, match="png"):
        SweepSummary(png="yes")


# -- a real sweep ----------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_compare_norms_sweep_writes_summary_of_its_jobs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # a command-line list replaces the experiment's five norms
    proc = run_sweep("experiment=compare_norms", "norm=none,batchnorm", *TINY, sweep_dir=sweep)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    rows = read_csv(sweep / "summary.csv")
    # job dirs (and TensorBoard runs) are named after the swept key, in job order
    assert [(r["job"], r["norm"], r["status"]) for r in rows] == [
        ("norm=none", "none", "ok"),
        ("norm=batchnorm", "batchnorm", "ok"),
    ]
    for row in rows:
        results = json.loads((sweep / row["job"] / "results.json").read_text())
        for key in ("val/acc", "test/acc"):
            assert float(row[key]) == results["metrics"][key]
            assert 0.0 <= float(row[key]) <= 1.0
        assert int(row["epochs"]) == results["epochs"] == 2
        assert float(row["wall_time_s"]) == results["wall_time_s"] > 0
        assert row["best_checkpoint"] == results["checkpoints"]["best"]
        assert Path(row["best_checkpoint"]).is_file()
        assert f"norm={row['norm']}" in row["overrides"].split()
        xs, ys, _ = read_curve(sweep / row["job"])
        assert xs == [1.0, 2.0] and ys[-1] == pytest.approx(results["metrics"]["val/acc"])
    assert (sweep / "summary.png").read_bytes()[:8] == PNG_MAGIC
    assert "sweep summary of 2 job(s)" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep_or_its_summary(tmp_path: Path) -> None:
    # batch_size=1 is refused for live BatchNorm only: job 0 fails, job 1 (norm=none) runs
    sweep = tmp_path / "sweep"
    proc = run_sweep("norm=batchnorm,none", *TINY, "data.batch_size=1", sweep_dir=sweep)
    # the sweep as a whole reports the failure, once, after the other job ran: no traceback
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("normlab: error: ")]
    assert line.startswith(
        f"normlab: error: 1 of 2 sweep jobs failed (the others ran; {sweep / 'summary.csv'}"
    )
    assert (
        "job 0 (norm=batchnorm " in line
        and f"its dir {sweep / 'norm=batchnorm'}): data.batch_size=1" in line
    )
    rows = read_csv(sweep / "summary.csv")
    assert [(r["job"], r["norm"]) for r in rows] == [
        ("norm=batchnorm", "batchnorm"),
        ("norm=none", "none"),
    ]
    assert rows[0]["status"].startswith("failed") and rows[1]["status"] == "ok"
    assert (sweep / "norm=none" / "results.json").is_file()


def test_debug_overrides_an_experiments_trainer_settings() -> None:
    # debug is last in the defaults list: debug=limit wins over experiment's max_epochs=5
    cfg = compose_with_hydra("experiment=sigmoid_saturation", "debug=limit")
    assert cfg.trainer.max_epochs == 2 and cfg.trainer.limit_train_batches == 4
    assert cfg.model.net.activation == "sigmoid"  # the rest of the experiment still applies
