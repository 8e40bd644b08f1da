"""Names of a multirun's job dirs: what distinguishes the job, not its number.

``python train.py -m experiment=compare_norms norm=batchnorm,frozen,groupnorm`` writes
``logs/compare_norms/multiruns/<timestamp>_<pid>/norm=frozen/`` (and so TensorBoard shows the run
``norm=frozen/tensorboard``): the job's overrides of the keys the sweep varies, written as Hydra
writes ``hydra.job.override_dirname`` (its ``kv_sep``, ``item_sep`` and ``exclude_keys`` in
``hydra.job.config.override_dirname`` apply). The sweep dir keeps the time, so the same name in
two sweeps never collides; a name already taken in the sweep dir (an Optuna trial repeating a
sample) gets ``_<job number>`` appended, and a job with nothing swept is named by its number.

``configs/hydra/default.yaml`` sets ``hydra.sweep.subdir: ${normlab_job_name:${hydra.job.num}}``;
``hydra.sweep.subdir=${hydra.job.num}`` on the command line brings the numbers back.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# the keys a sweep varies, set by SweptKeys in the multirun's process and inherited by the jobs'
# processes (a SLURM job's too), where the dir name is resolved
SWEPT_KEYS_ENV = "NORMLAB_SWEPT_KEYS"
# file systems take 255 bytes; room for the `_<job number>` suffix
MAX_NAME = 200


def _parse(overrides: Iterable[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([str(o) for o in overrides])


def swept_keys(overrides: Iterable[str], params: Mapping[str, Any] | None = None) -> list[str]:
    """The keys a multirun varies: its command-line sweeps (``norm=a,b``, ``lr=interval(...)``)
    and the sweeper's ``params`` (an experiment's or an ``hparams_search`` config's)."""
    keys = [o.key_or_group for o in _parse(overrides) if o.is_sweep_override()]
    return sorted({*keys, *(params or {})})


def current_swept_keys() -> list[str]:
    """The keys the multirun this process belongs to varies; empty for a single run."""
    return [k for k in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if k]


def job_name(
    job_overrides: Iterable[str],
    swept: Iterable[str] | None,
    num: int,
    *,
    kv_sep: str = "=",
    item_sep: str = ",",
    exclude_keys: Iterable[str] = (),
) -> str:
    """The dir name of a job with ``job_overrides`` (``norm=frozen``) in a sweep over ``swept``
    keys (None: every override counts), as ``hydra.job.override_dirname`` writes it; the job
    number when nothing is left."""
    swept = None if swept is None else set(swept)
    excluded = set(exclude_keys)
    lines = sorted(
        o.input_line
        for o in _parse(job_overrides)
        if o.key_or_group not in excluded and (swept is None or o.key_or_group in swept)
    )
    name = item_sep.join(line.replace("=", kv_sep, 1) for line in lines)
    name = name.replace(os.sep, "_").strip(". ")  # one path component, never hidden
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME]}_{num}"
    return name or str(num)


def job_dir_name(num: Any) -> str:
    """Resolver ``${normlab_job_name:${hydra.job.num}}``: this job's dir name in its sweep dir,
    from the job's Hydra config (Hydra sets it before it resolves ``hydra.sweep.subdir``)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    settings = hydra_cfg.job.config.override_dirname
    env = os.environ.get(SWEPT_KEYS_ENV)
    name = job_name(
        hydra_cfg.overrides.task,
        None if env is None else [k for k in env.split(",") if k],
        int(num),
        kv_sep=settings.kv_sep,
        item_sep=settings.item_sep,
        exclude_keys=settings.exclude_keys,
    )
    if (Path(hydra_cfg.sweep.dir) / name).exists():
        name = f"{name}_{num}"
    return name


def run_name(run_dir: str) -> str:
    """Resolver ``${normlab_run_name:${paths.output_dir}}``: the name of the run's dir
    (``norm=frozen`` in a sweep, ``<timestamp>_<pid>`` for a single run), for loggers that name
    runs (W&B, MLflow)."""
    return Path(run_dir).name


class SweptKeys(Callback):
    """Hydra callback (``configs/hydra/default.yaml``): at the start of a multirun, record which
    keys it sweeps, for :func:`job_dir_name`."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        params = config.hydra.sweeper.get("params")
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept_keys(config.hydra.overrides.task, params))
