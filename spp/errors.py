"""The errors spp raises on purpose, in one module every other one may import (it imports none)."""

__all__ = ["ConfigError", "CheckpointError", "NonFiniteLoss"]


class ConfigError(ValueError):
    """A config key, value or path that cannot work; the message names the fix."""


class CheckpointError(RuntimeError):
    """A training checkpoint that does not fit this run (another model, config or world size)."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message says at which step and what to change."""
