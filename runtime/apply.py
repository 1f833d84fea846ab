"""Execute a Plan: rewrite a module in place so offloaded units stream through a slot ring.

    rt = apply(module, plan, graph=None, *, window_units=None, profile=False)
    ... module(*args) as usual ...
    rt.undo()

What it does
------------
* Every tensor is classified once. A parameter reached only from inside ONE offloaded unit is
  *streamed*: it moves into the unit's home (one flat pinned host buffer per unit, or a donor GPU
  buffer) and its original storage is released. Everything else stays resident on the compute
  device: units placed there, ROOT (weights a parent uses directly), parameters shared between
  units or between a unit and its parent (tied weights), and all buffers (a forward may write to
  a buffer; a streamed copy would lose the write).
* The compute device holds W slots (flat buffers as large as the largest streamed unit). The
  streamed units form a periodic sequence `seq` (their call order in one forward, learned from
  the calls themselves), packed into ring *items*: consecutive units that fit one slot together,
  come from one home device, run back to back (no resident unit between them in the plan's order)
  and sit back to back in their home travel as one copy into one slot
  (compiler.cost.stream_groups, which the cost model simulates too; a unit called twice per
  forward travels alone). Item o of the infinite item sequence runs from slot o % W. Before an
  item's first unit runs, the compute stream waits for the event `copied[slot]`; after each unit
  the event `done[slot]` is recorded, and after the item's last unit the copy of item o+W is
  issued into the same slot on its link's copy stream (which first waits `done[slot]`). Items past
  the end of the step are the next step's first items, so the ring wraps across the step
  boundary. No synchronize on the hot path; per unit the host does at most one event wait, one
  `param.data = view` per tensor (views precomputed for every (unit, slot) pair), one event
  record, and per item one copy.
* A streamed GGUF unit is dequantized right after its slot's copy event by one kernel launch per
  run of same-type tensors into a scratch buffer (runtime.gguf_stream.UnitDequant; CUDA default),
  instead of one launch per layer.
* Units called outside any forward of the module (a wrapper calling inner modules itself, as
  ComfyUI's CLIP encode and VAE decode do) are loaded on demand while the runtime records their
  order; when the first recorded unit is called again, the calls since are the period: it becomes
  `seq`, the ring is primed and those calls stream like a forward ("free run") until the order
  changes (learned again) or the module's own forward runs.
* Deviations (a unit skipped, called twice, called out of order, called outside the model's
  forward) never deadlock: the first unexpected call switches the rest of that forward to
  *fallback* loads (copy into the next slot, wait, run -- still ordered by events, just not
  prefetched), the order actually seen is adopted as the new `seq`, and the ring is primed again
  at the next forward.
* Window autotune (default on CUDA when the plan's unit times are estimates): the step after the
  warm-up runs profiled (events around every unit and copy); from those measured times and link
  rates compiler.cost.simulate re-evaluates the slot count, and the ring grows between steps when
  more slots shorten the step by more than 1 % (within the plan's window limit and the device's free
  memory less 2 GiB); the measured time between steps is added to predictions (no copy is issued
  while the host is away, so slots cannot buy it back). `tune_result` records what was measured.
* Without CUDA the streams/events are host objects (runtime.stream), so the very same code runs
  synchronously: homes, slots, ring, fallback, statistics, timeline.

Rebinding: `param.data = view` keeps every Parameter object (tied weights, optimizer or LoRA code
holding references stay valid) and costs ~0.3-0.5 us per tensor on CPU; swapping entries of
`module._parameters` is ~0.07 us but breaks identity, so it was not chosen. Measured host cost per
streamed unit with 20 tensors (hooks + rebinding + copy issue, CPU): ~10 us; for Flux-dev (57 units,
~20 tensors each) that is well under 1 ms per step, against 64-180 ms of GPU time.

Why hooks: forward pre/post hooks are removable handles that leave the module's class and
`forward` untouched (other tools, e.g. ComfyUI, patch `forward` or wrap modules themselves), and
they fire for whatever calls the unit. Only offloaded units and the root get hooks (a module with
no hooks keeps torch's fast call path), and each hook is a few attribute reads and calls.

Limits: inference only (a backward through streamed weights raises torch's in-place
modification error instead of using overwritten slots); nested units are refused; parameters
read between calls (state_dict during streaming) see whichever slot they were last bound to --
call `undo()` first, or read the homes (`home_views()`). On CUDA, dense streamed parameters are
bound to a slot from the start, so that they report the compute device before their first call.
"""
from __future__ import annotations

import time
import weakref
from typing import Any

import torch

from ..compiler.graph import ROOT, owner_lookup
from ..compiler.plan import Plan
from ..errors import DisTorchError
from .store import Home, HostArena, Layout, SlotPool, Progress, align_up, is_host, parse_device
from . import gguf_stream as _gs
from .stream import Backend

