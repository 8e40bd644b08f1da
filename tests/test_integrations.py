"""The habits of lightning-hydra-template users: `hparams_search=optuna`, `logger=wandb`,
`logger=mlflow` (optional extras, all in `.[dev]`) and the run-start `extras`."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from normlab.errors import ConfigError
from normlab.extras import apply_extras
from normlab.preflight import EXTRAS, check_launcher_installed
from tests.conftest import FAST, run_sweep

TINY = [
    *FAST,
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "callbacks=no_inspection",
]


# -- optional extras: a missing one is named with the command that installs it ---------------


@pytest.mark.parametrize("option, extra", [(e[0], e[2]) for e in EXTRAS])
def test_an_option_whose_extra_is_missing_names_the_install_command(
    option: str, extra: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    check_launcher_installed(["norm=none"])  # nothing optional asked for: nothing to say
    with pytest.raises(SystemExit) as info:
        check_launcher_installed(["-m", option, "norm=none"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"normlab: error: {option} needs ")
    assert f'Fix: pip install -e ".[{extra}]"' in err and err.count("\n") == 1


def test_the_extras_are_installed_by_dev() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for _, _, extra, _, _ in EXTRAS:
        assert set(extras[extra]) <= set(extras["dev"]), extra


# -- hparams_search=optuna -------------------------------------------------------------------


def test_optuna_search_finishes_its_trials_and_writes_the_best(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_sweep("hparams_search=optuna", *TINY, sweep_dir=sweep)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"model.optimizer.lr", "model.optimizer.weight_decay"}
    with (sweep / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}  # the default: 3 trials
    # the best value is the best trial's final val/acc, and its dir is named by its parameters
    assert best["best_value"] == pytest.approx(max(float(r["val/acc"]) for r in rows))
    (best_row,) = [r for r in rows if float(r["val/acc"]) == best["best_value"]]
    lr = best["best_params"]["model.optimizer.lr"]
    assert best_row["job"].startswith(f"model.optimizer.lr={lr},model.optimizer.weight_decay=")
    config = OmegaConf.load(sweep / best_row["job"] / ".hydra" / "config.yaml")
    assert config.model.optimizer.lr == pytest.approx(lr) and config.trainer.max_epochs == 1


# -- logger=wandb (offline) and logger=mlflow (local SQLite store) ---------------------------


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``): W&B's LevelDB-log format, 32
    KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3
    middle, 4 last), after a 7-byte file header ``:W&B`` + magic + version."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, chunks = [], header, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # the rest of a block is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if length == kind == 0:
            pos += left
            continue
        chunk = data[pos + header : pos + header + length]
        pos += header + length
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(chunks))
    return records


def key(item) -> str:
    """A W&B config/history item's key (newer versions fill ``nested_key`` instead)."""
    return item.key or "/".join(item.nested_key)


def test_wandb_logger_writes_an_offline_run_with_config_and_metrics(train_run) -> None:
    run = train_run("logger=wandb", *TINY[len(FAST) :], "norm=frozen")
    assert run.returncode == 0, run.output[-3000:]
    (path,) = (run.run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(path)
    (info,) = [r.run for r in records if r.HasField("run")]
    assert (info.project, info.run_group, list(info.tags)) == ("normlab", "train", ["dev"])
    assert info.display_name == run.run_dir.name  # named as its run dir
    config = {
        key(u): json.loads(u.value_json)
        for r in records
        if r.HasField("config")
        for u in r.config.update
    }
    assert config["norm.name"] == "frozen" and config["model.optimizer.lr"] == pytest.approx(3e-3)
    history = [
        {key(i): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.HasField("history")
    ]
    val_acc = [h["val/acc"] for h in history if "val/acc" in h]
    assert val_acc[-1] == pytest.approx(run.results["metrics"]["val/acc"])
    hparams_val_acc = [h["hparams/val_acc"] for h in history if "hparams/val_acc" in h]
    assert hparams_val_acc == [pytest.approx(run.results["metrics"]["val/acc"])]


def test_mlflow_logger_writes_a_run_mlflows_client_reads(train_run, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run = train_run("logger=mlflow", *FAST[1:], "trainer.limit_train_batches=2", "norm=groupnorm")
    assert run.returncode == 0, run.output[-3000:]
    store = run.run_dir.parent / "logs" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("train")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    assert found.info.run_name == run.run_dir.name  # named as its run dir
    assert found.data.params["norm.name"] == "groupnorm"
    assert found.data.tags["run_dir"] == str(run.run_dir)
    for key in ("val/acc", "test/acc"):
        assert found.data.metrics[key] == pytest.approx(run.results["metrics"][key])
    # the normalization statistics arrive as MLflow metrics too, step by step
    history = client.get_metric_history(found.info.run_id, "norm/net.features.1/weight/mean")
    assert len(history) >= 2


# -- extras ----------------------------------------------------------------------------------


def test_enforce_tags_refuses_a_run_without_tags() -> None:
    cfg = OmegaConf.create({"tags": [], "extras": {"enforce_tags": True, "print_config": False}})
    with pytest.raises(ConfigError, match=r"^tags=\[\] is not valid: extras.enforce_tags is on"):
        apply_extras(cfg)
    cfg.extras.enforce_tags = False
    apply_extras(cfg)  # off: no check
    cfg = OmegaConf.create({"tags": ["bn"], "extras": {"enforce_tags": True}})
    apply_extras(cfg)


def test_print_config_prints_the_groups_as_a_tree(capsys) -> None:
    cfg = OmegaConf.create(
        {
            "seed": 3,
            "norm": {"name": "frozen"},
            "data": {"name": "digits", "batch_size": "${seed}"},
            "extras": {"print_config": True, "enforce_tags": False},
        }
    )
    apply_extras(cfg)
    out = capsys.readouterr().out
    assert out.index("data") < out.index("norm") < out.index("extras") < out.index("seed")
    assert "name: frozen" in out and "batch_size: 3" in out  # resolved
