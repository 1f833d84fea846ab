"""Device inventory: devices with total/free memory and link bandwidths, probed or declared.

Declared inventories (plan for a machine you do not have)
--------------------------------------------------------
`declare(spec)` reads a device list, optionally followed by link speeds, e.g.
`cuda:0=24GiB/20GiB,cpu=64GiB;cpu>cuda:0=25GB/s;cuda:1<>cuda:0=50GB/s`; the grammar (names, sizes,
speeds, rates and their bounds) is in compiler/device_spec.py.

Probed inventories
------------------
`probe(cache=True)` looks at the real machine: every CUDA device (total memory and free memory from
`torch.cuda.mem_get_info`) and host RAM (`/proc/meminfo` MemTotal / MemAvailable, psutil or sysconf as
fallbacks), then measures the links: pinned host -> each GPU (a 256 MiB copy, median of 5 after a
warm-up) and GPU -> GPU peer copies where `torch.cuda.can_device_access_peer` says so, and each GPU's
compute rate: a bf16 8192^3 GEMM's FLOP/s x GEMM_EFFICIENCY (0.55).  Link speeds and rates are
cached as JSON in ~/.cache/distorch/links.json ($XDG_CACHE_HOME/distorch/links.json) keyed by the device
names, torch's CUDA version and the driver version; progress goes to stderr while probing.  The cache is
validated when read: an entry that is not a mapping of `SRC>DST` / `rate@DEV` to a speed / rate within the
bounds of compiler/device_spec.py (or names a device this machine does not have) is ignored with one warning (logger
"distorch.compiler.inventory"), that machine is measured again and the file is rewritten without it.  A CPU-only machine gives an inventory of `cpu`.
The measuring is in compiler/link_probe.py, the cache file in compiler/probe_cache.py.

Defaults (used by `Inventory.bandwidth` / `Inventory.rate` when a link or rate is neither declared nor
probed)
--------
* same device: infinite (nothing to copy)
* host <-> GPU: 25 GB/s (what a pinned copy reaches over PCIe 4.0 x16 in practice)
* GPU <-> GPU: 25 GB/s (a peer copy over PCIe; NVLink is only assumed when probed or declared)
* anything else: 25 GB/s
* compute rate: a CUDA/XPU GPU 400e12 FLOP/s (bf16, effective, not peak: about what a diffusion
  transformer reaches on an H100-class card), other accelerators 100e12, the host (`cpu`, and `cpu:N`
  computing) 100e9 FLOP/s; when the host computes, runtime/api.py measures it instead (`host_rate`).
  A measured per-unit time (Unit.time_s) always beats a rate; see compiler/cost.py.
"""
from __future__ import annotations

import logging
import math
import os
import re
import statistics
from dataclasses import dataclass, field

from ..errors import InventoryError
from .device_spec import normalize_device, parse_rate, parse_size, parse_speed, show
from .link_probe import GEMM_EFFICIENCY, measure, progress_line
from .probe_cache import cache_path, check_entry, read_cache, write_cache

log = logging.getLogger("distorch.compiler.inventory")

GiB = 1 << 30

DEFAULT_HOST_GPU_BPS = 25e9
PAGEABLE_FRACTION = 1 / 6     # pageable host memory -> GPU vs pinned (H200: pinned 55 GB/s, pageable 7-8)
DEFAULT_GPU_GPU_BPS = 25e9
DEFAULT_OTHER_BPS = 25e9
DEFAULT_GPU_FLOPS = 400e12
DEFAULT_ACCEL_FLOPS = 100e12
DEFAULT_CPU_FLOPS = 100e9   # a few cores of a desktop CPU in float32; the host is measured when it computes


def is_host(name: str) -> bool:
    """The host's memory and cores: `cpu` and its compute-device spelling `cpu:N`."""
    s = str(name)
    return s == "cpu" or s.startswith("cpu:")


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
    pinned_limit: int | None = None     # host bytes homes may still pin (runtime.api sets it from runtime.pinning); None: no cap

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

    def pageable_bandwidth(self, src: str, dst: str) -> float:
        """Bytes/s from pageable (not pinned) host memory: PAGEABLE_FRACTION of the pinned link's rate."""
        return self.bandwidth(src, dst) * PAGEABLE_FRACTION

    def rate(self, dev: str) -> float:
        """Effective FLOP/s of `dev`: declared/probed, else the documented default."""
        r = self.compute_rate.get(dev)
        if r:
            return float(r)
        if is_gpu(dev):
            return DEFAULT_GPU_FLOPS
        if is_host(dev):          # "cpu", and "cpu:0", the host computing (runtime/api.py HOST_COMPUTE)
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


def _parse_link(item: str, inv: Inventory) -> tuple[str, str, bool, float]:
    """'cpu>cuda:0=25GB/s' -> ('cpu', 'cuda:0', False, 25e9); 'a<>b=...' -> both ways (True)."""
    bad = InventoryError(f"bad link {show(item)}: write SRC>DST=SPEED (one way) or A<>B=SPEED (both ways), "
                         f"e.g. cpu>cuda:0=25GB/s")
    lhs, eq, speed = item.partition("=")
    if not eq:
        raise bad
    both = "<>" in lhs
    a, arrow, b = lhs.partition("<>" if both else ">")
    if not arrow or not a.strip() or not b.strip() or any(c in a or c in b for c in "<>"):
        raise bad
    a, b = normalize_device(a), normalize_device(b)
    for d in (a, b):
        if d not in inv.devices:
            raise InventoryError(f"link {show(item)} names {d!r}, which is not declared "
                                 f"(declared: {', '.join(inv.devices)})")
    if a == b:
        raise InventoryError(f"link {show(item)} goes from {a} to itself; a link joins two different devices")
    return a, b, both, parse_speed(speed)


