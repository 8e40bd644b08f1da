"""`data.download=true` through train.py on an empty data dir: the download happens before
anything reads the data (the model is sized from it), once; a failed download says so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from normlab.data.sources import load_source
from tests.conftest import ROOT

FAKE = ROOT / "tests" / "fake_download"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")


def _env(tmp_path: Path, mode: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(FAKE), os.environ.get("PYTHONPATH")) if p)
    return {
        "PYTHONPATH": path,
        "NORMLAB_FAKE_DOWNLOAD": mode,
        "NORMLAB_FAKE_DOWNLOAD_LOG": str(tmp_path / "downloads.txt"),
    }


@pytest.mark.slow
def test_download_true_downloads_once_then_trains(train_run, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    run = train_run(
        "data=mnist", "data.download=true", f"data.data_dir={data_dir}", env=_env(tmp_path, "ok")
    )
    assert run.returncode == 0, run.output[-3000:]
    raw = data_dir / "MNIST" / "raw"
    assert all((raw / f).is_file() for f in FILES)
    urls = (tmp_path / "downloads.txt").read_text().split()
    assert len(urls) == 4 and all(u.endswith(".gz") for u in urls)  # the four files, once each
    assert run.results["epochs"] == 1 and "test/acc" in run.results["metrics"]
    # what was downloaded is what the run read: the fake's 120 + 40 images, labels 0..9 cycling
    data = load_source("mnist", data_dir)
    assert (len(data.train_y), len(data.test_y)) == (120, 40)
    assert data.train_y.tolist() == [i % 10 for i in range(120)]
    # the files are there now: a second run with data.download=false reads them
    again = train_run("data=mnist", f"data.data_dir={data_dir}", name="again")
    assert again.returncode == 0, again.output[-3000:]


@pytest.mark.slow
def test_failed_download_says_so_and_where_from(train_run, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    run = train_run(
        "data=mnist",
        "data.download=true",
        f"data.data_dir={data_dir}",
        env=_env(tmp_path, "offline"),
    )
    assert run.returncode == 2, run.output[-3000:]
    message = run.stderr
    assert "normlab: error: data.name=mnist: downloading into" in message
    assert str(data_dir / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte.gz" in message and "(tried https://" in message
    assert "copy the files" in message and "data.download=false" in message
    assert not (run.run_dir / "results.json").exists()
