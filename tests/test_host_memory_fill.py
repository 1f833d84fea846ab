"""The parallel fill of host homes (runtime/fill.py): identical bytes from many pieces on several threads,
every thread kept busy across units, a failing copy leaving nothing half applied, the fill under
torch.inference_mode(), and the old storages freed on release threads within the window.  The shared model
and home store: tests/host_memory_util.py."""
import os

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


def _numpy_backed(t, freed, lock):
    """t's bytes in a numpy-owned storage whose release is recorded as (thread name, bytes) in `freed`."""
    import threading
    import weakref
    arr = t.detach().numpy().copy()
    nb = arr.nbytes

    def note():
        with lock:
            freed.append((threading.current_thread().name, nb))
    weakref.finalize(arr, note)            # runs on the thread that drops the storage's last reference
    return torch.from_numpy(arr)


def test_old_storages_are_let_go_of_off_the_calling_thread_within_the_window(monkeypatch):
    """The sources of each unit handed over are freed on the release threads, not the calling thread, and until
    they are, they count against the window: with slow releases, the home bytes written minus the source bytes
    freed never exceed in_flight_cap (RAM holds one copy plus the window)."""
    import threading
    import time
    from distorch.runtime import fill
    monkeypatch.setattr(fill, "CHUNK", 4096)
    monkeypatch.setattr(fill, "WINDOW_FRACTION", 0.0)
    monkeypatch.setattr(fill, "WINDOW_SLACK", 0)
    lock, freed, started, most = threading.Lock(), [], [0], [0]
    real_copy, real_drop = fill.copy_piece, fill._Releaser._drop

    def copy(dst, src):
        with lock:
            started[0] += dst.numel() * dst.element_size()
            most[0] = max(most[0], started[0] - sum(nb for _, nb in freed))
        real_copy(dst, src)

    def slow_drop(self, box, nb):
        time.sleep(0.005)
        real_drop(self, box, nb)
    monkeypatch.setattr(fill, "copy_piece", copy)
    monkeypatch.setattr(fill._Releaser, "_drop", slow_drop)
    want = [torch.randn(2048) for _ in range(12)]              # 8 KiB each: two pieces per unit
    dsts = [torch.empty(2048) for _ in want]
    items = [(f"u{i}", [(d, _numpy_backed(w, freed, lock))]) for i, (d, w) in enumerate(zip(dsts, want))]
    order = []

    def done(i):
        order.append(i)
        old = [s for _, s in items[i][1]]
        items[i] = (items[i][0], ())
        return old
    fill.fill_units(items, done, n_threads=4)
    assert order == list(range(12))
    assert all(torch.equal(d, w) for d, w in zip(dsts, want))
    assert len(freed) == 12 and all(name.startswith("distorch-release") for name, _ in freed), freed
    cap = fill.in_flight_cap(sum(w.numel() * 4 for w in want), 4)
    assert most[0] <= cap, f"{most[0]} bytes of homes beyond the sources freed, window {cap}"
    assert fill.release_threads(8) == 4 and fill.release_threads(1) == 1
    monkeypatch.setattr(fill, "RELEASERS", 0)
    assert fill.release_threads(8) == 0


@pytest.mark.parametrize("n_threads", [1, 4])
def test_homestore_frees_the_old_storages_on_release_threads(monkeypatch, n_threads):
    """Through HomeStore: every old storage is freed during the fill (one copy in RAM), on the release threads
    when the fill is parallel, inline on the calling thread when it is serial; with the home pages pre-faulted
    (fill.PREFAULT) the bytes are the same."""
    import threading
    from distorch.runtime import fill
    monkeypatch.setattr(fill, "CHUNK", 4096)
    monkeypatch.setattr(fill, "PREFAULT", True)
    monkeypatch.setenv(fill.ENV, str(n_threads))
    torch.manual_seed(5)
    m = TinyDiT(depth=4, d=64, h=160)
    want = {k: v.clone() for k, v in m.state_dict().items()}
    lock, freed = threading.Lock(), []
    with torch.no_grad():
        for p in m.blocks.parameters():
            p.data = _numpy_backed(p, freed, lock)
    n_src = len(list(m.blocks.parameters()))
    st, units = store_for(m, pin=False)
    assert len(freed) == n_src, "every old storage must be gone once the homes are filled"
    names = {name for name, _ in freed}
    if n_threads == 1:
        assert names == {"MainThread"}
    else:
        assert all(n.startswith("distorch-release") for n in names), names
    for k, v in m.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert st.held_bytes == 0


