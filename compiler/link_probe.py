"""Measuring a machine's links and compute rates for `compiler.inventory.probe`: pinned host -> each GPU
(a 256 MiB copy, median of 5 after a warm-up), GPU -> GPU peer copies where
`torch.cuda.can_device_access_peer` says so, and each GPU's compute rate: a bf16 8192^3 GEMM's FLOP/s x
GEMM_EFFICIENCY (0.55).  Progress goes to the logger "distorch.compiler.inventory"."""
from __future__ import annotations

import logging
import statistics
from types import ModuleType
from typing import TYPE_CHECKING

from .. import progress as _stages

if TYPE_CHECKING:
    from .inventory import Inventory

log = logging.getLogger("distorch.compiler.inventory")   # the probe's logger


def progress_line(msg: str, enabled: bool) -> None:
    """One line of the probe on the logger (INFO when progress is on, else DEBUG)."""
    log.log(logging.INFO if enabled else logging.DEBUG, "probe: %s", msg.strip())


def _time_copy(torch, dst, src, stream, reps: int = 5) -> float:
    """Median bytes/s of dst.copy_(src) on `stream` (one warm-up)."""
    times = []
    with torch.cuda.stream(stream):
        for i in range(reps + 1):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record(stream)
            dst.copy_(src, non_blocking=True)
            b.record(stream)
            b.synchronize()
            if i:
                times.append(a.elapsed_time(b) / 1e3)
    return src.numel() * src.element_size() / statistics.median(times)


GEMM_N = 8192            # probe GEMM: 8192^3 bf16 (1.1 TFLOP, ~1.5 ms on an H100)
GEMM_EFFICIENCY = 0.55   # traced FLOPs (compiler.trace, FlopCounterMode) per second of a real step, over a
#                          large GEMM's rate: diffusers Flux-dev at 1024x1024 on an H100 runs its 74.4 traced
#                          TFLOP at 409 TFLOP/s against a 736 TFLOP/s 8192^3 GEMM (bench/results/gguf_h100_unitdq_b.md;
#                          checked on another H100 in gguf_h100_r4.md: 777 x 0.55 = 427 predicted, 410 reached).
#                          Norms, softmax, elementwise work and uncounted ops sit between the matmuls


def _time_gemm(torch, dev: str, n: int = GEMM_N, reps: int = 5) -> float:
    """Median FLOP/s of an n x n x n bf16 matmul on `dev` (one warm-up)."""
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    times = []
    for i in range(reps + 1):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        torch.mm(a, b)
        e1.record()
        e1.synchronize()
        if i:
            times.append(e0.elapsed_time(e1) / 1e3)
    del a, b
    return 2.0 * n ** 3 / statistics.median(times)


def measure(torch: ModuleType, inv: Inventory, n: int, copy_mib: int, progress: bool) -> None:
    """Measure the links and compute rates of the `n` CUDA devices into `inv` (an Inventory), then refresh
    their free memory (after the probe's buffers are gone)."""
    nbytes = copy_mib << 20
    peers = [(i, j) for i in range(n) for j in range(n) if i != j and torch.cuda.can_device_access_peer(j, i)]
    with _stages.stage("distorch: probing links and compute rates", 2 * n + len(peers), "probes",
                       enabled=progress) as st:
        measure_into(torch, inv, n, copy_mib, progress, nbytes, peers, st)


def measure_into(torch: ModuleType, inv: Inventory, n: int, copy_mib: int, progress: bool, nbytes: int,
                 peers: list[tuple[int, int]], st: _stages.Stage) -> None:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    bufs = {}
    for i in range(n):
        dev = f"cuda:{i}"
        log.debug("probe: pinned cpu -> %s (%d MiB copies)...", dev, copy_mib)
        bufs[i] = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        s = torch.cuda.Stream(device=dev)
        with torch.cuda.device(i):
            bw = _time_copy(torch, bufs[i], host, s)
        inv.links[("cpu", dev)] = bw
        st.update()
        progress_line(f"  cpu -> {dev}: {bw / 1e9:.1f} GB/s", progress)
        try:
            with torch.cuda.device(i):
                g = _time_gemm(torch, dev)
            inv.compute_rate[dev] = g * GEMM_EFFICIENCY
            progress_line(f"  {dev}: bf16 GEMM {g / 1e12:.0f} TFLOP/s (effective rate {g * GEMM_EFFICIENCY / 1e12:.0f})",
                      progress)
        except Exception as e:       # a device without bf16 matmul keeps the default rate
            log.warning("probe: %s: GEMM probe failed (%s: %s); default compute rate", dev, type(e).__name__, e)
        st.update()
    for i, j in peers:
        log.debug("probe: peer cuda:%d -> cuda:%d...", i, j)
        s = torch.cuda.Stream(device=f"cuda:{j}")
        with torch.cuda.device(j):
            bw = _time_copy(torch, bufs[j], bufs[i], s)
        inv.links[(f"cuda:{i}", f"cuda:{j}")] = bw
        st.update()
        progress_line(f"  cuda:{i} -> cuda:{j}: {bw / 1e9:.1f} GB/s", progress)
    del bufs, host
    torch.cuda.empty_cache()
    for i in range(n):  # free memory after our buffers are gone
        f, t = torch.cuda.mem_get_info(i)
        inv.devices[f"cuda:{i}"].free_bytes = int(f)
