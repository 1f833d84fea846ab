"""The DisTorch ModelPatcher: ComfyUI's memory manager loads and unloads a compiled model through it.

How it cooperates with ComfyUI (classic path)
---------------------------------------------
The patcher's class is swapped in place for `DisTorch<OriginalClass>` (`mixed_class`), a subclass made
by mixing `DisTorchPatcherMixin` over the original class (so ComfyUI-GGUF's or any other ModelPatcher
subclass keeps its own methods). ComfyUI's clone() uses `self.__class__`, so LoRA loaders and every
other node that clones the model keep the DisTorch behaviour. The mixin overrides the ModelPatcher
methods that ComfyUI's memory manager (model_management.load_models_gpu / free_memory / LoadedModel)
calls:

* load()            `distorch.compile` binds the module with the Plan (resident units move to the compute
                    device, offloaded units into their homes), then the weight patches (LoRA ...) are
                    applied: streamed weights in their homes (stream_patches: patch math on the compute
                    device, no host backup -- the unpatched bytes are re-read from the model file),
                    resident ones on the compute device from their uploaded bytes, backed up by the host
                    tensor they held before compile moved them (no copy: ComfyUI's inplace_update=False
                    backup, put back as the parameter by unpatch_model); quantized / custom-stored
                    weights are patched before compile, as before.  Results are bit-identical to the
                    plain path.  Reports
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

LoRA precision (`high_precision_loras`)
--------------------------------------
`set_lora_precision(obj, high)` (the checkpoint loader's input) stores the choice in the patcher's
model_options (LORA_FLOAT32; clone() copies it, so LoRA loaders downstream keep it).  `lora_dtype`
(resident_patches.py, with `patched_weight`, the patch math every path here shares) is
the one rule: high precision (the default) computes every weight patch in float32 -- resident weights
patched at load, streamed ones (patched in place before they are homed, and re-patched from the kept
originals on a strength change), GGUF weights (their per-call GGUFPatch) -- then rounds once into the
weight's dtype; low precision computes in the weight's own dtype where that is float16 / bfloat16
(faster, one rounding per step of the LoRA math), float32 otherwise.

`outer_sample_wrapper`, a WrappersMP.OUTER_SAMPLE wrapper (patcher.add_wrapper_with_key, copied by
clone()), logs the measured step time beside the Plan's prediction after each sampling run.

Dynamic VRAM path (ComfyUI 2026, ModelPatcherDynamic + comfy-aimdo)
-------------------------------------------------------------------
A ModelPatcherDynamic pages weights itself through aimdo's virtual address ranges, which would fight
our placement. `classic_copy` builds a classic-based DisTorch patcher for the same model (copying
patches, object patches, model options, callbacks, wrappers, attachments); load_models_gpu then treats
it like any classic model. CI can only run 0.3.75.
"""
from __future__ import annotations

import copy
import logging
import threading
from typing import Any       # ComfyUI's objects (patchers, executors, CLIP) are typed Any: it ships no types

import torch

from ..errors import DisTorchError
from ..runtime.place import keep_host_originals
from .comfy_api import comfy, mp
from .devices import same_device
from . import stream_patches
from .gguf_ops import LORA_FLOAT32           # model_options key: high_precision_loras
from .resident_patches import Backup as _Backup, lora_dtype, patch_resident, patched_weight
from .state import State, model_state, target

log = logging.getLogger("distorch.comfy.patcher")

_lock = threading.RLock()
_MIXED: dict[type, type] = {}


def set_lora_precision(obj: Any, high: bool) -> None:
    """high_precision_loras: store the choice on a MODEL's or CLIP's patcher (model_options)."""
    p = getattr(obj, "patcher", obj)
    if getattr(p, "model_options", None) is not None:
        p.model_options[LORA_FLOAT32] = bool(high)


REST_MAX_BYTES = 64 << 20     # the parts of a BaseModel outside its diffusion model moved along up to this size


