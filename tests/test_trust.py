"""Files someone hands you: what a checkpoint (and a config) can make normlab import, call and
write. Each row of docs/troubleshooting.md's table "What a file you are given can make normlab
do" is asserted here: in-process where the gate itself decides, through eval.py/train.py for the
issue's reproductions (a crafted checkpoint must run nothing and write nothing)."""

from __future__ import annotations

import os
import struct
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from normlab.errors import CheckpointError, ConfigError
from normlab.utils.checkpoint_fit import check_classes, check_weights_fit
from normlab.utils.checkpoints import load_checkpoint
from normlab.utils.targets import check_targets, trusted_targets
from tests.conftest import FAST, ROOT, Run, run_script

EXAMPLES = str(ROOT / "examples")
CKPT = "ckpt_path=/x/evil.ckpt"


# -- the gate, in-process ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "cfg", "where"),
    [
        ("model", {"net": {"_target_": "os.system", "command": "true"}}, "model.net._target_"),
        ("data", {"_target_": "torch.load", "f": "x.pkl", "weights_only": False}, "data._target_"),
        ("data", {"_target_": "torch.save", "obj": "x", "f": "victim.txt"}, "data._target_"),
        ("model", {"_target_": "builtins.exec", "_args_": ["print(1)"]}, "model._target_"),
        # nested: in _args_, in a list, under _partial_
        (
            "data",
            {
                "_target_": "normlab.data.NormLabDataModule",
                "_args_": [{"_target_": "shutil.rmtree", "path": "nothing-here"}],
            },
            "data._args_[0]._target_",
        ),
        (
            "model",
            {"optimizer": {"_target_": "os.remove", "_partial_": True, "path": "x"}},
            "model.optimizer._target_",
        ),
        (
            "model",
            {"net": {"_target_": "normlab.models.ConvNet", "kw": [{"_target_": "os.system"}]}},
            "model.net.kw[0]._target_",
        ),
    ],
)
def test_a_checkpoints_targets_outside_the_allowlist_are_refused_by_name(
    key: str, cfg: dict, where: str
) -> None:
    with pytest.raises(CheckpointError) as info:
        check_targets(cfg, key, checkpoint=CKPT)
    message = str(info.value)
    target = message.split(f"{where}=")[1].split("'")[1]
    assert message.startswith(f"{CKPT}: its saved config sets {where}='{target}', which is not")
    assert f"trusted_targets=[{target.split('.')[0]}]" in message


