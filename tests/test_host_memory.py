"""Host memory honesty (issue 11, CPU parts): one host copy of every offloaded byte, unload gives the
memory back (RssAnon and its peak measured), and undo to the host puts weights in mappings of their own.
The pinned-memory cap with its pageable overflow: tests/test_host_memory_pinning.py; the parallel fill of the
homes: tests/test_host_memory_fill.py; the shared model and plans: tests/host_memory_util.py."""
import gc

import pytest
import torch

from distorch.compiler.plan import PlacedUnit
from distorch.runtime import fill as _fill
from distorch.runtime import pinning
from distorch.runtime.apply import apply

from host_memory_util import TinyDiT, nbytes, plan_all

MiB = 1 << 20


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


@pytest.mark.parametrize("drop_early", [False, True], ids=["let-go", "drop-early"])
def test_two_models_compile_in_turn_one_host_copy_and_undo_gives_it_back(monkeypatch, drop_early):
    """With fill.DROP_EARLY too: each piece's source pages go back as it lands, within the same bounds."""
    monkeypatch.setattr(_fill, "DROP_EARLY", drop_early)
    monkeypatch.setitem(_fill._DROPS, "ok", None)
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
            # the fill's transient: at least one 16 MiB piece per thread in flight (runtime/fill.py
            # in_flight_cap), 128 MiB with the 8 threads of a 16-core GPU host, more than 64 MiB of this toy
            window = max(64 * MiB, _fill.in_flight_cap(off, _fill.threads()))
            peak = hwm_anon_growth(h0, f0)
            assert peak <= 0.05 * off + window + slots, \
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
    _host_copy = pinning.mapped_copy               # what runtime/download.py falls back to
    t = torch.randn(1024, 512)
    c = _host_copy(t)
    assert torch.equal(c, t) and _mapped(c) and c.data_ptr() != t.data_ptr()
    s = t.t()
    c = _host_copy(s)
    assert torch.equal(c, s)
    small = torch.arange(10)
    assert torch.equal(_host_copy(small), small)
