"""Device inventory: devices with total/free memory and link bandwidths, probed or declared.

Declared inventories (plan for a machine you do not have)
--------------------------------------------------------
`declare(spec)` reads a device list, optionally followed by link speeds::

    SPEC    := DEVICES ( ';' LINKS )*
    DEVICES := DEVICE ( ',' DEVICE )*
    DEVICE  := NAME '=' SIZE [ '/' SIZE ] [ '@' RATE ]        total [/ free] [@ compute rate]
    LINKS   := LINK ( ',' LINK )*
    LINK    := NAME '>' NAME '=' SPEED                         one direction
             | NAME '<>' NAME '=' SPEED                        both directions

    cuda:0=24GiB,cuda:1=12GiB,cpu=64GiB
    cuda:0=24GiB/20GiB,cpu=64GiB;cpu>cuda:0=25GB/s;cuda:1<>cuda:0=50GB/s
    cuda:0=80GiB@600TFLOPS,cpu=256GiB

* NAME: `cpu`, `cuda:N` (plain `cuda` means `cuda:0`), or another torch device like `xpu:0`, `mps`.
* SIZE: a number (decimals fine) with a unit b, k/kb/kib, m/mb/mib, g/gb/gib, t/tb/tib, case-insensitive.
  ALL memory units are binary (1 GB = 1 GiB = 2^30 bytes), exactly as in the allocation strings and the
  ComfyUI nodes (where "GB" has always meant 2^30).  A bare number is bytes.
* free memory is the second SIZE after `/`; when absent, free = total.
* SPEED: number + B/s, KB/s, MB/s, GB/s, TB/s (decimal, 1 GB/s = 1e9 bytes/s, as bandwidth is usually
  quoted) or KiB/s, MiB/s, GiB/s (binary).
* RATE: number + FLOPS / GFLOPS / TFLOPS (or `TF`), the device's effective compute rate.

Probed inventories
------------------
`probe(cache=True)` looks at the real machine: every CUDA device (total memory and free memory from
`torch.cuda.mem_get_info`) and host RAM (`/proc/meminfo` MemTotal / MemAvailable, psutil or sysconf as
fallbacks), then measures the links: pinned host -> each GPU (a 256 MiB copy, median of 5 after a
warm-up) and GPU -> GPU peer copies where `torch.cuda.can_device_access_peer` says so, and each GPU's
compute rate: a bf16 8192^3 GEMM's FLOP/s x GEMM_EFFICIENCY (0.55).  Link speeds and rates are
cached as JSON in ~/.cache/distorch/links.json keyed by the device names, torch's CUDA version and the
driver version; progress goes to stderr while probing.  A CPU-only machine gives an inventory of `cpu`.

Defaults (used by `Inventory.bandwidth` / `Inventory.rate` when a link or rate is neither declared nor
probed)
--------
* same device: infinite (nothing to copy)
* host <-> GPU: 25 GB/s (what a pinned copy reaches over PCIe 4.0 x16 in practice)
* GPU <-> GPU: 25 GB/s (a peer copy over PCIe; NVLink is only assumed when probed or declared)
* anything else: 25 GB/s
* compute rate: a CUDA/XPU GPU 400e12 FLOP/s (bf16, effective, not peak: about what a diffusion
  transformer reaches on an H100-class card), other accelerators 100e12, a CPU 1e12 FLOP/s.
  A measured per-unit time (Unit.time_s) always beats a rate; see compiler/cost.py.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field

from ..errors import InventoryError

GiB = 1 << 30

DEFAULT_HOST_GPU_BPS = 25e9
DEFAULT_GPU_GPU_BPS = 25e9
DEFAULT_OTHER_BPS = 25e9
DEFAULT_GPU_FLOPS = 400e12
DEFAULT_ACCEL_FLOPS = 100e12
DEFAULT_CPU_FLOPS = 1e12

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}
_SPEED_UNITS = {
    "b/s": 1, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9, "tb/s": 1e12,
    "kib/s": 1024.0, "mib/s": 1024.0 ** 2, "gib/s": 1024.0 ** 3, "tib/s": 1024.0 ** 4,
}
_RATE_UNITS = {"flops": 1.0, "gflops": 1e9, "tflops": 1e12, "tf": 1e12, "pflops": 1e15}

_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_SIZE_RE = re.compile(r"^\s*" + _NUM + r"\s*([a-z]*)\s*$", re.I)
_DEV_RE = re.compile(r"^[a-z][a-z0-9_]*(:\d+)?$")


def parse_size(text: str, what: str = "size") -> int:
    """'24GiB', '500mb', '3.5g', '1024' -> bytes (binary units, case-insensitive)."""
    m = _SIZE_RE.match(str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise InventoryError(f"bad {what} {text!r}: write a number with a unit b, k/kb, m/mb, g/gb, t/tb "
                             f"(binary, e.g. 24GiB or 512mb)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def _parse_speed(text: str) -> float:
    m = re.match(r"^\s*" + _NUM + r"\s*([a-z]+/s)\s*$", text, re.I)
    if not m or m.group(2).lower() not in _SPEED_UNITS:
        raise InventoryError(f"bad link speed {text!r}: write e.g. 25GB/s, 400GB/s, 8000MB/s or 20GiB/s")
    v = float(m.group(1)) * _SPEED_UNITS[m.group(2).lower()]
    if v <= 0:
        raise InventoryError(f"link speed {text!r} must be above zero")
    return v


def _parse_rate(text: str) -> float:
    m = re.match(r"^\s*" + _NUM + r"\s*([a-z]+)\s*$", text, re.I)
    if not m or m.group(2).lower() not in _RATE_UNITS:
        raise InventoryError(f"bad compute rate {text!r}: write e.g. 400TFLOPS, 900TF or 2000GFLOPS")
    return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]


def normalize_device(name: str) -> str:
    """'CUDA:0 ' -> 'cuda:0', 'cuda' -> 'cuda:0'.  Raises InventoryError on something unlike a device."""
    n = str(name).strip().lower()
    if n == "cuda":
        n = "cuda:0"
    if not _DEV_RE.match(n):
        raise InventoryError(f"bad device name {name!r}: write cpu, cuda:0, cuda:1, ...")
    return n


def is_gpu(name: str) -> bool:
    return name.split(":")[0] in ("cuda", "xpu", "hip")


@dataclass
class Device:
    name: str            # "cuda:0", "cpu", ...
    total_bytes: int
    free_bytes: int

    def to_dict(self) -> dict:
        return {"name": self.name, "total_bytes": self.total_bytes, "free_bytes": self.free_bytes}


@dataclass
class Inventory:
    devices: dict[str, Device] = field(default_factory=dict)
    links: dict[tuple[str, str], float] = field(default_factory=dict)   # (src, dst) -> bytes/s
    compute_rate: dict[str, float] = field(default_factory=dict)        # dev -> FLOP/s, when known
    source: str = "declared"                                            # "declared" | "probed"

    def bandwidth(self, src: str, dst: str) -> float:
        """Bytes/s from src to dst: declared or probed value, else the documented defaults
        (same device: inf; host<->GPU 25e9; GPU<->GPU 25e9; other 25e9)."""
        if src == dst:
            return math.inf
        bw = self.links.get((src, dst))
        if bw:
            return float(bw)
        if is_gpu(src) and is_gpu(dst):
            return DEFAULT_GPU_GPU_BPS
        if "cpu" in (src, dst):
            return DEFAULT_HOST_GPU_BPS
        return DEFAULT_OTHER_BPS

    def rate(self, dev: str) -> float:
        """Effective FLOP/s of `dev`: declared/probed, else the documented default."""
        r = self.compute_rate.get(dev)
        if r:
            return float(r)
        if is_gpu(dev):
            return DEFAULT_GPU_FLOPS
        if dev == "cpu":
            return DEFAULT_CPU_FLOPS
        return DEFAULT_ACCEL_FLOPS

    def __contains__(self, name: str) -> bool:
        return name in self.devices

    def names(self) -> list[str]:
        return list(self.devices)

    def require(self, name: str, role: str = "device") -> Device:
        """The Device called `name`, or an InventoryError listing the known ones."""
        try:
            n = normalize_device(name)
        except InventoryError:
            n = str(name)
        if n not in self.devices:
            raise InventoryError(f"{role} {name!r} is not in the inventory (known: {', '.join(self.devices) or 'none'}); "
                                 f"name one of those, or declare it, e.g. --devices cuda:0=24GiB,cpu=64GiB")
        return self.devices[n]

    def to_dict(self) -> dict:
        return {"devices": {k: v.to_dict() for k, v in self.devices.items()},
                "links": {f"{a}>{b}": bw for (a, b), bw in self.links.items()},
                "compute_rate": dict(self.compute_rate), "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "Inventory":
        devs = {k: Device(v["name"], int(v["total_bytes"]), int(v["free_bytes"])) for k, v in d["devices"].items()}
        links = {tuple(k.split(">", 1)): float(v) for k, v in d.get("links", {}).items()}
        return cls(devs, links, dict(d.get("compute_rate", {})), d.get("source", "declared"))


def declare(spec: str) -> Inventory:
    """Parse a device spec (grammar in the module docstring) into an Inventory."""
    if not spec or not str(spec).strip():
        raise InventoryError("empty device spec: write e.g. cuda:0=24GiB,cpu=64GiB")
    groups = [g.strip() for g in str(spec).split(";")]
    inv = Inventory(source="declared")
    for item in [s.strip() for s in groups[0].split(",") if s.strip()]:
        if "=" not in item:
            raise InventoryError(f"bad device entry {item!r}: write NAME=SIZE, e.g. cuda:0=24GiB or cpu=64GiB/48GiB")
        name, val = item.split("=", 1)
        name = normalize_device(name)
        if name in inv.devices:
            raise InventoryError(f"device {name!r} is declared twice in {spec!r}")
        rate = None
        if "@" in val:
            val, r = val.split("@", 1)
            rate = _parse_rate(r)
        if "/" in val:
            tot, free = val.split("/", 1)
            free = re.sub(r"\s*free\s*$", "", free.strip(), flags=re.I)
        else:
            tot, free = val, None
        total = parse_size(tot, f"memory size for {name}")
        freeb = total if free is None else parse_size(free, f"free memory for {name}")
        if freeb > total:
            raise InventoryError(f"device {name}: free memory {free!r} is more than its total {tot!r}")
        inv.devices[name] = Device(name, total, freeb)
        if rate:
            inv.compute_rate[name] = rate
    if not inv.devices:
        raise InventoryError(f"no devices in {spec!r}: write e.g. cuda:0=24GiB,cpu=64GiB")
    for g in groups[1:]:
        for item in [s.strip() for s in g.split(",") if s.strip()]:
            m = re.match(r"^([^<>=]+?)\s*(<>|>)\s*([^<>=]+?)\s*=\s*(.+)$", item)
            if not m:
                raise InventoryError(f"bad link {item!r}: write SRC>DST=SPEED (one way) or A<>B=SPEED "
                                     f"(both ways), e.g. cpu>cuda:0=25GB/s")
            a, arrow, b, sp = normalize_device(m.group(1)), m.group(2), normalize_device(m.group(3)), m.group(4)
            for d in (a, b):
                if d not in inv.devices:
                    raise InventoryError(f"link {item!r} names {d!r}, which is not declared "
                                         f"(declared: {', '.join(inv.devices)})")
            bw = _parse_speed(sp)
            inv.links[(a, b)] = bw
            if arrow == "<>":
                inv.links[(b, a)] = bw
    return inv


# --- probing the real machine -----------------------------------------------------------------------

def _host_memory() -> tuple[int, int]:
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                info[k] = int(v.split()[0]) * 1024
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", info["MemTotal"]))
    except Exception:
        pass
    try:
        import psutil  # optional
        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except Exception:
        pass
    try:
        tot = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(tot), int(tot)
    except Exception:
        return 0, 0


def _driver_version() -> str:
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", f.read())
            if m:
                return m.group(1)
    except Exception:
        pass
    return "unknown"


def _cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "distorch", "links.json")


def _progress(msg: str, enabled: bool) -> None:
    if enabled:
        print(f"[distorch probe] {msg}", file=sys.stderr, flush=True)


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


def probe(cache: bool = True, progress: bool = True, copy_mib: int = 256) -> Inventory:
    """Inventory of this machine: CUDA devices + host RAM, link bandwidths measured (cached)."""
    inv = Inventory(source="probed")
    tot, free = _host_memory()
    inv.devices["cpu"] = Device("cpu", tot, free)
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        _progress("no CUDA device: inventory is the host only", progress)
        return inv
    n = torch.cuda.device_count()
    names = []
    for i in range(n):
        f, t = torch.cuda.mem_get_info(i)
        inv.devices[f"cuda:{i}"] = Device(f"cuda:{i}", int(t), int(f))
        names.append(torch.cuda.get_device_name(i))
    key = "|".join(names) + f"|cuda{torch.version.cuda}|driver{_driver_version()}|mib{copy_mib}|rate"
    path = _cache_path()
    stored = {}
    if cache:
        try:
            with open(path) as fh:
                stored = json.load(fh)
        except Exception:
            stored = {}
        if key in stored:
            for k, bw in stored[key].items():
                if k.startswith("rate@"):
                    inv.compute_rate[k[5:]] = float(bw)
                    continue
                a, b = k.split(">", 1)
                inv.links[(a, b)] = float(bw)
            _progress(f"link speeds from cache {path}", progress)
            return inv
    nbytes = copy_mib << 20
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    bufs = {}
    for i in range(n):
        dev = f"cuda:{i}"
        _progress(f"pinned cpu -> {dev} ({copy_mib} MiB copies)...", progress)
        bufs[i] = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        s = torch.cuda.Stream(device=dev)
        with torch.cuda.device(i):
            bw = _time_copy(torch, bufs[i], host, s)
        inv.links[("cpu", dev)] = bw
        _progress(f"  cpu -> {dev}: {bw / 1e9:.1f} GB/s", progress)
        try:
            with torch.cuda.device(i):
                g = _time_gemm(torch, dev)
            inv.compute_rate[dev] = g * GEMM_EFFICIENCY
            _progress(f"  {dev}: bf16 GEMM {g / 1e12:.0f} TFLOP/s (effective rate {g * GEMM_EFFICIENCY / 1e12:.0f})",
                      progress)
        except Exception as e:       # a device without bf16 matmul keeps the default rate
            _progress(f"  {dev}: GEMM probe failed ({type(e).__name__}: {e}); default compute rate", progress)
    for i in range(n):
        for j in range(n):
            if i != j and torch.cuda.can_device_access_peer(j, i):
                _progress(f"peer cuda:{i} -> cuda:{j}...", progress)
                s = torch.cuda.Stream(device=f"cuda:{j}")
                with torch.cuda.device(j):
                    bw = _time_copy(torch, bufs[j], bufs[i], s)
                inv.links[(f"cuda:{i}", f"cuda:{j}")] = bw
                _progress(f"  cuda:{i} -> cuda:{j}: {bw / 1e9:.1f} GB/s", progress)
    del bufs, host
    torch.cuda.empty_cache()
    for i in range(n):  # free memory after our buffers are gone
        f, t = torch.cuda.mem_get_info(i)
        inv.devices[f"cuda:{i}"].free_bytes = int(f)
    if cache:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            stored[key] = {f"{a}>{b}": bw for (a, b), bw in inv.links.items()}
            stored[key].update({f"rate@{d}": r for d, r in inv.compute_rate.items()})
            tmp = path + f".{os.getpid()}.tmp"
            with open(tmp, "w") as fh:
                json.dump(stored, fh, indent=1)
            os.replace(tmp, path)
        except OSError as e:
            _progress(f"could not write cache {path}: {e}", progress)
    return inv
