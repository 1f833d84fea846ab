"""The ONE module of DisTorch that touches ComfyUI internals.

Everything ComfyUI-specific the node classes need goes through the functions below; nothing else in
the package imports `comfy`, `nodes` or `folder_paths`.  Nothing here replaces a ComfyUI function:
we integrate through ComfyUI's own extension points.

Interface (what comfy_nodes/nodes.py calls)
-------------------------------------------
core_node_class(name)      ComfyUI's node class from nodes.NODE_CLASS_MAPPINGS, or None.
device_list()              devices that exist: GPUs first ("cuda:0", "cuda:1", ... / "xpu:0" / "mps"),
                           then "cpu".  default_device() is the first of them (cpu on a CPU-only box).
load_on_device(device, fn, *args, **kw)
                           runs a core loader `fn` and retargets the MODEL / CLIP / VAE / CONTROL_NET /
                           CLIP_VISION it returns to `device`: after the loader returns we set the
                           ModelPatcher's `load_device` (and VAE.device, ControlNet/CLIPVision
                           `load_device`), which is the attribute ComfyUI's memory manager loads to.
                           No ComfyUI function is replaced.
distorch(obj, compute_device, virtual_vram_gb, donor_device, expert, eject_models)
                           turns obj (ModelPatcher, CLIP, VAE, ControlNet, CLIPVision) into one whose
                           patcher is a DisTorch patcher (below); returns obj (the same CLIP/VAE/
                           ControlNet object with its patcher swapped, or the ModelPatcher itself).
path()                     "classic" (ModelPatcher, ComfyUI 0.3.x) or "dynamic" (ModelPatcherDynamic /
                           comfy-aimdo, 2026 releases) -- logged once.
release(obj)               unloads obj from ComfyUI (model_unload), which frees its homes.
load_gguf_unet(path, ...) / load_gguf_clip(paths, type)
                           .gguf models without ComfyUI-GGUF: our reader + ComfyUI's own loader entry
                           points with an operations class keeping GGUF weights quantized
                           (the GGUF section at the end of this module).

How it cooperates with ComfyUI (classic path)
---------------------------------------------
The patcher's class is swapped in place for `DisTorch<OriginalClass>`, a subclass made by mixing
`DisTorchPatcherMixin` over the original class (so ComfyUI-GGUF's or any other ModelPatcher subclass
keeps its own methods).  ComfyUI's clone() uses `self.__class__`, so LoRA loaders and every other
node that clones the model keep the DisTorch behaviour.  The mixin overrides the ModelPatcher methods
that ComfyUI's memory manager (model_management.load_models_gpu / free_memory / LoadedModel) calls:

* load()            weight patches (LoRA ...) are applied IN PLACE to the weights where they lie
                    (offload device), computed on the compute device exactly as ComfyUI computes them
                    (so results are bit-identical to the plain path); then `distorch.compile` binds the
                    module with the Plan: resident units move to the compute device, offloaded units
                    into their homes (pinned host buffer / donor GPU).  Reports
                    model_loaded_weight_memory = resident bytes + slot window (what it really holds on
                    the GPU), model_lowvram = False, so ComfyUI never loads the offloaded weights itself.
* partially_load()  when already compiled on that device: nothing to move.  When only the weight
                    patches changed (a LoRA strength changed: new clone, new patches_uuid), the
                    patched keys are recomputed from the kept originals and written into the live
                    storage (GPU tensor for resident weights, the home buffer for streamed ones) --
                    no re-read, no re-plan, no re-placement of the model.  (Weights stored through a
                    custom op's set_weight cannot be rewritten in place: those models are released
                    and compiled again with the same Plan.)
* partially_unload() returns 0: a compiled placement is not shrunk piecemeal, so ComfyUI falls back
                    to a full unload (detach) when it needs the memory.
* unpatch_model()   (detach / model_unload / cleanup) undoes the runtime: homes (pinned host memory,
                    donor GPU memory) and slots are freed, weights go back to the offload device,
                    LoRA backups are restored.
* model_size()      the VRAM the model needs on its load device (resident + window, from the Plan),
                    so free_memory() does not evict other models for bytes we never load there;
                    get_ram_usage() stays the whole model (it lives in RAM).

A WrappersMP.OUTER_SAMPLE wrapper (patcher.add_wrapper_with_key, copied by clone()) logs the measured
step time beside the Plan's prediction after each sampling run.

The compiled state lives on the underlying torch module (`patcher.model`), shared by all clones,
exactly like ComfyUI's own `model_loaded_weight_memory`.

Dynamic VRAM path (ComfyUI 2026, ModelPatcherDynamic + comfy-aimdo)
-------------------------------------------------------------------
A ModelPatcherDynamic pages weights itself through aimdo's virtual address ranges, which would fight
our placement.  When `distorch()` meets one, it builds a classic-based DisTorch patcher for the same
model (copying patches, object patches, model options, callbacks, wrappers, attachments) and hands
that to ComfyUI; load_models_gpu then treats it like any classic model.  CI can only run 0.3.75.
"""
from __future__ import annotations

import collections
import logging
import math
import sys
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DisTorchError

log = logging.getLogger("distorch")
GiB = 1 << 30

_lock = threading.RLock()
_PATH_LOGGED = [False]
_MIXED: dict[type, type] = {}


# ------------------------------------------------------------------------------------------------
# discovery
# ------------------------------------------------------------------------------------------------
def _mm():
    import comfy.model_management as mm
    return mm


def _mp():
    import comfy.model_patcher as mp
    return mp


def _wrappers_mp():
    import comfy.patcher_extension as pe
    return pe.WrappersMP


def comfy_version() -> str:
    try:
        import comfyui_version
        return str(comfyui_version.__version__)
    except Exception:
        return "unknown"


