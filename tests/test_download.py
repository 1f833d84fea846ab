"""runtime/download.py: weights back to the host through reused staging buffers, byte for byte.

On a CPU the pipeline runs with pin=False (ordinary staging, host sources) and small buffers: tensors smaller
and larger than a buffer, fp8, bool, bf16 and GGUF blocks go through pieces; what cannot be staged (not
contiguous, empty, 0-dim) goes by pinning.mapped_copy.  A deferred `copies` (device-to-buffer copies that run
only when a drain waits for its buffer) checks that a buffer is drained only after its copies and refilled
only after it was drained.  The CUDA test runs the pinned path on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from distorch.runtime import download, pinning
from distorch.runtime.download import Download
from distorch.runtime.upload import HostCopies

from staging_util import Deferred, as_bytes as _bytes

pytest.importorskip("gguf")
from distorch.formats import testing as ft  # noqa: E402


def _tensors():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 97, generator=g)                       # ~114 KB: many buffers
    return [
        torch.randn(5, generator=g),                              # smaller than a buffer
        big,
        big.t(),                                                  # not contiguous: mapped_copy
        torch.empty(0, 7),                                        # zero-size
        torch.tensor(3.5),                                        # 0-dim
        torch.randn(2048 + 3, generator=g).to(torch.float8_e4m3fn),
        torch.randint(0, 2, (777,), generator=g).bool(),
        torch.randint(0, 256, (4096 * 3 + 11,), dtype=torch.uint8, generator=g),
        torch.randn(640, 64, generator=g).to(torch.bfloat16),
        ft.random_blocks("Q8_0", (64, 96), generator=g).raw,      # GGUF stored blocks
        torch.nn.Parameter(torch.randn(33, 65, generator=g)),     # a parameter: its data comes back
        torch.randn(1100, 1024, generator=g),                     # 4.3 MiB: a mapping of its own
    ]


def _check(srcs, outs):
    assert len(outs) == len(srcs)
    for s, o in zip(srcs, outs):
        assert type(o) is torch.Tensor and o.device.type == "cpu"
        assert o.shape == s.shape and o.dtype == s.dtype and o.is_contiguous() == s.is_contiguous()
        if s.numel():
            assert o.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()
            assert torch.equal(_bytes(o), _bytes(s.detach()))
        if s.numel() * s.element_size() >= pinning.MAPPED_MIN_BYTES:
            assert o.data_ptr() % 4096 == 0, "a large copy sits in a mapping of its own (page-aligned)"


@pytest.mark.parametrize("stage,stages", [(4096, 3), (1000, 1), (1 << 20, 4), (512, 2)])
def test_bytes_exact_through_small_buffers(stage, stages):
    srcs = _tensors()
    with Download("cpu", pin=False, stage_bytes=stage, stages=stages) as dl:
        _check(srcs, dl.to_host(srcs))
        assert dl.bytes == sum(s.numel() * s.element_size() for s in srcs if s.numel() and s.is_contiguous())


def test_staging_and_threads_are_reused_across_calls_and_released():
    srcs = _tensors()
    made = []
    real = download._staging

    def counting(nbytes, pin):
        made.append(nbytes)
        return real(nbytes, pin)
    dl = Download("cpu", pin=False, stage_bytes=4096, stages=3)
    download._staging, saved = counting, download._staging
    try:
        for s in srcs:                          # one tensor per call, as the store decodes them
            _check([s], dl.to_host([s]))
    finally:
        download._staging = saved
    assert made == [4096 * 3], "one staging for every call"
    ex = dl._ex
    dl.close()
    assert dl._got is None and dl._ex is None and ex._shutdown
    assert Download("cpu", pin=False).to_host([]) == []


@pytest.mark.parametrize("n_threads", [1, 3])
def test_buffers_are_drained_after_their_copies_and_refilled_after_draining(n_threads):
    srcs = _tensors()
    cp = Deferred()
    with Download("cpu", pin=False, stage_bytes=2048, stages=3, copies=cp, n_threads=n_threads) as dl:
        _check(srcs, dl.to_host(srcs))
    assert cp.waits > 3          # the buffers went round


def test_deferred_copies_would_catch_a_missing_wait():
    """The check above has teeth: with waits ignored, drains read buffers whose copies have not run."""
    srcs = _tensors()
    with Download("cpu", pin=False, stage_bytes=2048, stages=3, copies=Deferred(honour_wait=False),
                  n_threads=1) as dl:
        outs = dl.to_host(srcs)
    with pytest.raises(AssertionError):
        _check(srcs, outs)


def test_inference_tensors_and_mode():
    with torch.inference_mode():
        srcs = _tensors()[:-3]         # inference_mode has no Parameter
        with Download("cpu", pin=False, stage_bytes=4096, stages=2, n_threads=2) as dl:
            outs = dl.to_host(srcs)
    _check(srcs, outs)


def test_a_failing_copy_raises_and_stops():
    class Boom(HostCopies):
        def issue(self, pairs):
            raise RuntimeError("copy engine on fire")
    with Download("cpu", pin=False, stage_bytes=4096, stages=2, copies=Boom()) as dl:
        with pytest.raises(RuntimeError, match="on fire"):
            dl.to_host(_tensors())


def test_host_sources_without_staging_go_by_mapped_copy():
    """pin=True with host tensors (no CUDA source): nothing is staged, every copy is pinning.mapped_copy's."""
    srcs = _tensors()
    with Download("cpu") as dl:
        outs = dl.to_host(srcs)
        assert dl._got is None and dl.summary() == "no staging"
    _check(srcs, outs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_download_is_exact_mapped_and_frees_its_staging():
    g = torch.Generator().manual_seed(2)
    host = _tensors() + [torch.randn(3000, 1000, generator=g),          # ~12 MB: larger than a buffer
                         torch.randn(2000, 999, generator=g).to(torch.float8_e4m3fn)]
    srcs = [t.detach().cuda() for t in host]
    before = pinning.pinned_bytes()
    with Download("cuda", stage_bytes=1 << 20, stages=3) as dl:
        outs = dl.to_host(srcs)
        assert dl.bytes > 12e6
        more = dl.to_host([srcs[-1]])[0]
    assert pinning.pinned_bytes() == before
    _check(host, outs)
    assert torch.equal(_bytes(more), _bytes(host[-1]))
