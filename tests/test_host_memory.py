"""Host memory honesty (issue 11, CPU parts): one host copy of every offloaded byte, unload gives the
memory back, and the pinned-memory cap with its pageable overflow (a fake pin function stands in for
cudaHostRegister on a machine without CUDA)."""
import ctypes
import gc
import logging

import pytest
import torch

from distorch.compiler.graph import ROOT
from distorch.compiler.plan import Plan, PlacedUnit
from distorch.runtime import fill as _fill
from distorch.runtime import pinning
from distorch.runtime.apply import apply, classify
from distorch.runtime.arena import PAGEABLE
from distorch.runtime.store import HomeStore

MiB = 1 << 20


class Block(torch.nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, h)
        self.gate = torch.nn.Linear(d, h)
        self.down = torch.nn.Linear(h, d)

    def forward(self, x):
        y = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(y)) * self.up(y))


class TinyDiT(torch.nn.Module):
    def __init__(self, depth=8, d=1024, h=2560):
        super().__init__()
        self.inp = torch.nn.Linear(d, d)
        self.blocks = torch.nn.ModuleList(Block(d, h) for _ in range(depth))

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return x


@pytest.fixture(autouse=True, scope="module")
def _cuda_context_first():
    """On a CUDA machine the homes are page-locked (cudaHostRegister), and the first CUDA call of a process
    creates its context: a few hundred MiB of RssAnon that are no buffer of ours, and that ComfyUI has made
    long before any model loads.  A test that happened to be its process's first CUDA user (one file per
    pytest-xdist worker, as bench/gpu_suite.sh runs the suite) would count them as the compile's, so the
    context is made before any baseline is taken."""
    if torch.cuda.is_available():
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
    yield


def nbytes(m):
    return sum(p.numel() * p.element_size() for p in m.parameters())


def plan_all(model, compute="cpu:0", home="cpu"):
    pu = [PlacedUnit(ROOT, "root", 0, compute, 0, "root")]
    for i, b in enumerate(model.blocks):
        pu.append(PlacedUnit(f"blocks.{i}", "Block", nbytes(b), home, i + 1))
    return Plan(compute=compute, units=pu)


def status(key):
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith(key + ":"):
                return int(ln.split()[1]) * 1024
    pytest.skip(f"/proc/self/status has no {key}")


def anon():
    gc.collect()
    pinning.trim_heap()
    return status("RssAnon")


def hwm_anon_growth(h0, f0):
    """Peak RSS growth since reset_peak(), less what file-backed/shared pages (code, libraries) added."""
    return status("VmHWM") - h0 - max(0, status("RssFile") + status("RssShmem") - f0)


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def test_two_models_compile_in_turn_one_host_copy_and_undo_gives_it_back():
    base = anon()
    torch.manual_seed(0)
    x = torch.randn(2, 1024)
    models, refs, rts, before = [], [], [], []
    for _ in range(2):                                      # ~260 MiB each, as ComfyUI loads them: on the CPU
        m = TinyDiT().eval()
        with torch.no_grad():
            refs.append(m(x))
        models.append(m)
    for m, ref in zip(models, refs):                        # high-noise expert, then low-noise expert
        off = sum(nbytes(b) for b in m.blocks)
        r0 = anon()
        peaked = reset_peak()
        h0, f0 = (status("VmHWM"), status("RssFile") + status("RssShmem")) if peaked else (0, 0)
        rt = apply(m, plan_all(m), progress=False)
        grow = anon() - r0
        slots = rt.pool.nbytes                               # the compute device's slots (VRAM on a GPU)
        assert grow <= 0.05 * off + 64 * MiB + slots, f"compile grew RssAnon by {grow / MiB:.0f} MiB"
        if peaked:
            peak = hwm_anon_growth(h0, f0)
            assert peak <= 0.05 * off + 64 * MiB + slots, \
                f"compile peak {peak / MiB:.0f} MiB above the start ({off / MiB:.0f} MiB offloaded, slots " \
                f"{slots / MiB:.0f} MiB, fill threads {_fill.threads()})"
        with torch.no_grad():
            assert torch.equal(m(x), ref)
        rts.append(rt)
        before.append(r0)
    for m, rt, ref, r0 in zip(models[::-1], rts[::-1], refs[::-1], before[::-1]):
        off = sum(nbytes(b) for b in m.blocks)
        r1 = anon()
        peaked = reset_peak()
        h0, f0 = (status("VmHWM"), status("RssFile") + status("RssShmem")) if peaked else (0, 0)
        rt.undo()                                            # back to the host, as ComfyUI's unload does
        if peaked:
            assert hwm_anon_growth(h0, f0) <= 0.05 * off + 64 * MiB, "undo must not copy the whole model"
        assert anon() <= r1 + 64 * MiB, "undo grew RssAnon"
        with torch.no_grad():
            assert torch.equal(m(x), ref)
    del models, rts, m, rt
    assert anon() - base <= 64 * MiB, "both models gone: RssAnon must be back where it started"