def path() -> str:
    """'dynamic' when this ComfyUI pages weights with ModelPatcherDynamic (aimdo enabled), else 'classic'."""
    mp = _mp()
    dyn = getattr(mp, "ModelPatcherDynamic", None)
    if dyn is None:
        p = "classic"
    else:
        enabled = False
        try:
            import comfy.memory_management as mem
            enabled = getattr(mem, "aimdo_enabled", False) is True
        except Exception:
            enabled = False
        core = getattr(mp, "CoreModelPatcher", None)
        p = "dynamic" if (enabled or (core is not None and core is dyn)) else "classic"
    if not _PATH_LOGGED[0]:
        _PATH_LOGGED[0] = True
        log.info("DisTorch: ComfyUI %s, %s ModelPatcher path%s", comfy_version(), p,
                 " (ModelPatcherDynamic available)" if dyn is not None and p == "classic" else "")
    return p


def core_node_class(name: str):
    """ComfyUI's node class registered as `name` (nodes.NODE_CLASS_MAPPINGS), or None."""
    try:
        import nodes
    except Exception:
        return None
    return getattr(nodes, "NODE_CLASS_MAPPINGS", {}).get(name)


def device_list() -> list[str]:
    """Devices that exist, GPUs first (cuda:0, cuda:1, ..., xpu:N, mps), then 'cpu'."""
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


def _device(dev, what: str = "device") -> torch.device:
    if isinstance(dev, torch.device):
        d = dev
    else:
        s = str(dev).strip()
        if s in ("", "default"):
            return _mm().get_torch_device()
        try:
            d = torch.device(s)
        except Exception:
            raise DisTorchError(f"{what} {dev!r} is not a device name; use one of {device_list()}") from None
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", 0)
    if d.type != "cpu" and str(d) not in device_list() and str(d) != "mps":
        raise DisTorchError(f"{what} {str(dev)!r} does not exist on this machine; use one of {device_list()}")
    return d


def _same(a, b) -> bool:
    """Device equality with DisTorch's names ('cpu:0' is the host computing) folded in."""
    def n(x):
        s = str(x)
        if s in ("cpu:0",):
            return "cpu"
        if s == "cuda":
            return "cuda:0"
        return s
    return n(a) == n(b)


# ------------------------------------------------------------------------------------------------
# patchers inside the objects ComfyUI passes around
# ------------------------------------------------------------------------------------------------
def _is_patcher(x) -> bool:
    return isinstance(x, _mp().ModelPatcher)


def _patcher_slot(obj):
    """(holder, attribute) where obj keeps its ModelPatcher; holder None when obj IS the patcher."""
    if _is_patcher(obj):
        return None, None
    for attr in ("patcher", "control_model_wrapped"):
        p = getattr(obj, attr, None)
        if p is not None and _is_patcher(p):
            return obj, attr
    raise DisTorchError(f"cannot find a ComfyUI model inside a {type(obj).__name__}: expected a MODEL, CLIP, "
                        "VAE, CONTROL_NET or CLIP_VISION output of a loader")


def _get_patcher(obj):
    holder, attr = _patcher_slot(obj)
    return obj if holder is None else getattr(holder, attr)


def _retarget(obj, dev: torch.device):
    """Point obj's loads at `dev` (attributes ComfyUI reads when it loads the model)."""
    if obj is None or isinstance(obj, (str, int, float, bool, dict, list, tuple, torch.Tensor)):
        return
    try:
        p = _get_patcher(obj)
    except DisTorchError:
        return
    # a loader may have loaded it already (CLIP loads eagerly) for its default device: unload that copy,
    # else ComfyUI keeps using the LoadedModel entry it made for the old device
    mm = _mm()
    for lm in list(mm.current_loaded_models):
        if lm.model is p and not _same(lm.device, dev):
            lm.model_unload()
            mm.current_loaded_models.remove(lm)
    p.load_device = dev
    if dev.type == "cpu":
        p.offload_device = dev
    if p is not obj:
        if hasattr(obj, "load_device"):
            obj.load_device = dev          # ControlNet, CLIPVision
        if hasattr(obj, "first_stage_model") and hasattr(obj, "device"):
            obj.device = dev               # VAE moves its inputs to .device
    log.info("DisTorch: %s loads on %s", type(obj).__name__, dev)


def load_on_device(device, fn, *args, **kw):
    """Run core loader `fn(*args, **kw)`; its MODEL/CLIP/VAE/CONTROL_NET/CLIP_VISION outputs load on `device`."""
    dev = _device(device)
    out = fn(*args, **kw)
    items = out if isinstance(out, tuple) else (out,)
    for o in items:
        _retarget(o, dev)
    return out


# ------------------------------------------------------------------------------------------------
# compiled state, shared by all clones of one model
# ------------------------------------------------------------------------------------------------
class _Config:
    def __init__(self, compute: torch.device, vram_gb: float, donors: list[str], expert: str):
        self.compute = compute
        self.vram_gb = vram_gb
        self.donors = donors
        self.expert = expert

    def __repr__(self):
        if self.expert:
            return f"compute={self.compute} expert={self.expert!r}"
        return f"compute={self.compute} virtual_vram_gb={self.vram_gb} donors={','.join(self.donors)}"


class _State:
    """DisTorch state of one torch model (patcher.model); every clone of its patcher sees the same one."""

    def __init__(self, cfg: _Config, total_bytes: int):
        self.cfg = cfg
        self.total_bytes = int(total_bytes)
        self.plan = None          # the Plan; made once, reused by every later compile
        self.handle = None        # the live distorch Handle while loaded
        self.device = None        # device it is compiled for
        self.index = None         # id(param) -> (unit index, position) for streamed params
        self.logged = False
        self.compiles = 0
        self.releases = 0
        self.repatches = 0
        self.last_stats = None    # runtime statistics of the latest sampling run (OUTER_SAMPLE wrapper)
        self.sd_hook = None       # state_dict hook that reports streamed weights from their homes

    # bytes the compiled model holds on its compute device
    def vram_bytes(self) -> int:
        h = self.handle
        rt = getattr(h, "runtime", None) if h is not None else None
        if rt is not None and hasattr(rt, "resident_bytes"):
            return int(rt.resident_bytes + getattr(rt, "W", 0) * getattr(rt, "slot_bytes", 0))
        p = self.plan
        if p is not None:
            dev = p.devices.get(p.compute, {})
            return int(dev.get("bytes", p.model_bytes - p.offloaded_bytes()) + (p.window_bytes or 0))
        if self.cfg.expert:
            return self.total_bytes
        return max(0, self.total_bytes - int(self.cfg.vram_gb * GiB))


