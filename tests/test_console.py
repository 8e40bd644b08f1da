"""What a run prints: its run dir first, what it resumes or tests, and no warning the user
cannot act on (Python's warnings are left on, as a user has them)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import run_script

# a library warning as Python (and Lightning's formatter) prints it, or a Lightning tip
LIBRARY_NOISE = re.compile(r"(Warning|site-packages/.*\.py:\d+: |💡)")


def noise(output: str) -> list[str]:
    return [line for line in output.splitlines() if LIBRARY_NOISE.search(line)]


def test_train_resume_and_eval_print_what_they_do_and_no_library_noise(tmp_path: Path) -> None:
    env = {"PYTHONWARNINGS": "default"}  # the suite's helpers silence warnings; a user has them
    logs = tmp_path / "logs"
    runs = logs / "train" / "runs"  # where ckpt_path=last looks
    fast = ["trainer=cpu", "callbacks.rich_progress_bar=null", "model.net.widths=[8,16]"]
    first = run_script(
        "train.py", *fast, "trainer.max_epochs=1", run_dir=runs / "a", env=env, log_dir=logs
    )
    assert first.returncode == 0, first.output[-3000:]
    assert noise(first.output) == []

    resumed = run_script(
        "train.py", *fast, "trainer.max_epochs=2", "ckpt_path=last",
        run_dir=runs / "b", env=env, log_dir=logs,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert noise(resumed.output) == []  # Lightning's "dirpath has changed" included
    picked = runs / "a" / "checkpoints" / "last.ckpt"
    run_dir_line = resumed.output.index(f"run dir: {runs / 'b'}")
    assert run_dir_line < resumed.output.index(f"ckpt_path=last: resuming {picked}")

    ckpt = resumed.results["checkpoints"]["best"]
    evaluated = run_script(
        "eval.py", "trainer=cpu", f"ckpt_path={ckpt}", run_dir=tmp_path / "e", env=env
    )
    assert evaluated.returncode == 0, evaluated.output[-3000:]
    assert noise(evaluated.output) == []
    assert (
        f"testing {ckpt}: normlab.models.NormLabModule(normlab.models.ConvNet) with"
        " norm=batchnorm, on digits"
    ) in evaluated.output
    # the evaluated checkpoint has its own key; eval.py saves no best or last checkpoint
    assert evaluated.results["evaluated"] == ckpt
    assert evaluated.results["checkpoints"] == {"best": None, "last": None}
