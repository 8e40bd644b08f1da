"""A multirun's job dirs (and so its TensorBoard runs) are named after what the sweep varies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from normlab.job_names import SWEPT_KEYS_ENV, SweptKeys, job_name, swept_keys
from tests.test_experiments import compose_with_hydra


def test_swept_keys_are_the_command_lines_sweeps_and_the_sweepers_params() -> None:
    overrides = ["experiment=compare_norms", "norm=batchnorm,frozen", "seed=1", "lr=interval(0,1)"]
    assert swept_keys(overrides) == ["lr", "norm"]
    assert swept_keys(["seed=1,2"], {"norm": "none,frozen"}) == ["norm", "seed"]


def test_job_name_keeps_the_swept_overrides_as_override_dirname_writes_them() -> None:
    job = ["experiment=compare_norms", "norm=frozen", "model.net.widths=[8,16]", "seed=3"]
    assert job_name(job, ["norm"], 2) == "norm=frozen"
    assert job_name(job, ["seed", "norm"], 2) == "norm=frozen,seed=3"
    assert job_name(job, ["model.net.widths"], 0) == "model.net.widths=[8,16]"
    assert job_name(job, ["norm", "seed"], 1, kv_sep="-", item_sep="__") == "norm-frozen__seed-3"
    assert job_name(job, ["norm", "seed"], 1, exclude_keys=["seed"]) == "norm=frozen"
    # nothing swept: the job number; no swept-key record (another launcher): every override
    assert job_name(job, [], 4) == "4"
    assert job_name(["norm=none"], None, 4) == "norm=none"
    # one path component, whatever the values hold
    assert job_name(["data.data_dir=/tmp/x"], None, 0) == "data.data_dir=_tmp_x"


@pytest.fixture
def job_config(monkeypatch, tmp_path: Path):
    """The composed Hydra config of job ``num`` of a sweep of ``overrides`` (as the launcher
    hands it to the job) and the sweep's start recorded by ``SweptKeys``."""
    monkeypatch.delenv(SWEPT_KEYS_ENV, raising=False)

    def _make(command_line: list[str], job: list[str], num: int):
        fixed = [o for o in command_line if "," not in o]  # compose() takes no sweeps
        sweep = compose_with_hydra(*fixed, f"hydra.sweep.dir={tmp_path}")
        with open_dict(sweep):
            sweep.hydra.overrides.task = command_line
        SweptKeys().on_multirun_start(sweep)
        cfg = compose_with_hydra(*job, f"hydra.sweep.dir={tmp_path}")
        with open_dict(cfg):
            cfg.hydra.overrides.task = job
            cfg.hydra.job.num = num
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _make
    os.environ.pop(SWEPT_KEYS_ENV, None)
    HydraConfig.instance().cfg = None  # no other test runs "inside" this job


def test_a_compare_norms_job_dir_is_named_by_its_norm(job_config, tmp_path: Path) -> None:
    command_line = ["experiment=compare_norms", "norm=batchnorm,frozen,groupnorm"]
    cfg = job_config(command_line, ["experiment=compare_norms", "norm=frozen"], 1)
    assert cfg.hydra.sweep.subdir == "norm=frozen"
    # the experiment's own list (hydra.sweeper.params) counts as swept too
    cfg = job_config(["experiment=compare_norms"], ["experiment=compare_norms", "norm=none"], 0)
    assert cfg.hydra.sweep.subdir == "norm=none"


def test_a_name_taken_in_the_sweep_dir_gets_the_job_number(job_config, tmp_path: Path) -> None:
    # an Optuna sweep can sample the same values twice
    (tmp_path / "seed=7").mkdir()
    cfg = job_config(["seed=7,8"], ["seed=7"], 5)
    assert cfg.hydra.sweep.subdir == "seed=7_5"


def test_single_runs_keep_their_timestamp_and_pid() -> None:
    cfg = compose_with_hydra()
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]
    assert run_dir.endswith("/runs/${now:%Y-%m-%d_%H-%M-%S}_${normlab_pid:}")