def _state(model):
    return model.__dict__.get("_distorch_state") if model is not None else None


def _target(model):
    """The torch module DisTorch compiles: the diffusion model of a BaseModel, else the model itself."""
    dm = getattr(model, "diffusion_model", None)
    return dm if isinstance(dm, torch.nn.Module) else model


def _prefix(model) -> str:
    return "diffusion_model." if _target(model) is not model else ""


# ------------------------------------------------------------------------------------------------
# allocation table
# ------------------------------------------------------------------------------------------------
def allocation_table(plan, title: str = "") -> str:
    """The table users know: per device memory, the share of the model (GB, %), layer types and counts,
    the v2 expert string, the predicted step overhead."""
    tot = plan.model_bytes or 1
    lines = ["=" * 78, f"DisTorch2 allocation{(' - ' + title) if title else ''}", "=" * 78,
             f"{'device':<10}{'memory GB':>11}{'model GB':>11}{'% model':>9}  layers (by type)", "-" * 78]
    devs = dict(plan.devices or {})
    if not devs:
        for u in plan.units:
            d = devs.setdefault(u.device, {"bytes": 0, "types": {}, "total": 0})
            d["bytes"] += u.bytes
            d["types"][u.type] = d["types"].get(u.type, 0) + 1
    for name, d in devs.items():
        b = int(d.get("bytes", 0))
        types = d.get("types") or {}
        t = ", ".join(f"{k} x{v}" for k, v in sorted(types.items(), key=lambda kv: -kv[1])) or "-"
        mem = d.get("total", 0) / GiB
        lines.append(f"{name:<10}{mem:>11.2f}{b / GiB:>11.3f}{100.0 * b / tot:>8.1f}%  {t}")
    lines.append("-" * 78)
    lines.append(f"model {tot / GiB:.3f} GB, {len(plan.units)} units, {plan.offloaded_bytes() / GiB:.3f} GB "
                 f"streamed to {plan.compute} through a {plan.window_bytes / GiB:.3f} GB window")
    pr = plan.predicted or {}
    step, comp = pr.get("step_s"), pr.get("compute_s")
    if step:
        over = pr.get("overhead_s", (step - comp) if comp is not None else None)
        extra = f", overhead {over * 1e3:.1f} ms ({100.0 * over / comp:.0f}% of compute)" if (
            over is not None and comp) else ""
        lines.append(f"predicted step {step * 1e3:.1f} ms (all resident {comp * 1e3 if comp else 0:.1f} ms){extra}"
                     f" [{pr.get('basis', '?')}]")
    lines.append(f"v2 Expert String: {plan.expert_string}")
    lines.append("=" * 78)
    return "\n".join(lines)


def _log_plan(st: _State, what: str):
    if st.plan is not None and not st.logged:
        st.logged = True
        log.info("%s", allocation_table(st.plan, what))


# ------------------------------------------------------------------------------------------------
# planning and compiling
# ------------------------------------------------------------------------------------------------
def _plan(module, cfg: _Config):
    """Trace + partition without moving a byte (errors in the inputs surface at the loader node)."""
    from ..compiler.trace import trace
    from ..passes.partition import partition
    from ..runtime import api
    comp = api._norm_compute(str(cfg.compute))
    graph = trace(module)
    inv = api._inventory(comp, cfg.donors)
    if cfg.expert:
        return partition(graph, inv, comp, expert=cfg.expert)
    return partition(graph, inv, comp, vram_gb=cfg.vram_gb, donors=cfg.donors)


def _compile(module, st: _State, device):
    from ..runtime.api import compile as _c
    kw = {"compute": "cpu" if torch.device(device).type == "cpu" else str(device), "progress": True}
    if st.plan is not None and _same(st.plan.compute, device):
        kw["plan"] = st.plan
    elif st.cfg.expert:
        kw["expert"] = st.cfg.expert
    else:
        kw["vram_gb"] = st.cfg.vram_gb
        kw["donors"] = list(st.cfg.donors)
    h = _c(module, **kw)
    st.handle, st.plan, st.device, st.index = h, h.plan, torch.device(device), None
    st.compiles += 1
    # Streamed parameters point at whichever slot they ran from last; anything that READS the weights
    # (state_dict for saving / merging, get_key_patches) must see their homes instead.
    idx = _stream_index(st)
    names = {n: idx[id(p)] for n, p in module.named_parameters(remove_duplicate=False) if id(p) in idx}

    def homes_in_state_dict(mod, state_dict, prefix, local_metadata):
        for n, home in names.items():
            if prefix + n in state_dict:
                state_dict[prefix + n] = home
        return None

    reg = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook
    st.sd_hook = reg(homes_in_state_dict) if names else None
    return h


def _undo(st: _State, to_device):
    """Free homes and slots; the weights end on `to_device`."""
    h = st.handle
    st.handle, st.index, st.device = None, None, None
    if getattr(st, "sd_hook", None) is not None:
        st.sd_hook.remove()
        st.sd_hook = None
    if h is None:
        return
    # straight to the offload device: a GPU that cannot hold the model must not receive it on the way out
    h.undo(device=to_device)
    st.releases += 1


def _stream_index(st: _State):
    """id(param) -> its tensor in its home, for the streamed params of the live runtime."""
    if st.index is None:
        rt = getattr(st.handle, "runtime", None)
        st.index = dict(rt.home_views()) if rt is not None else {}
    return st.index


def _invalidate_slots(st: _State):
    """Homes are about to be / were written: wait for copies in flight, then make the runtime copy every
    unit again before its next use (slots may hold the old bytes)."""
    rt = getattr(st.handle, "runtime", None)
    if rt is not None:
        rt.invalidate()