def _drop_spy(monkeypatch, fill):
    """fill's drop_pages, recorded: [(address, bytes)] of every range given back early (and whether the host
    honours the advice not yet known, whatever an earlier test saw)."""
    monkeypatch.setitem(fill._DROPS, "ok", None)
    seen = []
    real = fill._pinning.drop_pages

    def spy(ptr, nb):
        seen.append((ptr, nb))
        real(ptr, nb)
    monkeypatch.setattr(fill._pinning, "drop_pages", spy)
    return seen


def test_drop_early_gives_source_pages_back_per_piece_and_keeps_the_bytes(monkeypatch):
    """fill.DROP_EARLY: each piece's source pages go back as soon as it landed, for sources nothing else holds;
    a source still referenced elsewhere (a kept state dict) keeps its pages until it is let go of; the homes
    hold the exact bytes."""
    from distorch.runtime import fill
    monkeypatch.setattr(fill, "DROP_EARLY", True)
    monkeypatch.setattr(fill, "CHUNK", 128 << 10)           # 128 KiB pieces: whole pages to give back
    monkeypatch.setenv(fill.ENV, "4")
    seen = _drop_spy(monkeypatch, fill)
    torch.manual_seed(11)
    m = TinyDiT(depth=4, d=256, h=640)
    want = {k: v.clone() for k, v in m.state_dict().items()}
    kept = m.blocks[1].state_dict()                         # someone else holds block 1's weights
    held = [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in kept.values()]
    st, units = store_for(m, pin=False)
    for k, v in m.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert seen, "no source pages were given back early"
    dropped_in_held = [a for a, nb in seen for lo, hi in held if a < hi and lo < a + nb]
    assert not dropped_in_held, "pages of a source held elsewhere were given back"
    assert all(torch.equal(v, want[f"blocks.1.{k}"]) for k, v in kept.items())     # its holder still reads them
    assert sum(nb for _, nb in seen) > 0.5 * sum(
        p.numel() * p.element_size() for i in (0, 2, 3) for p in m.blocks[i].parameters())


def test_drop_early_failure_gives_the_dropped_pieces_their_bytes_back(monkeypatch):
    """A copy failing after other pieces of its unit (and of later units) gave their source pages back: those
    pieces are copied back from the home, every weight keeps its bytes, the failing unit and later ones keep
    their old storages."""
    from distorch.errors import DisTorchError
    from distorch.runtime import fill
    monkeypatch.setattr(fill, "DROP_EARLY", True)
    monkeypatch.setattr(fill, "CHUNK", 128 << 10)
    monkeypatch.setattr(fill, "WINDOW_FRACTION", 1.0)       # every unit in flight: later units drop pieces too
    monkeypatch.setenv(fill.ENV, "4")
    seen = _drop_spy(monkeypatch, fill)
    torch.manual_seed(12)
    m = TinyDiT(depth=5, d=256, h=640)
    want = {k: v.clone() for k, v in m.state_dict().items()}
    before = {k: p.data_ptr() for k, p in m.named_parameters()}
    w = m.blocks[2].down.weight
    last = w.data_ptr() + w.numel() * w.element_size() - (128 << 10)     # its last piece
    real = fill.copy_piece
    import time

    def copy(dst, src):
        if src.data_ptr() == last:
            time.sleep(0.05)                                # the other pieces land (and drop) first
            raise RuntimeError("disk on fire")
        real(dst, src)
    monkeypatch.setattr(fill, "copy_piece", copy)
    with pytest.raises(DisTorchError, match=r"'blocks\.2'.*disk on fire"):
        store_for(m, pin=False)
    unit_of = lambda a: next((i for i, b in enumerate(m.blocks) for p in b.parameters()        # noqa: E731
                              if p.data_ptr() <= a < p.data_ptr() + p.numel() * p.element_size()), None)
    assert {unit_of(a) for a, _ in seen} & {2, 3, 4}, "the test needs pieces dropped in the failing unit or later"
    for k, p in m.named_parameters():
        assert torch.equal(p, want[k]), k
        unit = int(k.split(".")[1]) if k.startswith("blocks.") else -1
        if unit >= 2:
            assert p.data_ptr() == before[k], k


