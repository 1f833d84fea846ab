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

* NAME: `cpu`, `cuda:N` (plain `cuda` means `cuda:0`; `cuda:00` is `cuda:0`), or another torch device like
  `xpu:0`, `mps`.  Each device, and each direction of each link, is declared once.
* SIZE: a number (decimals fine; no sign, no exponent) and a unit, case-insensitive: b (bytes);
  KiB, MiB, GiB, TiB (binary: 1 GiB = 2^30 bytes; the one-letter forms k, m, g, t are binary too, as in
  the allocation strings); KB, MB, GB, TB (decimal: 1 GB = 10^9 bytes, as DisTorch prints it).  A bare
  number is an error (`cuda:0=12` -> "did you mean 12GiB").  At most 1 EiB; a device's total is above 0.
* free memory is the second SIZE after `/` (a trailing word `free` is allowed); when absent, free = total.
* SPEED: number + B/s, KB/s, MB/s, GB/s, TB/s (decimal, 1 GB/s = 1e9 bytes/s, as bandwidth is usually
  quoted) or KiB/s, MiB/s, GiB/s (binary); between 1 MB/s and 1 PB/s.
* RATE: number + FLOPS / GFLOPS / TFLOPS (or `TF`) / PFLOPS, the device's effective compute rate;
  between 1 MFLOPS and 1000 PFLOPS (`@0TFLOPS` is an error, not "the default").

The parser is linear in the length of the spec (no backtracking regular expressions), and every error is an
InventoryError that names the bad part.

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
bounds above (or names a device this machine does not have) is ignored with one warning (logger
"distorch.compiler.inventory"), that machine is measured again and the file is rewritten without it.  A CPU-only machine gives an inventory of `cpu`.

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

import json
import logging
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal, localcontext

from .. import progress as _stages
from ..errors import InventoryError

log = logging.getLogger("distorch.compiler.inventory")

GiB = 1 << 30

DEFAULT_HOST_GPU_BPS = 25e9
PAGEABLE_FRACTION = 1 / 6     # pageable host memory -> GPU vs pinned (H200: pinned 55 GB/s, pageable 7-8)
DEFAULT_GPU_GPU_BPS = 25e9
DEFAULT_OTHER_BPS = 25e9
DEFAULT_GPU_FLOPS = 400e12
DEFAULT_ACCEL_FLOPS = 100e12
DEFAULT_CPU_FLOPS = 100e9   # a few cores of a desktop CPU in float32; the host is measured when it computes

# Memory sizes: binary units are GiB-style (KiB/MiB/GiB/TiB, 2^10..2^40) and so are the one-letter
# short forms k/m/g/t (as in the allocation strings and `docker -m 512m`); KB/MB/GB/TB are decimal (10^3..10^12)
# as everywhere else in DisTorch's output.  Case-insensitive.  A size must have a unit.
_SIZE_UNITS = {
    "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10 ** 3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10 ** 6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10 ** 9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10 ** 12,
}
_SPEED_UNITS = {
    "b/s": 1, "kb/s": 10 ** 3, "mb/s": 10 ** 6, "gb/s": 10 ** 9, "tb/s": 10 ** 12,
    "kib/s": 1 << 10, "mib/s": 1 << 20, "gib/s": 1 << 30, "tib/s": 1 << 40,
}
_RATE_UNITS = {"flops": 1, "gflops": 10 ** 9, "tflops": 10 ** 12, "tf": 10 ** 12, "pflops": 10 ** 15}

# Sane bounds: anything outside is a typo (or a crafted value), never a machine.
MAX_SIZE_BYTES = 1 << 60            # 1 EiB
MIN_LINK_BPS, MAX_LINK_BPS = 1e6, 1e15          # 1 MB/s .. 1 PB/s
MIN_RATE_FLOPS, MAX_RATE_FLOPS = 1e6, 1e18      # 1 MFLOP/s .. 1 EFLOP/s
MAX_DEVICE_NAME = 64

# One number: ASCII digits with an optional decimal point; no sign, no exponent.  Used with .match() only,
# nothing follows it in the pattern, so it cannot backtrack: every parse below is linear in its input.
_NUM_RE = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_DEV_RE = re.compile(r"([a-z][a-z0-9_]*)(?::([0-9]+))?", re.ASCII)
_SIZE_HELP = "b, KiB/MiB/GiB/TiB (binary; k/m/g/t too) or KB/MB/GB/TB (decimal), e.g. 24GiB or 512MiB"


def show(text, limit: int = 60) -> str:
    """repr() of a user's value for an error message, cut to `limit` characters."""
    s = str(text)
    if len(s) > limit:
        return repr(s[:limit]) + f"... ({len(s)} characters)"
    return repr(s)


def split_number(text: str) -> tuple[str, str]:
    """'24.5 GiB' -> ('24.5', ' GiB'); ('', text) when `text` does not start with a number."""
    m = _NUM_RE.match(text)
    return (m.group(0), text[m.end():]) if m else ("", text)