def rest_to_device(model: torch.nn.Module, device: torch.device | str | None) -> int:
    """What a BaseModel holds outside the diffusion model DisTorch compiled (model_sampling's sigma tables,
    small embedders) moved to the compute device, as ComfyUI's own full load moves the whole model: left on
    the host, a discrete schedule's timestep() reads its log-sigma table there every step, a device round
    trip that synchronizes the step.  Only up to REST_MAX_BYTES (more is not in the plan's VRAM budget).
    Returns the bytes moved."""
    inner = target(model)
    if inner is model or device is None:
        return 0
    rest = [c for c in model.children() if c is not inner]
    tensors = [t for c in rest for t in list(c.parameters()) + list(c.buffers())]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    if not tensors or nbytes > REST_MAX_BYTES:
        return 0
    for c in rest:
        c.to(device)
    return nbytes


def _plain(model: Any, key: str) -> bool:
    """Whether `key` is patched after compile (stream_patches.patchable: a plain tensor, not quantized)."""
    return stream_patches.patchable(model, key)


class DisTorchPatcherMixin:
    """Mixed over a ComfyUI ModelPatcher class; see the module docstring."""

    distorch = True

    # -- what ComfyUI's memory manager reads
    def model_size(self) -> int:
        st = model_state(self.model)
        if st is None:
            return super().model_size()
        return st.vram_bytes()

    def get_ram_usage(self) -> int:
        st = model_state(self.model)
        return st.total_bytes if st is not None else super().get_ram_usage()

    def distorch_state(self) -> State | None:
        return model_state(self.model)

    def get_key_patches(self, filter_prefix: str | None = None) -> dict[str, Any]:
        """ComfyUI's merge nodes read the weights here: streamed ones are read from their homes."""
        p = super().get_key_patches(filter_prefix)
        st = model_state(self.model)
        if st is None or st.handle is None:
            return p
        idx = st.stream_index()
        for k, v in p.items():
            if k in self.backup or not v:
                continue
            orig = stream_patches.original(self, k)      # patched in its home: the file has the original
            if orig is not None:
                p[k] = [(orig, v[0][1])] + list(v[1:])
                continue
            w, _, _ = mp.get_key_weight(self.model, k)
            home = idx.get(id(w))
            if home is not None:
                p[k] = [(home, v[0][1])] + list(v[1:])
        return p

    def patch_weight_to_device(self, key: str, device_to: torch.device | None = None,
                               inplace_update: bool = False) -> None:
        """ComfyUI's (float32 LoRA math) unless high_precision_loras is off for a plain fp16/bf16 weight."""
        if key in self.patches:
            w, set_func, convert_func = mp.get_key_weight(self.model, key)
            dt = lora_dtype(self.model_options, w.dtype)
            if dt != torch.float32 and set_func is None and convert_func is None \
                    and type(w) in (torch.Tensor, torch.nn.Parameter):
                inplace_update = self.weight_inplace_update or inplace_update
                if key not in self.backup:
                    self.backup[key] = _Backup(w.to(device=self.offload_device, copy=inplace_update), inplace_update)
                out = patched_weight(self, key, w, None, None, device_to if device_to is not None else w.device)
                if inplace_update:
                    comfy.utils.copy_to_param(self.model, key, out)
                else:
                    comfy.utils.set_attr_param(self.model, key, out)
                return None
        return super().patch_weight_to_device(key, device_to, inplace_update)

    # -- loading
    def load(self, device_to: torch.device | None = None, lowvram_model_memory: float = 0,
             force_patch_weights: bool = False, full_load: bool = False) -> None:
        st = model_state(self.model)
        if st is None:
            return super().load(device_to, lowvram_model_memory, force_patch_weights, full_load)
        with self.use_ejected():
            self.unpatch_hooks()
            if st.handle is not None and not same_device(st.device, device_to):
                self._distorch_release(self.offload_device)
            changed = self.model.current_weight_patches_uuid != self.patches_uuid or force_patch_weights
            if st.handle is not None and changed and self._distorch_coded_patched():
                # a unit streamed compressed got a weight patch: it cannot be patched in its packed home;
                # load again with that unit streaming raw
                self._distorch_release(self.offload_device)
            if st.handle is None:
                hit = self._distorch_coded_patched()
                if hit:
                    st.drop_codec(hit)
                # plain weights are patched after compile: the streamed ones in their homes (stream_patches,
                # no host backup), the resident ones on the compute device; others (quantized ...) before
                plain = {k for k in self.patches if _plain(self.model, k)}
                for key in sorted(set(self.patches) - plain):
                    self.patch_weight_to_device(key, device_to=device_to, inplace_update=True)
                weights = {k: mp.get_key_weight(self.model, k)[0] for k in plain if k not in self.backup}
                with keep_host_originals(weights.values()) as kept:     # resident ones: their unpatched host bytes
                    st.compile(target(self.model), device_to)
                rest_to_device(self.model, device_to)
                st.log_plan(type(self.model).__name__)
                done = stream_patches.apply_streamed(self, plain, device_to, st.stream_index(), lora_dtype) \
                    if plain else set()
                fast = 0
                for key in sorted(plain - done):
                    if patch_resident(self, key, device_to, weights.get(key), kept):
                        fast += 1
                        continue
                    if key in self.backup:      # released without unpatching: the unpatched bytes back first
                        comfy.utils.copy_to_param(self.model, key, self.backup[key].weight)
                    self.patch_weight_to_device(key, device_to=device_to, inplace_update=True)
                kept.clear()
                if plain - done:
                    log.info("DisTorch: %d resident weights patched on %s (%d backed up by their host tensors, no "
                             "copy)", len(plain - done), device_to, fast)
                if done:
                    st.invalidate_slots()
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

    def partially_load(self, device_to: torch.device, extra_memory: float = 0,
                       force_patch_weights: bool = False) -> int:
        st = model_state(self.model)
        if st is None or st.handle is None or not same_device(st.device, device_to):
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

    def partially_unload(self, device_to: torch.device, memory_to_free: float = 0,
                         force_patch_weights: bool = False) -> int:
        st = model_state(self.model)
        if st is None:
            return super().partially_unload(device_to, memory_to_free, force_patch_weights)
        return 0      # a compiled placement is freed whole (ComfyUI then detaches the model)

    def unpatch_model(self, device_to: torch.device | None = None, unpatch_weights: bool = True) -> None:
        st = model_state(self.model)
        if st is not None and unpatch_weights and st.handle is not None:
            self.eject_model()
            self._distorch_release(device_to if device_to is not None else self.offload_device)
        return super().unpatch_model(device_to, unpatch_weights)

    # -- helpers
    def _distorch_release(self, to_device):
        st = model_state(self.model)
        if st.handle is not None and stream_patches.sources(self.model):
            n = stream_patches.restore_streamed(self, st.stream_index())     # unpatched bytes from the file
            st.invalidate_slots()
            log.debug("DisTorch: %d streamed weights restored from the model file", n)
        st.undo(to_device, self._distorch_backups_on(to_device, st))
        if to_device is not None:
            self.model.to(to_device)
            self.model.device = to_device
        self.model.model_loaded_weight_memory = 0
        log.info("DisTorch: released %s (homes and slots freed, weights on %s)", type(self.model).__name__, to_device)

    def _distorch_backups_on(self, to_device, st) -> dict:
        """id(resident parameter) -> ComfyUI's backup of it (the unpatched weight, inplace_update False), for
        those already on `to_device`: undo binds them there instead of copying the patched bytes back, which
        unpatch_model replaces by the backup right after (and which, copied, would sit beside the backup:
        the LoRA'd resident weights twice in host RAM during the unload).  Streamed weights are not in it
        (their homes are restored above)."""
        if to_device is None or not self.backup:
            return {}
        dev = torch.device(to_device)
        streamed = st.stream_index()
        out = {}
        for key, bk in self.backup.items():
            if bk.inplace_update or type(bk.weight) not in (torch.Tensor, torch.nn.Parameter) or \
                    bk.weight.device != dev:
                continue
            try:
                w, set_func, _ = mp.get_key_weight(self.model, key)
            except Exception:
                continue
            if set_func is None and type(w) in (torch.Tensor, torch.nn.Parameter) and id(w) not in streamed:
                out[id(w)] = bk.weight
        return out

    def _distorch_repatchable(self) -> bool:
        """Whether every patched weight is a plain tensor we can rewrite in place (not a custom op's
        set_weight storage, not a quantized tensor subclass)."""
        if self._distorch_coded_patched():
            return False
        for key in set(self.patches) | set(self.backup):
            try:
                w, set_func, _ = mp.get_key_weight(self.model, key)
            except Exception:
                return False
            if set_func is not None or type(w) not in (torch.Tensor, torch.nn.Parameter):
                return False
        return True

    def _distorch_coded_patched(self) -> set:
        """The units of the plan that stream compressed (Plan.codec) and own a weight with a patch (LoRA):
        a packed home cannot be patched, so those units must stream raw."""
        st = model_state(self.model)
        plan = st.plan if st is not None else None
        if plan is None or not plan.codec or not self.patches:
            return set()
        module = target(self.model)
        owner = {}
        for n in plan.codec:
            try:
                sub = module.get_submodule(n)
            except AttributeError:
                continue
            for p in sub.parameters():
                owner[id(p)] = n
        hit = set()
        for key in self.patches:
            try:
                w = mp.get_key_weight(self.model, key)[0]
            except Exception:
                continue
            if id(w) in owner:
                hit.add(owner[id(w)])
        return hit

    def _distorch_repatch(self, device_to):
        """Write the current weight patches into the live storage, from the kept originals."""
        st = model_state(self.model)
        keys = set(self.patches) | set(self.backup) | set(stream_patches.sources(self.model))
        if not keys:
            return
        st.invalidate_slots()
        index = st.stream_index()
        handled = stream_patches.apply_streamed(self, keys, device_to, index, lora_dtype)   # streamed: in homes
        done = len(handled)
        with torch.no_grad():
            for key in sorted(keys - handled):
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
                    out = patched_weight(self, key, orig, None, convert_func, device_to)
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
        st.invalidate_slots()
        st.repatches += 1
        log.info("DisTorch: re-patched %d weights in place (no reload)", done)


