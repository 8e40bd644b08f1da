"""Loading a checkpoint safely and the edges of the resume checks: each refusal names the key, the
file and the fix; the overrides a refusal lists are typed as on a command line (mutation testing
found these unchecked: docs/development.md)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from normlab.errors import CheckpointError
from normlab.resume import check_resumable, config_differences, find_last_checkpoint, nothing_left
from normlab.utils.checkpoints import _reason, load_checkpoint
from tests.test_resume import CONFIG, _aged, _checkpoint, _config

HINT = "give a .ckpt written by train.py, e.g. logs/train/runs/<run>/checkpoints/last.ckpt."


class NotAWeight:
    """A pickled Python object: torch.load(weights_only=True) must refuse to build it."""


def test_a_normlab_checkpoint_loads_as_written(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "ok.ckpt", CONFIG)
    loaded = load_checkpoint(path)
    assert loaded["normlab"]["config"] == CONFIG
    assert loaded["state_dict"]["w"].equal(torch.zeros(1))


def test_each_unloadable_file_is_refused_with_its_reason(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(missing, key="norm.init_from")
    assert str(info.value) == f"norm.init_from={missing}: no such file; {HINT}"

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(b"abc")  # 3 bytes, no zip archive
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(truncated)
    assert str(info.value) == (
        f"ckpt_path={truncated} is not a normlab checkpoint: it is not a complete file written by"
        f" torch.save (3 bytes, not a zip archive); {HINT}"
    )

    pickled = tmp_path / "pickled.ckpt"
    torch.save({"normlab": NotAWeight()}, pickled)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(pickled)
    message = str(info.value)
    assert message.startswith(
        f"ckpt_path={pickled} is not a normlab checkpoint: torch.load(weights_only=True) refuses"
        " it (UnpicklingError: Unsupported global: GLOBAL tests.test_checkpoint_loading.NotAWeight"
    )
    assert message.endswith(
        "; the file holds pickled Python objects, and building them could run code from it); "
        + HINT
    )
    assert "Please" not in message and "\x1b" not in message and "\n" not in message

    other_zip = tmp_path / "other.ckpt"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("readme.txt", "not a torch.save archive")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(other_zip)
    message = str(info.value)
    assert message.startswith(f"ckpt_path={other_zip} is not a normlab checkpoint: torch.load")
    assert "refuses it (RuntimeError: " in message and message.endswith(HINT)
    assert "\n" not in message

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(foreign)
    assert str(info.value) == (
        f"ckpt_path={foreign} is not a normlab checkpoint: it loads, but has no 'normlab' entry"
        f" with the run's config (was it written by another program?); {HINT}"
    )


def test_overrides_are_typed_as_on_the_command_line() -> None:
    saved = _config(model__activation="relu", model__dropout=None, norm__eps=1e-5)
    current = _config(model__activation="gelu", model__dropout=0.5, norm__eps=1e-3)
    # sorted by key; a string without quotes, None as null, a float as JSON writes it
    assert config_differences(saved, current) == [
        "model.activation=relu",
        "model.dropout=null",
        "norm.eps=1e-05",
    ]
    # a key the current config lacks is listed with the checkpoint's value, and vice versa
    assert config_differences(_config(model__depth=3), CONFIG) == ["model.depth=3"]
    assert config_differences(CONFIG, _config(model__depth=3)) == ["model.depth=null"]
    # another data set: data.name alone, not the other data keys that follow from it
    mnist = _config(data__name="mnist", data__image_size=28)
    assert config_differences(_config(data__image_size=8), mnist) == ["data.name=digits"]
    # a list or a mapping as JSON without spaces, as a shell takes it unquoted
    assert config_differences(_config(model__net={"widths": [8, 16]}), CONFIG) == [
        "model.net.widths=[8,16]"
    ]
    assert config_differences(_config(model__kw={"a": {}}), CONFIG) == ["model.kw.a={}"]
    # a nested key is dotted; a data key that does not decide the model is ignored
    nested = _config(model__net={"act": {"name": "relu"}}, data__num_workers=4)
    assert config_differences(nested, CONFIG) == ["model.net.act.name=relu"]


def _progress(done: int | None) -> dict:
    if done is None:
        return {}
    return {"loops": {"fit_loop": {"epoch_progress": {"current": {"processed": done}}}}}


@pytest.mark.parametrize(
    ("done", "max_epochs", "finished"),
    [
        (2, 3, False),  # one epoch left
        (3, 3, True),
        (4, 3, True),
        (None, 0, True),  # no progress recorded: 0 epochs done, max_epochs=0 trains nothing
        (None, 1, False),
        (5, -1, False),  # max_epochs=-1: train until stopped
        (5, None, False),
        (5, "unset", False),  # no trainer.max_epochs: Lightning's default, train until stopped
    ],
)
def test_nothing_left_when_max_epochs_are_done(
    done: int | None, max_epochs: int | None, finished: bool
) -> None:
    trainer = {} if max_epochs == "unset" else {"max_epochs": max_epochs}
    problem = nothing_left(_progress(done), {"trainer": trainer})
    if not finished:
        assert problem is None
        return
    n = done or 0
    assert problem == (
        f"it has already trained {n} epoch(s) and trainer.max_epochs={max_epochs}, so resuming"
        f" it would train nothing: raise trainer.max_epochs above {n} to train on, or test it"
        " with eval.py"
    )


def test_last_without_any_checkpoint_says_to_train_first(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        find_last_checkpoint(tmp_path)
    assert str(info.value) == (
        f"ckpt_path=last: no checkpoints/last.ckpt under {tmp_path}; train a run of this"
        " task_name first, or give the checkpoint's path."
    )


def test_last_lists_at_most_five_candidates_passed_over(tmp_path: Path) -> None:
    other = _config(norm={"name": "frozen"})
    for i in range(6):  # run 5 is the newest
        _aged(_checkpoint(tmp_path / f"runs/{i}/checkpoints/last.ckpt", other), 100 - i)
    with pytest.raises(CheckpointError) as info:
        find_last_checkpoint(tmp_path, current=CONFIG)
    message = str(info.value)
    assert message.startswith(
        f"ckpt_path=last: none of the 6 checkpoints/last.ckpt under {tmp_path} can be resumed"
        f" by this command: {tmp_path / 'runs/5/checkpoints/last.ckpt'}: it holds another model"
    )
    assert message.count("it holds another model") == 5 and "runs/0/" not in message
    # "; ..." for the sixth, then the sentence's full stop
    assert message.endswith(
        "; .... Give a checkpoint's path, or use another task_name for a new experiment."
    )
    # without a current config every readable candidate qualifies: the newest one wins
    assert find_last_checkpoint(tmp_path)[0] == tmp_path / "runs/5/checkpoints/last.ckpt"


def test_torch_load_reasons_are_one_clean_line() -> None:
    colored = RuntimeError("\x1b[1mPytorchStreamReader failed\x1b[0m reading zip archive\nmore")
    assert _reason(colored) == "RuntimeError: PytorchStreamReader failed reading zip archive"
    assert _reason(ValueError("")) == "ValueError"  # nothing to quote: the type alone
    assert _reason(ValueError("\n  \n")) == "ValueError"
    assert _reason(ValueError("x" * 300)) == "ValueError: " + "x" * 200  # cut at 200 characters
    # the unpickler's reason, found on any line, cut before its advice
    unsafe = RuntimeError(
        "Weights only load failed.\nWeightsUnpickler error: Unsupported global: GLOBAL a.B"
        " was not an allowed global by default. Please use `torch.serialization.add_safe_globals`"
    )
    assert _reason(unsafe) == (
        "RuntimeError: Unsupported global: GLOBAL a.B was not an allowed global by default; the"
        " file holds pickled Python objects, and building them could run code from it"
    )
    multiline = RuntimeError("WeightsUnpickler error: Unsupported operand 149\nCheck the file")
    assert _reason(multiline).startswith("RuntimeError: Unsupported operand 149; the file holds")


def test_another_models_checkpoint_is_refused_with_every_override(tmp_path: Path) -> None:
    saved = _config(model__widths=[4, 8], norm__momentum=0.5)
    path = _checkpoint(tmp_path / "other.ckpt", saved)
    with pytest.raises(CheckpointError) as info:
        check_resumable(load_checkpoint(path), path, CONFIG)
    assert str(info.value) == (
        f"ckpt_path={path}: it holds another model than this command builds, trained with"
        " model.widths=[4,8] norm.momentum=0.5: to resume it, add those overrides; to go on"
        " with this command's settings anyway (the weights must still fit, e.g. norm=batchnorm"
        " <-> norm=frozen), add ckpt_strict=false."
    )


@pytest.mark.parametrize("others", [4, 5])  # 5 and 6 candidates passed over
def test_last_names_each_candidate_passed_over_and_why(tmp_path: Path, others: int) -> None:
    frozen = _config(norm={"name": "frozen"})
    for i in range(others):  # run i is written i seconds after run 0
        _aged(_checkpoint(tmp_path / f"runs/{i}/checkpoints/last.ckpt", frozen), 100 - i)
    broken = tmp_path / "runs/new/checkpoints/last.ckpt"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"abc")
    with pytest.raises(CheckpointError) as info:
        find_last_checkpoint(tmp_path, current=CONFIG)
    # the newest first: the unreadable file, then each other model's run; at most 5, then "..."
    unreadable = (
        f"ckpt_path=last={broken} is not a normlab checkpoint: it is not a complete file written"
        f" by torch.save (3 bytes, not a zip archive); {HINT}"
    )
    runs = [tmp_path / f"runs/{i}/checkpoints/last.ckpt" for i in reversed(range(others))]
    mismatches = [
        f"{p}: it holds another model than this command builds, trained with norm=frozen"
        for p in runs
    ]
    listed = "; ".join([unreadable, *mismatches[:4]]) + ("; ..." if others + 1 > 5 else "")
    assert str(info.value) == (
        f"ckpt_path=last: none of the {others + 1} checkpoints/last.ckpt under {tmp_path} can be"
        f" resumed by this command: {listed}. Give a checkpoint's path, or use another task_name"
        " for a new experiment."
    )
