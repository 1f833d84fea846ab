"""The DisTorch state of one ComfyUI model, shared by every clone of its patcher.

The state lives on the underlying torch model (`patcher.model.__dict__`), exactly like ComfyUI's own
`model_loaded_weight_memory`, so LoRA loaders and every other node that clones the patcher see the
same Plan and the same live runtime.

Config         what the node asked for: compute device, virtual VRAM GB, donors, or an expert string.
State          the Plan (made once by `make_plan`, reused by every later compile), the live Handle
               while loaded, the device it is compiled for, counters, and the operations on them:
               compile / undo / stream_index / invalidate_slots / vram_bytes / log_plan.
allocation_table(plan)
               the table users know (per device memory, share of the model, layer types, the v2
               expert string, the predicted step overhead), logged once per model.
"""
from __future__ import annotations

import logging

import torch

from ..compiler.trace import trace
from ..passes.partition import partition
from ..runtime import api as runtime_api
from .comfy_api import mm
from .devices import same_device

log = logging.getLogger("distorch.comfy.state")
GiB = 1 << 30
_ATTR = "_distorch_state"   # key of the State in the torch model's __dict__


class Config:
    def __init__(self, compute: torch.device, vram_gb: float, donors: list[str], expert: str):
        self.compute = compute
        self.vram_gb = vram_gb
        self.donors = donors
        self.expert = expert

    def __repr__(self):
        if self.expert:
            return f"compute={self.compute} expert={self.expert!r}"
        return f"compute={self.compute} virtual_vram_gb={self.vram_gb} donors={','.join(self.donors)}"


class State:
    """DisTorch state of one torch model (patcher.model); every clone of its patcher sees the same one."""

    def __init__(self, cfg: Config, total_bytes: int):
        self.cfg = cfg
        self.total_bytes = int(total_bytes)
        self.plan = None          # the Plan; made once, reused by every later compile
        self.handle = None        # the live distorch Handle while loaded
        self.device = None        # device it is compiled for
        self.index = None         # id(param) -> its tensor in its home, for streamed params
        self.logged = False
        self.compiles = 0
        self.releases = 0
        self.repatches = 0
        self.last_stats = None    # runtime statistics of the latest sampling run (OUTER_SAMPLE wrapper)
        self.sd_hook = None       # state_dict hook that reports streamed weights from their homes

    def vram_bytes(self) -> int:
        """Bytes the compiled model holds on its compute device."""
        h = self.handle
        rt = getattr(h, "runtime", None) if h is not None else None
        if rt is not None and hasattr(rt, "resident_bytes"):
            return int(rt.resident_bytes + getattr(rt, "W", 0) * getattr(rt, "slot_bytes", 0))
        p = self.plan
        if p is not None:
            peak = (p.predicted or {}).get("compute_peak_bytes")
            if peak is not None:
                return int(peak)
            dev = p.devices.get(p.compute, {})
            return int(dev.get("bytes", p.model_bytes - p.offloaded_bytes()) + (p.window_bytes or 0))
        if self.cfg.expert:
            return self.total_bytes
        return max(0, self.total_bytes - int(self.cfg.vram_gb * GiB))

    def log_plan(self, what: str):
        """Log the allocation table, once per model."""
        if self.plan is not None and not self.logged:
            self.logged = True
            log.info("%s", allocation_table(self.plan, what))

    def compile(self, module, device):
        """Bind `module` for `device` with the Plan (made now when there is none for that device)."""
        kw = {"compute": "cpu" if torch.device(device).type == "cpu" else str(device), "progress": True}
        if self.plan is not None and same_device(self.plan.compute, device):
            kw["plan"] = self.plan
        elif self.cfg.expert:
            kw["expert"] = self.cfg.expert
        else:   # virtual_vram_gb is the library's offload_gb; more than the model can spare streams it all
            kw["offload_gb"] = self.cfg.vram_gb
            kw["donors"] = list(self.cfg.donors)
            kw["clamp_offload"] = True
        h = runtime_api.compile(module, **kw)
        self.handle, self.plan, self.device, self.index = h, h.plan, torch.device(device), None
        self.compiles += 1
        # Streamed parameters point at whichever slot they ran from last; anything that READS the weights
        # (state_dict for saving / merging, get_key_patches) must see their homes instead.
        idx = self.stream_index()
        names = {n: idx[id(p)] for n, p in module.named_parameters(remove_duplicate=False) if id(p) in idx}

        def homes_in_state_dict(mod, state_dict, prefix, local_metadata):
            for n, home in names.items():
                if prefix + n in state_dict:
                    state_dict[prefix + n] = home
            return None

        reg = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook
        self.sd_hook = reg(homes_in_state_dict) if names else None
        return h

    def undo(self, to_device):
        """Free homes and slots; the weights end on `to_device`."""
        h = self.handle
        self.handle, self.index, self.device = None, None, None
        if self.sd_hook is not None:
            self.sd_hook.remove()
            self.sd_hook = None
        if h is None:
            return
        # straight to the offload device: a GPU that cannot hold the model must not receive it on the way out
        h.undo(device=to_device)
        self.releases += 1

    def stream_index(self) -> dict:
        """id(param) -> its tensor in its home, for the streamed params of the live runtime."""
        if self.index is None:
            rt = getattr(self.handle, "runtime", None)
            self.index = dict(rt.home_views()) if rt is not None else {}
        return self.index

    def invalidate_slots(self):
        """Homes are about to be / were written: wait for copies in flight, then make the runtime copy
        every unit again before its next use (slots may hold the old bytes)."""
        rt = getattr(self.handle, "runtime", None)
        if rt is not None:
            rt.invalidate()


def model_state(model) -> State | None:
    """The State of a torch model (patcher.model), or None."""
    return model.__dict__.get(_ATTR) if model is not None else None


def new_state(model, cfg: Config) -> State:
    """A fresh State for `model` (replacing any earlier one)."""
    st = State(cfg, mm.module_size(model))
    model.__dict__[_ATTR] = st
    return st


def target(model):
    """The torch module DisTorch compiles: the diffusion model of a BaseModel, else the model itself."""
    dm = getattr(model, "diffusion_model", None)
    return dm if isinstance(dm, torch.nn.Module) else model


def make_plan(module, cfg: Config):
    """Trace + partition without moving a byte (errors in the inputs surface at the loader node)."""
    comp = runtime_api.norm_compute(str(cfg.compute))
    graph = trace(module)
    inv = runtime_api.inventory_for(comp, cfg.donors)
    if cfg.expert:
        return partition(graph, inv, comp, expert=cfg.expert)
    plan = partition(graph, inv, comp, offload_gb=cfg.vram_gb, donors=cfg.donors, clamp=True)
    for w in (plan.predicted or {}).get("warnings", ()):
        log.warning("DisTorch: %s", w)
    return plan


def allocation_table(plan, title: str = "") -> str:
    """The table users know: per device memory, the share of the model (GiB = 2^30 bytes, %), layer types
    and counts, the v2 expert string, the predicted step overhead.  Device names are never cut."""
    tot = plan.model_bytes or 1
    lines = ["=" * 78, f"DisTorch2 allocation{(' - ' + title) if title else ''}", "=" * 78,
             f"{'device':<10}{'memory GiB':>11}{'model GiB':>11}{'% model':>9}  layers (by type)", "-" * 78]
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
    lines.append(f"model {tot / GiB:.3f} GiB, {len(plan.units)} units, {plan.offloaded_bytes() / GiB:.3f} GiB "
                 f"streamed to {plan.compute} through a {plan.window_bytes / GiB:.3f} GiB window")
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