def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """WrappersMP.OUTER_SAMPLE: after a sampling run, log the measured step time beside the Plan's prediction
    (from measured unit times once a profiled step ran, else estimated; comfy_nodes/state.step_report).
    Nothing runs between the run's steps: the statistics are read once, after it."""
    out = executor(*args, **kwargs)
    try:
        p = getattr(executor.class_obj, "model_patcher", None)
        st = model_state(getattr(p, "model", None))
        if st is not None and st.handle is not None:
            from .state import step_report     # the line's wording lives beside the placement table's
            d = st.handle.stats                # synchronizes once, after the last step of the run
            if d.get("measured_step_s"):
                st.last_stats = d
                log.info("%s", step_report(d))
    except Exception as e:   # statistics are a courtesy: never fail a finished sampling run over them
        log.debug("DisTorch: no step statistics (%s)", e)
    return out


def mixed_class(base: type) -> type:
    """`DisTorch<base>`: DisTorchPatcherMixin over the ModelPatcher class `base` (made once per base)."""
    with _lock:
        cls = _MIXED.get(base)
        if cls is None:
            if issubclass(base, DisTorchPatcherMixin):
                return base
            cls = type(f"DisTorch{base.__name__}", (DisTorchPatcherMixin, base), {"__module__": __name__})
            _MIXED[base] = cls
        return cls


def classic_copy(p: Any, cls: type) -> Any:
    """A classic-based DisTorch patcher for p's model (the Dynamic-VRAM path)."""
    n = cls(p.model, p.load_device, p.offload_device)
    for k in ("patches", "object_patches", "weight_wrapper_patches", "attachments", "additional_models",
              "callbacks", "wrappers", "injections", "hook_patches", "forced_hooks", "is_clip", "hook_mode",
              "force_cast_weights", "weight_inplace_update"):
        if hasattr(p, k):
            v = getattr(p, k)
            setattr(n, k, copy.copy(v) if isinstance(v, dict) else v)
    n.model_options = copy.deepcopy(p.model_options)
    n.patches_uuid = p.patches_uuid
    return n
