"""Device names for the node inputs, and loading a core loader's outputs onto a chosen device.

device_list()          devices that exist: GPUs first ("cuda:0", "cuda:1", ... / "xpu:0" / "mps"), then
                       "cpu". default_device() is the first of them (cpu on a CPU-only box).
parse_device(dev)      a node's device string -> torch.device, with an error naming the input and the
                       devices that exist; "default" / "" is ComfyUI's own torch device.
same_device(a, b)      device equality with DisTorch's names folded in ("cpu:0" is the host computing).
load_on_device(device, fn, *args, **kw)
                       runs a core loader `fn` and retargets the MODEL / CLIP / VAE / CONTROL_NET /
                       CLIP_VISION it returns to `device`: after the loader returns we set the
                       ModelPatcher's `load_device` (and VAE.device, ControlNet/CLIPVision
                       `load_device`), which is the attribute ComfyUI's memory manager loads to.
                       No ComfyUI function is replaced.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ..errors import DisTorchError
from .comfy_api import get_patcher, mm, unload_models

log = logging.getLogger("distorch.comfy.devices")
# ComfyUI's objects (ModelPatcher, CLIP, VAE, ...) are typed Any: ComfyUI ships no types.


def device_list() -> list[str]:
    """Devices that exist, GPUs first (cuda:0, cuda:1, ..., xpu:N, mps), then 'cpu'.  When ComfyUI itself runs
    on the CPU (`--cpu`), only 'cpu': its memory manager keeps no statistics for a GPU it was told not to use,
    so offering one would fail at the first load."""
    if getattr(mm, "cpu_state", None) == getattr(getattr(mm, "CPUState", None), "CPU", object()):
        return ["cpu"]
    out: list[str] = []
    try:
        if torch.cuda.is_available():
            out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    try:
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            out += [f"xpu:{i}" for i in range(torch.xpu.device_count())]
    except Exception:
        pass
    try:
        if torch.backends.mps.is_available():
            out.append("mps")
    except Exception:
        pass
    out.append("cpu")
    return out


def default_device() -> str:
    return device_list()[0]


def parse_device(dev: str | torch.device | None, what: str = "device") -> torch.device:
    """`dev` (a node's device input) as a torch.device that exists here; `what` names the input in errors."""
    if isinstance(dev, torch.device):
        d = dev
    else:
        s = str(dev).strip()
        if s in ("", "default"):
            return mm.get_torch_device()
        try:
            d = torch.device(s)
        except Exception:
            raise DisTorchError(f"{what} {dev!r} is not a device name; use one of {device_list()}") from None
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", 0)
    if d.type != "cpu" and str(d) not in device_list() and str(d) != "mps":
        raise DisTorchError(f"{what} {str(dev)!r} does not exist on this machine; use one of {device_list()}")
    return d


def same_device(a: str | torch.device, b: str | torch.device) -> bool:
    """Device equality with DisTorch's names ('cpu:0' is the host computing) folded in."""
    def n(x):
        s = str(x)
        if s in ("cpu:0",):
            return "cpu"
        if s == "cuda":
            return "cuda:0"
        return s
    return n(a) == n(b)


def _retarget(obj, dev: torch.device):
    """Point obj's loads at `dev` (attributes ComfyUI reads when it loads the model)."""
    if obj is None or isinstance(obj, (str, int, float, bool, dict, list, tuple, torch.Tensor)):
        return
    try:
        p = get_patcher(obj)
    except DisTorchError:
        return
    # a loader may have loaded it already (CLIP loads eagerly) for its default device: unload that copy,
    # else ComfyUI keeps using the LoadedModel entry it made for the old device
    unload_models(lambda lm: lm.model is p and not same_device(lm.device, dev))
    p.load_device = dev
    if dev.type == "cpu":
        p.offload_device = dev
    if p is not obj:
        if hasattr(obj, "load_device"):
            obj.load_device = dev          # ControlNet, CLIPVision
        if hasattr(obj, "first_stage_model") and hasattr(obj, "device"):
            obj.device = dev               # VAE moves its inputs to .device
    log.info("DisTorch: %s loads on %s", type(obj).__name__, dev)


def load_on_device(device: str | torch.device, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run core loader `fn(*args, **kw)`; its MODEL/CLIP/VAE/CONTROL_NET/CLIP_VISION outputs load on `device`."""
    dev = parse_device(device)
    out = fn(*args, **kw)
    items = out if isinstance(out, tuple) else (out,)
    for o in items:
        _retarget(o, dev)
    return out