MAX_SLOTS = 8
TUNE_RESERVE_BYTES = 2 << 30     # autotune leaves this much of the device free (activations)


class Runtime:
    def __init__(self, module: torch.nn.Module, plan: Plan, graph=None, *, window_units: int | None = None,
                 profile: bool = False, homes: dict | None = None, progress: bool = True,
                 unit_dequant: bool | None = None, autotune: bool | None = None):
        if not isinstance(module, torch.nn.Module):
            raise DisTorchError(f"apply() needs a torch.nn.Module, got {type(module).__name__}")
        if getattr(module, "_distorch_runtime", None) is not None:
            raise DisTorchError("this module is already compiled by DisTorch; call handle.undo() first")
        self.plan = plan
        self.graph = graph
        self.be = be = Backend(plan.compute)
        self.device = be.device
        self.profile = bool(profile)
        self._module_ref = weakref.ref(module)

        # GGUF units the plan dequantizes once (plan.quant, runtime.gguf_stream); restored by undo()
        self.dequantized = _gs.dequantize_units(module, plan, plan.compute)
        c = classify(module, plan)
        unit_mods, home_of, offloaded, streamed = c.unit_mods, c.home_of, c.offloaded, c.streamed
        resident, buffers = c.resident, c.buffers
        self.shared_resident = c.shared
        self.root_note = c.root_note

        # ---- homes (one flat buffer per streamed unit)
        self.units = [n for n in offloaded if streamed[n]]
        self.homes: dict[str, Home] = {}
        pin_host = be.cuda
        total = sum(sum(_gs.stored_bytes(p) for _, p in streamed[n]) for n in self.units)
        prog = Progress(total if progress else 0, "distorch: weights -> homes")
        homes = homes or {}
        todo = {}
        for n in self.units:
            h = homes.get(n)
            tensors = streamed[n]
            if h is not None and len(h.layout.entries) == len(tensors) and all(
                    p.data_ptr() == v.data_ptr() for (_, p), v in zip(tensors, h.views())):
                self.homes[n] = h          # loaded straight into its home (runtime.loading)
            else:
                todo[n] = Layout.of(tensors)
        # one exact-size host arena per host home (pinned with one registration when CUDA copies from it)
        self.arenas: dict[str, HostArena] = {}
        for hd in sorted({home_of[n] for n in todo if is_host(home_of[n])}):
            need = sum(align_up(max(todo[n].nbytes, 1)) for n in todo if home_of[n] == hd)
            self.arenas[hd] = HostArena(need, pin=pin_host)
        for n in self.units:
            if n in self.homes:
                prog.update(self.homes[n].nbytes)
                continue
            tensors = streamed[n]
            lay = todo[n]
            h = Home.allocate(n, home_of[n], lay, pin=False, arena=self.arenas.get(home_of[n]))
            with torch.no_grad():
                for (q, p), v in zip(tensors, h.views()):
                    if p.is_meta:
                        raise DisTorchError(f"parameter {q!r} is on the meta device (no data); load weights "
                                            "with distorch.runtime.loading.load_into(module, path, plan) first")
                    if _gs.is_gguf(p):     # quantized: the home holds the stored blocks
                        v.copy_(p.raw)
                        _gs.set_raw(p, v)
                        continue
                    v.copy_(p.data)
                    p.data = v             # the original storage is released here
            self.homes[n] = h
            prog.update(h.nbytes)
        prog.close()
        dev = self.device
        with torch.no_grad():
            for p in resident:
                if p.is_meta:
                    raise DisTorchError("a resident parameter is on the meta device; load weights first")
                _gs.to_device(p, dev)
            for b in buffers.values():
                if b.device != dev and not b.is_meta:
                    b.data = b.data.to(dev)
        self.resident_bytes = sum(_gs.stored_bytes(p) for p in resident) + \
            sum(b.numel() * b.element_size() for b in buffers.values())

        # ---- slot pool and precomputed views
        n_units = len(self.units)
        self.index_set = set(self.units)
        self.slot_bytes = max((self.homes[n].nbytes for n in self.units), default=0)
        if window_units is None:
            # the planner sizes the window as n_slots x largest offloaded unit (compiler.cost.n_slots_for);
            # read it back the same way (slots carry a little alignment padding on top)
            big = self._largest_streamed()
            if plan.window_bytes and big:
                window_units = max(1, int(plan.window_bytes // big))
            else:
                window_units = 2
        if window_units is not None and int(window_units) < 1 and n_units:
            raise DisTorchError(f"window_units={window_units!r}: need at least 1 slot to stream {n_units} unit(s)")
        # never more slots than ring items (consecutive small units share one: compiler.cost.stream_groups,
        # as the cost model counts them)
        from ..compiler.cost import item_keys, stream_groups
        pos = {u.name: k for k, u in enumerate(sorted(plan.units, key=lambda u: u.order))}
        self.plan_pos = [pos[n] for n in self.units]
        n_items = len(stream_groups([self.homes[n].nbytes for n in self.units], self.slot_bytes,
                                    item_keys([home_of[n] for n in self.units], self.plan_pos)))
        self.W = W = max(1, min(int(window_units), MAX_SLOTS, max(n_items, 1))) if n_units else 0
        self.pool = SlotPool(dev, W, self.slot_bytes) if n_units else None
        # params per unit (a GGUF parameter as its RawBinder: `.data = view` rebinds its blocks)
        self.P = [[_gs.binder(p) for _, p in streamed[n]] for n in self.units]
        # streamed GGUF units: one dequantization launch per run of same-type tensors, into one scratch.
        # Default on for CUDA (saves ~40-80 us of host time per layer); off on a CPU, where the eager
        # dequantizer is faster layer by layer (cache-sized pieces) and there is no launch cost to save
        if unit_dequant is None:
            unit_dequant = be.cuda
        self.UD = [_gs.unit_dequant(self.P[i], self.homes[n].layout.entries) if unit_dequant else None
                   for i, n in enumerate(self.units)]
        self.dq_scratch_bytes = max((ud.nbytes for ud in self.UD if ud is not None), default=0)
        self.dq_scratch = None
        if self.dq_scratch_bytes:
            from .store import alloc_flat
            self.dq_scratch = alloc_flat(self.dq_scratch_bytes, dev, pin=False)
        self.V0, self.dst = [], []
        if n_units:
            self._slot_views()
        self.V = self.V0               # set per ring item by _group
        self.src = [self.homes[n].src for n in self.units]
        self.nbytes = [self.homes[n].nbytes for n in self.units]
        self.home_dev = [home_of[n] for n in self.units]
        self.index = {n: i for i, n in enumerate(self.units)}
        links: dict[str, Any] = {}
        for n in self.units:
            hd = home_of[n]
            if hd not in links:
                links[hd] = be.link(hd)
        self.links = links
        self.link_of = [links[home_of[n]] for n in self.units]
        self.copied = [be.event() for _ in range(W)]
        self.done = [be.event() for _ in range(W)]
        self.content = [-1] * W    # ring item (group index) whose bytes a slot holds; -1: none / fallback

        # ---- ring state
        self.seq: list[int] = list(range(n_units))
        self.n = n_units
        self._group()
        self.g = 0
        self.g0 = 0
        self.primed = False
        self.depth = 0
        self.deviated = False
        self.recorded: list[int] = []
        self.cur_s = 0
        self.cur_mode = 0          # 0 idle, 1 streamed, 2 fallback
        self.fb = 0
        self.free_run = False      # streaming calls made outside the module's forward (see _free_learn)
        self.free_rec: list[int] = []
        self.cs = be.compute_stream()
        # statistics
        self.steps = 0
        self.deviations = 0
        self.fallback_loads = 0
        self.copies = 0
        self.bytes_moved: dict[str, int] = {k: 0 for k in links}   # over the whole life, issued copies
        self._step_ev = [(be.event(True), be.event(True)) for _ in range(16)]
        self._step_host: list[float] = []
        self._step_i = 0
        self.trace: list[tuple] = []          # profile: (lane, unit, ev0, ev1, step)
        self._t_host0 = 0.0
        self._unit_mods = unit_mods

        # ---- window autotune: one profiled step after the warm-up; more slots if the measured times say so
        basis = (plan.predicted or {}).get("basis")
        if autotune is None:
            autotune = be.cuda and basis != "measured"
        self._tune = 1 if (autotune and n_units) else 0      # 1 wait for warm-up, 2 measuring, 0 off / done
        self._tune_tries = 0
        self._tune_hooks: list = []
        self._tune_profile = False
        self.tune_result: dict | None = None
        self.window_max_bytes = (plan.predicted or {}).get("window_max_bytes")

        # ---- hooks
        self.hooks = []
        self.hooks.append(module.register_forward_pre_hook(self._root_pre))
        self.hooks.append(module.register_forward_hook(self._root_post, always_call=True))
        for i, n in enumerate(self.units):
            m = unit_mods[n]
            self.hooks.append(m.register_forward_pre_hook(self._make_pre(i)))
            self.hooks.append(m.register_forward_hook(self._make_post(i), always_call=True))
        if self.profile:
            self._add_prof_hooks(self.hooks)
        module._distorch_runtime = self
        if n_units:
            self._report_compute_device()
            self._prime()

    def _largest_streamed(self) -> int:
        """The plan's largest streamed unit (its slot unit: window_bytes = slots x this), else the slot size."""
        return max((u.bytes for u in self.plan.units if u.name in self.index_set), default=0) or self.slot_bytes

    def _slot_views(self):
        """Every unit's views at the start of every slot (fallback loads; `_group` derives the ring's
        views from the pool), the copy targets, and the dequant runs' bytes in each slot."""
        flats = self.pool.flats
        self.V0 = [self.pool.views(self.homes[n].layout) for n in self.units]
        self.dst = [[f[:self.homes[n].nbytes] for f in flats] for n in self.units]
        if self.dq_scratch is not None:
            for ud in self.UD:
                if ud is not None:
                    ud.bind(self.dq_scratch, flats)

    def _report_compute_device(self):
        """Streamed parameters report the compute device before their unit first runs: a GGUF one by its
        device tag; on CUDA a dense one is bound to a view of slot 0 (its real bytes come when its unit
        runs), since code may pick its inputs' device from a weight (ComfyUI's text encoders do)."""
        for i in range(len(self.units)):
            for b, v in zip(self.P[i], self.V0[i][0]):
                if b is not _gs.param_of(b):
                    _gs._retag_device(b.param, v)
                elif self.be.cuda:
                    b.data = v

    # ------------------------------------------------------------------ ring
    def _group(self):
        """Ring items from `seq`: consecutive units packed into one copy and one slot while they fit a
        slot (compiler.cost.stream_groups, which the cost model simulates too), come from the same home
        device and sit back to back in it; a unit called more than once per forward travels alone."""
        from collections import Counter
        from ..compiler.cost import item_keys, stream_groups
        seq = self.seq
        n = len(seq)
        self.gpos = [0] * n
        self.gfirst = [True] * n
        self.glast = [True] * n
        self.gitems: list[list[int]] = []
        if not n:
            self.ng = 0
            self.gsrc, self.gdst, self.gbytes, self.glink, self.gname = [], [], [], [], []
            return
        cnt = Counter(seq)
        cand = stream_groups([self.nbytes[i] for i in seq], self.slot_bytes,
                             item_keys([self.home_dev[i] for i in seq], [self.plan_pos[i] for i in seq]))
        items: list[list[int]] = []
        for grp in cand:
            cur = [grp[0]]
            for k in grp[1:]:
                a, b = seq[cur[-1]], seq[k]
                if cnt[a] == 1 and cnt[b] == 1 and self._adjacent(a, b) and \
                        self._span(seq[cur[0]], b) <= self.pool.slot_bytes:
                    cur.append(k)
                else:
                    items.append(cur)
                    cur = [k]
            items.append(cur)
        flats = self.pool.flats
        V = list(self.V0)
        self.gsrc, self.gdst, self.gbytes, self.glink, self.gname = [], [], [], [], []
        for q, ks in enumerate(items):
            first = seq[ks[0]]
            base = self.homes[self.units[first]].flat
            span = self._span(first, seq[ks[-1]])
            for k in ks:
                self.gpos[k] = q
                self.gfirst[k] = k == ks[0]
                self.glast[k] = k == ks[-1]
                i = seq[k]
                off = self.homes[self.units[i]].flat.data_ptr() - base.data_ptr()
                if len(ks) > 1:
                    V[i] = [[e.view(f[off:]) for e in self.homes[self.units[i]].layout.entries] for f in flats]
                ud = self.UD[i]
                if ud is not None:
                    ud.rebase(flats, off)
            self.gsrc.append(self.src[first] if len(ks) == 1 else
                             base.as_strided((span,), (1,), base.storage_offset()))
            self.gdst.append([f[:span] for f in flats])
            self.gbytes.append(span)
            self.glink.append(self.link_of[first])
            self.gname.append(self.units[first])
            self.gitems.append([seq[k] for k in ks])
        self.V = V
        self.ng = len(items)
        self._regroup = False

    def _adjacent(self, a: int, b: int) -> bool:
        """Unit b's home starts where unit a's ends (same buffer, the arena's 256-byte step)."""
        ha, hb = self.homes[self.units[a]].flat, self.homes[self.units[b]].flat
        if self.home_dev[a] != self.home_dev[b] or ha.device != hb.device:
            return False
        if ha.untyped_storage().data_ptr() != hb.untyped_storage().data_ptr():
            return False
        return hb.data_ptr() == ha.data_ptr() + align_up(max(self.nbytes[a], 1))

    def _span(self, a: int, b: int) -> int:
        return self.homes[self.units[b]].flat.data_ptr() + self.nbytes[b] - self.homes[self.units[a]].flat.data_ptr()

    def _copy(self, link, s: int, dst, src, name: str, nbytes: int, hazard: bool):
        """src -> dst (a view of slot s) on `link`'s stream, after slot s is free (and, with `hazard`,
        after the slot's last copy landed); `copied[s]` marks the end."""
        st = link.stream
        st.wait_event(self.done[s])
        if hazard:
            st.wait_event(self.copied[s])
        prof = self.profile
        with link.ctx():
            if prof:
                e0 = self.be.event(True)
                e0.record(st)
            link.copy(dst, src)
            self.copied[s].record(st)
            if prof:
                e1 = self.be.event(True)
                e1.record(st)
                self.trace.append(("copy:" + link.src, name, e0, e1, self.steps))
        self.copies += 1
        self.bytes_moved[link.src] += nbytes

    def _issue(self, q: int, s: int, hazard: bool):
        """Copy ring item q (one or more units back to back) into slot s."""
        self._copy(self.glink[q], s, self.gdst[q][s], self.gsrc[q], self.gname[q], self.gbytes[q], hazard)
        self.content[s] = q

    def _issue_unit(self, j: int, s: int):
        """Fallback: copy unit j alone to the start of slot s (after the slot's last copy landed)."""
        self._copy(self.link_of[j], s, self.dst[j][s], self.src[j], self.units[j], self.nbytes[j], True)
        self.content[s] = -1

    def _prime(self):
        self.g = 0
        self.g0 = 0
        if self.n:
            if self._regroup:
                self._group()
            ng = self.ng
            for k in range(self.W):
                self._issue(k % ng, k, hazard=True)
        self.primed = True

    def _bind0(self, i: int, s: int):
        for p, v in zip(self.P[i], self.V0[i][s]):
            p.data = v

    def _make_pre(self, i: int):
        copied = self.copied
        P = self.P[i]
        ud = self.UD[i]

        def pre(mod, args):
            depth = self.depth
            if depth == 0 and self.free_run and not self.primed:
                # slots were invalidated (homes rewritten) or the ring was reset: learn the period again
                self.free_run = False
                self.free_rec = []
            if depth == 0 and not self.free_run:
                # called outside the model's forward (a wrapper calls inner modules directly): learn the
                # period of these calls; once one repeats, stream them like a forward
                if not self._free_learn(i):
                    self._fallback(i)
                    return None
            if (depth == 1 and not self.deviated) or depth == 0:
                g = self.g
                n = self.n
                if depth == 0:
                    self.cs = self.be.compute_stream()
                    if g - self.g0 >= n:           # free running: the next period begins
                        self.g0 += n
                if g - self.g0 < n and self.seq[g % n] == i:
                    k = g % n
                    s = ((g // n) * self.ng + self.gpos[k]) % self.W
                    if self.gfirst[k]:
                        self.cs.wait_event(copied[s])
                    for p, v in zip(P, self.V[i][s]):
                        p.data = v
                    self.cur_s = s
                    self.cur_mode = 1
                    if depth:
                        self.recorded.append(i)
                    if self.profile:
                        self._prof_begin()
                    if ud is not None:
                        ud.run(s)
                    return None
                self.primed = False
                self.deviations += 1
                if depth:
                    self.deviated = True
                else:                              # the period changed: learn it again from this call
                    self.free_run = False
                    self.free_rec = [i]
            self._fallback(i)
            return None
        return pre

    def _free_learn(self, i: int) -> bool:
        """Calls outside any forward of the compiled module: record them; when the first recorded unit
        comes again, the calls since are the period: adopt it as `seq`, prime the ring and stream from
        this call on (True).  Until then the calls are fallback loads (False)."""
        rec = self.free_rec
        if rec and i == rec[0]:
            if rec != self.seq:
                self.seq = list(rec)
                self.n = len(rec)
                self._regroup = True
            self.free_rec = []
            self._prime()
            self.free_run = True
            return True
        rec.append(i)
        if len(rec) > 4 * max(self.n, 1) + 64:     # no period in sight: keep the record bounded
            del rec[:-1]
        return False

    def _make_post(self, i: int):
        done = self.done
        ud = self.UD[i]

        def post(mod, args, out):
            s = self.cur_s
            mode = self.cur_mode
            self.cur_mode = 0
            if ud is not None:
                ud.clear()
            # recorded after every unit, not only an item's last: a forward that leaves the expected
            # order mid-item reuses slots through fallback loads, which must wait for this unit too
            done[s].record(self.cs)
            if self.profile:
                self._prof_end(self.units[i])
            if mode == 1:
                g = self.g
                n = self.n
                k = g % n
                self.g = g + 1
                if self.glast[k]:
                    q = ((g // n) * self.ng + self.gpos[k] + self.W) % self.ng
                    if self.content[s] != q:
                        self._issue(q, s, False)
            return None
        return post

    def _fallback(self, i: int):
        if self.depth == 0:
            self.cs = self.be.compute_stream()
        W = self.W
        s = self.fb % W
        self.fb += 1
        self._issue_unit(i, s)
        self.cs.wait_event(self.copied[s])
        self._bind0(i, s)
        self.cur_s = s
        self.cur_mode = 2
        self.fallback_loads += 1
        if self.depth:
            self.recorded.append(i)
        self.primed = False
        if self.profile:
            self._prof_begin()
        ud = self.UD[i]
        if ud is not None:
            ud.run(s, fallback=True)

    def _root_pre(self, mod, args):
        self.depth += 1
        if self.depth > 1:
            return None
        if self._tune and self.steps >= 1 and self._tune == 1:
            self._tune_begin()
        if self.free_run:          # the module's own forward again: its order, primed afresh
            self.free_run = False
            self.free_rec = []
            self.primed = False
        self.cs = cs = self.be.compute_stream()
        if self.n and not self.primed:
            self._prime()
        self.g0 = self.g
        self.deviated = False
        self.recorded.clear()
        ev = self._step_ev[self._step_i % len(self._step_ev)]
        ev[0].record(cs)
        self._t_host0 = time.perf_counter()
        return None

    def _root_post(self, mod, args, out):
        self.depth -= 1
        if self.depth:
            return None
        ev = self._step_ev[self._step_i % len(self._step_ev)]
        ev[1].record(self.cs)
        self._step_i += 1
        self._step_host.append(time.perf_counter() - self._t_host0)
        if len(self._step_host) > 64:
            del self._step_host[:32]
        ok = not (self.deviated or (self.g - self.g0) != self.n)
        if not ok:
            if self.recorded and self.recorded != self.seq:
                self.seq = list(self.recorded)
                self.n = len(self.seq)
                self._regroup = True
            self.primed = False
        self.steps += 1
        if self._tune == 2:
            self._tune_end(ok)
        return None

    # ------------------------------------------------------------------ window autotune
    def _tune_begin(self):
        """Profile the next step: events around every unit (temporary hooks on resident units) and copy."""
        self._tune = 2
        self._tune_profile = self.profile
        self.profile = True
        self.trace.clear()
        if not self._tune_profile:     # resident units have profiling hooks only with profile=True
            self._add_prof_hooks(self._tune_hooks)

    def _tune_end(self, ok: bool):
        from . import stats as _stats
        self._tune_tries += 1
        if not ok and self._tune_tries < 3:
            self.trace.clear()
            return                     # an irregular step: measure the next one
        gap = 0.0
        try:
            ev = _stats.timeline(self, steps=1) if ok else []
            step = _stats.step_times(self)[-1:] if ok else []
            se = self.step_events()
            if ok and len(se) >= 2:          # GPU time between the previous step's end and this one's start
                try:
                    gap = max(0.0, se[-2][1].elapsed_time(se[-1][0]) / 1e3)
                except Exception:
                    gap = 0.0
        finally:
            for h in self._tune_hooks:
                h.remove()
            self._tune_hooks = []
            self.profile = self._tune_profile
            if not self.profile:
                self.trace.clear()
            self._tune = 0
        if not ev or not step:
            return
        times: dict[str, float] = {}
        copy_s: dict[str, float] = {}
        for e in ev:
            d = (e["end_ms"] - e["start_ms"]) / 1e3
            if e["lane"] == "compute":
                times[e["unit"]] = times.get(e["unit"], 0.0) + d
            else:
                copy_s[e["lane"][5:]] = copy_s.get(e["lane"][5:], 0.0) + d
        per_link = _stats.bytes_per_link(self)
        rates = {k: per_link[k] / v for k, v in copy_s.items() if v > 0 and k in per_link}
        self._autotune_window(times, rates, step[0], gap)

    def _autotune_window(self, times: dict, rates: dict, step_s: float, gap_s: float = 0.0) -> dict:
        """Choose the slot count from measured unit times and link rates (compiler.cost.simulate over the
        plan); grow the ring when more slots shorten the simulated step by more than 1 %.  `gap_s`, the
        measured GPU time between steps (the sampler's own work, a preview's synchronize), is added to
        every prediction but does not change the choice: the host issues no copy while it is away, and
        the copies it issued before (the next step's first items, one per slot) finish in it whatever the
        slot count.  Slots come only from the plan's window limit and the device's free memory (less
        TUNE_RESERVE_BYTES)."""
        from ..compiler.cost import simulate
        from ..compiler.graph import Unit
        from ..compiler.inventory import Inventory
        plan = self.plan
        placed = sorted(plan.units, key=lambda u: u.order)
        root_t = max(0.0, step_s - sum(times.values()))
        units = [Unit(u.name, u.type, param_bytes=u.bytes, kind=u.kind,
                      time_s=root_t if u.name == ROOT else times.get(u.name, 0.0)) for u in placed]
        homes = {u.name: u.device for u in placed}
        inv = Inventory(source="measured")
        for src, r in rates.items():
            inv.links[(src, plan.compute)] = r
        slot = self.pool.slot_bytes
        big = self._largest_streamed()
        cap = self.window_max_bytes
        cur = self.W * slot
        if self.be.cuda:
            free = torch.cuda.mem_get_info(self.device)[0] - TUNE_RESERVE_BYTES
            cap = min(cap if cap is not None else float("inf"), cur + max(0, free))
        kmax = min(MAX_SLOTS, max(self.ng, 1), int(cap // slot) if cap is not None else MAX_SLOTS)
        pred = {k: simulate(units, homes, plan.compute, inv, k * big)["step_s"] + gap_s
                for k in range(1, max(kmax, self.W) + 1)}
        best = min(pred[k] for k in pred if k >= self.W)
        k = min(k for k in pred if k >= self.W and pred[k] <= best * 1.01)
        res = {"measured_step_s": step_s, "gap_s": gap_s, "slots_before": self.W, "slots": k,
               "predicted_by_slots": pred, "link_rates": rates}
        if k > self.W:
            self._resize(k)
            import logging
            logging.getLogger("distorch").info(
                "distorch: ring grown from %d to %d slots from measured unit times (simulated step %.1f -> %.1f ms)",
                res["slots_before"], k, pred[res["slots_before"]] * 1e3, pred[k] * 1e3)
        self.tune_result = res
        return res

    def _resize(self, k: int):
        """A ring of k slots (between steps): new pool, views, item copies; prefetch restarts next forward."""
        self.be.synchronize()
        dev = self.device
        old = self.pool
        self.pool = SlotPool(dev, k, self.slot_bytes)
        old.release()
        self.W = k
        self.copied[:] = [self.be.event() for _ in range(k)]
        self.done[:] = [self.be.event() for _ in range(k)]
        self.content = [-1] * k
        self.fb = 0
        self._slot_views()
        self._group()
        if self.plan.window_bytes is not None:
            self.plan.window_bytes = k * self._largest_streamed()
        self._report_compute_device()  # off the released pool
        self.primed = False

    # ------------------------------------------------------------------ profiling
    def _prof_begin(self):
        e = self.be.event(True)
        e.record(self.cs)
        self._prof_e0 = e

    def _prof_end(self, name: str):
        e = self.be.event(True)
        e.record(self.cs)
        self.trace.append(("compute", name, self._prof_e0, e, self.steps))
        if len(self.trace) > 20000:
            del self.trace[:10000]

    def _add_prof_hooks(self, hooks: list):
        """Event hooks on every unit the ring does not stream (its own units are timed by the ring's hooks)."""
        for n, m in self._unit_mods.items():
            if n not in self.index:
                hooks.append(m.register_forward_pre_hook(self._make_prof_pre(n)))
                hooks.append(m.register_forward_hook(self._make_prof_post(n), always_call=True))

    def _make_prof_pre(self, name):
        def pre(mod, args):
            if self.depth:
                self._prof_begin()
        return pre

    def _make_prof_post(self, name):
        def post(mod, args, out):
            if self.depth:
                self._prof_end(name)
        return post

    def step_events(self):
        """(start, end) event pairs of the most recent steps, oldest first."""
        k = len(self._step_ev)
        n = min(self._step_i, k)
        return [self._step_ev[(self._step_i - n + j) % k] for j in range(n)]

    def _adopt_arenas(self, arenas: dict) -> "Runtime":
        """Keep the host arenas that runtime.loading filled (freed with the rest by undo())."""
        for k, a in arenas.items():
            self.arenas[f"{k}#loaded" if k in self.arenas else k] = a
        return self

    # ------------------------------------------------------------------ undo
    def home_views(self) -> dict:
        """id(parameter) -> its tensor in its home, for every streamed parameter (for code that reads or
        patches weights between steps, e.g. LoRA; call invalidate() after writing). A GGUF parameter's
        entry is a GGUFTensor over its quantized bytes in the home."""
        out = {}
        for i, n in enumerate(self.units):
            for p, v in zip(self.P[i], self.homes[n].views()):
                q = _gs.param_of(p)
                out[id(q)] = v if q is p else q.with_raw(v)    # GGUF: the same weight over its home bytes
        return out

    def invalidate(self):
        """Homes were written: copy every unit again before its next use (slots may hold old bytes)."""
        self.be.synchronize()
        self.content = [-1] * len(self.content)
        self.primed = False
        self.free_run = False
        self.free_rec = []

    def undo(self, device=None):
        """All weights back resident (on the compute device, or `device`), hooks removed, homes and
        slots freed."""
        if self.hooks is None:
            return
        for h in self.hooks + self._tune_hooks:
            h.remove()
        self.hooks = None
        self._tune_hooks = []
        self._tune = 0
        self._unit_mods = {}
        self.be.synchronize()
        dev = self.device if device is None else parse_device(device)
        with torch.no_grad():
            for i, n in enumerate(self.units):
                for p, v in zip(self.P[i], self.homes[n].views()):
                    _gs.rebind(p, v.to(dev, copy=True))
            self.dequantized.restore(dev)
        for h in self.homes.values():
            h.release()
        for a in self.arenas.values():
            a.release()
        self.arenas = {}
        if self.pool is not None:
            self.pool.release()
        self.homes = {}
        self.pool = None
        for ud in self.UD:
            if ud is not None:
                ud.clear()
        self.UD = []
        self.dq_scratch = None
        self.P = self.V = self.V0 = self.src = self.dst = []
        self.gsrc = self.gdst = []
        self.copied = self.done = []
        self.trace = []
        m = self._module_ref()
        if m is not None and getattr(m, "_distorch_runtime", None) is self:
            del m._distorch_runtime

    @property
    def active(self) -> bool:
        return self.hooks is not None



class Classified:
    """How apply() sees a module under a plan (also used by runtime.loading)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def classify(module: torch.nn.Module, plan: Plan) -> Classified:
    """Unit modules, homes, and every parameter sorted into streamed-per-unit or resident."""
    # ---- units and their modules
    placed = sorted(plan.units, key=lambda u: u.order)
    unit_mods: dict[str, torch.nn.Module] = {}
    for u in placed:
        if u.name == ROOT:
            continue
        try:
            unit_mods[u.name] = module.get_submodule(u.name)
        except AttributeError:
            names = [n for n, _ in module.named_modules() if n][:8]
            raise DisTorchError(f"plan unit {u.name!r} is not a submodule of this "
                                f"{type(module).__name__} (some that are: {names})") from None
    uset = set(unit_mods)
    for name in uset:
        parts = name.split(".")
        for k in range(1, len(parts)):
            if ".".join(parts[:k]) in uset:
                raise DisTorchError(f"plan units overlap: {name!r} is inside unit {'.'.join(parts[:k])!r}; "
                                    "units must be disjoint subtrees (use block or leaf granularity, not both)")
    home_of = {u.name: u.device for u in placed}
    offloaded = [u.name for u in placed if u.name != ROOT and u.device != plan.compute]
    for name in offloaded:
        hd = home_of[name]
        if not is_host(hd):
            d = parse_device(hd)
            if d.type != "cuda" or not torch.cuda.is_available():
                raise DisTorchError(f"unit {name!r} has home {hd!r}, which this machine cannot hold "
                                    "(homes are 'cpu' or a CUDA GPU)")
            if d.index is not None and d.index >= torch.cuda.device_count():
                raise DisTorchError(f"unit {name!r} has home {hd!r} but only "
                                    f"{torch.cuda.device_count()} GPU(s) are visible")
    if plan.units and ROOT in home_of and home_of[ROOT] != plan.compute:
        root_note = f"ROOT placed on {home_of[ROOT]!r} is kept resident (a parent uses it anywhere in forward)"
    else:
        root_note = ""

    # ---- classify every parameter by the units that reach it
    owner_of = owner_lookup(uset)

    info: dict[int, list] = {}     # id(param) -> [param, owners set, first qualified name]
    buffers: dict[int, torch.Tensor] = {}
    for mname, m in module.named_modules(remove_duplicate=False):
        own = owner_of(mname)
        for pname, p in m._parameters.items():
            if p is None:
                continue
            rec = info.get(id(p))
            if rec is None:
                info[id(p)] = [p, {own}, f"{mname}.{pname}" if mname else pname]
            else:
                rec[1].add(own)
        for b in m._buffers.values():
            if b is not None:
                buffers[id(b)] = b
    off_set = set(offloaded)
    streamed: dict[str, list] = {n: [] for n in offloaded}
    resident: list[torch.Tensor] = []
    for p, owners, q in info.values():
        if len(owners) == 1:
            (o,) = owners
            if o in off_set:
                streamed[o].append((q, p))
                continue
        resident.append(p)
    shared = [q for p, owners, q in info.values() if len(owners) > 1]
    for o in streamed:         # GGUF tensors of one type back to back (one dequant launch per run)
        streamed[o].sort(key=_gs.gguf_order)

    return Classified(unit_mods=unit_mods, home_of=home_of, offloaded=offloaded, streamed=streamed,
                      resident=resident, buffers=buffers, shared=shared, root_note=root_note)

def apply(module: torch.nn.Module, plan: Plan, graph=None, **kw) -> Runtime:
    """Rewrite `module` in place to run under `plan`; returns the Runtime (see module docstring)."""
    if not isinstance(plan, Plan):
        raise DisTorchError(f"apply() needs a distorch Plan, got {type(plan).__name__}")
    return Runtime(module, plan, graph, **kw)