def store_for(m, pin=True):
    plan = plan_all(m)
    c = classify(m, plan)
    units = [n for n in c.offloaded if c.streamed[n]]
    return HomeStore(units, c.streamed, c.home_of, pin=pin, progress=False), units


def test_pinned_cap_overflow_is_pageable_with_one_warning(fake_pin, monkeypatch, caplog):
    m = TinyDiT(depth=6, d=64, h=128)
    per_block = nbytes(m.blocks[0])
    monkeypatch.setenv(pinning.ENV, str(2.5 * per_block / 2**30))
    caplog.set_level(logging.WARNING)
    p0 = pinning.pinned_bytes()
    st, units = store_for(m)
    assert st.arenas["cpu"].pinned and not st.arenas["cpu" + PAGEABLE].pinned
    assert 0 < st.pinned_bytes <= 2.5 * per_block and pinning.pinned_bytes() - p0 == st.pinned_bytes
    assert st.pageable_bytes >= 3 * per_block
    warns = [r for r in caplog.records if "pinned-memory cap" in r.getMessage()]
    assert len(warns) == 1 and pinning.ENV in warns[0].getMessage()
    # the first units in execution order are the pinned ones (compiler.cost assumes the same)
    pinned_flat = st.arenas["cpu"].flat
    lo, hi = pinned_flat.data_ptr(), pinned_flat.data_ptr() + pinned_flat.numel()
    assert [lo <= st.homes[n].flat.data_ptr() < hi for n in units] == [True, True] + [False] * 4
    for n in units:
        for p in m.get_submodule(n).parameters():
            assert any(h.flat.data_ptr() <= p.data_ptr() < h.flat.data_ptr() + h.flat.numel()
                       for h in st.homes.values())

    class R:
        undo_device = torch.device("cpu")
    st.stage(R)
    st.detach(R)
    gc.collect()
    assert pinning.pinned_bytes() == p0 and not fake_pin


def test_pinning_failure_never_fails_a_load(monkeypatch, caplog):
    def boom(ptr, n):
        raise RuntimeError("cudaHostRegister: out of memory")
    monkeypatch.setattr(pinning, "host_register", boom)
    caplog.set_level(logging.WARNING)
    m = TinyDiT(depth=3, d=64, h=128)
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = m(x)
    st, _ = store_for(m)
    assert not any(a.pinned for a in st.arenas.values())
    assert len([r for r in caplog.records if "pinning" in r.getMessage()]) == 1
    with torch.no_grad():
        assert torch.equal(m(x), ref)


def test_cap_setting(monkeypatch, caplog):
    monkeypatch.setenv(pinning.ENV, "0")
    assert pinning.max_pinned_bytes() == 0 and pinning.budget() == 0
    monkeypatch.setenv(pinning.ENV, "1.5")
    assert pinning.max_pinned_bytes() == int(1.5 * 2**30)
    monkeypatch.setenv(pinning.ENV, "lots")
    caplog.set_level(logging.WARNING)
    assert pinning.max_pinned_bytes() == int(pinning.total_host_bytes() * pinning.DEFAULT_PINNED_FRACTION)
    assert any(pinning.ENV in r.getMessage() for r in caplog.records)
    monkeypatch.delenv(pinning.ENV)
    assert pinning.DEFAULT_PINNED_FRACTION <= 0.95       # never above ComfyUI 0.3.75's own MAX_PINNED_MEMORY


