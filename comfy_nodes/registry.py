"""Node-class factories: build our ComfyUI node classes FROM another node class at start-up.

Every wrapper takes the base class's own INPUT_TYPES() at call time (so it never goes stale when
ComfyUI or another pack changes its loader), adds our inputs, and calls the base's function through
`backend()`: the functions of the modules that touch ComfyUI (comfy_api, devices, entry,
gguf_loaders), gathered in one namespace.

No ComfyUI import happens here; wrappers are plain classes in ComfyUI's V1 node format.
"""
import copy
import logging
import types
from typing import Any

log = logging.getLogger("distorch.comfy.nodes")

CATEGORY = "multigpu"
CATEGORY_D2 = "multigpu/distorch_2"

# Tooltips of the inputs we add (every input a user sees has one).
TIP_DEVICE = "Device this loader places the model on (cpu, cuda:0, ...)."
TIP_COMPUTE = "Device that runs the model's compute; its weights stream to it from the donor when offloaded."
TIP_CLIP_DEVICE = "Device that runs the text encoder's compute (DisTorch2 keeps part of it on the donor)."
TIP_VVRAM = ("GB (2^30 bytes) of the model to keep OFF the compute device, on the donor device; "
             "0 keeps the whole model on the compute device.")
TIP_DONOR = "Where the offloaded GB live (cpu RAM or another GPU)."
TIP_EXPERT = ("Overrides virtual_vram_gb/donor_device when set. Entries 'device,value' separated by ';': "
              "fractions of device memory (cuda:0,0.2;cpu,0.1), bytes (cuda:0,4gb;cpu,*) or shares of the "
              "model (cuda:0,25%;cpu,75%). The log prints the equivalent string of every run.")
TIP_EJECT = "Unload other models from the compute device before this one is loaded."
TIP_USE_OTHER = "Use every other GPU as a donor (in order), then cpu."
TIP_LEGACY_VVRAM = "GB (2^30 bytes) of the model to keep off `device` (legacy DisTorch node)."


_BACKEND = None


def backend() -> Any:
    """What the node classes call (registration tests replace this function with a fake):

        core_node_class(name)                  -> ComfyUI's node class, or None            comfy_api
        register_nodes(classes, display_names)    adds node classes to ComfyUI's registry  comfy_api
        registered_nodes()                     -> ComfyUI's registry, name -> class        comfy_api
        device_list()                          -> ["cuda:0", ..., "cpu"]                   devices
        load_on_device(device, fn)             -> fn()'s outputs, retargeted to `device`   devices
        distorch(obj, compute_device, virtual_vram_gb, donor_device, expert, eject_models) -> obj   entry
        remember_model_files(obj, loader_inputs)  the files obj was loaded from        stream_patches
        gguf_filenames(kind), gguf_clip_filenames(), gguf_path(kind, name),
        load_gguf_unet(path, ...), load_gguf_clip(paths, type)                             gguf_loaders

    Those modules import ComfyUI, so they are imported here, on first use, never at import time
    (see comfy_api's docstring)."""
    global _BACKEND
    if _BACKEND is None:
        from . import comfy_api, devices, entry, gguf_loaders, stream_patches
        _BACKEND = types.SimpleNamespace(
            core_node_class=comfy_api.core_node_class, register_nodes=comfy_api.register_nodes,
            registered_nodes=comfy_api.registered_nodes,
            device_list=devices.device_list, load_on_device=devices.load_on_device, distorch=entry.distorch,
            gguf_filenames=gguf_loaders.gguf_filenames, gguf_clip_filenames=gguf_loaders.gguf_clip_filenames,
            gguf_path=gguf_loaders.gguf_path, load_gguf_unet=gguf_loaders.load_gguf_unet,
            load_gguf_clip=gguf_loaders.load_gguf_clip, remember_model_files=stream_patches.remember_inputs)
    return _BACKEND


def devices() -> list[str]:
    """The device names offered in every device list (['cuda:0', ..., 'cpu'])."""
    devs = [str(d) for d in backend().device_list()]
    return devs or ["cpu"]


def default_device(devs: list[str]) -> str:
    """The first GPU when there is one, else cpu (COMPAT: default `cuda:0`)."""
    for d in devs:
        if d != "cpu":
            return d
    return devs[0]


