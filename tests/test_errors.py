"""Bad input, end to end: every mistake in the table below runs the real train.py / eval.py and
must end with a one-paragraph message that names the key or file and the fix, a non-zero exit
status, no traceback, and no results.json or checkpoint left behind.

The runs are independent, so the module fixture starts them all at once (a few at a time).
Mistakes that need no subprocess to show it (config values, data the DataModule refuses) are in
a second table, IN_PROCESS, that calls the entry points' ``run_task`` directly; the checks that
run before Hydra creates the run dir (normlab/preflight.py) have their own tests at the end."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, ROOT, Run, run_script

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
    from normlab.callbacks.divergence_guard import DivergenceGuard

    with pytest.raises(ValueError, match="at least 1"):
        DivergenceGuard(check_every_n_steps=0)
    with pytest.raises(ValueError, match="expected an integer"):
        DivergenceGuard(check_every_n_steps=1.5)  # type: ignore[arg-type]


# -- in process: the same run_task the entry points call, without a subprocess per case ----------
# (id, overrides, what the data dir {tmp} holds, substrings of the one-paragraph error)
# fmt: off
IN_PROCESS: list[tuple[str, list[str], str, list[str]]] = [
    # wrong results that used to end with exit 0
    ("train_false_no_ckpt", ["train=false"], "",
     ["train=False", "ckpt_path is not set", "eval.py"]),
    ("test_fraction_zero", ["data.test_fraction=0"], "",
     ["data.test_fraction=0", "no official test split", "test=false"]),
    ("custom_std_inf", ["data.scaling=custom", "data.mean=[0.5]", "data.std=[inf]"], "",
     ["data.std=[inf]", "finite number"]),
    ("custom_mean_nan", ["data.scaling=custom", "data.mean=[nan]", "data.std=[0.3]"], "",
     ["data.mean=[nan]", "finite number"]),
    ("synthetic_noise_inf", ["data=synthetic", "+data.synthetic.noise_std=inf"], "",
     ["data.synthetic.noise_std=inf", "finite number"]),
    ("synthetic_noise_nan", ["data=synthetic", "+data.synthetic.noise_std=nan"], "",
     ["data.synthetic.noise_std=nan", "finite number"]),
    ("norm_key_not_taken", ["norm=layernorm", "+norm.num_groups=4"], "",
     ["norm.num_groups=4",
      "norm=layernorm does not use it (it takes eps, affine, keep_affine, adapt)", "groupnorm"]),
    ("folder_three_images", ["data=imagefolder", "data.data_dir={tmp}"], "three",
     ["training split holds 1 image(s) of 3", "data.data_dir", "data.val_fraction"]),
    ("folder_test_fraction_zero", ["data=imagefolder", "data.data_dir={tmp}",
     "data.test_fraction=0"], "ok", ["no test split", "data.test_fraction=0", "test=false"]),
    ("folder_symlink_loop", ["data=imagefolder", "data.data_dir={tmp}"], "loop",
     ["cat/loop is a symbolic link to", "rm ", "cat/loop"]),
    ("folder_empty_class", ["data=imagefolder", "data.data_dir={tmp}"], "empty_class",
     ["class folder(s) without images", "/owl", "remove them"]),
    # values that ended in a traceback
    ("lr_nan", ["model.optimizer.lr=nan"], "", ["model.optimizer.lr=nan", "finite"]),
    ("dropout_nan", ["model.net.dropout=nan"], "", ["model.net.dropout=nan", "finite"]),
    ("val_fraction_nan", ["data.val_fraction=nan"], "", ["data.val_fraction=nan", "finite"]),
    ("clip_nan", ["trainer.gradient_clip_val=nan"], "", ["trainer.gradient_clip_val=nan"]),
    ("weight_decay_nan", ["model.optimizer.weight_decay=nan"], "",
     ["model.optimizer.weight_decay=nan", "finite"]),
    ("seed_too_big", ["seed=4294967296"], "", ["seed=4294967296", "up to 4294967295"]),
    ("split_seed_text", ["data.split_seed=abc"], "", ["data.split_seed='abc'", "integer"]),
    ("fractions_leave_nothing", ["data.val_fraction=0.9", "data.test_fraction=0.9"], "",
     ["data.val_fraction=0.9", "no training split", "below 1"]),
    ("image_size_zero", ["data=imagefolder", "data.data_dir={tmp}", "data.image_size=[0,0]"],
     "ok", ["data.image_size=[0, 0]", "positive integers"]),
    ("folder_text_as_jpg", ["data=imagefolder", "data.data_dir={tmp}"], "text_jpg",
     ["cannot decode the image file", "notes.jpg", "UnidentifiedImageError", "replace or remove"]),
    ("folder_truncated_png", ["data=imagefolder", "data.data_dir={tmp}"], "truncated",
     ["cannot decode the image file", "half.png", "replace or remove"]),
    ("folder_one_class", ["data=imagefolder", "data.data_dir={tmp}"], "one_class",
     ["1 class(es) (cat)", "at least two", "one sub-folder per class"]),
    ("synthetic_two_samples", ["data=synthetic", "data.synthetic.num_samples=2"], "",
     ["training split holds 1 image(s) of 2", "data.synthetic.num_samples"]),
    ("no_training_step", ["trainer.limit_train_batches=0"], "",
     ["training took no optimizer step", "trainer.limit_train_batches"]),
    ("accelerator_bogus", ["trainer.accelerator=bogus"], "",
     ["trainer.accelerator='bogus'", "choose one of auto, cpu, gpu"]),
    ("devices_empty", ["trainer.devices=[]"], "", ["trainer.devices=[]", "non-empty list"]),
    ("accelerator_gpu_none", ["trainer.accelerator=gpu"], "",
     ["trainer.accelerator='gpu'", "Lightning refuses it", "trainer=cpu"]),
]
# fmt: on


def _folder(root: Path, layout: str) -> None:
    """Image folders for the cases above: 8x8 PNGs, two classes unless the layout says not."""
    from PIL import Image

    def png(path: Path, value: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (value, value, value)).save(path)

    counts = {"three": (2, 1), "one_class": (6,)}.get(layout, (6, 6))
    for c, n in zip(("cat", "dog"), counts, strict=False):
        for i in range(n):
            png(root / c / f"{i}.png", 40 * i)
    if layout == "loop":  # 12 images became 492, dog images labelled cat
        os.symlink("..", root / "cat" / "loop")
    elif layout == "empty_class":
        (root / "owl").mkdir()
    elif layout == "text_jpg":
        (root / "dog" / "notes.jpg").write_text("a text file, not a JPEG\n")
    elif layout == "truncated":
        data = (root / "dog" / "0.png").read_bytes()
        (root / "dog" / "half.png").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case", IN_PROCESS, ids=[c[0] for c in IN_PROCESS])
def test_bad_input_in_process(case: tuple, tmp_path: Path, capsys) -> None:
    from normlab.cli import run_task
    from tests.test_configs import compose_train

    name, overrides, layout, expected = case
    if name == "accelerator_gpu_none" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if layout:
        _folder(tmp_path / "images", layout)
    args = [o.replace("{tmp}", str(tmp_path / "images")) for o in overrides]
    run_dir = tmp_path / "run"
    fast = ["trainer=cpu", "model.net.widths=[8,16]", "callbacks=none", "logger=csv"]
    _, cfg = compose_train([*fast, *args], run_dir)
    with pytest.raises(SystemExit) as info:
        run_task("train", cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("normlab: error: ")]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], f"{text!r} missing from {lines[0]!r}"
    if name == "no_training_step":  # fit ran (its logger wrote hparams) but saved no result
        assert list(run_dir.rglob("results.json")) + list(run_dir.rglob("*.ckpt")) == []
    else:  # nothing ran: no run dir at all
        assert not run_dir.exists()


@pytest.mark.parametrize(
    "override, fixed",
    [
        ('model.weights="~/w.pth"', "cannot read it as a state_dict file"),
        ('ckpt_path="~/c.ckpt"', "is not a normlab checkpoint"),
        ('norm.init_from="~/c.ckpt"', "is not a normlab checkpoint"),
    ],
)
def test_tilde_means_home_in_every_file_key(
    override: str, fixed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """``~`` is the user's home in each key that names a file (it was expanded only in
    norm.init_from; model.weights and ckpt_path answered 'no such file')."""
    from normlab.cli import run_task
    from tests.test_configs import compose_train

    home = tmp_path / "home"
    home.mkdir()
    for name in ("w.pth", "c.ckpt"):
        (home / name).write_text("not tensors")
    monkeypatch.setenv("HOME", str(home))
    norm = ["norm=frozen"] if override.startswith("norm.") else []
    _, cfg = compose_train(["trainer=cpu", *norm, override], tmp_path / "run")
    with pytest.raises(SystemExit):
        run_task("train", cfg)
    err = capsys.readouterr().err
    assert fixed in err and str(home) in err and "no such file" not in err, err


# -- before Hydra creates anything: an unwritable run dir, a SLURM launcher without SLURM -------
@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A directory nobody may write: a read-only tmpfs as root (permission bits do not stop
    root), else a directory without write permission."""
    where = tmp_path / "ro"
    where.mkdir()
    if os.geteuid() == 0:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)])
        if proc.returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs")
        yield where
        subprocess.run(["umount", str(where)], check=False)
    else:
        where.chmod(0o500)
        yield where
        where.chmod(0o700)


