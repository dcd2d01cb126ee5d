"""User-facing errors.

Every error a user can cause by what they asked for is a ``TbrunError``: its message says what was
wrong and what to do. The CLI prints the message and exits with code 2, without a traceback.
"""

from __future__ import annotations


class TbrunError(Exception):
    """A problem with the user's request, explained in the message."""


class ConfigError(TbrunError, ValueError):
    """An option has a value that cannot work (checked before anything is allocated)."""


class ModelLoadError(TbrunError):
    """The model could not be found, loaded or adapted."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture is not one the adapter knows."""


class InsufficientMemoryError(TbrunError, MemoryError):
    """Not enough host or device memory for what was asked; the message names the numbers."""


class DeviceUnavailableError(TbrunError):
    """The requested device (for example ``cuda``) is not present on this machine."""
