"""Performance features, tested for correctness (speed lives in scripts/bench.py): the in-memory
data path's single copy, streaming image folders, the accelerator knobs on CPU, and the wiring
the benchmark relies on."""

from __future__ import annotations

import copy
import gc
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from normlab.config import validate_train_config
from normlab.data import NormLabDataModule
from normlab.errors import ConfigError
from normlab.models import NormLabModule
from tests.conftest import ROOT, run_script

TINY = {
    "num_classes": 4,
    "in_channels": 3,
    "norm": {"name": "batchnorm"},
    "net": {"widths": [8, 16]},
}


def make_folder(root: Path, per_class: int = 14) -> Path:
    """Two classes of PNGs of mixed sizes (streaming must resize them all to image_size)."""
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            size = (9, 7) if i % 3 else (12, 10)
            pixels = rng.integers(0, 128, (*size, 3)) + 100 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / cls / f"{i}.png")
    return root


def learnable_batch(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose mean brightness gives away the class."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen)
    images = 0.5 * torch.randn(n, 3, 8, 8, generator=gen) + labels.view(-1, 1, 1, 1).float()
    return images, labels


def train_steps(model: NormLabModule, steps: int = 15) -> list[float]:
    images, labels = learnable_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_in_memory_splits_share_one_copy_of_the_images() -> None:
    dm = NormLabDataModule(name="digits", data_dir="unused")
    dm.setup("fit")
    data = dm.data
    # train/val/test are views of the one uint8 tensor: memory is N*C*H*W bytes, not twice that
    assert {s._images.data_ptr() for s in dm.splits.values()} == {data.train_x.data_ptr()}
    assert data.train_x.dtype == torch.uint8 and data.train_x.nbytes == 1797 * 1 * 8 * 8
    train = dm.splits["train"]
    assert torch.equal(train.images, data.train_x[train.index])
    images, labels = train.__getitems__([5, 0, 7])
    assert torch.equal(images, data.train_x[train.index[[5, 0, 7]]])
    assert torch.equal(labels, data.train_y[train.index[[5, 0, 7]]])


def test_streaming_imagefolder_matches_in_memory(tmp_path: Path, monkeypatch) -> None:
    import normlab.data.datamodule as datamodule

    folder = make_folder(tmp_path / "images")
    common = {"name": "imagefolder", "data_dir": str(folder), "image_size": [8, 6]}
    common |= {"batch_size": 5, "eval_batch_size": 4, "val_fraction": 0.2, "test_fraction": 0.2}
    memory = NormLabDataModule(**common)
    memory.setup("fit")

    decode = datamodule.decode_image

    def decode_in_worker(*args, **kwargs):
        # the streaming path decodes in DataLoader workers only, statistics pass included
        assert torch.utils.data.get_worker_info() is not None, "decoded in the main process"
        return decode(*args, **kwargs)

    monkeypatch.setattr(datamodule, "decode_image", decode_in_worker)
    stream = NormLabDataModule(**common, in_memory=False, num_workers=2)
    stream.setup("fit")

    assert {k: len(v) for k, v in stream.splits.items()} == {"train": 16, "val": 6, "test": 6}
    assert {k: len(v) for k, v in memory.splits.items()} == {"train": 16, "val": 6, "test": 6}
    # the training split's statistics: the same numbers from one pass in the workers
    np.testing.assert_allclose(stream.scaler.mean, memory.scaler.mean, rtol=1e-12)
    np.testing.assert_allclose(stream.scaler.std, memory.scaler.std, rtol=1e-12)
    for split in ("train", "val", "test"):
        loader = getattr(stream, f"{split}_dataloader")()
        for raw, expected in zip(loader, getattr(memory, f"{split}_dataloader")(), strict=True):
            assert raw[0].dtype == torch.uint8 and raw[0].shape[1:] == (3, 8, 6)  # uint8 out
            x, y = stream.on_after_batch_transfer(raw, 0)
            x_mem, y_mem = memory.on_after_batch_transfer(expected, 0)
            assert x.dtype == torch.float32 and torch.equal(x, x_mem) and torch.equal(y, y_mem)
    # the persistent workers are shut down here: collected in a later test, their shutdown timed
    # out (5 s a worker) and charged that test 10 s
    del loader
    gc.collect()


def compose(*overrides: str) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from normlab.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[*overrides, "paths.output_dir=unused"])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(
    ("overrides", "key", "fix"),
    [
        (["data.in_memory=false"], "data.in_memory", "only data=imagefolder streams"),
        (
            ["data=imagefolder", "data.data_dir=x", "data.in_memory=false", "data.image_size=null"],
            "data.image_size",
            "set data.image_size=[H,W]",
        ),
        (["data.in_memory=sometimes"], "data.in_memory", "expected true or false"),
        (["model.channels_last=1"], "model.channels_last", "expected true or false"),
        (["model.compile=yes"], "model.compile", "expected true or false"),
        (["trainer.precision=bf17"], "trainer.precision", "bf16-mixed"),
    ],
)
def test_performance_keys_are_validated(overrides: list[str], key: str, fix: str) -> None:
    validate_train_config(compose())  # the defaults pass
    with pytest.raises(ConfigError) as err:
        validate_train_config(compose(*overrides))
    assert err.value.key == key and fix in str(err.value)


