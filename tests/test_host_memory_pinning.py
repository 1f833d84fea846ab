"""Pinned host homes (issue 11, CPU parts; a fake pin function stands in for cudaHostRegister on a machine
without CUDA): the pinned-memory cap with its pageable overflow and one warning, a pinning failure never
failing a load, the cap setting, the planner pricing homes past the cap at the pageable rate, homes pinned in
pieces while the fill goes on, and a failing fill unpinning what it pinned.  The shared model and home store:
tests/host_memory_util.py."""
import ctypes
import gc
import logging

import pytest
import torch

from distorch.runtime import pinning
from distorch.runtime.arena import PAGEABLE

from host_memory_util import TinyDiT, nbytes, store_for


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
