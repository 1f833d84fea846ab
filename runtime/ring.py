"""The ring: W slots on the compute device through which the streamed units' weights flow.

    ring = Ring(backend, homes, params, plan_positions, slots, dequant)
    ring.pre(i) / ring.post(i)        per streamed unit (a part: runtime/hooks.py)
    ring.resize(k), ring.invalidate()       between steps: grow / shrink the ring, copy every unit again

The compute device holds W slots (flat buffers as large as the largest streamed unit).  The streamed
units form a periodic sequence `seq` (their call order in one forward, learned from the calls
themselves: runtime/learn.py), packed into ring *items*: consecutive units that fit one slot together,
come from one home device, run back to back (no resident unit between them in the plan's order) and
sit back to back in their home travel as one copy into one slot (compiler/ring_layout.py, whose
geometry the cost model simulates too; a unit called twice per forward travels alone).  Item o of the
infinite item sequence runs from slot o % W.  Before an item's first unit runs, the compute stream
waits for the event `copied[slot]`; after each unit the event `done[slot]` is recorded, and after the
item's last unit the copy of item o + W is issued into the same slot on its link's copy stream (which
first waits `done[slot]`).  Items past the end of the step are the next step's first items, so the ring
wraps across the step boundary.  No synchronize on the hot path; per unit the host does at most one
event wait, one `param.data = view` per tensor (views precomputed for every (unit, slot) pair), one
event record, and per item one copy.  A call the learner does not expect is a *fallback*: the unit
alone is copied to the start of the next slot (`fb` counts them round robin; the copy also waits for
the slot's previous copy: the hazard), the compute stream waits for it, and it runs.

Names on the hot path (short, as the per-unit code reads them many times):
    W          slots
    P[i]       unit i's parameters (a GGUF one as its RawBinder: `.data = view` rebinds its blocks)
    V[i][s]    unit i's tensors as views into slot s, where its ring item puts it; V0[i][s]: at the
               slot's start (fallback loads)
    g          position of a call in the infinite sequence of streamed calls (runtime/learn.py); k = g % n
    gpos[k]    ring item (index within the step) of position k; gfirst[k] / glast[k]: it is the item's
               first / last unit
    ng         ring items per step; items[q]: the unit indices of item q
    cs         the compute stream
"""
from __future__ import annotations

from collections import Counter

from ..compiler.ring_layout import MAX_SLOTS, item_keys, stream_groups
from . import gguf_stream as _gs
from .hooks import UnitPart
from .learn import Learner
from .store import SlotPool, align_up, alloc_flat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .apply import Runtime
    from .slot_dequant import SlotDequant
    from .stream import Backend

__all__ = ["Ring", "pack_items"]


def pack_items(seq: list[int], homes: list, home_dev: list, plan_pos: list, unit_slot: int,
               slot_bytes: int) -> list[list[int]]:
    """Positions of `seq` (streamed unit indices in call order) as ring items.  First the cost model's
    packing (compiler.ring_layout.stream_groups over units of at most `unit_slot` bytes, keyed by
    item_keys), then each group split where a unit is called more than once per forward, or its home
    does not start where the previous unit's ends, or the span outgrows `slot_bytes`: one copy moves one
    contiguous span of host memory into one slot."""
    cnt = Counter(seq)
    cand = stream_groups([homes[i].nbytes for i in seq], unit_slot,
                         item_keys([home_dev[i] for i in seq], [plan_pos[i] for i in seq]))
    items: list[list[int]] = []
    for grp in cand:
        cur = [grp[0]]
        for k in grp[1:]:
            a, b = seq[cur[-1]], seq[k]
            if cnt[a] == 1 and cnt[b] == 1 and home_dev[a] == home_dev[b] and _adjacent(homes[a], homes[b]) \
                    and _span(homes[seq[cur[0]]], homes[b]) <= slot_bytes:
                cur.append(k)
            else:
                items.append(cur)
                cur = [k]
        items.append(cur)
    return items


def _adjacent(ha, hb) -> bool:
    """Home hb starts where home ha ends (same buffer, the arena's 256-byte step)."""
    fa, fb = ha.flat, hb.flat
    if fa.device != fb.device or fa.untyped_storage().data_ptr() != fb.untyped_storage().data_ptr():
        return False
    return fb.data_ptr() == fa.data_ptr() + align_up(max(ha.nbytes, 1))


def _span(ha, hb) -> int:
    """Bytes from the start of home ha to the end of home hb (one copy's length)."""
    return hb.flat.data_ptr() + hb.nbytes - ha.flat.data_ptr()