def test_channels_last_gives_the_same_model() -> None:
    torch.manual_seed(0)
    base = NormLabModule(**TINY)
    fast = NormLabModule(**TINY, channels_last=True)
    fast.load_state_dict(base.state_dict())
    assert list(fast.state_dict()) == list(base.state_dict())
    conv = fast.net.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x, _ = learnable_batch()
    base.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), base(x), rtol=1e-5, atol=1e-5)
    base_losses, fast_losses = train_steps(base), train_steps(fast)
    assert fast_losses[-1] < 0.5 * fast_losses[0]
    np.testing.assert_allclose(fast_losses, base_losses, rtol=1e-3)


@pytest.mark.slow
def test_compile_gives_the_same_model() -> None:
    torch.manual_seed(0)
    base = NormLabModule(**TINY)
    fast = NormLabModule(**TINY, compile=True)
    fast.load_state_dict(base.state_dict())
    # the compiled wrapper stays out of the module tree: names and checkpoint keys unchanged
    assert list(fast.state_dict()) == list(base.state_dict())
    assert [n for n, _ in fast.named_modules()] == [n for n, _ in base.named_modules()]
    x, _ = learnable_batch()
    base.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), base(x), rtol=1e-4, atol=1e-4)
    assert fast._backbone() is not fast.net  # it did run compiled
    calls = []  # a hook added after compilation (as the saturation monitor does) still fires
    handle = fast.net.features[2].register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        fast(x)
    handle.remove()
    assert calls == [1] and fast._backbone() is not fast.net
    losses = train_steps(fast)
    assert losses[-1] < 0.5 * losses[0]
    np.testing.assert_allclose(losses, train_steps(base), rtol=1e-3)
    twin = copy.deepcopy(fast)  # a copy compiles its own backbone, never the original's
    assert twin._backbone()._orig_mod is twin.net


def test_bf16_mixed_trains_on_cpu_and_predicts_like_fp32() -> None:
    import lightning as L

    dm = NormLabDataModule(
        name="synthetic",
        batch_size=32,
        synthetic={"num_samples": 640, "num_test": 0, "shape": [3, 8, 8], "num_classes": 4},
    )
    torch.manual_seed(0)
    model = NormLabModule(**TINY, optimizer={"lr": 1e-2})
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Losses()],
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.precision == "bf16-mixed"
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    # the same weights predict (nearly) the same in bf16 autocast as in fp32
    x, _ = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    model.eval()
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x).float()
    assert (half.argmax(1) == full.argmax(1)).float().mean() >= 0.95
    assert (half - full).abs().max() <= 0.05 * full.abs().max() + 0.05


