"""train.py and eval.py end to end, as a user runs them (subprocesses, offline digits data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_script


def assert_run_dir(run_dir: Path) -> dict:
    """The run-dir layout of DESIGN.md; returns results.json."""
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "train.log").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    import json

    results = json.loads((run_dir / "results.json").read_text())
    assert set(results) >= {"metrics", "checkpoints", "run_dir"}
    assert {"val/acc", "test/acc", "train/loss"} <= set(results["metrics"])
    assert Path(results["checkpoints"]["best"]).is_file()
    assert results["checkpoints"]["last"] == str(run_dir / "checkpoints" / "last.ckpt")
    return results


@pytest.mark.parametrize("norm", ["none", "batchnorm", "frozen", "groupnorm", "layernorm"])
def test_train_each_norm(norm: str, train_run) -> None:
    run = train_run(f"norm={norm}", "seed=0", "tags=[e2e]", "trainer.max_epochs=3")
    assert run.returncode == 0, run.output[-3000:]
    results = assert_run_dir(run.run_dir)
    # three epochs of a tiny (8, 16)-channel CNN on digits: above chance (0.1), and normalized
    # nets at least three times chance (the full-size comparison is in the README tutorial)
    floor = 0.15 if norm == "none" else 0.3
    assert results["metrics"]["test/acc"] > floor, results
    ckpt = torch.load(run.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["norm"]["name"] == norm
    assert ckpt["normlab"]["config"]["seed"] == 0
    assert ckpt["NormLabDataModule"]["scaling"] == "dataset"
    keys = ckpt["state_dict"].keys()
    has_stats = any(k.endswith("running_mean") for k in keys)
    assert has_stats == (norm in ("batchnorm", "frozen"))
    # the console: the run dir first, each Lightning line once (it has a handler of its own)
    lines = run.output.splitlines()
    assert f"run dir: {run.run_dir}" in lines[0]
    assert sum("`Trainer.fit` stopped" in line for line in lines) == 1
    assert sum("Seed set to 0" in line for line in lines) == 1


def test_a_checkpoint_is_tested_as_trained_and_seed_zero_is_a_seed(train_run, tmp_path) -> None:
    """train -> eval.py -> train=false ckpt_path=: the same checkpoint, the same test/acc; the
    scaling statistics come from the checkpoint; seed=0 repeats itself and differs from 42."""
    # a learning rate at which one FAST epoch learns (test/acc 0.43 here; the default's 0.18 is
    # too close to chance for the rescaling check below to mean anything)
    lr = "model.optimizer.lr=0.05"
    first = train_run("seed=0", lr, name="first")
    assert first.returncode == 0, first.output[-3000:]
    results = assert_run_dir(first.run_dir)
    best = results["checkpoints"]["best"]

    evaluated = run_script("eval.py", f"ckpt_path={best}", "trainer=cpu", run_dir=tmp_path / "ev")
    assert evaluated.returncode == 0, evaluated.output[-3000:]
    assert evaluated.results["metrics"]["test/acc"] == results["metrics"]["test/acc"]
    assert evaluated.results["evaluated"] == best

    # train=false tests the checkpoint it is given, not freshly initialised weights
    tested = train_run("train=false", f"ckpt_path={best}", lr, name="tested")
    assert tested.returncode == 0, tested.output[-3000:]
    assert tested.results["metrics"]["test/acc"] == results["metrics"]["test/acc"]
    assert "val/acc" not in tested.results["metrics"]

    # eval.py scales with the checkpoint's statistics: a checkpoint whose scaling mean is moved
    # by 10 standard deviations feeds the net inputs 10 units off, which it cannot classify
    checkpoint = torch.load(best, weights_only=True)
    state = checkpoint["NormLabDataModule"]
    state["mean"] = [m + 10 * s for m, s in zip(state["mean"], state["std"], strict=True)]
    torch.save(checkpoint, tmp_path / "rescaled.ckpt")
    rescaled = run_script(
        "eval.py", f"ckpt_path={tmp_path / 'rescaled.ckpt'}", "trainer=cpu", run_dir=tmp_path / "r"
    )
    assert rescaled.returncode == 0, rescaled.output[-3000:]
    trained_acc, rescaled_acc = (
        results["metrics"]["test/acc"],
        rescaled.results["metrics"]["test/acc"],
    )
    # measured: 0.43 -> 0.15 (chance is 0.1), a drop of 0.28, twice the bound
    assert trained_acc - rescaled_acc > 0.14, (trained_acc, rescaled_acc)

    # seed=0 is honoured: the same seed gives the same weights, bit for bit, and seed 42 others
    second = train_run("seed=0", lr, name="second")
    other = train_run("seed=42", lr, name="other")
    assert second.returncode == 0 and other.returncode == 0, other.output[-3000:]
    a, b, c = (
        torch.load(run.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for run in (first, second, other)
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_norm_fails_at_once_listing_norms(train_run) -> None:
    run = train_run("norm=nosuchnorm")
    assert run.returncode != 0
    for norm in ("none", "batchnorm", "frozen", "groupnorm", "layernorm"):
        assert norm in run.stderr
    assert not (run.run_dir / "results.json").exists()


def test_missing_offline_data_is_one_clear_paragraph(train_run, tmp_path: Path) -> None:
    empty = tmp_path / "no_data"
    run = train_run("data=mnist", f"data.data_dir={empty}")
    assert run.returncode == 2, run.output[-2000:]
    assert "normlab: error:" in run.stderr and "Traceback" not in run.stderr
    assert str(empty) in run.stderr and "data.download=true" in run.stderr
    assert not run.run_dir.exists() or not (run.run_dir / "results.json").exists()
