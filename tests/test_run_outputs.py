"""What a finished run reports is what it did: float64 training, tags in results.json, and
eval.py's data.batch_size used by the test loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from normlab.config import eval_data_config
from tests.conftest import run_script


def test_eval_batch_size_is_the_test_loader_batch_size() -> None:
    from normlab.data import NormLabDataModule

    saved = {"name": "digits", "batch_size": 64, "eval_batch_size": 512, "data_dir": "data"}
    cfg = eval_data_config(saved, {"batch_size": 7, "data_dir": None})
    datamodule = NormLabDataModule(**cfg)
    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    n_test = len(datamodule.splits["test"])
    assert loader.batch_size == 7
    assert len(loader) == -(-n_test // 7)  # 270 held-out digits: 39 batches, not 1
    assert eval_data_config(saved, {"batch_size": None})["eval_batch_size"] == 512


@pytest.mark.slow
def test_float64_run_stores_tags_and_eval_batch_size_keeps_accuracy(tmp_path: Path) -> None:
    # norm=frozen: eval-mode outputs do not depend on the batch, so eval with batches of 7 must
    # reproduce the test accuracy that training measured with batches of 512
    args = [
        "trainer=cpu",
        "trainer.max_epochs=1",
        "callbacks=no_inspection",
        "model.net.widths=[8,16]",
    ]
    trained = run_script(
        "train.py", *args, "trainer.precision=64-true", "norm=frozen", "tags=[fp64,smoke]",
        run_dir=tmp_path / "train",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert trained.results["tags"] == ["fp64", "smoke"]
    ckpt = trained.run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    weights = [v for k, v in state.items() if k.endswith("weight")]
    assert weights and all(v.dtype == torch.float64 for v in weights)

    evaluated = run_script(
        "eval.py", "trainer=cpu", f"ckpt_path={ckpt}", "data.batch_size=7", "tags=[again]",
        run_dir=tmp_path / "eval",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert evaluated.results["tags"] == ["again"]
    assert evaluated.results["metrics"]["test/acc"] == pytest.approx(
        trained.results["metrics"]["test/acc"], abs=1e-9
    )


@pytest.mark.parametrize("seed", [0, 7])
def test_the_seed_sets_the_initial_weights(seed: int, tmp_path: Path, monkeypatch) -> None:
    """The model a run starts from is the one its seed builds. The reference is rebuilt here, in
    the order train.py seeds and builds (seed, data module, model), and a different seed builds
    different weights, so a run that swaps the seed (seed=0 read as "no seed") fails."""
    import lightning as L

    import normlab.run as run
    from normlab.cli import run_task
    from tests.test_configs import compose_train

    fast = ["trainer=cpu", "model.net.widths=[8,16]", "callbacks=none", "logger=csv"]
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "test=false"]
    _, cfg = compose_train([*fast, *short, f"seed={seed}"], tmp_path / "run")
    built = []
    build_model = run.build_model

    def recording_build_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        built.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(run, "build_model", recording_build_model)
    run_task("train", cfg)
    assert len(built) == 1

    def reference(reference_seed: int) -> dict[str, torch.Tensor]:
        L.seed_everything(reference_seed, workers=True)
        datamodule = run.build_datamodule(cfg.data, reference_seed)
        return build_model(cfg.model, cfg.norm, datamodule).state_dict()

    same, other = reference(seed), reference(seed + 42)
    assert built[0].keys() == same.keys()
    assert all(torch.equal(built[0][k], same[k]) for k in same)
    assert not all(torch.equal(built[0][k], other[k]) for k in other)


def test_results_report_the_best_checkpoints_test_accuracy(tmp_path: Path) -> None:
    """results.json's test/acc is the best checkpoint's, not the last epoch's weights'. The
    checkpoint callback keeps the *lowest* val/acc here, so the best checkpoint is an early epoch
    and differs from the last one by a margin; eval.py on each checkpoint gives the reference."""
    import json

    from normlab.cli import run_task
    from tests.test_configs import compose_train

    fast = ["trainer=cpu", "model.net.widths=[8,16]", "callbacks=no_inspection", "logger=csv"]
    fast += ["callbacks.rich_progress_bar=null", "seed=3"]
    worst_is_best = [
        "callbacks.model_checkpoint.mode=min",
        "callbacks.model_checkpoint.save_top_k=1",
    ]
    run = ["trainer.max_epochs=3", "model.optimizer.lr=0.02", *worst_is_best]
    _, cfg = compose_train([*fast, *run], tmp_path / "run")
    run_task("train", cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    best, last = results["checkpoints"]["best"], results["checkpoints"]["last"]
    assert Path(best).name != Path(last).name and Path(best).name.startswith("epoch_")

    def evaluate(ckpt: str, where: str) -> float:
        _, eval_cfg = compose_train(
            ["trainer=cpu", f"ckpt_path={ckpt}", "logger=csv"], tmp_path / where, "eval"
        )
        return run_task("eval", eval_cfg)["test/acc"]

    of_best, of_last = evaluate(best, "eval_best"), evaluate(last, "eval_last")
    assert of_last - of_best > 0.2, (of_best, of_last)  # the two checkpoints differ clearly
    assert results["metrics"]["test/acc"] == pytest.approx(of_best, abs=1e-9), (of_best, of_last)
