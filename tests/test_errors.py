"""Bad input, end to end: every mistake in the table below runs the real train.py / eval.py and
must end with a one-paragraph message that names the key or file and the fix, a non-zero exit
status, no traceback, and no results.json or checkpoint left behind.

The runs are independent, so the module fixture starts them all at once (a few at a time)."""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, Run, run_script

# (id, script, overrides, exit status, substrings the output must contain)
# "{tmp}" in an override is replaced by a per-case scratch dir holding the files made below.
# fmt: off
BAD_INPUTS: list[tuple[str, str, list[str], int, list[str]]] = [
    # mistakes Hydra catches while composing the config (its own message, exit status 1)
    ("unknown_option", "train.py", ["norm=bogus"], 1, ["Could not find 'norm/bogus'", "batchnorm"]),
    ("unknown_key", "train.py", ["trainer.max_epoch=3"], 1,
     ["max_epoch", "not in struct", "+trainer.max_epoch=3"]),
    # types and ranges, checked before torch/Lightning are imported
    ("wrong_type", "train.py", ["data.batch_size=abc"], 2,
     ["data.batch_size='abc' is not valid", "expected an integer"]),
    ("lr_negative", "train.py", ["model.optimizer.lr=-0.1"], 2,
     ["model.optimizer.lr=-0.1", "must be greater than 0"]),
    ("lr_huge", "train.py", ["model.optimizer.lr=1e5"], 2,
     ["model.optimizer.lr=100000.0", "must be at most 10"]),
    ("weight_decay", "train.py", ["model.optimizer.weight_decay=-1"], 2,
     ["model.optimizer.weight_decay=-1", "at least 0"]),
    ("epochs_zero", "train.py", ["trainer.max_epochs=0"], 2,
     ["trainer.max_epochs=0", "at least 1"]),
    ("bn_momentum", "train.py", ["norm.momentum=1.5"], 2, ["norm.momentum=1.5", "[0, 1]"]),
    ("devices_zero", "train.py", ["trainer.devices=0"], 2,
     ["trainer.devices=0", "positive integer, -1, 'auto'"]),
    ("activation", "train.py", ["model.net.activation=swish"], 2,
     ["model.net.activation='swish'", "relu, sigmoid"]),
    ("seed_negative", "train.py", ["seed=-1"], 2, ["seed=-1", "non-negative integer"]),
    ("custom_std_length", "train.py",
     ["data.scaling=custom", "data.mean=[0.5,0.5,0.5]", "data.std=[0.2,0.2,0.2]"], 2,
     ["data.mean=[0.5, 0.5, 0.5]", "data=digits has 1 channel(s): give 1 value(s)"]),
    ("custom_std_zero", "train.py", ["data.scaling=custom", "data.mean=[0.5]", "data.std=[0]"], 2,
     ["data.std=[0]", "positive number"]),
    ("mean_without_custom", "train.py", ["data.mean=[0.5]"], 2,
     ["data.mean=[0.5]", "only with data.scaling=custom", "add data.scaling=custom"]),
    ("imagenet_on_gray", "train.py", ["data.scaling=imagenet"], 2,
     ["data.scaling='imagenet'", "RGB", "data.scaling=dataset"]),
    ("batch_size_one_bn", "train.py", ["data.batch_size=1"], 2,
     ["data.batch_size=1", "BatchNorm", "data.batch_size>=2", "norm=frozen/groupnorm/layernorm"]),
    # files: missing data, things that are not checkpoints
    ("mnist_offline", "train.py", ["data=mnist", "data.data_dir={tmp}/empty"], 2,
     ["data.name=mnist", "MNIST/raw", "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
      "data.download=true", "copy the files into"]),
    ("ckpt_missing", "train.py", ["ckpt_path={tmp}/nope.ckpt"], 2, ["ckpt_path=", "no such file"]),
    ("ckpt_foreign", "train.py", ["ckpt_path={tmp}/foreign.ckpt"], 2,
     ["foreign.ckpt is not a normlab checkpoint", "no 'normlab' entry"]),
    ("ckpt_last_no_runs", "train.py", ["ckpt_path=last"], 2,
     ["ckpt_path=last: no checkpoints/last.ckpt under", "train a run of this task_name first"]),
    ("eval_no_ckpt", "eval.py", ["trainer=cpu"], 2,
     ["ckpt_path='???'", "required", "ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt"]),
    ("eval_text", "eval.py", ["trainer=cpu", "ckpt_path={tmp}/notes.txt"], 2,
     ["notes.txt is not a normlab checkpoint", "give a .ckpt written by train.py"]),
    ("eval_pickle", "eval.py", ["trainer=cpu", "ckpt_path={tmp}/code.ckpt"], 2,
     ["code.ckpt is not a normlab checkpoint", "weights_only=True", "argparse.Namespace",
      "could run code"]),
    ("eval_truncated", "eval.py", ["trainer=cpu", "ckpt_path={tmp}/half.ckpt"], 2,
     ["half.ckpt is not a normlab checkpoint", "not a complete file written by torch.save"]),
    ("eval_batch_size", "eval.py", ["trainer=cpu", "ckpt_path={tmp}/foreign.ckpt",
     "data.batch_size=0"], 2, ["data.batch_size=0", "at least 1"]),
    # a loss that blows up: inputs scaled by 1e30, no normalization, plain SGD
    ("diverges", "train.py",
     ["norm=none", "model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=1",
      "data.scaling=custom", "data.mean=[0]", "data.std=[1e-30]", "trainer.limit_train_batches=3",
      "callbacks=no_inspection"], 2,
     ["training diverged", "at global step", "model.optimizer.lr=1", "norm=none",
      "No checkpoint had been saved yet"]),
]
# fmt: on


