"""The parallel fill of host homes (runtime/fill.py): identical bytes from many pieces on several threads,
every thread kept busy across units, a failing copy leaving nothing half applied, and the fill under
torch.inference_mode().  The shared model and home store: tests/host_memory_util.py."""
import pytest
import torch

from host_memory_util import TinyDiT, store_for


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