def _decimal(num: str) -> Decimal:
    return Decimal(num)   # num matched _NUM_RE: always a valid finite Decimal, any length


def _amount(text, what: str, units: dict, help_: str, err=None) -> tuple[Decimal, str, str]:
    """NUMBER UNIT -> (exact value in base units, number text, unit as written).  Errors name `what`."""
    err = err or InventoryError
    s = str(text).strip()
    if s.startswith("-"):
        raise err(f"bad {what} {show(text)}: negative; write {help_}")
    num, rest = split_number(s)
    unit = rest.strip()
    if not num:
        raise err(f"bad {what} {show(text)}: write a number and a unit: {help_}")
    if not unit.isascii() or unit.lower() not in units:
        raise err(f"bad {what} {show(text)}: unknown unit {show(unit, 20)}; write {help_}")
    with localcontext() as ctx:
        ctx.prec = 60
        return _decimal(num) * units[unit.lower()], num, unit


def parse_size(text: str, what: str = "size") -> int:
    """'24GiB', '512MiB', '3.5g', '20GB', '1024b' -> bytes.  A unit is required (a bare number is an error
    that suggests GiB); GiB/g = 2^30, GB = 10^9; at most 1 EiB."""
    s = str(text).strip()
    num, rest = split_number(s)
    if num and not rest.strip():
        n = num if len(num) <= 20 else "24"
        raise InventoryError(f"{what} {show(text)} has no unit: did you mean {n}GiB (2^30 bytes)? Or {n}GB "
                             f"(10^9 bytes), {n}b (bytes)")
    v, num, unit = _amount(text, what, _SIZE_UNITS, _SIZE_HELP)
    if v > MAX_SIZE_BYTES:
        raise InventoryError(f"{what} {show(text)} is more than 1 EiB (2^60 bytes): no device has that; "
                             f"write e.g. 24GiB")
    return int(v.to_integral_value(rounding=ROUND_FLOOR))


def _parse_speed(text: str) -> float:
    help_ = "e.g. 25GB/s, 400GB/s, 8000MB/s or 20GiB/s (GB/s = 10^9 bytes/s)"
    v, _, _ = _amount(text, "link speed", _SPEED_UNITS, help_)
    if v <= 0:
        raise InventoryError(f"link speed {show(text)} must be above zero; write {help_}")
    if not MIN_LINK_BPS <= v <= MAX_LINK_BPS:
        raise InventoryError(f"link speed {show(text)} is outside 1 MB/s .. 1 PB/s, which no link is; write {help_}")
    return float(v)


def _parse_rate(text: str) -> float:
    help_ = "e.g. 400TFLOPS, 900TF or 2000GFLOPS"
    v, _, _ = _amount(text, "compute rate", _RATE_UNITS, help_)
    if v <= 0:
        raise InventoryError(f"compute rate {show(text)} must be above zero; write {help_} (or leave out "
                             f"'@...' for the default)")
    if not MIN_RATE_FLOPS <= v <= MAX_RATE_FLOPS:
        raise InventoryError(f"compute rate {show(text)} is outside 1 MFLOPS .. 1000 PFLOPS, which no device is; "
                             f"write {help_}")
    return float(v)


def normalize_device(name: str) -> str:
    """'CUDA:0 ' -> 'cuda:0', 'cuda' -> 'cuda:0', 'cuda:01' -> 'cuda:1'.  Raises InventoryError on something
    unlike a device."""
    n = str(name).strip().lower()
    if n == "cuda":
        n = "cuda:0"
    m = _DEV_RE.fullmatch(n) if len(n) <= MAX_DEVICE_NAME else None
    if not m:
        raise InventoryError(f"bad device name {show(name)}: write cpu, cuda:0, cuda:1, ...")
    if m.group(2) is None:
        return n
    return f"{m.group(1)}:{int(m.group(2))}"   # one spelling per device: cuda:00 is cuda:0


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
    return a, b, both, _parse_speed(speed)


