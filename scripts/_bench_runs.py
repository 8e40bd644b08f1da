"""The measurements behind scripts/bench.py; each returns plain numbers (seconds, samples/s).

Training runs share one process, one model definition and one in-memory data set; the caller
interleaves the variants and takes medians of paired ratios, because the machine is noisy.
"""

from __future__ import annotations

import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback, RichProgressBar
from omegaconf import DictConfig, OmegaConf

from normlab import run
from normlab.config import register_resolvers
from normlab.norm import param_groups

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 4  # steps before the timed window: allocator, first-call and logger set-up costs


def compose_config(overrides: Sequence[str], output_dir: Path) -> DictConfig:
    """configs/train.yaml composed as `python train.py overrides...` would, outside Hydra's run."""
    os.environ.setdefault("NORMLAB_ROOT", str(ROOT))
    register_resolvers()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])
    OmegaConf.set_struct(cfg, False)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return cfg


def _inspection_keys() -> list[str]:
    """The entries of configs/callbacks/default.yaml that `callbacks=no_inspection` turns off."""
    text = (ROOT / "configs" / "callbacks" / "no_inspection.yaml").read_text()
    return [k for k, v in yaml.safe_load(text).items() if k != "defaults" and v is None]


INSPECTION = _inspection_keys()


def is_inspection(entry: Any) -> bool:
    """An inspection callback (BatchNorm statistics, the other TensorBoard diagnostics) of
    configs/callbacks/default.yaml, as `callbacks=no_inspection` names them."""
    defaults = yaml.safe_load((ROOT / "configs" / "callbacks" / "default.yaml").read_text())
    targets = {defaults[k]["_target_"] for k in INSPECTION}
    return bool(entry) and entry.get("_target_") in targets


def recipe_config(cfg: DictConfig, inspection: bool) -> DictConfig:
    """``cfg``, or ``cfg`` with `callbacks=no_inspection`'s entries off."""
    if inspection:
        return cfg
    return OmegaConf.merge(cfg, {"callbacks": {k: None for k in INSPECTION}})


def recipe_trainer(cfg: DictConfig, inspection: bool, extra: Sequence[Callback] = ()) -> Any:
    """The Trainer train.py builds (`normlab.run.build_trainer`), optionally without the
    inspection callbacks, with ``extra`` callbacks; its progress bar renders as in a terminal,
    into /dev/null."""
    trainer = run.build_trainer(recipe_config(cfg, inspection), extra)
    for cb in trainer.callbacks:
        if isinstance(cb, RichProgressBar):
            null = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
            cb._console_kwargs = {"file": null, "force_terminal": True, "width": 120}
    return trainer


def recipe_callbacks(cfg: DictConfig, inspection: bool) -> list[Callback]:
    """The callbacks of the Trainer train.py builds, optionally without the inspection ones."""
    return list(recipe_trainer(cfg, inspection).callbacks)


def build_model(cfg: DictConfig, datamodule: Any, seed: int = 0) -> Any:
    """The LightningModule train.py builds, with the same initial weights for every variant."""
    torch.manual_seed(seed)
    return run.build_model(cfg.model, cfg.norm, datamodule)


