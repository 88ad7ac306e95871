"""The exceptions spruce raises.

Every class subclasses both :class:`SpruceError` and the built-in a user would catch
(``ValueError`` for bad values and shapes, ``TypeError`` for dtypes, ``RuntimeError`` for the
environment). Messages name the argument, the value received and what was expected, e.g.
``nm_mask: n (5) must be in [0, m] = [0, 4]``.
"""

from __future__ import annotations

__all__ = [
    "SpruceError",
    "ArgumentError",
    "ShapeError",
    "NonFiniteError",
    "DTypeError",
    "DeviceError",
    "CheckpointError",
    "ConfigError",
    "OutOfMemoryError",
]


class SpruceError(Exception):
    """Base class of every error spruce raises on purpose."""


class ArgumentError(SpruceError, ValueError):
    """An argument's value is outside its domain (sparsity outside [0, 1], n > m, ...)."""


class ShapeError(SpruceError, ValueError):
    """A tensor's shape does not fit the operation."""


class NonFiniteError(ArgumentError):
    """A tensor holds NaN where values must be ranked or finite."""


class DTypeError(SpruceError, TypeError):
    """A tensor's dtype is not supported by the operation."""


class DeviceError(SpruceError, RuntimeError):
    """A tensor is on a device the operation cannot run on in this build or environment."""


class CheckpointError(SpruceError, ValueError):
    """A checkpoint file or directory is missing, malformed or inconsistent."""


class ConfigError(SpruceError, ValueError):
    """A configuration (YAML/JSON/arguments of a command) is malformed or inconsistent."""


class OutOfMemoryError(SpruceError, MemoryError):
    """A result could not be allocated (the request is larger than the memory available)."""
