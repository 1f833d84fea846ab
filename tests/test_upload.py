"""runtime/upload.py: resident weights to the device through reused staging buffers, byte for byte.

On a CPU the same batch logic runs with pin=False (ordinary staging, host targets) and small buffers, so that
tensors smaller and larger than a buffer, non-contiguous, zero-size, 0-dim, fp8, bool and GGUF blocks all go
through pieces.  A deferred `copies` (copies run only when the pipeline waits for a buffer) checks that no
buffer is refilled before its copies are done.  Resident.place is run through apply() with every weight made
to move (needs_move) through a small-buffer upload, and keep_host_originals hands back the pre-move tensors.
"""
from __future__ import annotations

import functools

import pytest
import torch

from distorch.runtime import pinning, place, upload
from distorch.runtime.upload import HostCopies, batches, to_device

pytest.importorskip("gguf")
from distorch.formats import testing as ft  # noqa: E402
from distorch.formats.gguf_tensor import GGUFTensor  # noqa: E402
from distorch.runtime.apply import apply  # noqa: E402

from staging_util import Deferred, as_bytes as _bytes  # noqa: E402
from gguf_toys import bits, hand_plan, make, x_in  # noqa: E402


def _tensors():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 97, generator=g)                       # ~114 KB: many buffers
    out = [
        torch.randn(5, generator=g),                              # smaller than a buffer
        big,
        big.t(),                                                  # dense, permuted strides
        big[:, 3:50],                                             # not dense: a slice
        torch.randn(4, 1, 6, generator=g).expand(4, 3, 6),       # overlapping (stride 0)
        torch.empty(0, 7),                                        # zero-size
        torch.tensor(3.5),                                        # 0-dim
        torch.randn(2048 + 3, generator=g).to(torch.float8_e4m3fn),
        torch.randint(0, 2, (777,), generator=g).bool(),
        torch.randint(0, 256, (4096 * 3 + 11,), dtype=torch.uint8, generator=g),
        torch.randn(64, 64, generator=g).to(torch.bfloat16)[::2],  # strided bf16
        ft.random_blocks("Q8_0", (64, 96), generator=g).raw,      # GGUF stored blocks
    ]
    return out


def _check(srcs, outs):
    assert len(outs) == len(srcs)
    for s, o in zip(srcs, outs):
        assert o.shape == s.shape and o.dtype == s.dtype
        assert o.stride() == torch.empty_like(s).stride()       # the layout .to() gives
        if s.numel():
            assert o.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()
            assert torch.equal(_bytes(o), _bytes(s))


@pytest.mark.parametrize("stage,stages", [(4096, 3), (1000, 1), (1 << 20, 4), (512, 2)])
def test_bytes_exact_through_small_buffers(stage, stages):
    srcs = _tensors()
    _check(srcs, to_device(srcs, "cpu", pin=False, stage_bytes=stage, stages=stages))


def test_batches_cover_every_byte_once():
    sizes = [10, 0, 5000, 1, 4096, 70000, 3, 4097]
    for stage in (512, 4096, 5000, 1 << 16):
        loads = batches(sizes, stage)
        seen = {j: [] for j in range(len(sizes))}
        for load in loads:
            assert load, "no empty buffer loads"
            used = []
            for j, a, n, off in load:
                assert n > 0 and off % upload.ALIGN == 0 and off + n <= stage
                used.append((off, off + n))
                seen[j].append((a, n))
            used.sort()
            assert all(x[1] <= y[0] for x, y in zip(used, used[1:])), "pieces overlap in a buffer"
        for j, n in enumerate(sizes):
            pos = 0
            for a, k in sorted(seen[j]):
                assert a == pos
                pos += k
            assert pos == n


@pytest.mark.parametrize("n_threads", [1, 3])
def test_buffers_are_reused_only_after_their_copies(n_threads):
    srcs = _tensors()
    cp = Deferred()
    outs = to_device(srcs, "cpu", pin=False, stage_bytes=2048, stages=3, copies=cp, n_threads=n_threads)
    _check(srcs, outs)
    assert cp.waits > 3          # the buffers went round


def test_deferred_copies_would_catch_a_missing_wait():
    """The check above has teeth: with waits ignored, late copies read refilled buffers."""
    srcs = _tensors()
    outs = to_device(srcs, "cpu", pin=False, stage_bytes=2048, stages=3, copies=Deferred(honour_wait=False),
                     n_threads=1)
    with pytest.raises(AssertionError):
        _check(srcs, outs)


def test_inference_tensors_and_mode():
    with torch.inference_mode():
        srcs = _tensors()
        outs = to_device(srcs, "cpu", pin=False, stage_bytes=4096, stages=2, n_threads=2)
    _check(srcs, outs)


def test_a_failing_copy_raises_and_stops():
    class Boom(HostCopies):
        def issue(self, pairs):
            raise RuntimeError("copy engine on fire")
    with pytest.raises(RuntimeError, match="on fire"):
        to_device(_tensors(), "cpu", pin=False, stage_bytes=4096, stages=2, copies=Boom())