def test_plan_prices_homes_past_the_pinned_cap_at_the_pageable_rate():
    from distorch.compiler import inventory as inv_mod
    from distorch.compiler.cost import simulate
    from distorch.compiler.graph import Unit
    inv = inv_mod.declare("cuda:0=80GiB,cpu=128GiB")
    units = [Unit(name=f"b{i}", type="Block", param_bytes=1 << 30, time_s=1e-3) for i in range(4)]
    homes = {u.name: "cpu" for u in units}
    fast = simulate(units, homes, "cuda:0", inv, window_bytes=2 << 30)
    inv.pinned_limit = 2 << 30                               # two of the four 1 GiB units fit pinned
    slow = simulate(units, homes, "cuda:0", inv, window_bytes=2 << 30)
    bw = inv.bandwidth("cpu", "cuda:0")
    assert inv.pageable_bandwidth("cpu", "cuda:0") == pytest.approx(bw * inv_mod.PAGEABLE_FRACTION)
    want = 2 * (1 << 30) / bw + 2 * (1 << 30) / (bw * inv_mod.PAGEABLE_FRACTION)
    assert slow["per_link_s"]["cpu>cuda:0"] == pytest.approx(want, rel=1e-3)
    assert slow["step_s"] > fast["step_s"]


# ------------------------------------------------------------------------------------------ parallel fill
def test_parallel_fill_gives_identical_bytes(monkeypatch):
    from distorch.runtime import fill
    monkeypatch.setattr(fill, "CHUNK", 4096)                 # many pieces per tensor, across the threads
    torch.manual_seed(3)
    m = TinyDiT(depth=6, d=96, h=200)
    want = {k: v.clone() for k, v in m.state_dict().items()}
    calls = []
    real = fill.fill_units
    monkeypatch.setattr(fill, "fill_units", lambda items, done, **k: calls.append(len(items)) or
                        real(items, done, n_threads=4, window=2))
    st, units = store_for(m, pin=False)
    assert calls == [len(units)]
    for n in units:
        for k, p in m.get_submodule(n).named_parameters():
            h = st.homes[n].flat
            assert h.data_ptr() <= p.data_ptr() < h.data_ptr() + h.numel()
            assert torch.equal(p, want[f"{n}.{k}"])
    assert fill.pieces(torch.empty(10000), torch.zeros(10000), chunk=4096)[0][0].numel() == 1024


def test_fill_keeps_every_thread_busy_across_units(monkeypatch):
    """Pieces, not units, are the grain: with units of two pieces and a window of a fraction of one unit, four
    threads still copy four pieces at once (units as the grain kept one unit, two pieces, in flight), the
    units are handed over in order and the bytes land exactly."""
    import threading
    from distorch.runtime import fill
    monkeypatch.setattr(fill, "CHUNK", 4096)
    monkeypatch.setattr(fill, "WINDOW_FRACTION", 0.0)
    monkeypatch.setattr(fill, "WINDOW_SLACK", 0)
    lock, running, most, enough = threading.Lock(), [0], [0], threading.Event()
    real = fill.copy_piece

    def copy(dst, src):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            if running[0] >= 4:
                enough.set()
        enough.wait(2.0)                   # hold the piece until four run at once (or give up after 2 s)
        real(dst, src)
        with lock:
            running[0] -= 1
    monkeypatch.setattr(fill, "copy_piece", copy)
    srcs = [torch.randn(2048) for _ in range(8)]          # 8 KiB each: two pieces per unit
    dsts = [torch.empty(2048) for _ in srcs]
    order = []
    fill.fill_units([(f"u{i}", [(d, s)]) for i, (d, s) in enumerate(zip(dsts, srcs))], order.append, n_threads=4)
    assert order == list(range(8))
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))
    assert most[0] == 4, f"at most {most[0]} pieces ran at once on 4 threads"
    assert fill.in_flight_cap(10 << 30, 8) == 8 * fill.CHUNK          # at least one piece per thread
    monkeypatch.undo()
    assert fill.in_flight_cap(100 << 30, 8) == 4 * 8 * fill.CHUNK     # at most four


