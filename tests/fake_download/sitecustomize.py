"""Loaded by a train.py subprocess whose PYTHONPATH starts with this folder (tests only): it
replaces torchvision's MNIST download with one that writes tiny IDX files, or fails as an
offline machine does, and counts the calls in ``$NORMLAB_FAKE_DOWNLOAD_LOG``."""

import os

MODE = os.environ.get("NORMLAB_FAKE_DOWNLOAD")

if MODE:
    from pathlib import Path
    from urllib.error import URLError

    import numpy as np
    import torchvision.datasets.mnist as tv_mnist

    def _fake_download(url: str, download_root: str, filename: str | None = None, **_: object):
        with open(os.environ["NORMLAB_FAKE_DOWNLOAD_LOG"], "a") as log:
            log.write(url + "\n")
        if MODE == "offline":
            raise URLError("[Errno -3] Temporary failure in name resolution")
        name = Path(filename or url).name.removesuffix(".gz")
        n = 120 if name.startswith("train") else 40
        rng = np.random.default_rng(0)
        labels = np.arange(n, dtype=np.uint8) % 10
        if "images" in name:
            header = np.array([0x803, n, 28, 28], dtype=">i4").tobytes()
            body = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            body[np.arange(n), labels * 2, :] = 255  # a learnable stripe per class
        else:
            header, body = np.array([0x801, n], dtype=">i4").tobytes(), labels
        Path(download_root, name).write_bytes(header + body.tobytes())

    tv_mnist.download_and_extract_archive = _fake_download
