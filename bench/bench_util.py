"""What the ComfyUI benches (bench_comfy.py, bench_comfy_wan.py, bench_comfy_codec.py, bench_comfy_gguf.py,
bench_comfy_clip.py) share: logging, ComfyUI's boot and distorch's import, where results go, a streaming
safetensors writer, and the measuring (bit-equal latents, time guard, host-memory sampler, timed sampling,
ComfyUI's partial loading, unloading, budget order, the results header).

Scripts reach these through `import bench_comfy as B` (B.say, B.boot, B.sample_timed ...); a script that
wants its own log prefix sets `bench_util.NAME` (say() reads it at each call).
"""
from __future__ import annotations

import gc
import json
import math
import os
import re
import statistics
import struct
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30
T0 = time.perf_counter()
NAME = "bench_comfy"             # the log prefix; a script sets its own (bench_comfy_wan.py: bench_util.NAME = "bench_wan")


def say(*a):
    print("[%s %6.1fs]" % (NAME, time.perf_counter() - T0), *a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------
# ComfyUI and distorch, imported the way ComfyUI runs
# ------------------------------------------------------------------------------------------------------
def boot(comfy_dir: str, cpu: bool):
    """ComfyUI's import order (main.py): options, cli args, cuda_malloc before torch, extra_config, nodes."""
    sys.path.insert(0, comfy_dir)
    try:                                      # carried wheels for av / torchsde / trampoline
        import av  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"ComfyUI needs PyAV here: {e}")
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    args.cpu = cpu
    if not cpu:
        import cuda_malloc  # noqa: F401  (sets the allocator backend before torch initialises CUDA)
    import utils.extra_config  # noqa: F401
    import comfy.model_management as mm
    import comfy.utils
    import nodes
    import folder_paths
    comfy.utils.PROGRESS_BAR_ENABLED = False
    return mm, nodes, folder_paths


def import_distorch():
    """The distorch.comfy_nodes package, its modules imported (entry, gguf_loaders, nodes ...); where distorch
    is not pip-installed (the GPU machine), the repo root, which IS the package, is put on the path under the
    name distorch."""
    try:
        import distorch.comfy_nodes  # noqa: F401
    except ImportError:
        import tempfile
        d = tempfile.mkdtemp(prefix="distorch_pkg_")
        os.symlink(REPO, os.path.join(d, "distorch"))
        sys.path.insert(0, d)
    from distorch import comfy_nodes
    from distorch.comfy_nodes import entry, gguf_loaders, nodes  # noqa: F401
    return comfy_nodes