def test_a_checkpoints_unknown_module_is_not_imported(tmp_path: Path, monkeypatch) -> None:
    """Refused before import: a module's top-level code would run on import."""
    (tmp_path / "evil_on_import.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').write('ran')\nclass Net: pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CheckpointError, match="evil_on_import.Net"):
        check_targets({"net": {"_target_": "evil_on_import.Net"}}, "model", checkpoint=CKPT)
    assert not (tmp_path / "imported").exists() and "evil_on_import" not in sys.modules


def test_normlabs_own_builders_and_torch_optimizers_pass_from_a_checkpoint() -> None:
    model = {
        "_target_": "normlab.models.NormLabModule",
        "net": {"_target_": "normlab.models.torchvision_net", "arch": "resnet18"},
        "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
        "scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True},
    }
    check_targets(model, "model", checkpoint=CKPT)
    check_targets({"_target_": "normlab.data.NormLabDataModule"}, "data", checkpoint=CKPT)
    for net in ("normlab.models.ConvNet", "normlab.models.timm_net"):
        check_targets({"net": {"_target_": net}}, "model", checkpoint=CKPT)
    # experiment=cifar10_resnet's warm-up + cosine schedule is normlab's own
    for sched in ("normlab.models.WarmupCosineLR", "normlab.models.schedules.WarmupCosineLR"):
        check_targets({"scheduler": {"_target_": sched}}, "model", checkpoint=CKPT)
    # torch.optim's module attributes that are not optimizer/scheduler classes do not pass
    for other in ("torch.optim.lr_scheduler.warnings", "torch.optim.Optimizer.step"):
        with pytest.raises(CheckpointError):
            check_targets({"optimizer": {"_target_": other}}, "model", checkpoint=CKPT)


def test_a_users_class_passes_from_a_checkpoint_when_the_user_names_it(monkeypatch) -> None:
    monkeypatch.syspath_prepend(EXAMPLES)
    model = {"net": {"_target_": "my_project.models.SmallNet", "hidden": 4}}
    data = {"_target_": "my_project.data.BlobsDataModule"}
    with pytest.raises(CheckpointError, match=r"add trusted_targets=\[my_project\]"):
        check_targets(model, "model", checkpoint=CKPT)
    for trusted in (["my_project"], ["my_project.models"], ["my_project.models.SmallNet"]):
        check_targets(model, "model", trusted, checkpoint=CKPT)
    check_targets(data, "data", ["my_project"], checkpoint=CKPT)
    # a prefix that is not a dotted parent does not cover it
    with pytest.raises(CheckpointError):
        check_targets(model, "model", ["my_proj"], checkpoint=CKPT)


def test_a_trusted_package_still_builds_only_classes_of_the_right_kind(monkeypatch) -> None:
    """Trusting ``torch`` (or ``os``) does not open ``torch.save``: a function must be named."""
    for target, trusted in (("torch.save", "torch"), ("os.system", "os")):
        with pytest.raises(ConfigError) as info:
            check_targets({"net": {"_target_": target}}, "model", [trusted], checkpoint=CKPT)
        assert str(info.value).startswith(f"model.net._target_='{target}' is not valid: it is a")
        assert "not a subclass of torch.nn.modules.module.Module" in str(info.value)
    monkeypatch.syspath_prepend(EXAMPLES)
    # the user's DataModule is not a net, and a net is not a DataModule
    with pytest.raises(ConfigError, match="LightningDataModule"):
        check_targets({"_target_": "my_project.models.SmallNet"}, "data", ["my_project"])
    with pytest.raises(ConfigError, match="class BlobsDataModule, not a subclass of torch.nn"):
        check_targets({"net": {"_target_": "my_project.data.BlobsDataModule"}}, "model")


def test_the_command_lines_net_passes_the_same_gate() -> None:
    """From the user's own config: classes of the right kind; a function only when named."""
    check_targets({"net": {"_target_": "torch.nn.Identity"}}, "model")
    with pytest.raises(ConfigError, match=r"add trusted_targets=\[os.system\]"):
        check_targets({"net": {"_target_": "os.system", "command": "true"}}, "model")
    with pytest.raises(ConfigError, match="it is a class ZipFile, not a subclass"):
        check_targets({"net": {"_target_": "zipfile.ZipFile"}}, "model")
    check_targets({"net": {"_target_": "normlab.models.torchvision_net"}}, "model")  # builtin
    check_targets({"net": {"_target_": "torch.nn.init.zeros_"}}, "model", ["torch.nn.init.zeros_"])


def test_a_module_not_on_the_path_is_named_with_the_fix() -> None:
    with pytest.raises(ConfigError) as info:
        check_targets({"net": {"_target_": "no_such_project.Net"}}, "model", ["no_such_project"])
    assert str(info.value) == (
        "model.net._target_='no_such_project.Net' is not valid: Python cannot import its package"
        " 'no_such_project': put the directory that holds no_such_project/ on PYTHONPATH (e.g."
        " PYTHONPATH=path/to/project python eval.py ...) or install it"
    )


def test_trusted_targets_must_be_dotted_names() -> None:
    assert trusted_targets(None) == [] and trusted_targets(["a.b", "c"]) == ["a.b", "c"]
    for bad in ("my_project", ["a b"], [1], ["os;rm"]):
        with pytest.raises(ConfigError, match="trusted_targets="):
            trusted_targets(bad)


# -- checkpoint files: checksums, pickled objects ---------------------------------------------
def _flip_a_bit_in_the_largest_tensor(path: Path) -> str:
    """Flip one bit in the middle of the largest tensor's bytes; returns the member's name."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size if "/data/" in i.filename else -1)
    with path.open("r+b") as f:
        f.seek(info.header_offset + 26)  # the local header's name and extra field lengths
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        offset = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))
    return info.filename


def test_a_bit_flipped_in_a_tensor_is_refused_naming_file_and_member(tmp_path: Path) -> None:
    path = tmp_path / "flipped.ckpt"
    weights = torch.linspace(-1, 1, 4096)
    torch.save({"normlab": {"config": {}}, "state_dict": {"net.w": weights}}, path)
    member = _flip_a_bit_in_the_largest_tensor(path)
    # torch.load itself reads the damaged file without a word: the numbers are just different
    loaded = torch.load(path, weights_only=True)["state_dict"]["net.w"]
    assert not torch.equal(loaded, weights)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(
        f"ckpt_path={path} is damaged: its member {member} does not match the CRC-32 checksum"
        " torch.save wrote for it"
    )
    assert "copy the file again" in str(info.value)


class Pickled:
    """A class a checkpoint may pickle: its instance would be rebuilt by calling code."""


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize(
    ("obj", "refused"),
    [
        (Pickled(), "Unsupported global: GLOBAL tests.test_trust.Pickled was not an allowed"),
        (RunsACommand(), "Trying to load unsupported GLOBAL posix.system whose module posix"),
    ],
)
def test_a_pickled_object_is_refused_naming_the_global(
    obj: object, refused: str, tmp_path: Path
) -> None:
    """torch 2.14 words a blocked module's global without 'WeightsUnpickler error:'; both forms
    name the global, and the advice not to build it stays."""
    path = tmp_path / "pickled.ckpt"
    torch.save({"normlab": {"config": {}}, "hyper_parameters": obj}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert f"torch.load(weights_only=True) refuses it (UnpicklingError: {refused}" in message
    assert "the file holds pickled Python objects, and building them could run code from it)" in (
        message
    )
    assert "Re-running" not in message and "\n" not in message


# -- does the checkpoint fit this data and this model ----------------------------------------
def _data(classes: list[str]) -> SimpleNamespace:
    return SimpleNamespace(classes=classes, num_classes=len(classes))


def test_data_with_other_class_names_or_number_is_refused_by_name(caplog) -> None:
    ckpt = {"normlab": {"classes": ["cat", "dog", "fox"], "num_classes": 3}}
    check_classes(ckpt, _data(["cat", "dog", "fox"]), CKPT, "data.data_dir=x")
    with pytest.raises(CheckpointError) as info:
        check_classes(ckpt, _data(["cat", "dog", "horse"]), CKPT, "data.data_dir=photos")
    assert str(info.value) == (
        f"{CKPT} was trained on the classes cat, dog, fox, and the data's classes are cat, dog,"
        " horse (label: checkpoint vs data: 2: 'fox' vs 'horse'): its predictions would be scored"
        " against other labels; give the data it was trained on (data.data_dir=photos holds other"
        " classes)."
    )
    with pytest.raises(CheckpointError) as info:
        check_classes(ckpt, _data(["cat", "dog"]), CKPT, "data.data_dir=photos")
    assert str(info.value).startswith(
        f"{CKPT} holds a model for 3 classes (cat, dog, fox), and the data has 2 (cat, dog): its"
        " outputs cannot be scored against these labels"
    )
    # a checkpoint from before class names were saved: the number (from its hyperparameters)
    old = {"normlab": {}, "hyper_parameters": {"num_classes": 3}}
    with pytest.raises(CheckpointError, match="holds a model for 3 classes, and the data has 2"):
        check_classes(old, _data(["cat", "dog"]), CKPT, "data.name=digits")
    with caplog.at_level("INFO", logger="normlab"):
        check_classes(old, _data(["a", "b", "c"]), CKPT, "data.name=digits")
    assert "stores no class names" in caplog.text and "only the number of classes" in caplog.text


def test_weights_that_do_not_fit_are_named_before_anything_runs() -> None:
    from normlab.models import ConvNet as Net

    def ConvNet(**kwargs):  # noqa: N802
        return Net(**kwargs, blocks_per_stage=1, activation="relu", dropout=0.0)

    saved = ConvNet(num_classes=10, in_channels=1, widths=[8, 16]).state_dict()
    check_weights_fit(saved, ConvNet(num_classes=10, in_channels=1, widths=[8, 16]), CKPT, "fix")
    with pytest.raises(CheckpointError) as info:
        check_weights_fit(saved, ConvNet(num_classes=10, in_channels=3, widths=[8, 16]), CKPT, "f")
    assert str(info.value) == (
        f"{CKPT}: its weights do not fit the model this command builds (another shape"
        " (checkpoint vs model): features.0.weight [8, 1, 3, 3] vs [8, 3, 3, 3]); f."
    )
    no_norm = {k: v for k, v in saved.items() if ".1." not in k}
    with pytest.raises(CheckpointError) as info:
        check_weights_fit(
            no_norm, ConvNet(num_classes=10, in_channels=1, widths=[8, 16]), CKPT, "f"
        )
    assert "missing from the checkpoint: features.1.weight, features.1.bias," in str(info.value)


# -- end to end: the issue's crafted checkpoints through eval.py and train.py -----------------
class Payload:
    """A pickle that runs a shell command when it is unpickled (torch.load(weights_only=False))."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _image_folder(where: Path, classes: list[str]) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for i, name in enumerate(classes):
        (where / name).mkdir(parents=True)
        for j in range(12):  # each class its own brightness: learnable in a step or two
            pixels = (torch.rand(8, 8, 3, generator=gen) * 64 + 60 * i).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(where / name / f"{j}.png")
    return where


def _craft(ckpt: Path, files: Path) -> dict[str, Path]:
    """The issue's three files (its reproduction, with paths under ``files``)."""
    crafted = {}
    evil = torch.load(ckpt, weights_only=True)
    touch = f"touch {files / 'pwned_by_checkpoint'}"
    evil["normlab"]["config"]["model"]["net"] = {"_target_": "os.system", "command": touch}
    torch.save(evil, crafted.setdefault("evil", files / "evil.ckpt"))
    torch.save(Payload(f"touch {files / 'pwned_by_pickle'}"), files / "payload.pkl")
    evil = torch.load(ckpt, weights_only=True)
    load = {"_target_": "torch.load", "f": str(files / "payload.pkl"), "weights_only": False}
    evil["normlab"]["config"]["data"] = load
    torch.save(evil, crafted.setdefault("evil2", files / "evil2.ckpt"))
    save = {"_target_": "torch.save", "obj": "clobbered", "f": str(files / "victim.txt")}
    evil["normlab"]["config"]["data"] = save
    torch.save(evil, crafted.setdefault("evil3", files / "evil3.ckpt"))
    (files / "victim.txt").write_text("original\n")
    return crafted


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    base = tmp_path_factory.mktemp("trust")
    photos = _image_folder(base / "photos", ["cat", "dog"])
    folder = ["data=imagefolder", f"data.data_dir={photos}", "data.image_size=[8,8]"]
    trained = run_script("train.py", *FAST, *folder, run_dir=base / "train")
    assert trained.returncode == 0, trained.output[-3000:]
    ckpt = Path(trained.results["checkpoints"]["last"])
    crafted = _craft(ckpt, base)
    other = _image_folder(base / "other", ["cat", "horse"])
    three = _image_folder(base / "three", ["cat", "dog", "fox"])
    cases: dict[str, tuple[str, list[str]]] = {
        name: ("eval.py", [f"ckpt_path={path}"]) for name, path in crafted.items()
    }
    cases |= {
        "eval": ("eval.py", [f"ckpt_path={ckpt}"]),
        "other_classes": ("eval.py", [f"ckpt_path={ckpt}", f"data.data_dir={other}"]),
        "three_classes": ("eval.py", [f"ckpt_path={ckpt}", f"data.data_dir={three}"]),
        # train.py reads a crafted checkpoint's tensors, never its config's targets
        "resume_evil": (
            "train.py",
            [*FAST, *folder, f"ckpt_path={crafted['evil']}", "ckpt_strict=false"],
        ),
        "init_from_evil": (
            "train.py",
            [*FAST, *folder, "norm=frozen", f"norm.init_from={crafted['evil']}", "test=false"],
        ),
        "resume_other_classes": (
            "train.py",
            [*FAST, *folder[:1], f"data.data_dir={other}", folder[2], f"ckpt_path={ckpt}"],
        ),
        "strict_false_widths": (
            "train.py",
            [*FAST, *folder, f"ckpt_path={ckpt}", "ckpt_strict=false", "model.net.widths=[4,8]"],
        ),
    }

    def run(name: str) -> Run:
        script, args = cases[name]
        if name in ("resume_evil", "resume_other_classes", "strict_false_widths"):  # 1 epoch done
            args = [a for a in args if a != "trainer.max_epochs=1"] + ["trainer.max_epochs=2"]
        if script == "eval.py":
            args = ["trainer=cpu", *args]
        return run_script(script, *args, run_dir=base / name, timeout=600)

    with ThreadPoolExecutor(max_workers=3) as pool:
        done = dict(zip(cases, pool.map(run, cases), strict=True))
    return {**done, "train": trained, "base": base}  # type: ignore[dict-item]


def _refused(run: Run, *expected: str) -> None:
    assert run.returncode == 2, run.output[-3000:]
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("normlab: error: ")]
    assert len(lines) == 1, run.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in run.output
    assert not run.run_dir.exists()  # refused before anything ran: no run dir left