def now(device: torch.device | None = None) -> tuple[float, float]:
    """(wall-clock, CPU time of this process, all threads) in seconds, after the GPU's work."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


class PlainLoop:
    """The loop a user writes by hand, one step at a time: the same model (own copy, same
    initial weights), AdamW with the same parameter groups, the same in-memory batches."""

    def __init__(self, cfg: DictConfig, dm: Any, device: torch.device) -> None:
        self.model, self.dm, self.device = build_model(cfg, dm).to(device), dm, device
        opt = cfg.model.optimizer
        groups = param_groups(self.model, opt.weight_decay, opt.norm_weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=opt.lr)
        self.batches = self._forever()

    def _forever(self):
        while True:
            yield from self.dm.train_dataloader()

    def step(self) -> None:
        images, labels = (t.to(self.device, non_blocking=True) for t in next(self.batches))
        images, labels = self.dm.on_after_batch_transfer((images, labels), 0)
        with torch.enable_grad():
            self.model.train()
            loss = F.cross_entropy(self.model(images), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


class Interleaved(Callback):
    """After every training step of the Trainer, one step of the plain loop; time stamps
    before and after it. So the two loops alternate step by step on the same machine state,
    and a slow minute of a shared machine slows both alike."""

    def __init__(self, plain: PlainLoop | None, device: torch.device) -> None:
        self.plain, self.device = plain, device
        self.stamps: list[tuple[tuple[float, float], tuple[float, float]]] = []
        self.end = (0.0, 0.0)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        before = now(self.device)
        if self.plain is not None:
            self.plain.step()
        self.stamps.append((before, now(self.device)))

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        self.end = now(self.device)


def timings(clock: Interleaved, steps: int, hooks: Sequence = ()) -> dict[str, float]:
    """Seconds a step of the Trainer (from the end of one plain step to the start of the next)
    and of the plain loop, over the steps after WARMUP; seconds from the last step to the end
    of training (the epoch's end); the same for the timed hooks ((start, duration) pairs)."""
    if len(clock.stamps) != steps:
        raise RuntimeError(f"expected {steps} step time stamps, got {len(clock.stamps)}")
    out, timed = {}, clock.stamps[WARMUP - 1 :]
    last = timed[-1][1]
    for i, name in enumerate(("wall", "cpu")):
        template = sum(b[0][i] - a[1][i] for a, b in zip(timed, timed[1:], strict=False))
        out[f"step_s_{name}"] = template / (steps - WARMUP)
        out[f"plain_step_s_{name}"] = sum(b[i] - a[i] for a, b in timed[1:]) / (steps - WARMUP)
        out[f"epoch_end_s_{name}"] = clock.end[i] - last[i]
        in_steps = sum(d[i] for t, d in hooks if timed[0][1][i] < t[i] <= last[i])
        out[f"hooks_step_s_{name}"] = in_steps / (steps - WARMUP)
        out[f"hooks_epoch_end_s_{name}"] = sum(d[i] for t, d in hooks if t[i] > last[i])
    return out


def time_hooks(callbacks: Sequence[Callback], events: list) -> None:
    """Wrap the hooks each callback's class defines, appending (start, duration) to ``events``
    at every call (both clocks): what those callbacks cost, measured directly."""

    def timed(hook: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = now()
            try:
                return hook(*args, **kwargs)
            finally:
                stop = now()
                events.append((start, (stop[0] - start[0], stop[1] - start[1])))

        return wrapper

    for cb in callbacks:
        for name in dir(type(cb)):
            if name.startswith("on_") and getattr(type(cb), name) is not getattr(Callback, name):
                setattr(cb, name, timed(getattr(cb, name)))


def run_template(
    cfg: DictConfig,
    dm: Any,
    steps: int,
    device: torch.device,
    inspection: bool = True,
    plain: bool = True,
) -> dict[str, float]:
    """One epoch of `steps` training steps and the validation split through the Trainer that
    train.py builds, a plain-loop step after each of its steps (``plain``). Returns seconds per
    step of each (steady state), of the epoch's end (validation, checkpoints, epoch-end
    callbacks) and of the inspection callbacks' hooks."""
    run_cfg = OmegaConf.merge(
        cfg,
        {
            "paths": {"output_dir": tempfile.mkdtemp(dir=cfg.paths.output_dir)},
            "trainer": {
                "max_epochs": 1,
                "limit_train_batches": steps,
                "num_sanity_val_steps": 0,
                "enable_model_summary": False,
            },
        },
    )
    model = build_model(run_cfg, dm)
    clock = Interleaved(PlainLoop(run_cfg, dm, device) if plain else None, device)
    trainer = recipe_trainer(run_cfg, inspection, [clock])
    targets = {c._target_ for c in run_cfg.callbacks.values() if is_inspection(c)}
    events: list = []
    time_hooks([c for c in trainer.callbacks if _target(c) in targets], events)
    trainer.fit(model, datamodule=dm)
    return timings(clock, steps, events)


def _target(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def interleaved(variants: dict[str, Callable[[], dict]], repeats: int) -> list[dict[str, dict]]:
    """Run every variant `repeats` times, rotating their order each round."""
    names, rounds = list(variants), []
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        rounds.append({name: variants[name]() for name in order})
    return rounds


def median_ratio(rounds: list[dict], num: str, den: str, key: str) -> float:
    """Median over rounds of rounds[num][key] / rounds[den][key] (paired within a round)."""
    return statistics.median(r[num][key] / r[den][key] for r in rounds)


# -- the data path ----------------------------------------------------------------------------
def write_mnist_idx(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """MNIST's four IDX files (random pixels) under root/MNIST/raw, the layout torchvision reads."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen)
        labels = torch.randint(0, 10, (n,), dtype=torch.uint8, generator=gen)
        for kind, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + array.numpy().tobytes())
    return root


def loader_rate(loader: Any, batches: int, step: Callable[[Any], Any], device: torch.device):
    """Samples/s over `batches` batches after two warm-up batches (worker start-up excluded)."""
    it = iter(loader)
    for _ in range(2):
        step(next(it))
    samples, start = 0, time.perf_counter()
    for _ in range(batches):
        out = step(next(it))
        samples += out[1].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return samples / (time.perf_counter() - start)


def torchvision_rate(root: Path, batch_size: int, workers: int, batches: int) -> float:
    """The usual pipeline: torchvision MNIST -> PIL image -> ToTensor -> Normalize, per sample."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    data = datasets.MNIST(str(root), train=True, transform=tf)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers)
    return loader_rate(loader, batches, lambda b: b, torch.device("cpu"))


def normlab_rate(root: Path, batch_size: int, device: torch.device, batches: int) -> float:
    """normlab's path: in-memory uint8 batches, copied to the device, scaled there."""
    from normlab.data import NormLabDataModule

    dm = NormLabDataModule(name="mnist", data_dir=str(root), batch_size=batch_size)
    dm.setup("fit")

    def step(batch: Any) -> Any:
        moved = tuple(t.to(device, non_blocking=True) for t in batch)
        return dm.on_after_batch_transfer(moved, 0)

    def forever():
        while True:
            yield from dm.train_dataloader()

    return loader_rate(forever(), batches, step, device)


# -- subprocess measurements --------------------------------------------------------------------
# fork+exec from this small launcher, not from the large benchmark process: Linux carries a
# parent's peak RSS over into its child's ru_maxrss across exec
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1), os.dup2(null, 2)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def peak_rss_of(cmd: Sequence[str]) -> tuple[float, float, int]:
    """(peak resident MiB, wall seconds, exit status) of a command, via wait4's rusage."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *cmd], cwd=ROOT, capture_output=True, text=True
    )
    maxrss_kib, code = (int(v) for v in proc.stdout.split())
    return maxrss_kib / 1024, time.perf_counter() - start, code


def help_latency(repeats: int) -> float:
    """Median wall seconds of `python train.py --help`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT, capture_output=True
        )
        times.append(time.perf_counter() - start)
    return statistics.median(times)