def card_tag(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA GeForce RTX 4090' -> 'rtx4090', 'cpu' -> 'cpu'."""
    m = re.search(r"\b([ABHLV]\d{2,3}|GH\d{3}|GB\d{3}|B\d{3})\b", name)
    if m:
        return m.group(1).lower()
    m = re.search(r"RTX\s*(\w+)", name)
    if m:
        return "rtx" + m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def out_path(out: str | None, default_name: str) -> str:
    """Where a result goes: `out` (default bench/results/<default_name>), under $OUT when that is set."""
    out = out or os.path.join(REPO, "bench", "results", default_name)
    if os.environ.get("OUT"):
        out = os.path.join(os.environ["OUT"], os.path.basename(out))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    return out


def write_result(text: str, out: str | None, default_name: str) -> str:
    """Write a results document where out_path says (bench_comfy_clip.py, bench_comfy_gguf.py); returns its path."""
    path = out_path(out, default_name)
    with open(path, "w") as fh:
        fh.write(text)
    return path


def start(comfy_dir: str, device: str):
    """ComfyUI booted for `device` and distorch's nodes imported: (mm, nodes, folder_paths, torch, ComfyUI's
    version, distorch.comfy_nodes.entry, the torch device, the card's name or 'cpu')."""
    cpu = device == "cpu"
    mm, nodes, folder_paths = boot(comfy_dir, cpu)
    import torch
    import comfyui_version
    entry = import_distorch().entry
    dev = torch.device(device)
    gpu = "cpu" if cpu else torch.cuda.get_device_name(dev)
    say(f"ComfyUI {comfyui_version.__version__}, torch {torch.__version__}, {gpu}")
    return mm, nodes, folder_paths, torch, comfyui_version.__version__, entry, dev, gpu


# ------------------------------------------------------------------------------------------------------
# Model files: a streaming safetensors writer (one tensor in host memory at a time)
# ------------------------------------------------------------------------------------------------------
def _st_dtype(dt) -> tuple[str, int]:
    import torch
    table = {torch.float32: ("F32", 4), torch.bfloat16: ("BF16", 2), torch.float16: ("F16", 2),
             torch.float8_e4m3fn: ("F8_E4M3", 1), torch.float8_e5m2: ("F8_E5M2", 1), torch.int64: ("I64", 8),
             torch.int32: ("I32", 4), torch.uint8: ("U8", 1), torch.bool: ("BOOL", 1)}
    if dt not in table:
        raise ValueError(f"dtype {dt} has no safetensors name here; use one of {sorted(str(k) for k in table)}")
    return table[dt]


def write_safetensors(path: str, specs: list, make, metadata: dict | None = None) -> int:
    """Write a .safetensors file tensor by tensor: specs = [(name, shape, dtype)], make(name, shape, dtype)
    returns that tensor (any device).  Written to path + '.part', renamed when complete.  Returns bytes of data."""
    header, off = {}, 0
    for name, shape, dt in specs:
        code, size = _st_dtype(dt)
        n = math.prod(shape) * size
        header[name] = {"dtype": code, "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path + ".part"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)))
        fh.write(hb)
        for name, shape, dt in specs:
            t = make(name, shape, dt)
            if tuple(t.shape) != tuple(shape) or t.dtype != dt:
                raise ValueError(f"{name}: made {tuple(t.shape)} {t.dtype}, declared {tuple(shape)} {dt}")
            b = t.detach().contiguous().reshape(-1).to("cpu").view(__import__("torch").uint8).numpy()
            fh.write(memoryview(b))
            del t, b
    os.replace(tmp, path)
    return off


# ------------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------------
def bit_equal(a, b) -> bool:
    """Same shape, dtype and bits (NaNs compare by their bits, unlike torch.equal)."""
    import torch
    if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().contiguous().cpu(), b.detach().contiguous().cpu()
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class Guard:
    """A time budget for a phase: deadline_s from the start of the process (0: none)."""

    def __init__(self, deadline_s: float):
        self.deadline = deadline_s

    def left(self) -> float:
        return math.inf if not self.deadline else self.deadline - (time.perf_counter() - T0)

    def allow(self, est_s: float, what: str, skipped: list) -> bool:
        if self.left() >= est_s:
            return True
        skipped.append(what)
        say(f"time guard: skipping {what} (needs ~{est_s:.0f}s, {self.left():.0f}s left)")
        return False


class RssSampler(threading.Thread):
    """Host memory of this process every `period` s from /proc/self/status (VmRSS, RssAnon, RssFile,
    RssShmem), the machine's used memory (MemTotal - MemAvailable), what distorch and ComfyUI have pinned.
    `mark()` starts a new window; `peak()` is the sample with the largest VmRSS since the mark and the
    largest value of each field."""
    FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")

    def __init__(self, period: float = 0.05, mm=None):
        super().__init__(daemon=True)
        self.period, self.mm = period, mm
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._win = None
        self._pinning = None
        try:
            from distorch.runtime import pinning
            self._pinning = pinning
        except ImportError:
            pass
        self.mark()

    def read(self) -> dict:
        d = {}
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    k, _, v = line.partition(":")
                    if k in self.FIELDS:
                        d[k] = int(v.split()[0]) * 1024
            with open("/proc/meminfo") as fh:
                mi = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in fh if ln.split(":")[0] in
                      ("MemTotal", "MemAvailable")}
            d["sys_used"] = mi["MemTotal"] - mi["MemAvailable"]
        except (OSError, KeyError, ValueError, IndexError):
            pass
        d["distorch_pinned"] = self._pinning.pinned_bytes() if self._pinning is not None else 0
        d["comfy_pinned"] = int(getattr(self.mm, "TOTAL_PINNED_MEMORY", 0) or 0) if self.mm is not None else 0
        return d

    def mark(self) -> dict:
        d = self.read()
        with self._lock:
            self._win = {"at_peak": dict(d), "max": dict(d), "n": 1}
        return d

    def sample(self) -> None:
        d = self.read()
        with self._lock:
            w = self._win
            w["n"] += 1
            if d.get("VmRSS", 0) > w["at_peak"].get("VmRSS", 0):
                w["at_peak"] = dict(d)
            for k, v in d.items():
                w["max"][k] = max(w["max"].get(k, 0), v)

    def peak(self) -> dict:
        self.sample()
        with self._lock:
            return {"at_peak": dict(self._win["at_peak"]), "max": dict(self._win["max"]), "samples": self._win["n"]}

    def run(self):
        while not self._stop.wait(self.period):
            self.sample()

    def stop(self):
        self._stop.set()


STACKS_ENV = "DISTORCH_BENCH_STACKS"     # set (not 0): sample_timed samples Python stacks through each run
TORCHPROF_ENV = "DISTORCH_BENCH_TORCHPROF"  # a folder: torch.profiler over the steps after the first, per run
#                                            a table of ops by host time (<label>.txt) in that folder


def _torch_profile_start():
    import torch
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                              torch.profiler.ProfilerActivity.CUDA])
    prof.start()
    return prof