@pytest.mark.parametrize(
    ("name", "where", "target"),
    [
        ("evil", "model.net._target_", "os.system"),
        ("evil2", "data._target_", "torch.load"),
        ("evil3", "data._target_", "torch.save"),
    ],
)
def test_the_issues_crafted_checkpoints_run_and_write_nothing(
    runs: dict, name: str, where: str, target: str
) -> None:
    base = runs["base"]
    _refused(runs[name], f"its saved config sets {where}='{target}', which is not one of")
    assert not (base / "pwned_by_checkpoint").exists()
    assert not (base / "pwned_by_pickle").exists()
    assert (base / "victim.txt").read_text() == "original\n"


def test_a_normal_checkpoint_still_evaluates_to_its_training_score(runs: dict) -> None:
    evaluated, trained = runs["eval"], runs["train"]
    assert evaluated.returncode == 0, evaluated.output[-3000:]
    test_acc = trained.results["metrics"]["test/acc"]
    assert evaluated.results["metrics"]["test/acc"] == pytest.approx(test_acc, abs=1e-6)
    entry = torch.load(trained.results["checkpoints"]["last"], weights_only=True)["normlab"]
    assert (entry["classes"], entry["num_classes"]) == (["cat", "dog"], 2)


def test_eval_on_data_with_other_classes_is_refused_naming_them(runs: dict) -> None:
    base = runs["base"]
    _refused(
        runs["other_classes"],
        "was trained on the classes cat, dog, and the data's classes are cat, horse (label:"
        " checkpoint vs data: 1: 'dog' vs 'horse')",
        f"data.data_dir={base / 'other'} holds other classes",
    )
    _refused(
        runs["three_classes"],
        "holds a model for 2 classes (cat, dog), and the data has 3 (cat, dog, fox)",
    )
    # resuming it on them too (data.data_dir is not part of the model's settings)
    _refused(
        runs["resume_other_classes"],
        "was trained on the classes cat, dog, and the data's classes are cat, horse",
        "or add ckpt_strict=false to train on these classes anyway",
    )


