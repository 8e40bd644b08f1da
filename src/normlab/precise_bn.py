"""Moved to :mod:`normlab.norm.stats`; this name stays importable for existing code."""

from normlab.norm.stats import apply_population_stats, estimate_population_stats

__all__ = ["apply_population_stats", "estimate_population_stats"]