def _torch_profile_save(prof, folder: str, label: str) -> None:
    prof.stop()
    os.makedirs(folder, exist_ok=True)
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)
    ka = prof.key_averages()
    with open(os.path.join(folder, name + ".txt"), "w") as f:
        f.write(ka.table(sort_by="self_cpu_time_total", row_limit=40) + "\n")
        f.write(ka.table(sort_by="self_device_time_total", row_limit=15) + "\n")
    say(f"{label}: torch profile of the steps after the first in {folder}/{name}.txt")


def step_sync(dev) -> None:
    """Wait, in a sampler's step callback, for the step's work on the stream the sampler runs on -- not for the
    whole device.  A device-wide synchronize would also wait for the copies DisTorch's ring queues at the end of
    a step for the next step's first units (it wraps across the step boundary, as it should between two
    sampler steps), so every step would pay for copies that otherwise overlap the sampler's own work.
    ComfyUI's sampler never waits on those streams (its previews read the latent on the compute stream)."""
    import torch
    torch.cuda.current_stream(dev).synchronize()


def sample_timed(m, label: str, latent, cond, steps: int, dev, cpu: bool, filler_bytes: int = 0,
                 detail: bool = False) -> dict:
    """ComfyUI's sampler (euler, simple, cfg 1, seed 42) on `m`, the compute stream synchronized in the step
    callback (step_sync): s/it =
    median step after the first (which includes loading), peak VRAM minus `filler_bytes`, the latent, and the
    host memory through the run: peak VmRSS, peak RssAnon, distorch's pinned bytes (RssSampler).
    `detail` adds "host" (the sampler's whole window: every field at the VmRSS peak and each field's
    maximum, ComfyUI's pinned bytes included) and "peak_steps" (peak VRAM of the steps after the first,
    without the load's transients)."""
    import torch
    import comfy.sample
    times, load_peak = [], []
    prof_dir, prof = os.environ.get(TORCHPROF_ENV, ""), []

    def cb(step, x0, x, total_steps):
        if not cpu:
            step_sync(dev)
            if detail and not times:      # the load and the first step: its peak kept, then a new window
                load_peak.append(torch.cuda.max_memory_allocated(dev))
                torch.cuda.reset_peak_memory_stats(dev)
        times.append(time.perf_counter())
        if prof_dir and len(times) == 1:
            prof.append(_torch_profile_start())

    if not cpu:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    lat = comfy.sample.fix_empty_latent_channels(m, latent)
    noise = comfy.sample.prepare_noise(lat, 42)
    rss = RssSampler(mm=sys.modules.get("comfy.model_management") if detail else None)  # load included
    rss.start()
    stacks = None
    if os.environ.get(STACKS_ENV, "") not in ("", "0"):      # where the run's host time goes (bench/sampler.py)
        from sampler import StackSampler
        stacks = StackSampler(0.005)
        stacks.start()
    t0 = time.perf_counter()
    try:
        out = comfy.sample.sample(m, noise, steps, 1.0, "euler", "simple", cond, cond, lat,
                                  callback=cb, disable_pbar=True, seed=42)
    finally:
        host = rss.peak()
        rss.stop()
        if stacks is not None:
            stacks.stop()
        if prof:
            _torch_profile_save(prof[0], prof_dir, label)
    first = times[0] - t0
    dts = [b - a_ for a_, b in zip(times, times[1:])]
    sit = statistics.median(dts) if dts else first
    peak = peak_steps = 0
    if not cpu:
        peak_steps = max(0, torch.cuda.max_memory_allocated(dev) - filler_bytes)
        peak = max([peak_steps] + [max(0, p - filler_bytes) for p in load_peak])
    finite = bool(torch.isfinite(out).all())
    say(f"{label}: {sit:.3f} s/it (steps {[round(x, 3) for x in dts]}), first step incl. load {first:.1f}s, "
        f"peak {peak / GiB:.2f} GiB{'' if finite else ' (non-finite latent: random weights)'}")
    r = {"s_it": sit, "first_s": first, "peak": peak, "steps": dts, "finite": finite, "out": out,
         "rss_peak": host["at_peak"].get("VmRSS", 0), "rss_anon_peak": host["max"].get("RssAnon", 0),
         "pinned_peak": host["max"].get("distorch_pinned", 0)}
    if detail:
        r.update(host=host, peak_steps=peak_steps if load_peak else peak)
    if stacks is not None:
        r["stacks"] = stacks.report(top=25)
        say(f"{label}: sampled stacks (load and first step included)\n" + stacks.text(r["stacks"], threads=2, top=15))
    return r


