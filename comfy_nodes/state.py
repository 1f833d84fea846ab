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
               expert string, the predicted step and whether its unit times are estimates or
               measurements), logged once per model.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from ..errors import DisTorchError
from ..runtime import api as runtime_api
from ..runtime.stats import basis_text
from .comfy_api import mm
from .devices import same_device

if TYPE_CHECKING:
    from ..compiler.plan import Plan

log = logging.getLogger("distorch.comfy.state")
GiB = 1 << 30
_ATTR = "_distorch_state"   # key of the State in the torch model's __dict__


class Config:
    def __init__(self, compute: torch.device, vram_gb: float, donors: list[str], expert: str) -> None:
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

    def __init__(self, cfg: Config, total_bytes: int) -> None:
        self.cfg = cfg
        self.total_bytes = int(total_bytes)
        self.plan: Plan | None = None                  # the Plan; made once, reused by every later compile
        self.handle: runtime_api.Handle | None = None  # the live distorch Handle while loaded
        self.device: torch.device | None = None        # device it is compiled for
        self.index: dict | None = None                 # id(param) -> its tensor in its home, for streamed params
        self.logged = False
        self.compiles = 0
        self.releases = 0
        self.repatches = 0
        self.last_stats: dict | None = None   # runtime statistics of the latest sampling run (OUTER_SAMPLE wrapper)
        self.sd_hook: Any = None              # state_dict hook that reports streamed weights from their homes

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

    def drop_codec(self, units: set) -> None:
        """These units of the plan stream raw instead of compressed (their weights carry patches)."""
        plan = self.plan
        keep = {n: b for n, b in plan.codec.items() if n not in units}
        pr = dict(plan.predicted or {})
        note = f"{len(units)} unit(s) carry weight patches (LoRA) and stream raw instead of compressed"
        pr["warnings"] = list(pr.get("warnings", ())) + [note]
        self.plan = dataclasses.replace(plan, codec=keep, predicted=pr)
        log.info("DisTorch: %s", note)

    def log_plan(self, what: str) -> None:
        """Log the allocation table, once per model."""
        if self.plan is not None and not self.logged:
            self.logged = True
            log.info("%s", allocation_table(self.plan, what))

    def compile(self, module: torch.nn.Module, device: str | torch.device) -> runtime_api.Handle:
        """Bind `module` for `device` with the Plan (made now when there is none for that device)."""
        kw: dict[str, Any] = {"compute": "cpu" if torch.device(device).type == "cpu" else str(device), "progress": True}
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
        rt = h.runtime
        if rt is not None and not rt.be.cuda:
            # CUDA compute measures a step anyway (window autotune); on the host, measure one for the
            # prediction alone (host timestamps: no device to synchronize), so that the log after
            # sampling compares the step with a prediction from measured unit times
            rt.autotune.measure_next()
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

    def undo(self, to_device: str | torch.device | None, host: dict | None = None) -> None:
        """Free homes and slots; the weights end on `to_device` (resident ones in `host`, id -> tensor there,
        bound to that tensor: Handle.undo)."""
        h = self.handle
        self.handle, self.index, self.device = None, None, None
        if self.sd_hook is not None:
            self.sd_hook.remove()
            self.sd_hook = None
        if h is None:
            return
        # straight to the offload device: a GPU that cannot hold the model must not receive it on the way out
        h.undo(device=to_device, host=host)
        self.releases += 1

    def stream_index(self) -> dict:
        """id(param) -> its tensor in its home, for the streamed params of the live runtime."""
        if self.index is None:
            rt = getattr(self.handle, "runtime", None)
            self.index = dict(rt.home_views()) if rt is not None else {}
        return self.index

    def invalidate_slots(self) -> None:
        """Homes are about to be / were written: wait for copies in flight, then make the runtime copy
        every unit again before its next use (slots may hold the old bytes)."""
        rt = getattr(self.handle, "runtime", None)
        if rt is not None:
            rt.invalidate()


def model_state(model: torch.nn.Module | None) -> State | None:
    """The State of a torch model (patcher.model), or None."""
    return model.__dict__.get(_ATTR) if model is not None else None


def new_state(model: torch.nn.Module, cfg: Config) -> State:
    """A fresh State for `model` (replacing any earlier one)."""
    st = State(cfg, mm.module_size(model))
    model.__dict__[_ATTR] = st
    return st


def target(model: torch.nn.Module) -> torch.nn.Module:
    """The torch module DisTorch compiles: the diffusion model of a BaseModel, else the model itself."""
    dm = getattr(model, "diffusion_model", None)
    return dm if isinstance(dm, torch.nn.Module) else model


def make_plan(module: torch.nn.Module, cfg: Config) -> Plan:
    """Trace + partition without moving a byte (errors in the inputs surface at the loader node)."""
    comp = runtime_api.norm_compute(str(cfg.compute))
    if cfg.expert:
        return runtime_api.plan_model(module, comp, expert=cfg.expert, donors=cfg.donors)[1]
    # trace -> partition -> granularity (whole blocks or the layers inside them), as compile() does;
    # DISTORCH_GRANULARITY=block|sub fixes the choice (troubleshooting), default auto
    gran = os.environ.get("DISTORCH_GRANULARITY", "auto").strip().lower() or "auto"
    if gran not in ("auto", "block", "sub"):
        raise DisTorchError(f"DISTORCH_GRANULARITY={os.environ['DISTORCH_GRANULARITY']!r}: give auto (the default), "
                            f"block (whole blocks stream) or sub (the layers inside them stream), or unset it")
    plan = runtime_api.plan_model(module, comp, offload_gb=cfg.vram_gb, donors=cfg.donors, clamp_offload=True,
                                  granularity=gran, compress=compress_mode())[1]
    for w in (plan.predicted or {}).get("warnings", ()):
        log.warning("DisTorch: %s", w)
    return plan


