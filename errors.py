"""Errors DisTorch raises on bad input. Import with a relative import: `from ..errors import DisTorchError`."""


class DisTorchError(ValueError):
    """Bad input or an unusable model/file: the message names the bad value and what would work."""


class FileFormatError(DisTorchError):
    """A weights file (.safetensors / .gguf) is truncated, corrupt or of an unsupported kind."""


class AllocationError(DisTorchError):
    """An expert allocation string is malformed or asks for something impossible."""


class InventoryError(DisTorchError):
    """A device spec is malformed, or a device named is not in the inventory."""


class PartitionError(DisTorchError):
    """A placement cannot be made: unknown devices, budgets that cannot hold the model, ..."""