def comfy_filler(mm, model, latent_shape, off_bytes: int, dev):
    """A device allocation that leaves ComfyUI room for all but `off_bytes` of `model` (plus what it reserves
    for inference), so that its own partial loading offloads about `off_bytes`.  Returns (tensor, bytes)."""
    import torch
    free = mm.get_free_memory(dev)
    need = model.memory_required([1] + list(latent_shape[1:])) + mm.minimum_inference_memory() \
        + mm.extra_reserved_memory()
    keep = model.model_size() - off_bytes + need
    n = max(0, int(free - keep))
    return torch.empty(n, dtype=torch.uint8, device=dev), n


def unload_all(mm, cpu: bool) -> None:
    import torch
    mm.unload_all_models()
    gc.collect()
    if not cpu:
        torch.cuda.empty_cache()


def spread_order(vals: list) -> list:
    """Budgets in an order that covers the range early (ends, then midpoints): a run cut short by its time
    guard still has points across the whole curve."""
    v = sorted(vals)
    if len(v) <= 2:
        return v[::-1]
    order, seen = [v[-1], v[0]], {len(v) - 1, 0}
    spans = [(0, len(v) - 1)]
    while spans:
        nxt = []
        for lo, hi in spans:
            if hi - lo < 2:
                continue
            mid = (lo + hi) // 2
            if mid not in seen:
                seen.add(mid)
                order.append(v[mid])
            nxt += [(lo, mid), (mid, hi)]
        spans = nxt
    return order + [x for i, x in enumerate(v) if i not in seen]


def header(d: dict, gpu: str, torch, comfyui_version: str) -> None:
    d.update(gpu=gpu, torch=torch.__version__, comfyui=comfyui_version,
             date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             command="python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]))


def wait_for(path: str, limit_s: float = 120.0) -> None:
    if not path:
        return
    t = time.perf_counter()
    while not os.path.exists(path) and time.perf_counter() - t < limit_s:
        time.sleep(0.5)
    say(f"waited {time.perf_counter() - t:.1f}s for {path} ({'there' if os.path.exists(path) else 'NOT there'})")