@pytest.mark.slow
def test_train_and_eval_stream_with_the_knobs(train_run, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "images", per_class=24)
    run = train_run(
        "data=imagefolder",
        f"data.data_dir={folder}",
        "data.in_memory=false",
        "data.num_workers=2",
        "data.image_size=[8,8]",
        "data.batch_size=8",
        "model.channels_last=true",
        "trainer.precision=bf16-mixed",
        "callbacks=no_inspection",
    )
    assert run.returncode == 0, run.output[-3000:]
    assert "test/acc" in run.results["metrics"]
    ckpt = torch.load(run.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["channels_last"] is True
    assert ckpt["normlab"]["config"]["data"]["in_memory"] is False
    stats = ckpt["NormLabDataModule"]
    # eval.py streams the test split with the statistics saved in the checkpoint
    evaluated = run_script(
        "eval.py",
        f"ckpt_path={run.run_dir / 'checkpoints' / 'last.ckpt'}",
        "trainer=cpu",
        run_dir=tmp_path / "eval",
    )
    assert evaluated.returncode == 0, evaluated.output[-3000:]
    # one epoch: last.ckpt holds the weights the run tested (its best), so the same score
    assert evaluated.results["metrics"]["test/acc"] == run.results["metrics"]["test/acc"]
    assert len(stats["mean"]) == 3 and all(s > 0 for s in stats["std"])


def test_bench_measures_the_recipe_callbacks(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import _bench_runs as runs

    cfg = runs.compose_config(["trainer=cpu", "model.net.widths=[8,16]"], tmp_path)
    inspection = {c._target_ for c in cfg.callbacks.values() if runs.is_inspection(c)}
    # the BatchNorm statistics callbacks of configs/callbacks/default.yaml are what is toggled
    assert "normlab.callbacks.batch_norm_stats.BatchNormStats" in inspection
    with_all = {type(c).__name__ for c in runs.recipe_callbacks(cfg, inspection=True)}
    without = {type(c).__name__ for c in runs.recipe_callbacks(cfg, inspection=False)}
    assert with_all - without == {t.rsplit(".", 1)[1] for t in inspection}
    assert {"ModelCheckpoint", "RichProgressBar"} <= without
    dm = NormLabDataModule(name="digits", data_dir="unused", batch_size=32)
    dm.setup("fit")
    # the Trainer and the plain loop alternate step by step; both step times are measured
    timed = runs.run_template(cfg, dm, runs.WARMUP + 3, torch.device("cpu"))
    assert timed["step_s_wall"] > 0 and timed["plain_step_s_wall"] > 0
    assert timed["hooks_step_s_cpu"] > 0 and timed["hooks_epoch_end_s_cpu"] > 0


def test_whole_process_section_is_replaced_in_place(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import _bench_process as bp

    def spread(x: float) -> dict:
        return {"min": x, "median": x, "max": x}

    job = {v: {c: spread(t) for c in ("wall", "user", "sys")} for v, t in
           (("normlab", 11.0), ("plain", 10.5), ("lean", 10.0))}  # fmt: skip
    job |= {
        "commands": {v: f"python {v}.py" for v in bp.VARIANTS},
        "steps": 422,
        "repeats": 5,
        "ratios_to_lean": {
            "normlab": {"wall": 1.1, "cpu": 1.104, "sys": 1.0},
            "plain": {"wall": 1.05, "cpu": 1.05, "sys": 1.0},
        },
    }
    results = {
        "command": "python scripts/bench.py --process --docs page.md",
        "date": "2026-12-05T09:00:00",
        "machine": {"cpu": "EPYC", "cpu_cores": 2, "torch_threads": 2, "load_average_end": [0.5]},
        "import_floor_s": {"torch": 1.9, "lightning": 5.6, "floor": 3.7},
        "whole_process": {"mnist_sized_1_epoch": job},
        "passed": {"mnist_sized_1_epoch.wall": True, "mnist_sized_1_epoch.cpu": False},
    }
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\n## Results\n\nin-process\n\n## Augmentation\n\naugment\n")
    bp.write_section(page, results)
    bp.write_section(page, results)  # a second run replaces its section, nothing else
    text = page.read_text()
    assert text.count(bp.SECTION) == 1 and text.count("## Augmentation") == 1
    assert text.index("in-process") < text.index(bp.SECTION) < text.index("## Augmentation")
    assert text.endswith("augment\n")
    assert "mnist_sized_1_epoch.wall met, mnist_sized_1_epoch.cpu NOT met" in text
    # three decimals: 1.104 is not rounded into a target of 1.10
    assert "| python normlab.py |" not in text and "1.100 / 1.104 / 1.000" in text
    assert "Lightning's floor 3.70 s" in text


def test_the_three_benchmark_commands_share_one_page_in_order(tmp_path: Path) -> None:
    # bench.py renders the page's top, then `bench.py --process` and bench_augment.py each write
    # their own section: whichever order they run in, each keeps the others' text
    sys.path.insert(0, str(ROOT / "scripts"))
    import _bench_docs as docs

    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nin-process\n")
    docs.put_section(page, "## Augmentation\n\naugment 1\n")
    docs.put_section(page, "## Whole process\n\nprocess 1\n\n")
    docs.put_section(page, "## Augmentation\n\naugment 2\n")
    docs.put_section(page, "## Whole process\n\nprocess 2\n\n")
    assert page.read_text() == (
        "# Benchmarks\n\nin-process\n\n"
        "## Whole process\n\nprocess 2\n\n## Augmentation\n\naugment 2\n"
    )
    assert docs.later_sections(page.read_text()).startswith("## Whole process\n\nprocess 2")
    assert docs.later_sections("# Benchmarks\n\nin-process\n") == ""