def declare(spec: str) -> Inventory:
    """Parse a device spec (grammar in compiler/device_spec.py) into an Inventory.  Linear in the length of
    `spec`; every error is an InventoryError naming the bad part."""
    if spec is None or not str(spec).strip():
        raise InventoryError("empty device spec: write e.g. cuda:0=24GiB,cpu=64GiB")
    groups = str(spec).split(";")
    inv = Inventory(source="declared")
    for item in [s.strip() for s in groups[0].split(",") if s.strip()]:
        name, eq, val = item.partition("=")
        if not eq:
            raise InventoryError(f"bad device entry {show(item)}: write NAME=SIZE, e.g. cuda:0=24GiB or "
                                 f"cpu=64GiB/48GiB")
        name = normalize_device(name)
        if name in inv.devices:
            raise InventoryError(f"device {name!r} is declared twice in {show(spec)}")
        val, at, r = val.partition("@")
        rate = parse_rate(r) if at else None
        tot, slash, free = val.partition("/")
        if slash:
            free = free.strip()
            if free.lower().endswith("free"):
                free = free[:-4]
        total = parse_size(tot, f"memory size for {name}")
        if total <= 0:
            raise InventoryError(f"memory size for {name} {show(tot.strip())} must be above zero")
        freeb = total if not slash else parse_size(free, f"free memory for {name}")
        if freeb > total:
            raise InventoryError(f"device {name}: free memory {show(free.strip())} is more than its total "
                                 f"{show(tot.strip())}")
        inv.devices[name] = Device(name, total, freeb)
        if rate is not None:
            inv.compute_rate[name] = rate
    if not inv.devices:
        raise InventoryError(f"no devices in {show(spec)}: write e.g. cuda:0=24GiB,cpu=64GiB")
    for g in groups[1:]:
        for item in [s.strip() for s in g.split(",") if s.strip()]:
            a, b, both, bw = _parse_link(item, inv)
            for k in ((a, b), (b, a)) if both else ((a, b),):
                if k in inv.links:
                    raise InventoryError(f"link {k[0]}>{k[1]} is declared twice (again in {show(item)}); "
                                         f"give each direction one speed")
                inv.links[k] = bw
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



HOST_GEMM_N = 512           # host probe GEMM: 512^3 float32 (0.27 GFLOP; a few ms on a few cores)
_host_rate: list = []       # measured once per process


def host_rate(measure: bool = True) -> float:
    """Effective FLOP/s of the host computing a model: a float32 GEMM's rate (median of 5, one warm-up,
    torch's own threads) x GEMM_EFFICIENCY, measured once per process; DEFAULT_CPU_FLOPS when torch is
    missing or `measure` is false.  Used for the compute device `cpu:0` (runtime/api.py inventory_for),
    which used to be rated as a 100 TFLOP/s accelerator."""
    if not measure:
        return DEFAULT_CPU_FLOPS
    if _host_rate:
        return _host_rate[0]
    try:
        import time
        import torch
        n = HOST_GEMM_N
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        times = []
        for i in range(6):
            t0 = time.perf_counter()
            torch.mm(a, b)
            if i:
                times.append(time.perf_counter() - t0)
        r = 2.0 * n ** 3 / max(statistics.median(times), 1e-9) * GEMM_EFFICIENCY
        r = min(max(r, 1e9), 1e15)
    except Exception:   # no torch, or it cannot run here: the documented default
        r = DEFAULT_CPU_FLOPS
    _host_rate.append(r)
    return r


def _apply_entry(inv: Inventory, entry: dict) -> None:
    for k, v in entry.items():
        if k.startswith("rate@"):
            inv.compute_rate[k[5:]] = float(v)
        else:
            a, _, b = k.partition(">")
            inv.links[(a, b)] = float(v)


def _entry_of(inv: Inventory) -> dict:
    e = {f"{a}>{b}": bw for (a, b), bw in inv.links.items()}
    e.update({f"rate@{d}": r for d, r in inv.compute_rate.items()})
    return e


def probe(cache: bool = True, progress: bool = True, copy_mib: int = 256) -> Inventory:
    """Inventory of this machine: CUDA devices + host RAM, link bandwidths measured (cached; the cache is
    validated on read and repaired, see the module docstring)."""
    inv = Inventory(source="probed")
    tot, free = _host_memory()
    inv.devices["cpu"] = Device("cpu", tot, free)
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        progress_line("no CUDA device: inventory is the host only", progress)
        return inv
    n = torch.cuda.device_count()
    names = []
    for i in range(n):
        f, t = torch.cuda.mem_get_info(i)
        inv.devices[f"cuda:{i}"] = Device(f"cuda:{i}", int(t), int(f))
        names.append(torch.cuda.get_device_name(i))
    key = "|".join(names) + f"|cuda{torch.version.cuda}|driver{_driver_version()}|mib{copy_mib}|rate"
    path = cache_path()
    stored: dict = {}
    if cache:
        stored, entry, dropped = read_cache(path, key, inv.devices)
        if entry is not None:
            _apply_entry(inv, entry)
            progress_line(f"link speeds from cache {path}", progress)
            if dropped:   # repair the file now: keep what was good, drop what was not
                write_cache(path, stored, progress)
            return inv
    measure(torch, inv, n, copy_mib, progress)
    if cache:
        entry = _entry_of(inv)
        why = check_entry(entry, inv.devices)
        if why is None:
            stored[key] = entry
        else:   # a measurement no real link gives (a timer glitch): use it now, never cache it
            log.warning("probe of this machine gave unusable values (%s); not caching them", why)
        write_cache(path, stored, progress)
    return inv