COMPRESS_ENV = "DISTORCH_COMPRESS"


def compress_mode() -> str:
    """$DISTORCH_COMPRESS: auto (default: the planner streams a unit compressed where that makes the step
    faster, passes/codec_choice.py), on (every offloaded bf16/fp16 unit), off."""
    raw = os.environ.get(COMPRESS_ENV, "auto").strip().lower() or "auto"
    if raw not in ("auto", "on", "off"):
        raise DisTorchError(f"{COMPRESS_ENV}={os.environ[COMPRESS_ENV]!r}: give auto (the default), on (stream every "
                            "offloaded bf16/fp16 weight losslessly compressed) or off, or unset it")
    return raw


def allocation_table(plan: Plan, title: str = "") -> str:
    """The table users know: per device memory, the share of the model (GiB = 2^30 bytes, %), layer types
    and counts, the v2 expert string, the predicted step (streaming overhead on a GPU; compute + slot copies
    on the host) and its basis.  Device names are never cut."""
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
        if str(plan.compute).startswith("cpu"):
            # the host computes: its compute is not overhead; what streaming adds are the slot copies
            extra = f": compute on {plan.compute} {comp * 1e3:.1f} ms" if comp else ""
            extra += f" + slot copies {over * 1e3:.1f} ms" if (over is not None and comp) else ""
        else:
            extra = f" (all resident {comp * 1e3 if comp else 0:.1f} ms)"
            extra += f", streaming overhead {over * 1e3:.1f} ms ({100.0 * over / comp:.0f}% of compute)" if (
                over is not None and comp) else ""
        lines.append(f"predicted step {step * 1e3:.1f} ms{extra} [{basis_text(pr.get('basis'))}]")
    gran = pr.get("granularity")
    if gran:
        lines.append(granularity_line(gran, pr))
    line = codec_line(pr.get("codec"))
    if line:
        lines.append(line)
    lines.append(f"v2 Expert String: {plan.expert_string}")
    lines.append("=" * 78)
    return "\n".join(lines)


def granularity_line(gran: dict, pr: dict) -> str:
    """What streams: whole blocks or the layers inside them, with both predicted steps (passes/granularity.py)."""
    b, sub = gran.get("block_step_s"), gran.get("sub_step_s")
    what = "layers inside blocks" if gran.get("chosen") == "sub" else "whole blocks"
    slots = f"{pr.get('slots', 0)} slots x {pr.get('slot_bytes', 0) / 2**20:.0f} MiB"
    alt = ""
    if b and sub:
        alt = f" (predicted: whole blocks {b * 1e3:.1f} ms, layers {sub * 1e3:.1f} ms)"
    return f"streams {what} through {slots}{alt}"


def codec_line(c: dict | None) -> str:
    """What streams losslessly compressed (passes/codec_choice.py), or "" when nothing does."""
    if not c or not c.get("units"):
        return ""
    raw, stored = c.get("raw_bytes", 0), c.get("stored_bytes", 0)
    return (f"compressed ({c.get('mode')}): {len(c['units'])} units stream {raw / GiB:.2f} GiB as {stored / GiB:.2f} GiB "
            f"(x{stored / max(1, raw):.2f}, decoded on the compute device: {c.get('decode_s_per_step', 0) * 1e3:.1f} ms "
            f"per step; all raw: {c.get('step_s_raw', 0) * 1e3:.1f} ms)")


def step_report(d: dict) -> str:
    """The log line after a sampling run, from Handle.stats `d`: the measured step, the predicted one with
    its basis ("from measured unit times" once a profiled step replaced the estimates, else "estimated"),
    their ratio, then what the step is made of: on a GPU the streaming overhead over the all-resident
    compute; on the host the host's own compute (not overhead) and the slot copies.  The prediction is the
    one for the input signature of the run's last forward (runtime/autotune.py measures each input size
    once and re-applies it); when the window autotune chose the slots for it, that input is named."""
    meas, pred, comp = d.get("measured_step_s"), d.get("predicted_step_s"), d.get("predicted_compute_s")
    basis = d.get("predicted_basis")
    msg = f"DisTorch: measured step {meas * 1e3:.1f} ms" if meas else "DisTorch: no measured step"
    if pred:
        msg += f", predicted {pred * 1e3:.1f} ms {basis_text(basis)}"
        sig = (d.get("autotune") or {}).get("signature") if basis == "measured" else None
        if sig:
            msg += f" for input {sig}"
        if meas:
            msg += f" (measured/predicted x{meas / pred:.2f})"
        est = d.get("estimated_step_s")
        if basis == "measured" and est:
            msg += f", estimated before measuring {est * 1e3:.1f} ms"
    if comp:
        how = "measured" if basis == "measured" else "predicted"
        if str(d.get("compute", "")).startswith("cpu"):
            msg += f"; compute on the host ({d.get('compute')}) {comp * 1e3:.1f} ms ({how})"
            if pred:
                msg += f", slot copies {max(0.0, pred - comp) * 1e3:.1f} ms (predicted)"
        else:
            msg += f"; streaming overhead over the all-resident compute ({comp * 1e3:.1f} ms, {how}):"
            if meas:
                msg += f" measured {(meas - comp) * 1e3:+.1f} ms"
            if pred:
                msg += f"{',' if meas else ''} predicted {(pred - comp) * 1e3:+.1f} ms"
    gap = d.get("measured_gap_s")
    if gap:
        msg += f"; {gap * 1e3:.1f} ms between forwards (the sampler's own work, measured once)"
    return msg + f" ({d.get('streamed_units', 0)} streamed units, {d.get('window_slots', 0)} slots)"