def _sync(st: _State):
    _invalidate_slots(st)


# ------------------------------------------------------------------------------------------------
# the patcher
# ------------------------------------------------------------------------------------------------
_Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])


class DisTorchPatcherMixin:
    """Mixed over a ComfyUI ModelPatcher class; see the module docstring."""

    distorch = True

    # -- what ComfyUI's memory manager reads
    def model_size(self):
        st = _state(self.model)
        if st is None:
            return super().model_size()
        return st.vram_bytes()

    def get_ram_usage(self):
        st = _state(self.model)
        return st.total_bytes if st is not None else super().get_ram_usage()

    def distorch_state(self):
        return _state(self.model)

    def get_key_patches(self, filter_prefix=None):
        """ComfyUI's merge nodes read the weights here: streamed ones are read from their homes."""
        p = super().get_key_patches(filter_prefix)
        st = _state(self.model)
        if st is None or st.handle is None:
            return p
        idx = _stream_index(st)
        mp = _mp()
        for k, v in p.items():
            if k in self.backup or not v:
                continue
            w, _, _ = mp.get_key_weight(self.model, k)
            home = idx.get(id(w))
            if home is not None:
                p[k] = [(home, v[0][1])] + list(v[1:])
        return p

    # -- loading
    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        st = _state(self.model)
        if st is None:
            return super().load(device_to, lowvram_model_memory, force_patch_weights, full_load)
        mp = _mp()
        with self.use_ejected():
            self.unpatch_hooks()
            if st.handle is not None and not _same(st.device, device_to):
                self._distorch_release(self.offload_device)
            if st.handle is None:
                for key in list(self.patches):
                    self.patch_weight_to_device(key, device_to=device_to, inplace_update=True)
                module = _target(self.model)
                _compile(module, st, device_to)
                _log_plan(st, type(self.model).__name__)
            elif self.model.current_weight_patches_uuid != self.patches_uuid or force_patch_weights:
                self._distorch_repatch(device_to)
            self.model.device = device_to
            self.model.model_loaded_weight_memory = st.vram_bytes()
            self.model.model_lowvram = False
            self.model.lowvram_patch_counter = 0
            self.model.current_weight_patches_uuid = self.patches_uuid
            if hasattr(self.model, "model_offload_buffer_memory"):
                self.model.model_offload_buffer_memory = 0
            for callback in self.get_all_callbacks(mp.CallbacksMP.ON_LOAD):
                callback(self, device_to, lowvram_model_memory, force_patch_weights, full_load)
            self.apply_hooks(self.forced_hooks, force_apply=True)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        st = _state(self.model)
        if st is None or st.handle is None or not _same(st.device, device_to):
            return super().partially_load(device_to, extra_memory, force_patch_weights)
        changed = self.model.current_weight_patches_uuid != self.patches_uuid or force_patch_weights
        if changed and not self._distorch_repatchable():
            # weights stored by a custom op (set_func): undo, restore, and load again with the same Plan
            self.unpatch_model(self.offload_device, unpatch_weights=True)
            return super().partially_load(device_to, extra_memory, force_patch_weights)
        # compiled on this device already: nothing to move; apply a changed set of weight patches in place
        with self.use_ejected(skip_and_inject_on_exit_only=True):
            changed = self.model.current_weight_patches_uuid != self.patches_uuid or force_patch_weights
            super().unpatch_model(self.offload_device, unpatch_weights=False)   # object patches only
            self.patch_model(load_weights=False)
            if changed:
                self.unpatch_hooks()
                self._distorch_repatch(device_to)
                self.model.current_weight_patches_uuid = self.patches_uuid
            self.model.model_loaded_weight_memory = st.vram_bytes()
            self.apply_hooks(self.forced_hooks, force_apply=True)
        return 0

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        st = _state(self.model)
        if st is None:
            return super().partially_unload(device_to, memory_to_free, force_patch_weights)
        return 0      # a compiled placement is freed whole (ComfyUI then detaches the model)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        st = _state(self.model)
        if st is not None and unpatch_weights and st.handle is not None:
            self.eject_model()
            self._distorch_release(device_to if device_to is not None else self.offload_device)
        return super().unpatch_model(device_to, unpatch_weights)

    # -- helpers
    def _distorch_release(self, to_device):
        st = _state(self.model)
        _undo(st, to_device)
        if to_device is not None:
            self.model.to(to_device)
            self.model.device = to_device
        self.model.model_loaded_weight_memory = 0
        log.info("DisTorch: released %s (homes and slots freed, weights on %s)", type(self.model).__name__, to_device)

    def _distorch_repatchable(self) -> bool:
        """Whether every patched weight is a plain tensor we can rewrite in place (not a custom op's
        set_weight storage, not a quantized tensor subclass)."""
        mp = _mp()
        for key in set(self.patches) | set(self.backup):
            try:
                w, set_func, _ = mp.get_key_weight(self.model, key)
            except Exception:
                return False
            if set_func is not None or type(w) not in (torch.Tensor, torch.nn.Parameter):
                return False
        return True

    def _distorch_repatch(self, device_to):
        """Write the current weight patches into the live storage, from the kept originals."""
        st = _state(self.model)
        mp = _mp()
        mm = _mm()
        import comfy.lora
        import comfy.float
        keys = set(self.patches) | set(self.backup)
        if not keys:
            return
        _sync(st)
        index = _stream_index(st)
        done = 0
        with torch.no_grad():
            for key in sorted(keys):
                live, set_func, convert_func = mp.get_key_weight(self.model, key)
                if set_func is not None:
                    raise DisTorchError(f"weight {key!r} is a custom-stored tensor; DisTorch cannot re-patch it "
                                        "in place (reload the model to change its patches)")
                bk = self.backup.get(key)
                if bk is None:
                    home = index.get(id(live))
                    src = home if home is not None else live
                    bk = _Backup(src.to(device=self.offload_device, copy=True), True)
                    self.backup[key] = bk
                orig = bk.weight
                if key in self.patches:
                    temp = mm.cast_to_device(orig, device_to, torch.float32, copy=True)
                    if convert_func is not None:
                        temp = convert_func(temp, inplace=True)
                    out = comfy.lora.calculate_weight(self.patches[key], temp, key)
                    out = comfy.float.stochastic_rounding(out, orig.dtype, seed=mp.string_to_seed(key))
                else:
                    out = orig
                home = index.get(id(live))
                dst = home if home is not None else live.data
                if tuple(dst.shape) != tuple(out.shape):
                    raise DisTorchError(f"weight {key!r}: live shape {tuple(dst.shape)} != patched {tuple(out.shape)}")
                dst.copy_(out)
                if key not in self.patches:
                    self.backup.pop(key, None)
                done += 1
        _invalidate_slots(st)
        st.repatches += 1
        log.info("DisTorch: re-patched %d weights in place (no reload)", done)


