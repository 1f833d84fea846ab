"""The lossless bf16/fp16 codec (formats/bf16_codec.py): ratio, encoder MB/s, GPU decoder GB/s.

    PYTHONPATH=<dir holding the package as distorch> python bench/bench_codec.py [--quick]

For a 4096 x 4096 and a 3072 x 12288 tensor of each kind of data (random normal with std 0.02 and
0.002 -- what trained bf16 weights look like -- and a heavy-tailed Student-t with 3 degrees of
freedom, std ~0.02; bf16, and fp16 for one case):

  ratio        compressed bytes / raw bytes of our code (escape levels, widths chosen per tensor)
  huffman      the same with an optimal Huffman code of the exponents (no table or offsets counted):
               what DFloat11-style coding would give; entropy: the bound for any exponent code
  enc MB/s     encoder throughput (raw input bytes / s) on one thread and on a thread pool (all cores)
  dec GB/s     the Triton kernel on the GPU, decoded (output) bytes per second of device time, from
               CUDA events over repeated launches; beside it the same for the torch decoder and a
               device-to-device copy of the output's size (read + write, as a bandwidth reference)
  cpu dec MB/s the torch decoder on the CPU (the CI / compute="cpu" path), normal 0.02 bf16 only

A second table times the encoder in torch ops on the device (formats/bf16_encode_torch.py, what the
runtime uses at load on a GPU) on the same tensors: encode_on on a tensor already on the device (median
of a few runs, torch.cuda.synchronize around each), its two phases (prepare: histograms and sizes, one
sync; write: coding and packing), the runtime's whole path for one tensor (pageable host tensor ->
device -> encode -> packed bytes in pinned host memory), the peak device scratch against
bf16_encode_torch.temp_bytes, and whether the bytes equal the numpy encoder's.  On the CPU the same
table reports the torch encoder running on the CPU.

Every GPU decode is checked bit-exact (int16 view) against the input.  Then, on the large tensor, the
number of levels (ratio against decode speed) and the Triton kernel's block size and warps are swept.  Prints markdown and writes it to $OUT/codec.md when OUT is
set.  Without CUDA it runs a small CPU smoke version (torch decoder; the Triton kernel too when
TRITON_INTERPRET=1 and Triton is installed).  Runs in well under a minute on a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import heapq
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

try:
    from distorch.formats import bf16_codec as codec
    from distorch.formats.bf16_encode import encode
    from distorch.formats.bf16_encode_torch import encode_on, prepare, temp_bytes
except ImportError:  # pragma: no cover - run from a checkout whose folder is not named distorch
    sys.exit("put the folder holding this package (as `distorch`) on PYTHONPATH")

CUDA = torch.cuda.is_available()


def make(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == "normal 0.02":
        x = torch.randn(n, generator=g) * 0.02
    elif kind == "normal 0.002":
        x = torch.randn(n, generator=g) * 0.002
    elif kind == "student-t3":
        # t with 3 degrees of freedom = normal / sqrt(chi2_3 / 3); std sqrt(3) -> scaled to ~0.02
        z = torch.randn(n, generator=g)
        chi = torch.randn(n, 3, generator=g).pow(2).sum(1) / 3
        x = z / chi.sqrt() * (0.02 / math.sqrt(3))
    else:
        raise ValueError(kind)
    return x.to(dtype).reshape(shape)


def huffman_bits(counts: list[int]) -> int:
    """Total bits of the symbols under an optimal (unbounded-length) Huffman code of these counts."""
    c = [x for x in counts if x > 0]
    if len(c) <= 1:
        return sum(c)                      # one symbol still takes a bit in a Huffman stream
    heap = list(c)
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        total += a + b                     # every merge adds one bit to each symbol below it
        heapq.heappush(heap, a + b)
    return total


def reference_ratios(t: torch.Tensor) -> tuple[float, float]:
    """(optimal Huffman ratio, entropy ratio) for the exponent of `t`, the rest stored raw."""
    u = t.reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF
    fp16 = t.dtype == torch.float16
    sym = (u >> 10) & 31 if fp16 else (u >> 7) & 255
    counts = torch.bincount(sym, minlength=256).tolist()
    n = u.numel()
    rest = 11 if fp16 else 8
    ent = -sum(c / n * math.log2(c / n) for c in counts if c)
    return (rest * n + huffman_bits(counts)) / (16 * n), (rest + ent) / 16


def timed_encode(t: torch.Tensor, executor=None, reps: int = 2) -> tuple[codec.Encoded, float]:
    best, enc = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        enc = encode(t, executor=executor)
        best = min(best, time.perf_counter() - t0)
    return enc, t.numel() * 2 / best / 1e6


def timed(fn) -> float:
    """Wall seconds of one call (after one warm-up call)."""
    fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def device_time(fn, reps: int) -> float:
    """Median seconds per call of fn on the GPU (CUDA events), or wall time on the CPU."""
    fn()
    if not CUDA:
        ts = []
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    torch.cuda.synchronize()
    ts = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / reps)
    return statistics.median(ts)


def wall(fn, reps: int) -> float:
    """Median wall seconds of fn() over `reps` runs after one warm-up, the device synchronised around each."""
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    fn()
    ts = []
    for _ in range(max(1, reps)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def device_encode_rows(cases: list, dev: str, reps: int) -> tuple[list[str], int, dict]:
    """The encode-on-device table: one row per (shape, kind, dtype, host tensor, numpy Encoded, numpy pool
    MB/s); returns its lines, the number of mismatches, and the rates of the big normal 0.02 bf16 case."""
    lines = ["", f"Encoder in torch ops on the device ({'CUDA' if CUDA else 'CPU'}; formats/bf16_encode_torch.py): "
             f"GB/s = raw input bytes / wall time (median of {reps} runs, synchronised)", "",
             "| tensor | data | dtype | widths | enc GB/s | prepare ms | write ms | host->dev->host GB/s | "
             "x numpy pool | scratch MiB | bound MiB | same bytes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    failures, big = 0, {}
    for shape, kind, dtype, t, ref, mbsp in cases:
        g = t.to(dev)
        enc = encode_on(g)
        same = enc.meta == ref.meta and torch.equal(enc.buf.cpu(), ref.buf)
        failures += not same
        raw = t.numel() * 2
        s_all = wall(lambda: encode_on(g), reps)
        s_prep = wall(lambda: prepare(g), reps)
        job = prepare(g)
        s_write = wall(lambda: job.write(), reps)
        if CUDA:
            host = torch.empty(job.nbytes, dtype=torch.uint8, pin_memory=True)
            s_path = wall(lambda: prepare(t.to(dev)).write(host), reps)
            path = f"{raw / s_path / 1e9:.1f}"
            torch.cuda.synchronize()
            del enc
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            enc = encode_on(g)
            torch.cuda.synchronize()
            scratch = torch.cuda.max_memory_allocated() - base - enc.nbytes
            mib = f"{scratch / 2**20:.0f}"
            failures += scratch > temp_bytes(t.numel(), dtype)
        else:
            path, mib = "n/a", "n/a"
        del job
        lines.append(f"| {shape[0]}x{shape[1]} | {kind} | {str(dtype)[6:]} | {enc.meta.widths} | {raw / s_all / 1e9:.3g} | "
                     f"{s_prep * 1e3:.1f} | {s_write * 1e3:.1f} | {path} | {raw / s_all / 1e6 / mbsp:.2g} | {mib} | "
                     f"{temp_bytes(t.numel(), dtype) / 2**20:.0f} | {'yes' if same else 'NO'} |")
        print(lines[-1], flush=True)
        if shape == cases[-1][0] and (kind, dtype) == ("normal 0.02", torch.bfloat16):
            big = {"gbs": raw / s_all / 1e9, "pool_mbs": mbsp, "path_gbs": float(path) if CUDA else None}
    if big and CUDA:
        flux = 23.8e9
        line = (f"A FLUX.1-dev-sized checkpoint (23.8 GB of bf16) at the {cases[-1][0][0]}x{cases[-1][0][1]} normal "
                f"0.02 bf16 rate: {flux / big['gbs'] / 1e9:.1f} s encoding on the device")
        if big["path_gbs"]:
            line += f" ({flux / big['path_gbs'] / 1e9:.1f} s with the upload and the packed bytes' download)"
        line += f", against {flux / big['pool_mbs'] / 1e6:.0f} s for the numpy encoder on the thread pool."
        lines += ["", line]
    return lines, failures, big


def exact(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.int16), b.reshape(-1).view(torch.int16))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases (the CPU smoke run always is)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dev = "cuda" if CUDA else "cpu"
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    have_triton = codec.triton_available() and (CUDA or interp)
    if CUDA:
        shapes = [(4096, 4096), (3072, 12288)]
        kinds = [("normal 0.02", torch.bfloat16), ("normal 0.002", torch.bfloat16), ("student-t3", torch.bfloat16),
                 ("normal 0.02", torch.float16)]
        if args.quick:
            kinds = kinds[:1]
        reps = args.reps
    else:
        shapes, kinds, reps = [(256, 256)], [("normal 0.02", torch.bfloat16), ("normal 0.02", torch.float16)], 1
    workers = os.cpu_count() or 1
    card = torch.cuda.get_device_name() if CUDA else "CPU (smoke run)"
    lines = [f"# bf16 codec, {card}, {datetime.date.today()}", "",
             f"`{' '.join([os.path.basename(sys.executable)] + sys.argv)}`; torch {torch.__version__}; "
             f"{workers} CPU threads; decode GB/s = output bytes / device time (median of 3 x {reps} launches)", "",
             "| tensor | data | dtype | widths | ratio | huffman | entropy | enc MB/s 1 thr | enc MB/s pool | "
             "dec GB/s triton | dec GB/s torch | copy GB/s | cpu dec MB/s | exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    failures = 0
    pool = ThreadPoolExecutor(workers)
    big = None
    cases = []
    for shape in shapes:
        for kind, dtype in kinds:
            t = make(kind, shape, dtype)
            enc, mbs1 = timed_encode(t)
            _, mbsp = timed_encode(t, pool)
            huff, ent = reference_ratios(t)
            ref = t.to(dev)
            g = enc.to(dev)
            out = torch.empty_like(ref)
            ok = exact(codec.decode(g), ref)
            t_torch = device_time(lambda: codec.decode(g, out), max(1, reps // 5))
            if have_triton:
                out.zero_()
                codec.decode_triton(g, out)
                ok = ok and exact(out, ref)
                t_tri = device_time(lambda: codec.decode_triton(g, out), reps)
                tri = f"{ref.numel() * 2 / t_tri / 1e9:.0f}"
            else:
                tri = "n/a"
            cpu = "" if (kind, dtype) != ("normal 0.02", torch.bfloat16) and CUDA else \
                f"{t.numel() * 2 / timed(lambda: codec.decode(enc)) / 1e6:.0f}"
            src = torch.empty_like(ref)
            t_copy = device_time(lambda: out.copy_(src), reps)
            failures += not ok
            lines.append(f"| {shape[0]}x{shape[1]} | {kind} | {str(dtype)[6:]} | {enc.meta.widths} | "
                         f"{enc.ratio:.4f} | {huff:.4f} | {ent:.4f} | {mbs1:.0f} | {mbsp:.0f} | {tri} | "
                         f"{ref.numel() * 2 / t_torch / 1e9:.2f} | {ref.numel() * 2 / t_copy / 1e9:.0f} | "
                         f"{cpu} | {'yes' if ok else 'NO'} |")
            print(lines[-1], flush=True)
            if shape == shapes[-1] and kind == "normal 0.02" and dtype == torch.bfloat16:
                big = (t, ref)
            cases.append((shape, kind, dtype, t, enc, mbsp))
    pool.shutdown()
    rows, bad, _ = device_encode_rows(cases, dev, max(3, reps // 4))
    lines += rows
    failures += bad
    del cases
    if CUDA and have_triton and big is not None:
        t, ref = big
        out = torch.empty_like(ref)
        lines += ["", f"Levels on {tuple(t.shape)} normal 0.02 bf16 (default block and warps):", "",
                  "| max levels | widths | ratio | dec GB/s triton | exact |", "|---|---|---|---|---|"]
        for levels in (2, 3, 4):
            enc = encode(t, max_levels=levels).to(dev)
            out.zero_()
            codec.decode_triton(enc, out)
            ok = exact(out, ref)
            failures += not ok
            s = device_time(lambda: codec.decode_triton(enc, out), reps)
            lines.append(f"| {levels} | {enc.meta.widths} | {enc.ratio:.4f} | {ref.numel() * 2 / s / 1e9:.0f} | "
                         f"{'yes' if ok else 'NO'} |")
            print(lines[-1], flush=True)
        lines += ["", f"Triton kernel on {tuple(t.shape)} normal 0.02 bf16 by block size and warps (GB/s of output):",
                  "", "| block | ratio | warps 4 | warps 8 | warps 16 |", "|---|---|---|---|---|"]
        for block in (1024, 2048, 4096):
            enc = encode(t, block=block).to(dev)
            row = [f"{block}", f"{enc.ratio:.4f}"]
            for w in (4, 8, 16):
                out.zero_()
                codec.decode_triton(enc, out, num_warps=w)
                ok = exact(out, ref)
                failures += not ok
                s = device_time(lambda: codec.decode_triton(enc, out, num_warps=w), reps)
                row.append(f"{ref.numel() * 2 / s / 1e9:.0f}{'' if ok else ' NOT EXACT'}")
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "codec.md"), "w") as f:
            f.write(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