def test_train_py_takes_only_tensors_from_a_crafted_checkpoint(runs: dict) -> None:
    base = runs["base"]
    for name in ("resume_evil", "init_from_evil"):
        assert runs[name].returncode == 0, runs[name].output[-3000:]
    assert not (base / "pwned_by_checkpoint").exists()
    # the resumed run's checkpoints describe the run that wrote them, not the crafted config
    last = runs["resume_evil"].results["checkpoints"]["last"]
    config = torch.load(last, weights_only=True)["normlab"]["config"]
    assert config["model"]["net"]["_target_"] == "normlab.models.ConvNet"
    assert config["trainer"]["max_epochs"] == 2


def test_ckpt_strict_false_with_weights_that_do_not_fit_names_them(runs: dict) -> None:
    _refused(
        runs["strict_false_widths"],
        "its weights do not fit the model this command builds (another shape (checkpoint vs"
        " model): net.features.0.weight [8, 3, 3, 3] vs [4, 3, 3, 3],",
        "without ckpt_strict=false, the settings that differ are listed",
    )


def test_a_weights_file_with_a_pickle_runs_nothing(tmp_path: Path) -> None:
    from normlab.models.adapters import load_weights

    marker = tmp_path / "pwned_by_weights"
    torch.save({"state_dict": Payload(f"touch {marker}")}, tmp_path / "weights.pth")
    with pytest.raises(ConfigError) as info:
        load_weights(torch.nn.Linear(2, 2), tmp_path / "weights.pth")
    assert "cannot read it as a state_dict file (UnpicklingError" in str(info.value)
    assert not marker.exists()