def declare(spec: str) -> Inventory:
    """Parse a device spec (grammar in the module docstring) into an Inventory.  Linear in the length of
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
        rate = _parse_rate(r) if at else None
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


def _cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "distorch", "links.json")


def _progress(msg: str, enabled: bool) -> None:
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


MAX_CACHE_BYTES = 1 << 20   # the cache holds a few numbers per machine; a larger file is not ours


def _check_entry(entry, devices=None) -> str | None:
    """None when `entry` (one machine's cached measurements) is usable, else why not.  `devices`: the
    devices of this machine, which every key must name (None: only the syntax is checked)."""
    if not isinstance(entry, dict) or not entry:
        return f"not a non-empty mapping ({type(entry).__name__})"
    for k, v in entry.items():
        if not isinstance(k, str):
            return f"key {show(k)} is not a string"
        if k.startswith("rate@"):
            names, lo, hi, what = [k[5:]], MIN_RATE_FLOPS, MAX_RATE_FLOPS, "a compute rate in FLOP/s"
        else:
            a, sep, b = k.partition(">")
            if not sep:
                return f"key {show(k)} is neither SRC>DST nor rate@DEV"
            names, lo, hi, what = [a, b], MIN_LINK_BPS, MAX_LINK_BPS, "a link speed in bytes/s"
            if a == b:
                return f"key {show(k)} is a link from a device to itself"
        for d in names:
            try:
                ok = normalize_device(d) == d
            except InventoryError:
                ok = False
            if not ok or (devices is not None and d not in devices):
                return f"key {show(k)} names {show(d)}, which is not a device of this machine"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            return f"{show(k)} = {show(v)} is not {what} between {lo:g} and {hi:g}"
    return None


def _read_cache(path: str, key: str, devices) -> tuple[dict, dict | None, bool]:
    """The probe cache at `path`: (its valid entries, this machine's entry or None, whether anything was
    dropped).  Anything unusable is ignored with ONE warning; it never raises."""
    try:
        if os.path.getsize(path) > MAX_CACHE_BYTES:
            raise ValueError(f"larger than {MAX_CACHE_BYTES} bytes")
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        return {}, None, False
    except (OSError, ValueError, RecursionError) as e:   # unreadable, not JSON (ValueError), nested too deep
        log.warning("probe cache %s is unusable (%s: %s); ignoring it: the machine is measured again and the "
                    "file rewritten", path, type(e).__name__, str(e)[:200])
        return {}, None, True
    if not isinstance(raw, dict):
        log.warning("probe cache %s holds a %s, not a mapping of machines to measurements; ignoring it: the "
                    "machine is measured again and the file rewritten", path, type(raw).__name__)
        return {}, None, True
    good, bad = {}, []
    for k, entry in raw.items():
        why = _check_entry(entry, devices if k == key else None)
        if why:
            bad.append(f"{show(k, 40)}: {why}")
        else:
            good[k] = entry
    if bad:
        log.warning("probe cache %s: ignoring %d bad entr%s (%s); %s", path, len(bad),
                    "y" if len(bad) == 1 else "ies", "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else ""),
                    "the file is rewritten without " + ("it" if len(bad) == 1 else "them"))
    return good, good.get(key), bool(bad)


def _write_cache(path: str, stored: dict, progress: bool) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(stored, fh, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("probe: could not write cache %s: %s", path, e)


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


def _measure(torch, inv: Inventory, n: int, copy_mib: int, progress: bool) -> None:
    """Measure the links and compute rates of the `n` CUDA devices into `inv`, then refresh their free
    memory (after the probe's buffers are gone)."""
    nbytes = copy_mib << 20
    peers = [(i, j) for i in range(n) for j in range(n) if i != j and torch.cuda.can_device_access_peer(j, i)]
    with _stages.stage("distorch: probing links and compute rates", 2 * n + len(peers), "probes",
                       enabled=progress) as st:
        _measure_into(torch, inv, n, copy_mib, progress, nbytes, peers, st)


def _measure_into(torch, inv: Inventory, n: int, copy_mib: int, progress: bool, nbytes: int, peers: list,
                  st) -> None:
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
        _progress(f"  cpu -> {dev}: {bw / 1e9:.1f} GB/s", progress)
        try:
            with torch.cuda.device(i):
                g = _time_gemm(torch, dev)
            inv.compute_rate[dev] = g * GEMM_EFFICIENCY
            _progress(f"  {dev}: bf16 GEMM {g / 1e12:.0f} TFLOP/s (effective rate {g * GEMM_EFFICIENCY / 1e12:.0f})",
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
        _progress(f"  cuda:{i} -> cuda:{j}: {bw / 1e9:.1f} GB/s", progress)
    del bufs, host
    torch.cuda.empty_cache()
    for i in range(n):  # free memory after our buffers are gone
        f, t = torch.cuda.mem_get_info(i)
        inv.devices[f"cuda:{i}"].free_bytes = int(f)


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
    stored: dict = {}
    if cache:
        stored, entry, dropped = _read_cache(path, key, inv.devices)
        if entry is not None:
            _apply_entry(inv, entry)
            _progress(f"link speeds from cache {path}", progress)
            if dropped:   # repair the file now: keep what was good, drop what was not
                _write_cache(path, stored, progress)
            return inv
    _measure(torch, inv, n, copy_mib, progress)
    if cache:
        entry = _entry_of(inv)
        why = _check_entry(entry, inv.devices)
        if why is None:
            stored[key] = entry
        else:   # a measurement no real link gives (a timer glitch): use it now, never cache it
            log.warning("probe of this machine gave unusable values (%s); not caching them", why)
        _write_cache(path, stored, progress)
    return inv
