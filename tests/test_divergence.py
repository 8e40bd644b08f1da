"""Divergence: a NaN loss stops training with a message naming the step and the likely causes,
and the last good checkpoint stays as it was."""

from __future__ import annotations

import torch

STEPS_PER_EPOCH = 5


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(train_run) -> None:
    run = train_run(
        "callbacks=no_inspection",
        "trainer.max_epochs=3",
        f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
        "+callbacks.nan._target_=tests.nan_injection.InjectNaN",
        "+callbacks.nan.at_step=7",
    )
    assert run.returncode == 2, run.output[-3000:]
    last = run.run_dir / "checkpoints" / "last.ckpt"
    [line] = [ln for ln in run.stderr.splitlines() if ln.startswith("normlab: error: ")]
    assert "training diverged: the training loss is nan at global step 7 (epoch 1, batch 2)" in line
    assert "model.optimizer.lr=0.003: try 10x smaller" in line
    assert "missing normalization (this run has norm=batchnorm" in line
    assert f"The last good checkpoint, {last}, is unchanged" in line
    assert f"python eval.py ckpt_path={last}" in line
    assert "Traceback" not in run.output
    assert not (run.run_dir / "results.json").exists()
    good = torch.load(last, weights_only=True)
    assert good["global_step"] == STEPS_PER_EPOCH  # saved at the end of epoch 0, not later
    assert all(
        torch.isfinite(v).all() for v in good["state_dict"].values() if v.is_floating_point()
    )


def _train_in_process(tmp_path, *overrides: str):
    """train.py's run_task in this process on a small digits run; returns its exit code."""
    import pytest

    from normlab.cli import run_task
    from tests.test_configs import compose_train

    fast = ["trainer=cpu", "model.net.widths=[8,16]", "callbacks.rich_progress_bar=null"]
    _, cfg = compose_train([*fast, "trainer.max_epochs=1", *overrides], tmp_path / "run")
    with pytest.raises(SystemExit) as info:
        run_task("train", cfg)
    return info.value.code


def test_half_precision_divergence_names_the_precision(tmp_path, capsys) -> None:
    # 16-true on CPU: the loss is NaN at step 1 with the default learning rate
    code = _train_in_process(tmp_path, "trainer.precision=16-true", "callbacks=no_inspection")
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("normlab: error")]
    assert code == 2
    causes = line.split("Likely causes: ")[1]
    assert causes.startswith("the precision (trainer.precision=16-true"), line
    assert "trainer.precision=bf16-mixed" in causes and "32-true" in causes


def test_non_finite_statistics_are_inspected_without_crashing(tmp_path, caplog) -> None:
    """Inputs of 1e30 (data.std=1e-30) overflow the first BatchNorm's running_var to inf while
    the loss stays finite: the run completes, the histograms hold the finite statistics and one
    warning names the layer."""
    import logging

    from normlab.cli import run_task
    from tests.test_configs import compose_train

    overrides = ["trainer=cpu", "model.net.widths=[8,16]", "callbacks.rich_progress_bar=null",
                 "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                 "callbacks.bn_stats.histograms_every_n_steps=1", "data.scaling=custom",
                 "data.mean=[0]", "data.std=[1e-30]"]  # fmt: skip
    _, cfg = compose_train(overrides, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="normlab"):
        metrics = run_task("train", cfg)
    assert 0 <= metrics["test/acc"] <= 1
    warned = [r.getMessage() for r in caplog.records if "NaN/inf" in r.getMessage()]
    assert warned and "norm/net.features.1/running_var holds 8 NaN/inf value(s) of 8" in warned[0]
    assert len(warned) == len(set(warned))  # once per statistic, not once per step