def _outer_sample_wrapper(executor, *args, **kwargs):
    """WrappersMP.OUTER_SAMPLE: after a sampling run, log the measured step time beside the Plan's prediction."""
    out = executor(*args, **kwargs)
    try:
        p = getattr(executor.class_obj, "model_patcher", None)
        st = _state(getattr(p, "model", None))
        if st is not None and st.handle is not None:
            d = st.handle.stats
            meas, pred, comp = d.get("measured_step_s"), d.get("predicted_step_s"), d.get("predicted_compute_s")
            if meas:
                st.last_stats = d
                msg = f"DisTorch: measured step {meas * 1e3:.1f} ms"
                if pred:
                    msg += f", predicted {pred * 1e3:.1f} ms"
                if comp:
                    msg += f"; overhead over the all-resident prediction: measured {(meas - comp) * 1e3:+.1f} ms"
                    if pred:
                        msg += f", predicted {(pred - comp) * 1e3:+.1f} ms"
                log.info("%s (%d streamed units, %d slots)", msg, d.get("streamed_units", 0), d.get("window_slots", 0))
    except Exception as e:   # statistics are a courtesy: never fail a finished sampling run over them
        log.debug("DisTorch: no step statistics (%s)", e)
    return out


def _mixed_class(base: type) -> type:
    with _lock:
        cls = _MIXED.get(base)
        if cls is None:
            if issubclass(base, DisTorchPatcherMixin):
                return base
            cls = type(f"DisTorch{base.__name__}", (DisTorchPatcherMixin, base), {"__module__": __name__})
            _MIXED[base] = cls
        return cls


def _classic_copy(p, cls):
    """A classic-based DisTorch patcher for p's model (the Dynamic-VRAM path)."""
    import copy as _copy
    n = cls(p.model, p.load_device, p.offload_device)
    for k in ("patches", "object_patches", "weight_wrapper_patches", "attachments", "additional_models",
              "callbacks", "wrappers", "injections", "hook_patches", "forced_hooks", "is_clip", "hook_mode",
              "force_cast_weights", "weight_inplace_update"):
        if hasattr(p, k):
            v = getattr(p, k)
            setattr(n, k, _copy.copy(v) if isinstance(v, dict) else v)
    n.model_options = _copy.deepcopy(p.model_options)
    n.patches_uuid = p.patches_uuid
    return n


# ------------------------------------------------------------------------------------------------
# the entry point of the DisTorch2 nodes
# ------------------------------------------------------------------------------------------------
def eject(device) -> int:
    """Unload every model ComfyUI holds on `device`; returns how many."""
    mm = _mm()
    dev = _device(device, "compute_device")
    before = [lm for lm in mm.current_loaded_models if _same(lm.device, dev)]
    mm.free_memory(1e30, dev)
    mm.soft_empty_cache()
    after = [lm for lm in mm.current_loaded_models if _same(lm.device, dev)]
    n = len(before) - len(after)
    log.info("DisTorch: eject_models unloaded %d model(s) from %s", n, dev)
    return n


def distorch(obj, compute_device="cuda:0", virtual_vram_gb=4.0, donor_device="cpu", expert="",
             eject_models=True):
    """Hand ComfyUI a version of obj whose model runs under a DisTorch Plan (module docstring)."""
    if obj is None:
        raise DisTorchError("distorch() got no model (the loader returned None)")
    compute = _device(compute_device, "compute_device")
    expert = (expert or "").strip()
    try:
        vram_gb = float(virtual_vram_gb)
    except (TypeError, ValueError):
        raise DisTorchError(f"virtual_vram_gb={virtual_vram_gb!r} is not a number; give GB (2^30 bytes), "
                            "e.g. 4.0") from None
    if not math.isfinite(vram_gb) or vram_gb < 0:
        raise DisTorchError(f"virtual_vram_gb={virtual_vram_gb!r}: give 0 or more GB")
    if isinstance(donor_device, (list, tuple)):
        donors = [str(d).strip() for d in donor_device if str(d).strip()]
    else:
        donors = [d.strip() for d in str(donor_device or "cpu").split(",") if d.strip()]
    for d in donors:
        _device(d, "donor_device")
    if not expert and compute.type != "cpu" and any(_same(_device(d), compute) for d in donors):
        raise DisTorchError(f"donor_device {donor_device!r} is the compute device; donors hold what does "
                            "NOT fit it (use cpu or another GPU)")
    which = path()
    holder, attr = _patcher_slot(obj)
    p = obj if holder is None else getattr(holder, attr)

    if eject_models:
        eject(compute)

    model = p.model
    # ComfyUI may hold this model loaded already (CLIP loaders load eagerly): unload it the usual way
    # first, so that the next load goes through the DisTorch patcher (and a previous compile is undone)
    for lm in list(_mm().current_loaded_models):
        if lm.model is not None and lm.model.model is model:
            lm.model_unload()
            _mm().current_loaded_models.remove(lm)
    old = _state(model)
    if old is not None and old.handle is not None:
        _undo(old, p.offload_device)

    dyn = getattr(_mp(), "ModelPatcherDynamic", None)
    if dyn is not None and isinstance(p, dyn):
        newp = _classic_copy(p, _mixed_class(_mp().ModelPatcher))
        log.info("DisTorch: ModelPatcherDynamic replaced by a classic DisTorch patcher for this model")
    else:
        p.__class__ = _mixed_class(type(p))
        newp = p
    if holder is None:
        wt = _wrappers_mp().OUTER_SAMPLE
        if "distorch" not in newp.wrappers.get(wt, {}):
            newp.add_wrapper_with_key(wt, "distorch", _outer_sample_wrapper)
    newp.load_device = compute
    if compute.type == "cpu":
        newp.offload_device = compute
    if holder is not None:
        setattr(holder, attr, newp)
        if hasattr(holder, "load_device"):
            holder.load_device = compute
        if hasattr(holder, "first_stage_model") and hasattr(holder, "device"):
            holder.device = compute

    cfg = _Config(compute, vram_gb, donors, expert)
    mm = _mm()
    st = _State(cfg, mm.module_size(model))
    model.__dict__["_distorch_state"] = st
    try:
        st.plan = _plan(_target(model), cfg)
    except (ImportError, AttributeError) as e:   # planner API not available here: plan at load time
        log.info("DisTorch: planning deferred to load time (%s)", e)
    _log_plan(st, f"{type(model).__name__} ({which} path, {cfg})")
    return newp if holder is None else obj