def _entry_point(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def test_unwritable_log_dir_is_one_paragraph(read_only_dir: Path) -> None:
    proc = _entry_point("trainer=cpu", f"paths.log_dir={read_only_dir}/logs")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("normlab: error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{read_only_dir}/logs/train/runs/" in lines[0]
    assert "cannot be created" in lines[0] and "set paths.log_dir to a writable" in lines[0]
    assert list(read_only_dir.iterdir()) == []


def test_a_full_log_filesystem_is_one_paragraph_before_hydra_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import normlab.preflight as preflight

    usage = shutil.disk_usage(tmp_path)._replace(free=300 * 1024)  # 0.3 MiB left
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(SystemExit) as info:
        preflight.check_writable(tmp_path / "logs" / "run", "hydra.run.dir")
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"normlab: error: hydra.run.dir={tmp_path}/logs/run cannot be created")
    assert f"{tmp_path} has 0.3 MiB free" in line and "at least 10 MiB" in line
    assert "paths.log_dir" in line and not (tmp_path / "logs").exists()


def test_full_log_tmpfs_leaves_no_empty_config(tmp_path: Path) -> None:
    """A real 1 MiB filesystem: Hydra used to die in _save_config with a 0-byte config.yaml."""
    where = tmp_path / "small"
    where.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)]).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        proc = _entry_point("trainer=cpu", f"paths.log_dir={where}/logs")
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("normlab: error: ")]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "MiB free" in lines[0] and list(where.iterdir()) == []
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_slurm_launcher_without_slurm(tmp_path: Path) -> None:
    if shutil.which("sbatch"):
        pytest.skip("this machine has SLURM")
    sweep = tmp_path / "sweep"
    proc = _entry_point("-m", "hydra/launcher=slurm", "trainer=cpu", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("normlab: error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "hydra/launcher=slurm" in lines[0] and "sbatch" in lines[0]
    assert 'pip install -e ".[slurm]"' in lines[0]
    assert not sweep.exists()


def test_slurm_launcher_without_the_extra(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import importlib.util

    from normlab.preflight import check_launcher_installed

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    check_launcher_installed(["norm=none"])  # no SLURM asked for: nothing to say
    with pytest.raises(SystemExit) as info:
        check_launcher_installed(["-m", "hydra/launcher=slurm", "norm=none"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("normlab: error: hydra/launcher=slurm needs the SLURM extra")
    assert 'pip install -e ".[slurm]"' in err and err.count("\n") == 1