@pytest.mark.parametrize("n_threads", [1, 4])
def test_failing_copy_leaves_nothing_half_applied(monkeypatch, n_threads):
    from distorch.errors import DisTorchError
    from distorch.runtime import fill
    monkeypatch.setattr(fill, "CHUNK", 4096)
    monkeypatch.setenv(fill.ENV, str(n_threads))
    m = TinyDiT(depth=5, d=64, h=160)
    want = {k: v.clone() for k, v in m.state_dict().items()}
    before = {k: p.data_ptr() for k, p in m.named_parameters()}
    bad = m.blocks[2].gate.weight.data_ptr()
    real = fill.copy_piece

    def copy(dst, src):
        if src.data_ptr() == bad:
            raise RuntimeError("disk on fire")
        real(dst, src)
    monkeypatch.setattr(fill, "copy_piece", copy)
    with pytest.raises(DisTorchError, match=r"'blocks\.2'.*disk on fire"):
        store_for(m, pin=False)
    for k, p in m.named_parameters():
        assert torch.equal(p, want[k]), k                   # every weight still has its bytes
        unit = int(k.split(".")[1]) if k.startswith("blocks.") else -1
        if unit >= 2:                                      # the failing unit and later ones: untouched
            assert p.data_ptr() == before[k], k
        elif unit >= 0:                                     # earlier ones: wholly in their homes
            assert p.data_ptr() != before[k], k


def test_parallel_fill_inside_inference_mode(monkeypatch):
    """ComfyUI runs nodes under torch.inference_mode() (thread-local): the fill's workers copy in that mode."""
    from distorch.runtime import fill
    monkeypatch.setenv(fill.ENV, "4")
    monkeypatch.setattr(fill, "CHUNK", 4096)
    with torch.inference_mode():
        m = TinyDiT(depth=3, d=64, h=128)
        x = torch.randn(2, 64)
        ref = m(x)
        st, _ = store_for(m, pin=False)
        assert torch.equal(m(x), ref)


# ------------------------------------------------------------------------------------------ undo to the host
def _mapped(t: torch.Tensor) -> bool:
    """A mapping of its own starts at a page boundary; glibc's chunks (heap or mmapped) start past a header."""
    return t.data_ptr() % 4096 == 0


