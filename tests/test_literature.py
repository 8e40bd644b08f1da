"""The experiments of the BatchNorm literature: batch_size (Wu & He 2018), population_stats
(Wu & Johnson 2021), shift (AdaBN, Li et al. 2016): what each sweeps, the table and picture its
sweep dir gets (normlab.sweep_table), and the EMA-vs-precise accuracy callback."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from normlab.sweep_table import main, write_table
from tests.test_experiments import PNG_MAGIC, TINY, compose_with_hydra, run_sweep


@pytest.mark.parametrize(
    ("experiment", "params", "table"),
    [
        (
            "batch_size",
            {"norm": "batchnorm,batchrenorm,ghostbatchnorm,groupnorm,frozen",
             "data.batch_size": "2,4,8,16,32,64,128"},
            ("norm.name", "data.batch_size"),
        ),
        (
            "population_stats",
            {"norm.momentum": "0.01,0.1,0.5", "model.optimizer.lr": "0.001,0.01"},
            ("norm.momentum", "model.optimizer.lr"),
        ),
        (
            "shift",
            {"norm": "batchnorm,batchrenorm,ghostbatchnorm,frozen,groupnorm,layernorm,none"},
            ("norm.name", None),
        ),
    ],
)  # fmt: skip
def test_experiment_sweeps_and_tabulates_what_its_paper_does(experiment, params, table) -> None:
    cfg = compose_with_hydra(f"experiment={experiment}")
    assert dict(cfg.hydra.sweeper.params) == params
    layout = cfg.hydra.callbacks.sweep_summary.table
    assert (layout.rows, layout.get("columns")) == table
    if experiment == "shift":
        assert cfg.norm.adapt == "test" and cfg.data.test_shift.brightness == 0.3
    if experiment == "population_stats":
        assert cfg.callbacks.precise_bn_accuracy.num_batches == 20


def _fake_sweep(sweep: Path, jobs: list[tuple[str, int, float]]) -> None:
    for i, (norm, batch, acc) in enumerate(jobs):
        job = sweep / str(i)
        (job / ".hydra").mkdir(parents=True)
        config = f"norm:\n  name: {norm}\ndata:\n  batch_size: {batch}\n"
        (job / ".hydra" / "config.yaml").write_text(config)
        (job / "results.json").write_text(json.dumps({"metrics": {"val/acc": acc}}))
    (sweep / "9" / ".hydra").mkdir(parents=True)  # a failed job: no results.json, no record


def test_table_lays_out_each_jobs_metric_by_two_config_keys(tmp_path: Path, capsys) -> None:
    jobs = [("batchnorm", 2, 0.5), ("batchnorm", 32, 0.9), ("groupnorm", 2, 0.8),
            ("groupnorm", 32, 0.85)]  # fmt: skip
    _fake_sweep(tmp_path, jobs)
    records = write_table(tmp_path, "norm.name", "data.batch_size", ["val/acc"], log_x=True)
    assert len(records) == 4
    grid = (tmp_path / "table.md").read_text()
    assert "| norm.name \\ data.batch_size | 2 | 32 |" in grid
    assert "| batchnorm | 0.500 | 0.900 |" in grid and "| groupnorm | 0.800 | 0.850 |" in grid
    with (tmp_path / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["norm.name"], int(r["data.batch_size"]), float(r["val/acc"])) for r in rows] == jobs
    assert (tmp_path / "table.png").read_bytes()[:8] == PNG_MAGIC
    assert main([str(tmp_path), "--rows", "norm.name", "--values", "val/acc"]) == 0
    assert "| groupnorm | 0.825 |" in capsys.readouterr().out  # mean over batch sizes


def test_precise_bn_accuracy_scores_a_copy_and_leaves_training_alone(tmp_path: Path) -> None:
    import lightning as L

    from normlab.callbacks.precise_bn_accuracy import PreciseBNAccuracy
    from normlab.data import NormLabDataModule
    from normlab.models import NormLabModule

    def fit(*callbacks) -> tuple[NormLabModule, dict]:
        L.seed_everything(3)
        model = NormLabModule(10, 1, {"name": "batchnorm", "momentum": 0.01},
                              net={"widths": [8, 16]})  # fmt: skip
        trainer = L.Trainer(max_epochs=2, limit_train_batches=5, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=list(callbacks))  # fmt: skip
        trainer.fit(model, datamodule=NormLabDataModule(data_dir=str(tmp_path)))
        return model, dict(trainer.callback_metrics)

    plain, plain_metrics = fit()
    scored, metrics = fit(PreciseBNAccuracy(num_batches=5))
    assert "val/acc_precise" in metrics and 0 <= float(metrics["val/acc_precise"]) <= 1
    assert float(metrics["val/acc"]) == float(plain_metrics["val/acc"])
    for key, value in plain.state_dict().items():  # weights and running statistics
        assert torch.equal(scored.state_dict()[key], value), key
    with pytest.raises(ValueError, match="num_batches=0"):
        PreciseBNAccuracy(num_batches=0)


def test_tiny_shift_sweep_tabulates_accuracy_without_and_with_adaptation(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_sweep("experiment=shift", "norm=batchnorm,groupnorm", *TINY, sweep_dir=sweep)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with (sweep / "table.csv").open() as f:
        rows = {r["norm.name"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"batchnorm", "groupnorm"}
    for row in rows.values():
        results = json.loads((Path(row["run_dir"]) / "results.json").read_text())["metrics"]
        assert float(row["test/acc"]) == pytest.approx(results["test/acc"])
        assert float(row["test_adapted/acc"]) == pytest.approx(results["test_adapted/acc"])
    # GroupNorm has no running statistics: adapting changes nothing
    assert rows["groupnorm"]["test/acc"] == rows["groupnorm"]["test_adapted/acc"]
    assert "| batchnorm |" in (sweep / "table.md").read_text()
    assert (sweep / "table.png").read_bytes()[:8] == PNG_MAGIC
