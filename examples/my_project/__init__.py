"""A user's own model and data, kept outside normlab: see docs/custom_models.md."""