def with_tooltip(spec: tuple | list, tooltip: str) -> tuple:
    """An input spec (TYPE,) / (TYPE, opts) with a tooltip added where it has none."""
    spec = tuple(spec)
    opts = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if not opts.get("tooltip"):
        opts["tooltip"] = tooltip
    return (spec[0], opts) + spec[2:]


def device_input(tooltip: str, default: str | None = None) -> tuple:
    devs = devices()
    return (devs, {"default": default if default in devs else default_device(devs), "tooltip": tooltip})


def donor_input() -> tuple:
    devs = devices()
    return (devs, {"default": "cpu" if "cpu" in devs else devs[-1], "tooltip": TIP_DONOR})


def vvram_input(default: float = 4.0, maximum: float = 128.0, tooltip: str = TIP_VVRAM) -> tuple:
    return ("FLOAT", {"default": default, "min": 0.0, "max": maximum, "step": 0.1, "tooltip": tooltip})


def expert_input(tooltip: str = TIP_EXPERT) -> tuple:
    return ("STRING", {"multiline": False, "default": "", "tooltip": tooltip})


def eject_input(default: bool) -> tuple:
    return ("BOOLEAN", {"default": bool(default), "tooltip": TIP_EJECT})


def base_inputs(base: type, base_label: str) -> dict:
    """Deep copy of base.INPUT_TYPES() with a tooltip on every input."""
    inputs = copy.deepcopy(base.INPUT_TYPES())
    if is_v3(base):
        inputs.pop("hidden", None)  # V3 nodes read hidden values from cls.hidden, not from kwargs
    for section in ("required", "optional"):
        for name, spec in list(inputs.get(section, {}).items()):
            inputs[section][name] = with_tooltip(spec, f"'{name}' of {base_label}, passed through unchanged.")
    return inputs


def is_v3(base: type) -> bool:
    """A node written against ComfyUI's V3 API (comfy_api io.ComfyNode: define_schema/execute)."""
    return hasattr(base, "GET_SCHEMA") and hasattr(base, "define_schema")


def call_base(base: type, kwargs: dict) -> tuple:
    """Run the base node's function with `kwargs`; returns its output tuple."""
    if is_v3(base):
        out = base.execute(**kwargs)
        if hasattr(out, "args"):  # NodeOutput
            return tuple(out.args)
        return tuple(out)
    if hasattr(base, "FUNCTION"):
        return tuple(getattr(base(), base.FUNCTION)(**kwargs))
    raise TypeError(f"{base.__name__} is neither a V1 node (FUNCTION) nor a V3 node (execute)")


_COPIED_ATTRS = ("RETURN_TYPES", "RETURN_NAMES", "OUTPUT_TOOLTIPS", "OUTPUT_IS_LIST", "OUTPUT_NODE",
                 "DESCRIPTION", "DEPRECATED", "EXPERIMENTAL")


def _make_class(name, base, base_label, category, title, add_inputs, run, description):
    """A V1 node class named `name` whose inputs are the base's plus add_inputs()."""
    base_title = getattr(base, "TITLE", None) or base_label

    def INPUT_TYPES(cls):
        inputs = base_inputs(base, base_label)
        inputs.setdefault("optional", {})
        for section, key, spec in add_inputs():
            # Our input replaces a base input of the same name (CLIPLoader's own `device`).
            for other in ("required", "optional"):
                inputs.get(other, {}).pop(key, None)
            inputs.setdefault(section, {})[key] = spec
        return inputs

    attrs = {a: getattr(base, a) for a in _COPIED_ATTRS if hasattr(base, a)}
    attrs.setdefault("RETURN_TYPES", ())
    attrs.update({
        "INPUT_TYPES": classmethod(INPUT_TYPES),
        "FUNCTION": "load",
        "CATEGORY": category,
        "TITLE": f"{base_title} ({title})",
        "DESCRIPTION": description,
        "BASE_CLASS": base,
        "load": run,
        "__module__": __name__,
        "__doc__": description,
    })
    return type(name, (object,), attrs)


def _base_has_input(base, key):
    """Whether the base node has an input `key` (asked at call time: INPUT_TYPES may list files)."""
    inputs = base.INPUT_TYPES()
    return any(key in inputs.get(s, {}) for s in ("required", "optional"))


