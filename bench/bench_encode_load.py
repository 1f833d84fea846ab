"""Where the time of coding weights at load goes (runtime/codec_stream.encode_units on a CUDA device).

24 bf16 tensors of 3072 x 12288 (N(0, 0.02), 1.81 GB) in pageable host memory, as a loader leaves them:
the host->device upload alone; the serial path (upload, formats.bf16_encode_torch.prepare, write into a
fresh pageable host buffer) with its three parts timed; the same without the download; writing into
pinned host memory instead; and encode_units itself with 1, 3 and 6 workers.

    PYTHONPATH=/tmp/site python3 bench/bench_encode_load.py        # a CUDA machine; prints GB/s of raw bytes
"""
from __future__ import annotations

import time

import torch

from distorch.formats.bf16_encode_torch import prepare
from distorch.runtime import codec_stream as cs


def main() -> None:
    dev = torch.device("cuda:0")
    ts = [(torch.randn(3072, 12288) * 0.02).to(torch.bfloat16) for _ in range(24)]
    nb = sum(t.numel() * 2 for t in ts)

    def gbps(dt: float) -> str:
        return f"{nb / dt / 1e9:.2f} GB/s ({dt:.2f} s)"
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g = [t.to(dev) for t in ts]
    torch.cuda.synchronize()
    print("H2D pageable", gbps(time.perf_counter() - t0))
    del g
    t0 = time.perf_counter()
    tu = tp = tw = 0.0
    for t in ts:
        a = time.perf_counter()
        x = t.to(dev)
        torch.cuda.synchronize()
        b = time.perf_counter()
        job = prepare(x)
        c = time.perf_counter()
        job.write(out=torch.empty(job.nbytes, dtype=torch.uint8))
        d = time.perf_counter()
        tu, tp, tw = tu + b - a, tp + c - b, tw + d - c
    print("serial: total", gbps(time.perf_counter() - t0), f"upload {tu:.2f} prepare {tp:.2f} write+download {tw:.2f}")
    t0 = time.perf_counter()
    for t in ts:
        prepare(t.to(dev)).write()
        torch.cuda.synchronize()
    print("no download", gbps(time.perf_counter() - t0))
    pin = [torch.empty(int(t.numel() * 2 * 0.7), dtype=torch.uint8, pin_memory=True) for t in ts]
    t0 = time.perf_counter()
    for t, p in zip(ts, pin):
        job = prepare(t.to(dev))
        job.write(out=p[:job.nbytes])
    torch.cuda.synchronize()
    print("pinned out", gbps(time.perf_counter() - t0))
    for w in (1, 3, 6):
        cs.GPU_WORKERS = w
        params = [torch.nn.Parameter(t.clone(), requires_grad=False) for t in ts]
        streamed = {"u": [(f"p{i}", p) for i, p in enumerate(params)]}
        t0 = time.perf_counter()
        out = cs.encode_units(streamed, ["u"], "cuda:0", progress=False)
        print(f"encode_units workers={w}", gbps(time.perf_counter() - t0), "ratio",
              round(out.stored_bytes / out.raw_bytes, 4))


if __name__ == "__main__":
    main()
