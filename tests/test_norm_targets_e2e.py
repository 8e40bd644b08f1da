"""End to end through train.py / eval.py: each norm of issue 21 trains a torchvision resnet18,
its checkpoint evaluates to the same test accuracy, and the layers with running statistics show
them in TensorBoard under the module's name. (The default ConvNet trains and resumes exactly
under each of them in tests/test_resume.py.)"""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import run_script

RESNET = [
    "trainer=cpu",
    "trainer.max_epochs=1",
    "callbacks.rich_progress_bar=null",
    "model=torchvision",
    "model.arch=resnet18",
    "data=synthetic",
    "data.synthetic.shape=[3,64,64]",  # layer4 sees 2x2: instance norm needs > 1 position
    "data.synthetic.num_samples=96",
    "data.synthetic.num_test=32",
    "data.batch_size=16",
]
# each norm with settings that make it differ from BatchNorm within a few steps
NORMS = {
    "batchrenorm": ["norm.renorm_warmup_steps=2"],
    "ghostbatchnorm": ["norm.virtual_batch_size=8"],
    "instancenorm": [],
    "layernorm2d": [],
    "gn_ws": [],
}


@pytest.mark.slow
@pytest.mark.parametrize("norm", list(NORMS))
def test_each_new_norm_trains_and_evaluates_a_resnet18(norm: str, tmp_path) -> None:
    train = run_script(
        "train.py", *RESNET, f"norm={norm}", *NORMS[norm], run_dir=tmp_path / "train"
    )
    assert train.returncode == 0, train.output[-3000:]
    ckpt = train.results["checkpoints"]["last"]
    evaluated = run_script("eval.py", "trainer=cpu", f"ckpt_path={ckpt}", run_dir=tmp_path / "ev")
    assert evaluated.returncode == 0, evaluated.output[-3000:]
    assert evaluated.results["metrics"]["test/acc"] == pytest.approx(
        train.results["metrics"]["test/acc"], abs=1e-6
    )
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    stats = sorted(k.removesuffix(".running_mean") for k in state if k.endswith("running_mean"))
    tags = set()
    for events in (train.run_dir / "tensorboard").glob("events.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    if norm in ("batchrenorm", "ghostbatchnorm"):
        # BatchNorm's buffers under BatchNorm's names, moved by training, and shown in TensorBoard
        assert len(stats) == 20 and "net.layer1.0.bn1" in stats
        steps = checkpoint["global_step"]  # one update per training step, also for ghost BN
        assert steps >= 5 and int(state["net.layer1.0.bn1.num_batches_tracked"]) == steps
        assert not torch.equal(state["net.bn1.running_var"], torch.ones(64))
        assert any("net.layer1.0.bn1/running_mean" in tag for tag in tags)
    else:
        assert stats == []
    assert any("net.layer1.0.bn1/weight" in tag for tag in tags)  # gamma of every kind
    assert not torch.equal(state["net.layer1.0.bn1.weight"], torch.ones(64))  # gamma learned