def device_wrapper(name: str, base: type, base_label: str, *, category: str = CATEGORY) -> type:
    """`<Loader>MultiGPU`: the base loader's inputs plus `device`; loads onto that device."""
    def add_inputs():
        return [("optional", "device", device_input(TIP_DEVICE))]

    def run(self, device=None, **kwargs):
        if _base_has_input(base, "device"):  # the base's own `device` choice ("default"/"cpu") is ours now
            kwargs["device"] = "default"
        return tuple(backend().load_on_device(device or default_device(devices()), lambda: call_base(base, kwargs)))

    return _make_class(name, base, base_label, category, "MultiGPU", add_inputs, run,
                       f"{base_label} with a device choice: the model is loaded for that device.")


def distorch2_wrapper(name: str, base: type, base_label: str, *, device_key: str = "compute_device",
                      eject_default: bool = True, distorch_outputs: tuple[int, ...] = (0,)) -> type:
    """`<Loader>DisTorch2MultiGPU`: base inputs plus compute device, virtual VRAM, donor, expert string,
    eject_models; the loaded model is compiled by DisTorch with the Plan these describe."""
    def add_inputs():
        tip = TIP_COMPUTE if device_key == "compute_device" else TIP_CLIP_DEVICE
        return [
            ("optional", device_key, device_input(tip)),
            ("optional", "virtual_vram_gb", vvram_input()),
            ("optional", "donor_device", donor_input()),
            ("optional", "expert_mode_allocations", expert_input()),
            ("optional", "eject_models", eject_input(eject_default)),
        ]

    def run(self, virtual_vram_gb=4.0, donor_device="cpu", expert_mode_allocations="",
            eject_models=eject_default, **kwargs):
        compute = kwargs.pop(device_key, None) or default_device(devices())
        if device_key == "device" and _base_has_input(base, "device"):
            kwargs["device"] = "default"
        be = backend()
        out = list(be.load_on_device(compute, lambda: call_base(base, kwargs)))
        remember = getattr(be, "remember_model_files", None)   # LoRA'd streamed weights re-read originals there
        for i in distorch_outputs:
            if i < len(out) and out[i] is not None:
                if remember is not None:
                    remember(out[i], kwargs)
                out[i] = be.distorch(out[i], compute, float(virtual_vram_gb), donor_device,
                                     expert_mode_allocations or "", bool(eject_models))
        return tuple(out)

    return _make_class(name, base, base_label, CATEGORY_D2, "DisTorch2", add_inputs, run,
                       f"{base_label}, compiled by DisTorch: virtual_vram_gb of the model lives on the donor "
                       "device and streams to the compute device just before it is needed.")


def other_gpu_donors(device: str) -> str:
    """Legacy `use_other_vram`: every other GPU as a donor (in index order), then cpu."""
    def index(d):
        tail = d.rsplit(":", 1)[-1]
        return int(tail) if tail.isdigit() else 0
    gpus = sorted((d for d in devices() if d != "cpu" and d != device), key=index)
    return ",".join(gpus + ["cpu"])


def legacy_distorch_wrapper(name: str, base: type, base_label: str) -> type:
    """Legacy `...GGUFDisTorchMultiGPU`: inputs device, virtual_vram_gb, use_other_vram,
    expert_mode_allocations; runs on the same engine as DisTorch2."""
    def add_inputs():
        return [
            ("optional", "device", device_input(TIP_DEVICE)),
            ("optional", "virtual_vram_gb", vvram_input(tooltip=TIP_LEGACY_VVRAM)),
            ("optional", "use_other_vram", ("BOOLEAN", {"default": False, "tooltip": TIP_USE_OTHER})),
            ("optional", "expert_mode_allocations", expert_input()),
        ]

    def run(self, device=None, virtual_vram_gb=4.0, use_other_vram=False, expert_mode_allocations="", **kwargs):
        device = device or default_device(devices())
        if _base_has_input(base, "device"):
            kwargs["device"] = "default"
        donors = other_gpu_donors(device) if use_other_vram else "cpu"
        be = backend()
        out = list(be.load_on_device(device, lambda: call_base(base, kwargs)))
        if out and out[0] is not None:
            out[0] = be.distorch(out[0], device, float(virtual_vram_gb), donors,
                                 expert_mode_allocations or "", False)
        return tuple(out)

    return _make_class(name, base, base_label, CATEGORY, "DisTorch", add_inputs, run,
                       f"{base_label} (legacy DisTorch node), placed by the DisTorch2 engine.")