def test_undo_to_host_gives_each_weight_a_mapping_of_its_own():
    """Weights copied back to the host by undo() sit in anonymous mappings of their own (not glibc's heap,
    which keeps freed memory until malloc_trim): dropping the model later unmaps them at once."""
    from distorch.runtime import pinning
    t = torch.randn(512, 1024)                      # 2 MiB
    c = pinning.mapped_copy(t)
    assert torch.equal(c, t) and c.dtype == t.dtype and c.shape == t.shape and _mapped(c)
    f8 = torch.randn(1024, 2048).to(torch.float8_e4m3fn)
    c8 = pinning.mapped_copy(f8)
    assert c8.dtype == torch.float8_e4m3fn and torch.equal(c8.view(torch.uint8), f8.view(torch.uint8))
    del c, c8
    gc.collect()
    r0 = anon()
    big = pinning.mapped_copy(torch.zeros(64 << 20, dtype=torch.uint8).fill_(1))
    assert anon() - r0 >= 60 * MiB
    del big
    gc.collect()
    assert anon() - r0 <= 4 * MiB, "the mapping must go with the last view"

    m = TinyDiT().eval()
    x = torch.randn(2, 1024)
    with torch.no_grad():
        ref = m(x)
    rt = apply(m, plan_all(m), progress=False)
    rt.undo()                                        # back to the host, as ComfyUI's unload does
    # the weights stay views of their arena (runtime/home_reuse.py: the next compile may adopt it) ...
    arena = m.blocks[0].up.weight.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == arena for p in m.blocks.parameters())
    # ... a compile under another plan cannot: first every weight gets a mapping of its own (the resident
    # half keeps it), then the streamed half is filled into new homes
    plan = plan_all(m)
    plan.units[5:] = [PlacedUnit(u.name, u.type, u.bytes, plan.compute, u.order) for u in plan.units[5:]]
    rt = apply(m, plan, progress=False)
    bigs = [p for p in m.blocks[4:].parameters() if p.numel() * p.element_size() >= pinning.MAPPED_MIN_BYTES]
    assert len(bigs) >= 4 and all(_mapped(p) for p in bigs)
    with torch.no_grad():
        assert torch.equal(m(x), ref)
    rt.undo()
    with torch.no_grad():
        assert torch.equal(m(x), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (resident weights on a GPU)")
def test_undo_to_host_moves_resident_weights_into_mappings_of_their_own():
    """undo("cpu") from a GPU: the resident weights come back too, each large one in a mapping of its own,
    so dropping the model returns their memory (ComfyUI's module.to(cpu) left them in glibc's heap)."""
    m = TinyDiT().eval()
    x = torch.randn(2, 1024)
    with torch.no_grad():
        ref = m(x)
    plan = plan_all(m, compute="cuda:0")
    plan.units[5:] = [PlacedUnit(u.name, u.type, u.bytes, "cuda:0", u.order) for u in plan.units[5:]]
    rt = apply(m, plan, progress=False)
    with torch.no_grad():
        assert torch.isfinite(m(x.cuda())).all()     # (GPU kernels differ from the CPU's: not compared)
    rt.undo("cpu")
    assert all(t.device.type == "cpu" for t in list(m.parameters()) + list(m.buffers()))
    bigs = [p for p in m.blocks[4:].parameters() if p.numel() * p.element_size() >= pinning.MAPPED_MIN_BYTES]
    assert len(bigs) >= 4 and all(_mapped(p) for p in bigs)
    with torch.no_grad():
        assert torch.equal(m(x), ref)
    gc.collect()
    r0 = anon()
    resident = sum(p.numel() * p.element_size() for p in m.blocks[4:].parameters())
    del m, rt, bigs
    gc.collect()
    assert r0 - anon() >= 0.9 * resident, "dropping the model must give the resident weights' memory back"


def test_host_copy_of_resident_weights():
    """The resident part's host copy (CPU here): exact bytes, mapped when large, plain copy when strided."""
    _host_copy = pinning.mapped_copy               # what runtime/place.py's Resident.stage copies with
    t = torch.randn(1024, 512)
    c = _host_copy(t)
    assert torch.equal(c, t) and _mapped(c) and c.data_ptr() != t.data_ptr()
    s = t.t()
    c = _host_copy(s)
    assert torch.equal(c, s)
    small = torch.arange(10)
    assert torch.equal(_host_copy(small), small)


def test_pinned_homes_come_in_pieces_pinned_while_the_fill_goes_on(fake_pin, monkeypatch):
    """Pinned homes are split into arenas of about PIECE_BYTES (whole units); each is registered as soon as its
    last unit is filled, holding the final bytes by then; no ring item spans two pieces; all end pinned."""
    from distorch.runtime import arena as arena_mod
    from distorch.runtime.ring import _adjacent
    m = TinyDiT().eval()
    per_block = nbytes(m.blocks[0])
    monkeypatch.setattr(arena_mod, "PIECE_BYTES", int(2.5 * per_block))
    want = {n: p.detach().clone() for n, p in m.named_parameters()}
    seen = []
    real = pinning.host_register

    def reg(ptr, n):            # the piece's bytes are final when it is registered
        flat = torch.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=torch.uint8)
        seen.append((ptr, n, flat.clone()))
        return real(ptr, n)
    monkeypatch.setattr(pinning, "host_register", reg)
    st, _ = store_for(m)
    keys = sorted(st.arenas)
    assert keys == ["cpu", "cpu@1", "cpu@2", "cpu@3"], keys
    assert all(a.pinned for a in st.arenas.values()) and len(fake_pin) == 4 and len(seen) == 4
    for ptr, n, got in seen:
        (key,) = [k for k, a in st.arenas.items() if a.flat.data_ptr() == ptr]
        assert torch.equal(got, st.arenas[key].flat[:n]), f"{key} registered before its bytes were final"
    homes = [st.homes[u] for u in st.units]
    split = [not _adjacent(a, b) for a, b in zip(homes, homes[1:])]
    assert sum(split) == 3, "consecutive homes are adjacent within a piece and never across two"
    for n, p in m.named_parameters():
        assert torch.equal(p, want[n]), n
    assert st.load_times["pin_total_s"] >= st.load_times["pin_s"] >= 0


def test_a_failing_fill_unpins_the_pieces_it_pinned(fake_pin, monkeypatch, fail_fill_after):
    from distorch.runtime import arena as arena_mod
    from distorch.errors import DisTorchError
    m = TinyDiT().eval()
    monkeypatch.setattr(arena_mod, "PIECE_BYTES", int(1.5 * nbytes(m.blocks[0])))
    fail_fill_after(15)
    p0 = pinning.pinned_bytes()
    with pytest.raises(DisTorchError, match="disk on fire"):
        store_for(m)
    assert not fake_pin and pinning.pinned_bytes() == p0
