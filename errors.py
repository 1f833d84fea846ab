"""Errors DisTorch raises on bad input. Import with a relative import: `from ..errors import DisTorchError`."""


class DisTorchError(ValueError):
    """Bad input or an unusable model/file: the message names the bad value and what would work."""


class FileFormatError(DisTorchError):
    """A weights file (.safetensors / .gguf) is truncated, corrupt or of an unsupported kind."""


class GGUFError(FileFormatError):
    """A GGUF tensor or file that cannot be read or dequantized."""


class UnsupportedQuantError(GGUFError):
    """A GGML quantization type DisTorch's dequantizer does not implement (or an unknown type name/id)."""


class GGUFFileError(GGUFError):
    """A .gguf file that is truncated, corrupt or holds a tensor type DisTorch cannot use."""


class GGUFNameError(DisTorchError):
    """A GGUF state dict whose llama.cpp tensor names cannot be mapped back to the original names."""


class QuantChoiceError(DisTorchError):
    """The quant-choice pass cannot decide: a bad mode or budget, or a plan/graph/inventory that do not match."""


class AllocationError(DisTorchError):
    """An expert allocation string is malformed or asks for something impossible."""


class InventoryError(DisTorchError):
    """A device spec is malformed, or a device named is not in the inventory."""


class PartitionError(DisTorchError):
    """A placement cannot be made: unknown devices, budgets that cannot hold the model, ..."""


class PlanVerificationError(DisTorchError):
    """A Plan/Schedule breaks an invariant (memory, conservation, load-before-use); the message lists them."""


class GGUFLoadError(DisTorchError):
    """A .gguf model cannot be loaded into ComfyUI: a bad loader option (dequant_dtype, patch_dtype, clip
    type), or a file whose model type ComfyUI cannot detect."""
