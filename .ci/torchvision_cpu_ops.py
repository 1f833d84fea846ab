"""Make PyPI's torchvision importable beside a CPU-only torch (installed into a venv by .ci/setup_comfyui.sh).

PyPI's Linux torchvision wheels are CUDA builds: their compiled `_C.so` links libtorch_cuda.so and
cannot load beside the CPU torch wheel. torchvision then still calls
`torch.library.register_fake("torchvision::nms")` at import, which fails with
"operator torchvision::nms does not exist". ComfyUI imports torchvision (transforms only).

This module installs an import hook (cheap: no torch import until torchvision itself is imported).
When `torchvision` is first imported it tries to load torchvision's own `_C` library; only when that
fails does it define the two operators torchvision registers unconditionally (`nms`, `qnms`) with a
plain-torch CPU kernel, so `import torchvision` works. Everything guarded by torchvision's
`_has_ops()` (roi_align, deform_conv2d, ...) stays unavailable, with torchvision's own clear error.
"""
import importlib.abc
import importlib.machinery
import os
import sys

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def _greedy_nms(dets, scores, iou_threshold):
    import torch

    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    x1, y1, x2, y2 = dets.float().unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    order = scores.argsort(descending=True)
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=dets.device)


def _define_ops():
    import torch

    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            lib = os.path.join(folder, "_C.so")
            if os.path.exists(lib):
                try:
                    torch.ops.load_library(lib)
                    return  # a matching build: nothing to do
                except (OSError, ImportError):
                    pass
    if hasattr(torch.ops.torchvision, "nms"):
        return
    global _LIB
    _LIB = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        _LIB.define(name + _SCHEMA)
        _LIB.impl(name, _greedy_nms, "CPU")


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            try:
                _define_ops()
            except Exception as e:  # never break the import itself
                print(f"torchvision_cpu_ops: could not define CPU ops: {e}", file=sys.stderr)
        return None


if not any(isinstance(f, _Hook) for f in sys.meta_path):
    sys.meta_path.insert(0, _Hook())