def _make_files(where: Path) -> None:
    (where / "empty").mkdir(parents=True)
    (where / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, where / "foreign.ckpt")
    # a pickle that would construct an arbitrary object: weights_only=True refuses it
    torch.save({"normlab": argparse.Namespace(x=1)}, where / "code.ckpt")
    # the first half of a real checkpoint, as a killed writer without atomic saves leaves it
    data = (where / "foreign.ckpt").read_bytes()
    (where / "half.ckpt").write_bytes(data[: len(data) // 2])


def _run_case(case: tuple, base: Path) -> Run:
    name, script, overrides, _, _ = case
    files = base / name / "files"
    _make_files(files)
    args = [o.replace("{tmp}", str(files)) for o in overrides]
    fast = FAST if script == "train.py" else []
    return run_script(script, *fast, *args, run_dir=base / name / "run", timeout=600)


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    base = tmp_path_factory.mktemp("bad_inputs")
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = pool.map(lambda c: _run_case(c, base), BAD_INPUTS)
        return {case[0]: run for case, run in zip(BAD_INPUTS, runs, strict=True)}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_fails_clearly(case: tuple, bad_runs: dict[str, Run]) -> None:
    name, _, _, status, expected = case
    run = bad_runs[name]
    assert run.returncode == status, run.output[-3000:]
    for text in expected:
        assert text in run.output, f"{text!r} missing from:\n{run.output[-3000:]}"
    assert "Traceback" not in run.output
    if status == 2:  # normlab's own errors: exactly one paragraph (one line) on stderr
        lines = [ln for ln in run.stderr.splitlines() if ln.startswith("normlab: error: ")]
        assert len(lines) == 1, run.stderr
        assert len(lines[0]) > 60
    leftovers = list(run.run_dir.rglob("results.json")) + list(run.run_dir.rglob("*.ckpt"))
    assert leftovers == []
    if name != "diverges":  # a run that never started leaves no run dir at all
        assert not run.run_dir.exists(), sorted(p.name for p in run.run_dir.iterdir())


def test_divergence_guard_rejects_bad_args() -> None:
    from normlab.callbacks.divergence import DivergenceGuard

    with pytest.raises(ValueError, match="at least 1"):
        DivergenceGuard(check_every_n_steps=0)
    with pytest.raises(ValueError, match="expected an integer"):
        DivergenceGuard(check_every_n_steps=1.5)  # type: ignore[arg-type]
