"""Every `python train.py ...` command shown in README.md and docs/ composes with Hydra (no
unknown key, group option or stale name) and passes normlab's up-front checks, without training.
A command documented to fail (`# fails` after it, or a `normlab: error:` line shown under it) is
run in-process as train.py runs it, and must be refused (exit 2) with the words the docs show."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest

from normlab.config import validate_train_config
from normlab.errors import NormlabError
from tests.test_configs import compose_train

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(?:bash|console|sh|shell)?\n(.*?)```", re.S)


# page:line -> the refusal the docs show under a command (`normlab: error: ...`)
SHOWN: dict[str, str] = {}


def documented_commands() -> list[tuple[str, str]]:
    """(page:line, command) of each `python train.py` line in a fenced block (`$ ` prompts and
    `\\` continuations handled); commands with shell variables are skipped. A refusal shown
    under a command is recorded in ``SHOWN``."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in FENCE.finditer(text):
            start = text[: block.start()].count("\n") + 2
            lines = block.group(1).replace("\\\n", " ").splitlines()
            for offset, line in enumerate(lines):
                line = line.strip().removeprefix("$ ").strip().removesuffix("&").strip()
                if not line.startswith("python train.py") or "$" in line:
                    continue
                shown = lines[offset + 1].strip() if offset + 1 < len(lines) else ""
                where = f"{page.relative_to(ROOT)}:{start + offset}"
                if shown.startswith("normlab: error:"):  # a console example of a refusal
                    line += "  # fails"
                    SHOWN[where] = shown.removeprefix("normlab: error:").strip()
                found.append((where, line))
    return found


def _overrides(command: str) -> tuple[list[list[str]], bool]:
    """The override lists a command composes (a `-m` sweep: every combination) and whether it
    is documented to fail."""
    fails = "# fails" in command
    words = shlex.split(command.split("#")[0])[2:]
    words = [w for w in words if not w.startswith("-")]  # -m, --help, --cfg job ...
    if "hydra/launcher=slurm" in words:  # composes only where submitit is installed
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    choices = [
        [f"{w.split('=', 1)[0]}={v}" for v in w.split("=", 1)[1].split(",")]
        if "=" in w and "," in w.split("=", 1)[1] and "[" not in w
        else [w]
        for w in words
    ]
    return [list(c) for c in itertools.product(*choices)], fails


COMMANDS = documented_commands()


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) >= 40, COMMANDS  # README plus the docs pages


@pytest.mark.parametrize("where, command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_composes_and_validates(
    where: str, command: str, tmp_path, capsys
) -> None:
    combos, fails = _overrides(command)
    for overrides in combos:
        overrides = [o.replace("<", "").replace(">", "") for o in overrides]
        if fails:
            _assert_refused(where, overrides, tmp_path, capsys)
            continue
        try:
            container, _ = compose_train(overrides, tmp_path)
            if "ckpt_path=" in command and "ckpt_path=last" not in command:
                container["ckpt_path"] = None  # a placeholder path: the file is the user's
            if "init_from=" in command:
                container["norm"]["init_from"] = None
            validate_train_config(container)
        except (NormlabError, Exception) as err:
            raise AssertionError(f"{where}: {command}\n{type(err).__name__}: {err}") from err


def _assert_refused(where: str, overrides: list[str], tmp_path, capsys) -> None:
    """A documented refusal, run in-process as train.py runs it: exit 2 and the shown words (up
    to an elided ``...``), or, where the docs show none, an error naming a key of the command."""
    from normlab.cli import run_task

    _, cfg = compose_train(overrides, tmp_path / "run")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_task("train", cfg)
    message = capsys.readouterr().err
    assert exited.value.code == 2, f"{where}: exit {exited.value.code}\n{message[-2000:]}"
    assert message.startswith("normlab: error: "), message[-2000:]
    shown = SHOWN.get(where)
    if shown:
        expected = " ".join(shown.split("...")[0].split())
        assert expected in " ".join(message.split()), (
            f"{where}: docs show {shown!r}, got {message!r}"
        )
    else:
        keys = [o.split("=", 1)[0] for o in overrides]
        assert any(k in message for k in keys), f"{where}: {message!r} names none of {keys}"
