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