def test_plain_path_where_staging_cannot_help():
    srcs = _tensors()
    outs = to_device(srcs, "cpu")              # pin=True to a host device: plain .to(), the same tensors
    assert all(o is s for o, s in zip(outs, srcs))
    p = torch.nn.Parameter(torch.randn(3, 3))  # a tensor subclass is never staged
    assert not upload._stageable(p, torch.device("cpu"), False)


def test_pinned_staging_is_registered_capped_and_released(monkeypatch):
    regs = []
    monkeypatch.setattr(pinning, "host_register", lambda ptr, n: regs.append((ptr, n)) or 0)
    monkeypatch.setattr(pinning, "host_unregister", lambda ptr: regs.remove(next(r for r in regs if r[0] == ptr)))
    before = pinning.pinned_bytes()
    n = upload.STAGES * upload.STAGE_BYTES
    assert n <= 256 << 20
    buf, release = upload._staging(n, True)
    assert buf.numel() == n and regs == [(buf.data_ptr(), n)] and pinning.pinned_bytes() == before + n
    release()
    assert regs == [] and pinning.pinned_bytes() == before
    monkeypatch.setattr(pinning, "host_register", lambda ptr, n: 2)        # CUDA refuses: plain copies
    assert upload._staging(n, True) is None and pinning.pinned_bytes() == before
    monkeypatch.setenv(pinning.ENV, "0")                                  # no room under the cap
    assert upload._staging(n, True) is None


@pytest.fixture
def moving(monkeypatch):
    """Every resident weight moves (a CPU stands in for the GPU) through a small-buffer staged upload."""
    calls = []
    real = functools.partial(to_device, pin=False, stage_bytes=4096, stages=3)

    def up(tensors, device):
        calls.append(len(tensors))
        return real(tensors, device)
    monkeypatch.setattr(place, "needs_move", lambda t, device: True)
    monkeypatch.setattr(place, "upload_to", up)
    return calls


def test_resident_place_uploads_dense_and_gguf_exactly(moving):
    m = make("Q8_0", d=64, depth=4)
    x = x_in()
    with torch.no_grad():
        ref = m(x)
    before = {id(p): (p.raw if isinstance(p, GGUFTensor) else p.data) for p in m.parameters()}
    kept_for = [m.head.bias, m.blocks[0].norm.weight]
    assert isinstance(m.head.weight, GGUFTensor) and not isinstance(m.head.bias, GGUFTensor)
    streamed = m.blocks[3].norm.weight
    with place.keep_host_originals(kept_for + [m.head.weight, streamed]) as kept:
        rt = apply(m, hand_plan(m, {"blocks.2", "blocks.3"}), progress=False)
    try:
        assert moving and moving[0] > 0
        resident = [p for n in ("blocks.0", "blocks.1") for p in m.get_submodule(n).parameters()] + \
            list(m.head.parameters())
        for p in resident:
            now = p.raw if isinstance(p, GGUFTensor) else p.data
            old = before[id(p)]
            assert now.data_ptr() != old.data_ptr(), "moved through the staging"
            assert torch.equal(_bytes(now), _bytes(old))
            if isinstance(p, GGUFTensor):
                assert p.device == now.device
        assert set(kept) == {id(p) for p in kept_for}, "dense resident ones only (not GGUF, not streamed)"
        for p in kept_for:
            assert kept[id(p)].data_ptr() == before[id(p)].data_ptr(), "the pre-move tensor, not a copy"
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(bits(m(x)), bits(ref))
    finally:
        rt.undo()
    with torch.no_grad():
        assert torch.equal(bits(m(x)), bits(ref))


def test_a_failing_upload_falls_back_to_plain_copies(monkeypatch):
    def broken(tensors, device):
        raise RuntimeError("no staging today")
    monkeypatch.setattr(place, "needs_move", lambda t, device: True)
    monkeypatch.setattr(place, "upload_to", broken)
    m = make("Q8_0", d=64, depth=2)
    x = x_in()
    with torch.no_grad():
        ref = m(x)
    rt = apply(m, hand_plan(m, {"blocks.1"}), progress=False)
    try:
        with torch.no_grad():
            assert torch.equal(bits(m(x)), bits(ref))
    finally:
        rt.undo()


def test_keep_host_originals_is_scoped():
    assert place._KEEP.get() is None
    with place.keep_host_originals([]) as kept:
        assert place._KEEP.get() is not None and kept == {}
    assert place._KEEP.get() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_upload_is_exact_and_frees_its_staging():
    g = torch.Generator().manual_seed(2)
    srcs = _tensors() + [torch.randn(3000, 1000, generator=g),          # ~12 MB: larger than a buffer
                         torch.randn(2000, 999, generator=g).to(torch.float8_e4m3fn)]
    before = pinning.pinned_bytes()
    outs = to_device(srcs, "cuda", stage_bytes=1 << 20, stages=3)
    assert pinning.pinned_bytes() == before
    assert all(o.device.type == "cuda" for o in outs)
    _check(srcs, [o.cpu() for o in outs])
