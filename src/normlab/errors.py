"""User-facing errors: one paragraph that names the key or file, the value and the fix."""

from __future__ import annotations


class NormlabError(Exception):
    """An error in the user's input; the entry points print it as one paragraph, exit 2."""


class ConfigError(NormlabError, ValueError):
    """A config key has a value normlab cannot use."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value = key, value
        super().__init__(f"{key}={value!r} is not valid: {allowed}")


class CheckpointError(NormlabError):
    """A file given as a checkpoint is missing or is not a normlab checkpoint."""


class DivergenceError(NormlabError, FloatingPointError):
    """The training loss became NaN or infinite; raised by ``DivergenceGuard`` before the
    optimizer applies the step, so the checkpoints on disk hold the last good weights."""


class NormConfigError(ConfigError):
    """A bad ``norm.*`` value, or a norm that does not fit a layer of the model (e.g. a
    ``num_groups`` that does not divide its channels); names the key, the value and the fix."""


class SweepJobError(RuntimeError):
    """A multirun job stopped by a :class:`NormlabError`: Hydra marks the job failed and runs the
    sweep's other jobs; ``normlab.sweep_summary.SweepSummary`` then names every failed job."""
