"""Screenshots of TensorBoard as a person sees it, for the docs: a fresh short comparison sweep
(``experiment=compare_norms norm=batchnorm,frozen,groupnorm`` on digits, its runs named
``norm=<name>``), ``tensorboard --logdir`` on a free 127.0.0.1 port, headless Chromium.

    python scripts/tensorboard_screenshots.py [--out docs/images] [--chromium chromium]

Writes ``tensorboard_dashboard.png`` (the Custom Scalars dashboard), ``tensorboard_histograms.png``
and ``tensorboard_hparams.png`` into ``--out``. Needs Chromium (Debian: ``apt-get install
chromium``); TensorBoard is stopped whatever happens. ``serve_tensorboard`` is also what the
HTTP-API test uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# 4 epochs of digits (80 steps), statistics every 4 steps, histograms every 8
SWEEP = [
    "experiment=compare_norms",
    "norm=batchnorm,frozen,groupnorm",
    "trainer=cpu",
    "trainer.max_epochs=4",
    "callbacks.rich_progress_bar=null",
    "callbacks.bn_stats.scalars_every_n_steps=4",
    "callbacks.bn_stats.histograms_every_n_steps=8",
    "tags=[screenshots]",
]
PAGES = {  # file name -> (TensorBoard page, window size)
    "tensorboard_dashboard.png": ("#custom_scalars", "1400,1500"),
    "tensorboard_histograms.png": ("#histograms", "1400,1100"),
    # wide enough for the metric columns right of the five hparam columns
    "tensorboard_hparams.png": ("#hparams", "2000,520"),
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, body: dict[str, Any] | None = None, timeout: float = 10) -> Any:
    """GET ``url`` (POST ``body`` as JSON when given) and decode the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


@contextlib.contextmanager
def serve_tensorboard(logdir: Path, wait_s: float = 90) -> Iterator[str]:
    """Run ``tensorboard --logdir logdir`` on a free 127.0.0.1 port; yield its base URL once it
    answers and its event files are loaded; terminate it on exit (kill after 10 s)."""
    port = free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}"]
    cmd += ["--host=127.0.0.1", f"--port={port}", "--reload_interval=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"tensorboard exited with {proc.returncode}: {proc.stderr.read()}"
                )
            with contextlib.suppress(OSError, ValueError):
                if get_json(f"{url}/data/plugin/scalars/tags", timeout=2):  # runs loaded
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensorboard on {url} did not serve {logdir} in {wait_s} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def screenshot(chromium: str, url: str, path: Path, size: str) -> None:
    """Load ``url`` in headless Chromium, let it render for 20 s of virtual time, save a PNG."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            chromium,
            "--headless=new",
            "--no-sandbox",  # root in a container
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={size}",
            "--virtual-time-budget=20000",
            f"--screenshot={path}",
            url,
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--chromium", default="chromium", help="the Chromium program")
    args = parser.parse_args(argv)
    chromium = shutil.which(args.chromium)
    if chromium is None:
        print(f"tensorboard_screenshots: error: {args.chromium} not found; on Debian/Ubuntu:"
              " apt-get install chromium, or pass --chromium PATH", file=sys.stderr)  # fmt: skip
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "sweep"
        cmd = [sys.executable, str(ROOT / "train.py"), "-m", *SWEEP]
        cmd += [f"hydra.sweep.dir={sweep}", f"paths.log_dir={Path(tmp) / 'logs'}"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=900)
        args.out.mkdir(parents=True, exist_ok=True)
        with serve_tensorboard(sweep) as url:
            for name, (page, size) in PAGES.items():
                screenshot(chromium, f"{url}/{page}", args.out / name, size)
                print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