def release(obj) -> bool:
    """Unload obj from ComfyUI now (as its memory manager would): frees homes, slots, donor memory."""
    p = _get_patcher(obj)
    mm = _mm()
    for lm in list(mm.current_loaded_models):
        if lm.model is not None and lm.model.is_clone(p):
            lm.model_unload()
            mm.current_loaded_models.remove(lm)
            return True
    st = _state(p.model)
    if st is not None and st.handle is not None:
        p.detach()
        return True
    return False


def state_of(obj):
    """The DisTorch state of obj's model (plan, handle, counters), or None."""
    return _state(_get_patcher(obj).model)


def register_nodes(classes: dict, display_names: dict) -> None:
    """Add node classes to ComfyUI's registry after start-up (wrappers of packs that loaded after ours):
    the same public dicts ComfyUI fills from a pack's NODE_CLASS_MAPPINGS."""
    import nodes as comfy_registry  # ComfyUI's top-level nodes.py
    comfy_registry.NODE_CLASS_MAPPINGS.update(classes)
    comfy_registry.NODE_DISPLAY_NAME_MAPPINGS.update(display_names)


# ------------------------------------------------------------------------------------------------
# model files (ComfyUI's folder_paths) for the native GGUF loader nodes
# ------------------------------------------------------------------------------------------------
def _folder_paths():
    import folder_paths  # ComfyUI's model-file registry
    return folder_paths


def gguf_filenames(kind):
    """.gguf files of the diffusion-model ('unet') or text-encoder ('clip') folders.

    Registers the keys `unet_gguf` / `clip_gguf` (shared with ComfyUI-GGUF, same meaning) on first use."""
    fp = _folder_paths()
    key, target = {"unet": ("unet_gguf", "diffusion_models"), "clip": ("clip_gguf", "text_encoders")}[kind]
    if key not in fp.folder_names_and_paths:
        fp.folder_names_and_paths[key] = (fp.folder_names_and_paths[target][0], {".gguf"})
    return fp.get_filename_list(key)


def gguf_clip_filenames():
    fp = _folder_paths()
    return sorted(set(fp.get_filename_list("text_encoders")) | set(gguf_filenames("clip")))


def gguf_path(kind, name):
    gguf_filenames(kind)
    key = "unet_gguf" if kind == "unet" else "clip_gguf"
    fp = _folder_paths()
    path = fp.get_full_path(key, name) or fp.get_full_path("diffusion_models" if kind == "unet" else "text_encoders", name)
    if path is None:
        raise FileNotFoundError(f"model file {name!r} not found in the {kind} model folders")
    return path


# ------------------------------------------------------------------------------------------------
# GGUF without ComfyUI-GGUF: our reader + ComfyUI's own loader entry points
# ------------------------------------------------------------------------------------------------
def load_gguf_unet(path, dequant_dtype=None, patch_dtype=None, patch_on_device=None):
    """A .gguf diffusion model -> ModelPatcher; weights stay quantized (dequantized per call)."""
    return _gguf_load_unet(path, dequant_dtype=dequant_dtype, patch_dtype=patch_dtype,
                           patch_on_device=patch_on_device)


def load_gguf_clip(paths, clip_type="stable_diffusion", dequant_dtype=None):
    """Text encoder(s) from .gguf / .safetensors files -> CLIP; GGUF weights stay quantized."""
    return _gguf_load_clip(list(paths), clip_type, dequant_dtype=dequant_dtype)


# GGUF models in ComfyUI without ComfyUI-GGUF: DisTorch's own reader + ComfyUI's own loaders.
#
# How a .gguf diffusion model becomes a ComfyUI MODEL
# ---------------------------------------------------
# 1. runtime.gguf_loader.load_gguf memory-maps the file: quantized tensors are GGUFTensors (their bytes a
#    view of the mapping, never dequantized on the host), F32/F16/BF16 tensors plain tensors.
# 2. ComfyUI's own entry point `comfy.sd.load_diffusion_model_state_dict(sd, model_options=
#    {"custom_operations": ops})` detects the architecture from the keys and builds its model with our
#    operations class (below) instead of comfy.ops.
# 3. The layers of that class take a GGUFTensor from the state dict AS their parameter
#    (`_load_from_state_dict`; ComfyUI's load_state_dict would otherwise copy it into a dense weight) and
#    dequantize it on the compute device at every call, into the input's dtype (or `dequant_dtype` first),
#    then apply ComfyUI's weight/bias functions (lowvram LoRA patches).  Plain weights take ComfyUI's
#    own path (manual_cast).
# The result is ComfyUI's ModelPatcher with two methods changed (gguf_patcher_class): a weight patch
# (LoRA) of a GGUF weight is not written into the quantized weight but applied at every call to the
# dequantized one (the layer's weight_function, like ComfyUI's own lowvram patches), and unpatching
# removes it.  The DisTorch2 nodes place it like any model (streamed units move their quantized bytes:
# runtime/gguf_stream.py); units whose layers carry such patches stay quantized (passes/quant_choice.py).
#
# Text encoders: .safetensors files and .gguf files load through `comfy.sd.load_text_encoder_state_dicts`
# with the same operations class.  GGUF text encoders in llama.cpp naming (`enc.blk.0.attn_q.weight`,
# `token_embd.weight`...: T5/UMT5, llama, qwen2, gemma families) get their original names back first
# (runtime/gguf_names.py: the gguf package's own name map, llama Q/K rows un-permuted on the quantized
# bytes, gemma norms un-shifted); the LM head and decoder tensors an encoder does not use are dropped.
#


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class GGUFLoadError(DisTorchError):
    pass