def test_the_python_apis_load_from_checkpoint_passes_the_same_gate(tmp_path: Path) -> None:
    import lightning

    from normlab.models import NormLabModule

    model = NormLabModule(10, 1, {"name": "batchnorm"}, net={"widths": [8, 16]})
    checkpoint = {
        "normlab": {"config": {}},
        "hyper_parameters": dict(model.hparams),
        "state_dict": model.state_dict(),
        "pytorch-lightning_version": lightning.__version__,
    }
    torch.save(checkpoint, tmp_path / "ok.ckpt")
    loaded = NormLabModule.load_from_checkpoint(tmp_path / "ok.ckpt")
    assert torch.equal(loaded.net.features[0].weight, model.net.features[0].weight)

    marker = tmp_path / "pwned_by_load_from_checkpoint"
    checkpoint["hyper_parameters"]["net"] = {"_target_": "os.system", "command": f"touch {marker}"}
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="model.net._target_='os.system', which is not"):
        NormLabModule.load_from_checkpoint(tmp_path / "evil.ckpt")
    with pytest.raises(ConfigError, match="it is a builtin_function_or_method, not a subclass"):
        NormLabModule.load_from_checkpoint(tmp_path / "evil.ckpt", trusted_targets=["os"])
    assert not marker.exists()


def test_a_checkpoints_interpolations_are_refused_not_resolved() -> None:
    data = {"_target_": "normlab.data.NormLabDataModule", "data_dir": "${oc.env:HOME}"}
    with pytest.raises(CheckpointError) as info:
        check_targets(data, "data", checkpoint=CKPT)
    assert str(info.value).startswith(
        f"{CKPT}: its saved config sets data.data_dir='${{oc.env:HOME}}', an interpolation"
    )
    check_targets(data, "data")  # the user's own config may interpolate


def test_timm_net_reads_no_file_a_config_names() -> None:
    """A checkpoint's model.net may name normlab's timm adapter, not make it load other weights."""
    from normlab.models import timm_net

    with pytest.raises(ConfigError) as info:
        timm_net("resnet10t", 10, checkpoint_path="/elsewhere/weights.pth")
    assert str(info.value).startswith(
        "model.net.checkpoint_path='/elsewhere/weights.pth' is not valid: timm_net builds the"
        " model without weights; give a weights file as model.weights=<file>"
    )