class Ring(UnitPart):
    """The slots and the copies into them for streamed units 0..n-1 (homes[i], params[i]); `slots` is the
    ring size asked for (at most MAX_SLOTS and the number of ring items); `learn` decides, per call, the
    position in the ring or a fallback load."""

    STREAMED, FALLBACK = 1, 2      # cur_mode of the unit running now (0: none)

    def __init__(self, be: Backend, homes: list, params: list, plan_pos: list, slots: int,
                 dequant: SlotDequant | None = None) -> None:
        self.be = be
        self.homes = homes                       # Home of unit i (runtime/store.py)
        self.names = [h.unit for h in homes]
        self.P = params
        self.nbytes = [h.nbytes for h in homes]
        self.src = [h.src for h in homes]
        self.home_dev = [h.device for h in homes]
        self.plan_pos = list(plan_pos)           # position of unit i in the plan's order
        self.dequant = dequant                   # runtime/slot_dequant.py: follows the slots and items
        self.prof = None                         # the Profiler while profiling: copy events
        n = len(homes)
        self.slot_bytes = max(self.nbytes, default=0)
        # never more slots than ring items (consecutive small units share one, as the cost model counts them)
        n_items = len(stream_groups(self.nbytes, self.slot_bytes, item_keys(self.home_dev, self.plan_pos)))
        self.W = W = max(1, min(int(slots), MAX_SLOTS, max(n_items, 1))) if n else 0
        self.pool = SlotPool(be.device, W, self.slot_bytes) if n else None
        self.links: dict = {}
        for hd in self.home_dev:
            if hd not in self.links:
                self.links[hd] = be.link(hd)
        self.link_of = [self.links[hd] for hd in self.home_dev]
        self.copied = [be.event() for _ in range(W)]
        self.done = [be.event() for _ in range(W)]
        self.content = [-1] * W    # ring item whose bytes a slot holds; -1: none / a fallback load
        self.fb = 0
        self.cs = be.compute_stream()
        self.cur_s = self.cur_g = self.cur_mode = 0
        self.copies = 0
        self.fallback_loads = 0
        self.bytes_moved: dict[str, int] = {k: 0 for k in self.links}   # over the whole life, issued copies
        self.learn = Learner(n, fill=self._fill)
        self.V0, self.dst = [], []
        if n:
            self._slot_views()
        self.V = self.V0
        self._group()

    # ------------------------------------------------------------------ layout
    def _slot_views(self):
        """Every unit's views at the start of every slot (fallback loads; `_group` derives the ring's
        views from them), the copy targets, and the dequantization views."""
        flats = self.pool.flats
        self.V0 = [self.pool.views(h.layout) for h in self.homes]
        self.dst = [[f[:h.nbytes] for f in flats] for h in self.homes]
        if self.dequant is not None:
            self.dequant.bind(flats)

    def _report_compute_device(self):
        """Streamed parameters report the compute device before their unit first runs: a GGUF one by its
        device tag; on CUDA a dense one is bound to a view of slot 0 (its real bytes come when its unit
        runs), since code may pick its inputs' device from a weight (ComfyUI's text encoders do)."""
        for P, V0 in zip(self.P, self.V0):
            for b, v in zip(P, V0[0]):
                if type(b) is _gs.RawBinder:
                    _gs.retag_device(b.param, v)
                elif self.be.cuda:
                    b.data = v       # a CodedBinder keeps the view; runtime/codec_stream.py binds its parameter

    def _group(self):
        """Ring items from the learner's `seq` (pack_items), their copies' sources and targets, and the
        views of units that sit behind another one in their item's slot."""
        seq = self._grouped = self.learn.seq
        n = len(seq)
        self.gpos, self.gfirst, self.glast = [0] * n, [True] * n, [True] * n
        self.items, self.gsrc, self.gdst, self.gbytes, self.glink, self.gname = [], [], [], [], [], []
        self.ng = 0
        if not n:
            return
        flats = self.pool.flats
        V = list(self.V0)
        for q, ks in enumerate(pack_items(seq, self.homes, self.home_dev, self.plan_pos, self.slot_bytes,
                                          self.pool.slot_bytes)):
            first = seq[ks[0]]
            base = self.homes[first].flat
            span = _span(self.homes[first], self.homes[seq[ks[-1]]])
            for k in ks:
                self.gpos[k] = q
                self.gfirst[k] = k == ks[0]
                self.glast[k] = k == ks[-1]
                i = seq[k]
                off = self.homes[i].flat.data_ptr() - base.data_ptr()
                if len(ks) > 1:
                    V[i] = [[e.view(f[off:]) for e in self.homes[i].layout.entries] for f in flats]
                if self.dequant is not None:
                    self.dequant.rebase(i, flats, off)
            self.gsrc.append(self.src[first] if len(ks) == 1 else
                             base.as_strided((span,), (1,), base.storage_offset()))
            self.gdst.append([f[:span] for f in flats])
            self.gbytes.append(span)
            self.glink.append(self.link_of[first])
            self.gname.append(self.names[first])
            self.items.append([seq[k] for k in ks])
        self.V = V
        self.ng = len(self.items)

    # ------------------------------------------------------------------ copies
    def _copy(self, link, s: int, dst, src, name: str, nbytes: int, hazard: bool):
        """src -> dst (a view of slot s) on `link`'s stream, after slot s is free (and, with `hazard`,
        after the slot's last copy landed); `copied[s]` marks the end."""
        st = link.stream
        st.wait_event(self.done[s])
        if hazard:
            st.wait_event(self.copied[s])
        prof = self.prof
        with link.ctx():
            if prof is not None:
                ev = prof.copy_start(st)
            link.copy(dst, src)
            self.copied[s].record(st)
            if prof is not None:
                prof.copy_end("copy:" + link.src, name, ev, st)
        self.copies += 1
        self.bytes_moved[link.src] += nbytes

    def _issue(self, q: int, s: int, hazard: bool):
        """Copy ring item q (one or more units back to back) into slot s."""
        self._copy(self.glink[q], s, self.gdst[q][s], self.gsrc[q], self.gname[q], self.gbytes[q], hazard)
        self.content[s] = q

    def _fill(self):
        """The learner primed: the first W items of (a possibly new) seq into the slots."""
        if self.learn.seq is not self._grouped:
            self._group()
        for k in range(self.W):
            self._issue(k % self.ng, k, hazard=True)

    # ------------------------------------------------------------------ the part
    def attach(self, rt: Runtime) -> None:
        if self.P:
            self._report_compute_device()
            self.learn.prime()

    def begin(self) -> None:
        self.cs = self.be.compute_stream()
        self.learn.begin()

    def end(self) -> None:
        self.learn.end()

    def pre(self, i: int) -> None:
        L = self.learn
        if L.depth == 0:           # called outside the module's forward (runtime/learn.py)
            self.cs = self.be.compute_stream()
        g = L.call(i)
        if g < 0:
            self._fallback(i)
            return
        n = L.n
        k = g % n
        s = ((g // n) * self.ng + self.gpos[k]) % self.W
        if self.gfirst[k]:
            self.cs.wait_event(self.copied[s])
        for p, v in zip(self.P[i], self.V[i][s]):
            p.data = v
        self.cur_s = s
        self.cur_g = g
        self.cur_mode = self.STREAMED

    def post(self, i: int) -> None:
        s = self.cur_s
        mode = self.cur_mode
        self.cur_mode = 0
        # recorded after every unit, not only an item's last: a forward that leaves the expected
        # order mid-item reuses slots through fallback loads, which must wait for this unit too
        self.done[s].record(self.cs)
        if mode == self.STREAMED:
            g = self.cur_g
            n = self.learn.n
            k = g % n
            if self.glast[k]:
                q = ((g // n) * self.ng + self.gpos[k] + self.W) % self.ng
                if self.content[s] != q:
                    self._issue(q, s, False)

    def _fallback(self, i: int):
        """Unit i alone to the start of the next slot (after the slot's last copy landed), waited for."""
        s = self.fb % self.W
        self.fb += 1
        self._copy(self.link_of[i], s, self.dst[i][s], self.src[i], self.names[i], self.nbytes[i], True)
        self.content[s] = -1
        self.cs.wait_event(self.copied[s])
        for p, v in zip(self.P[i], self.V0[i][s]):
            p.data = v
        self.cur_s = s
        self.cur_mode = self.FALLBACK
        self.fallback_loads += 1

    # ------------------------------------------------------------------ between steps
    def resize(self, k: int) -> None:
        """A ring of k slots (1..MAX_SLOTS), grown or shrunk between steps: prefetch restarts at the next
        forward.  First nothing may be in flight on any slot: the compute device is synchronized (its
        compute and copy streams) and so is every link's stream on a donor GPU.  The slots kept stay where
        they are; a grown ring allocates only the new ones (an allocation that fails leaves the ring as it
        was), a shrunk one drops the last ones: once the views into them are rebuilt (and, on CUDA, the
        parameters rebound to slot 0; on the host they rest on their homes) nothing holds them and torch's
        allocator gets their memory back.  A new SlotPool object, so the parts that cache the slots'
        storages by pool (runtime/grad.py) read them again."""
        k = max(1, min(int(k), MAX_SLOTS))
        if self.pool is None or k == self.W:
            return
        self.be.synchronize()
        for link in self.links.values():
            if getattr(link, "src_stream", None) is not None:
                link.src_stream.synchronize()
        old = self.pool
        pool = SlotPool(self.be.device, 0, self.slot_bytes)
        pool.flats = old.flats[:k] + [alloc_flat(pool.slot_bytes, pool.device, pin=False)
                                      for _ in range(k - len(old.flats))]
        old.release()
        self.pool = pool
        self.W = k
        self.copied = [self.be.event() for _ in range(k)]
        self.done = [self.be.event() for _ in range(k)]
        self.content = [-1] * k
        self.fb = 0
        self._slot_views()
        self._group()
        self._report_compute_device()  # off the dropped slots
        self.learn.primed = False

    def invalidate(self) -> None:
        """Homes were written: copy every unit again before its next use (slots may hold old bytes)."""
        self.be.synchronize()
        self.content = [-1] * len(self.content)
        self.learn.forget()

    def detach(self, rt: Runtime) -> None:
        if self.pool is not None:
            self.pool.release()
        self.pool = None
        self.P = self.V = self.V0 = self.src = self.dst = []
        self.gsrc = self.gdst = []
        self.copied = self.done = []