def _is_gguf(t) -> bool:
    from ..runtime.gguf_stream import is_gguf
    return is_gguf(t)


def _dtype_option(value, what: str):
    if value in (None, "", "default", "target"):
        return None
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise GGUFLoadError(f"{what} {value!r}: expected one of default, target, {', '.join(DTYPES)}")
    return DTYPES[value]


class _GGUFLayer:
    """Mixin over a comfy.ops layer class: GGUF parameters kept quantized, dequantized per call."""

    dequant_dtype: torch.dtype | None = None
    _gguf_params = ("weight", "bias")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        taken = []
        for name in self._gguf_params:
            key = prefix + name
            v = state_dict.get(key)
            if v is None or not _is_gguf(v):
                continue
            cur = self._parameters.get(name)
            if cur is not None and tuple(cur.shape) != tuple(v.shape):
                error_msgs.append(f"size mismatch for {key}: GGUF tensor of shape {list(v.shape)}, the model "
                                  f"expects {list(cur.shape)}")
                continue
            self._parameters[name] = nn.Parameter(v, requires_grad=False)
            taken.append(key)
        rest = {k: v for k, v in state_dict.items() if k not in taken} if taken else state_dict
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key in taken:
            if key in missing_keys:
                missing_keys.remove(key)

    def _has_gguf(self) -> bool:
        return any(_is_gguf(self._parameters.get(n)) for n in self._gguf_params)

    def _gw(self, name: str, x: torch.Tensor, dtype: torch.dtype | None):
        """Parameter `name` dense on x's device in `dtype` (None: its own), patch functions applied."""
        from ..runtime.gguf_tensor import materialize
        t = getattr(self, name)
        if t is None:
            return None
        if _is_gguf(t):
            w = materialize(t, x.device, self.dequant_dtype or dtype or t.dtype)
            if dtype is not None and w.dtype != dtype:
                w = w.to(dtype)
        elif t.device != x.device or (dtype is not None and t.dtype != dtype):
            w = t.to(device=x.device, dtype=dtype or t.dtype, non_blocking=True)
        else:
            w = t
        fns = self.weight_function if name == "weight" else self.bias_function
        if fns and (w is t or w is getattr(t, "_dq", None)):
            w = w.clone()         # patch functions may work in place: never on the parameter (or the
            #                       runtime's shared dequantized copy of it) itself
        for f in fns:
            w = f(w)
        return w

    def forward(self, *args, **kwargs):
        if self._has_gguf():
            return self._gguf_forward(*args, **kwargs)
        return super().forward(*args, **kwargs)


def _float(x):
    return x.dtype if x.dtype.is_floating_point else None


def _linear(self, x):
    d = _float(x)
    return F.linear(x, self._gw("weight", x, d), self._gw("bias", x, d))


def _conv(self, x):
    d = _float(x)
    return self._conv_forward(x, self._gw("weight", x, d), self._gw("bias", x, d))


def _embedding(self, x, out_dtype=None):
    w = self._gw("weight", x, out_dtype)     # dequantized straight into the dtype asked for
    return F.embedding(x, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)


def _layer_norm(self, x):
    d = _float(x)
    return F.layer_norm(x, self.normalized_shape, self._gw("weight", x, d), self._gw("bias", x, d), self.eps)


def _group_norm(self, x):
    d = _float(x)
    return F.group_norm(x, self.num_groups, self._gw("weight", x, d), self._gw("bias", x, d), self.eps)


_FORWARDS = {"Linear": _linear, "Conv1d": _conv, "Conv2d": _conv, "Conv3d": _conv, "Embedding": _embedding,
             "LayerNorm": _layer_norm, "GroupNorm": _group_norm}
_OPS_CACHE: dict = {}


def gguf_operations(dequant_dtype=None):
    """A comfy.ops-style operations class (over comfy.ops.manual_cast) whose layers keep GGUF weights
    quantized and dequantize them per call (see the module docstring)."""
    import comfy.ops
    dd = _dtype_option(dequant_dtype, "dequant_dtype")
    key = (id(comfy.ops.manual_cast), dd)
    ops = _OPS_CACHE.get(key)
    if ops is not None:
        return ops
    base = comfy.ops.manual_cast
    attrs = {}
    for name, fwd in _FORWARDS.items():
        bcls = getattr(base, name, None)
        if bcls is None:
            continue
        attrs[name] = type(name, (_GGUFLayer, bcls), {"dequant_dtype": dd, "_gguf_forward": fwd,
                                                      "__module__": __name__,
                                                      "__qualname__": f"DisTorchGGUFOps.{name}"})
    ops = type("DisTorchGGUFOps", (base,), dict(attrs, __module__=__name__))
    _OPS_CACHE[key] = ops
    return ops