@pytest.mark.parametrize("value, on", [("1", True), ("", True), ("0", False), ("yes", True), ("off", False),
                                       ("maybe", True)])
def test_drop_early_follows_its_environment_setting(value, on):
    import os
    import subprocess
    import sys
    env = dict(os.environ, DISTORCH_FILL_DROP_EARLY=value)
    p = subprocess.run([sys.executable, "-c", "from distorch.runtime import fill; print(fill.DROP_EARLY)"],
                       env=env, capture_output=True, text=True, check=True)
    assert p.stdout.strip() == str(on)
    # a value that is no switch is named, with what works
    assert ("'maybe' is not a switch (1/on/true/yes or 0/off/false/no); taken as on" in p.stderr) == \
        (value == "maybe"), p.stderr


def test_drop_early_gives_back_only_the_sources_named_droppable(monkeypatch):
    """fill_units gives a source's pages back only when its caller named it droppable (HomeStore: a plain
    parameter's `.data` alias; never a GGUF parameter's raw blocks or a compressed buffer, which are the very
    tensors their holders keep, so the storage's use count cannot tell another holder apart)."""
    from distorch.runtime import fill
    monkeypatch.setattr(fill, "DROP_EARLY", True)
    monkeypatch.setattr(fill, "CHUNK", 128 << 10)
    seen = _drop_spy(monkeypatch, fill)
    srcs = [torch.randn(1 << 18) for _ in range(4)]          # 1 MiB each
    want = [s.clone() for s in srcs]
    dsts = [torch.empty_like(s) for s in srcs]
    for which in ((), (1, 3)):
        named = {id(srcs[i]) for i in which}
        seen.clear()
        items = [(f"u{i}", [(d, s)]) for i, (d, s) in enumerate(zip(dsts, srcs))]
        fill.fill_units(items, lambda i: None, n_threads=2, droppable=named)
        assert all(torch.equal(d, w) for d, w in zip(dsts, want))
        hit = {i for i, s in enumerate(srcs) for a, _ in seen
               if s.data_ptr() <= a < s.data_ptr() + s.numel() * 4}
        assert hit == {i for i, s in enumerate(srcs) if id(s) in named}, (hit, named)
        if named:
            assert not torch.equal(srcs[1], want[1]) and torch.equal(srcs[0], want[0])     # pages really went
        srcs = [w.clone() for w in want]
        dsts = [torch.empty_like(s) for s in srcs]


