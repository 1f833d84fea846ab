"""Errors DisTorch raises on bad input. Import with a relative import: `from ..errors import DisTorchError`."""


class DisTorchError(ValueError):
    """Bad input or an unusable model/file: the message names the bad value and what would work."""


class FileFormatError(DisTorchError):
    """A weights file (.safetensors / .gguf) is truncated, corrupt or of an unsupported kind."""