def patches_to(obj, device):
    """A copy of a ComfyUI patch list (tuples / lists / dicts of tensors, weight adapters holding their
    tensors in `.weights`) with every tensor on `device`; anything else is kept as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(patches_to(x, device) for x in obj)
    if isinstance(obj, list):
        return [patches_to(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: patches_to(v, device) for k, v in obj.items()}
    w = getattr(obj, "weights", None)
    if isinstance(w, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in w):
        import copy as _copy
        c = _copy.copy(obj)              # an adapter object: same class and fields, weights moved
        c.weights = patches_to(w, device)
        return c
    return obj


class GGUFPatch:
    """A weight patch (LoRA ...) of a GGUF weight, applied to the dequantized weight at every call
    (the layer's weight_function), computed in `patch_dtype` (default: the weight's float dtype).
    With `device` (the GGUF loaders' patch_on_device), the patch tensors are copied there once instead
    of being cast to the weight's device by every call."""

    def __init__(self, key, patches, patch_dtype=None, device=None):
        self.key = key
        self.patches = patches
        self.patch_dtype = patch_dtype
        self.local = patches_to(patches[key], device) if device is not None else None

    def __call__(self, weight):
        import comfy.lora
        dt = self.patch_dtype or (weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                  else torch.float32)
        p = self.local if self.local is not None else self.patches[self.key]
        out = comfy.lora.calculate_weight(p, weight.to(dt), self.key, intermediate_dtype=dt)
        return out.to(weight.dtype)


_PATCHER_CLASSES: dict = {}


def gguf_patcher_class(base):
    """`base` (a ComfyUI ModelPatcher class) whose weight patches of GGUF weights are applied per call
    after dequantization instead of being written into the (quantized) weight."""
    cls = _PATCHER_CLASSES.get(base)
    if cls is not None:
        return cls

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return None
        import comfy.model_patcher as mp
        import comfy.utils
        w, _set_func, _convert = mp.get_key_weight(self.model, key)
        if not _is_gguf(w):
            return base.patch_weight_to_device(self, key, device_to, inplace_update)
        mod_name, pname = key.rsplit(".", 1)
        m = comfy.utils.get_attr(self.model, mod_name)
        attr = "weight_function" if pname == "weight" else "bias_function"
        fns = [f for f in getattr(m, attr, []) if not (isinstance(f, GGUFPatch) and f.key == key)]
        opt = self.model_options.get("distorch_gguf") or {}
        dev = None
        if opt.get("patch_on_device"):
            dev = torch.device(device_to) if device_to is not None else torch.device(self.load_device)
        # a new list: the class default is shared
        setattr(m, attr, fns + [GGUFPatch(key, self.patches, opt.get("patch_dtype"), dev)])
        reg = self.model.__dict__.setdefault("_distorch_gguf_patched", [])
        reg.append((m, attr))
        return None

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for m, attr in self.model.__dict__.pop("_distorch_gguf_patched", []):
                kept = [f for f in getattr(m, attr, []) if not isinstance(f, GGUFPatch)]
                setattr(m, attr, kept)
        return base.unpatch_model(self, device_to, unpatch_weights)

    cls = type(f"GGUF{base.__name__}", (base,), {"patch_weight_to_device": patch_weight_to_device,
                                                 "unpatch_model": unpatch_model, "__module__": __name__})
    _PATCHER_CLASSES[base] = cls
    return cls


def _gguf_load_unet(path, dequant_dtype=None, patch_dtype=None, patch_on_device=None):
    """A .gguf diffusion model -> ComfyUI ModelPatcher, through comfy.sd.load_diffusion_model_state_dict."""
    import comfy.sd
    from ..runtime.gguf_loader import load_gguf
    ops = gguf_operations(dequant_dtype)
    _dtype_option(patch_dtype, "patch_dtype")
    sd, meta = load_gguf(path)
    n_q = sum(1 for v in sd.values() if _is_gguf(v))
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ops})
    if model is None:
        raise GGUFLoadError(f"{path}: ComfyUI could not detect the model type from its {len(sd)} tensors "
                            f"(GGUF architecture {meta.get('architecture')!r}); is it a diffusion model "
                            f"converted for ComfyUI?")
    pt = _dtype_option(patch_dtype, "patch_dtype")
    if pt is not None:
        model.model_options.setdefault("distorch_gguf", {})["patch_dtype"] = pt
    if patch_on_device:
        model.model_options.setdefault("distorch_gguf", {})["patch_on_device"] = True
    model.__class__ = gguf_patcher_class(type(model))
    log.info("DisTorch: %s loaded natively (%d quantized tensors: %s; %.2f GiB stored)", path, n_q,
             ", ".join(f"{k} {v}" for k, v in sorted(meta["qtypes"].items())), meta["stored_bytes"] / 2**30)
    return model


def _gguf_load_clip(paths, clip_type="stable_diffusion", dequant_dtype=None):
    """Text encoder(s) from .gguf (original key names) and/or .safetensors files -> ComfyUI CLIP."""
    import comfy.sd
    import comfy.utils
    import folder_paths
    from ..runtime.gguf_loader import load_gguf
    from ..runtime.gguf_names import GGUFNameError, is_llama_cpp_named, to_original_names
    ops = gguf_operations(dequant_dtype)
    ct = getattr(comfy.sd.CLIPType, str(clip_type).upper(), None)
    if ct is None:
        raise GGUFLoadError(f"clip type {clip_type!r} is not one of ComfyUI's "
                            f"({', '.join(t.name.lower() for t in comfy.sd.CLIPType)})")
    sds = []
    for p in paths:
        if str(p).lower().endswith(".gguf"):
            sd, meta = load_gguf(p, prefix=None)
            if is_llama_cpp_named(sd):
                try:
                    sd, info = to_original_names(sd, meta, drop_lm_head=True)
                except GGUFNameError as e:
                    raise GGUFLoadError(f"{p}: {e}") from None
                log.info("DisTorch: %s: %d tensors renamed from llama.cpp names (%s)%s", p, info["mapped"],
                         info["architecture"], f", {len(info['dropped'])} unused dropped" if info["dropped"] else "")
        else:
            sd = comfy.utils.load_torch_file(p, safe_load=True)
        sds.append(sd)
    clip = comfy.sd.load_text_encoder_state_dicts(sds, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                                  clip_type=ct, model_options={"custom_operations": ops})
    return clip