def test_drop_early_turns_itself_off_where_the_host_ignores_the_advice(monkeypatch, caplog):
    """A host whose madvise(MADV_DONTNEED) leaves the pages in place: the first dropped page still holds its
    bytes, DROP_EARLY stays off from there on (no piece counted as gone), with one warning; bytes exact."""
    from distorch.runtime import fill
    monkeypatch.setattr(fill, "DROP_EARLY", True)
    monkeypatch.setattr(fill, "CHUNK", 128 << 10)
    monkeypatch.setitem(fill._DROPS, "ok", None)
    calls = []
    monkeypatch.setattr(fill._pinning, "drop_pages", lambda ptr, nb: calls.append(nb))      # ignored advice
    srcs = [torch.randn(1 << 18) + 5 for _ in range(4)]
    want = [s.clone() for s in srcs]
    dsts = [torch.empty_like(s) for s in srcs]
    items = [(f"u{i}", [(d, s)]) for i, (d, s) in enumerate(zip(dsts, srcs))]
    with caplog.at_level("WARNING", logger="distorch.runtime.fill"):
        fill.fill_units(items, lambda i: None, n_threads=4, droppable={id(s) for s in srcs})
    assert fill._DROPS["ok"] is False and len(calls) == 1, calls
    assert "ignores madvise" in caplog.text
    assert all(torch.equal(d, w) for d, w in zip(dsts, want))


def test_pieces_too_small_to_give_back_stay_counted_and_do_not_decide_the_probe(monkeypatch):
    """A source piece with fewer whole pages than drop_pages acts on (a bias) is not taken as given back, and
    it is never the probe that decides whether the host honours the advice (its bytes stay: that would say
    "ignored" on any host)."""
    from distorch.runtime import fill, pinning
    monkeypatch.setattr(fill, "DROP_EARLY", True)
    seen = _drop_spy(monkeypatch, fill)
    small = [torch.randn(2048) + 5 for _ in range(3)]          # 8 KiB: under DROP_MIN_PAGES
    big = torch.randn(1 << 18) + 5                              # 1 MiB
    assert pinning.droppable_span(small[0].data_ptr(), 8192) is None
    srcs = small + [big]
    want = [s.clone() for s in srcs]
    dsts = [torch.empty_like(s) for s in srcs]
    items = [(f"u{i}", [(d, s)]) for i, (d, s) in enumerate(zip(dsts, srcs))]
    fill.fill_units(items, lambda i: None, n_threads=2, droppable={id(s) for s in srcs})
    assert all(torch.equal(d, w) for d, w in zip(dsts, want))
    assert all(torch.equal(s, w) for s, w in zip(small, want))                  # small ones untouched
    assert [nb for _, nb in seen] == [big.numel() * 4] and fill._DROPS["ok"] is True


def test_a_file_mapped_source_decides_nothing_about_the_advice(monkeypatch, tmp_path, caplog):
    """A weight still viewing the file its loader mapped (safetensors' get_tensor does) reads the file's bytes
    back after MADV_DONTNEED whatever the host does: the probe takes no verdict from it (no warning, DROP_EARLY
    stays on, its pieces not counted as gone) and a later anonymous source decides."""
    import mmap
    from distorch.runtime import fill, pinning
    if pinning.file_mapping(torch.zeros(1).data_ptr()) is not None or not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    monkeypatch.setitem(fill._DROPS, "ok", None)
    monkeypatch.setattr(fill, "_FILE_SPANS", [])
    n = 64 * 4096
    path = tmp_path / "w.bin"
    path.write_bytes((torch.arange(n // 4, dtype=torch.float32) + 1).numpy().tobytes())
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), n, flags=mmap.MAP_PRIVATE)
    src = torch.frombuffer(mm, dtype=torch.float32)
    assert pinning.file_mapping(src.data_ptr()) is not None
    with caplog.at_level("WARNING", logger="distorch.runtime.fill"):
        assert fill._drop_checked(src) is False
        assert fill._DROPS["ok"] is None and "ignores madvise" not in caplog.text
        assert fill._drop_checked(src[1024:]) is False             # the same mapping: not probed again
        anon = pinning.mapped_empty((n // 4,), torch.float32).fill_(3.0)
        assert pinning.file_mapping(anon.data_ptr()) is None
        assert fill._drop_checked(anon) is True and fill._DROPS["ok"] is True
    assert torch.equal(src, torch.arange(n // 4, dtype=torch.float32) + 1)     # the file's bytes, still
    del src
    mm.close()
