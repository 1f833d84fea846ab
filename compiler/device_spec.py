"""The `--devices` value grammar: sizes, link speeds, compute rates and device names (used by
`compiler.inventory.declare`, the CLI's --offload / --window and the probe cache's checks).

Declared inventories (plan for a machine you do not have)
--------------------------------------------------------
`compiler.inventory.declare(spec)` reads a device list, optionally followed by link speeds::

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
"""
from __future__ import annotations

import re
from decimal import ROUND_FLOOR, Decimal, localcontext

from ..errors import InventoryError

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


def show(text: object, limit: int = 60) -> str:
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


def parse_speed(text: str) -> float:
    help_ = "e.g. 25GB/s, 400GB/s, 8000MB/s or 20GiB/s (GB/s = 10^9 bytes/s)"
    v, _, _ = _amount(text, "link speed", _SPEED_UNITS, help_)
    if v <= 0:
        raise InventoryError(f"link speed {show(text)} must be above zero; write {help_}")
    if not MIN_LINK_BPS <= v <= MAX_LINK_BPS:
        raise InventoryError(f"link speed {show(text)} is outside 1 MB/s .. 1 PB/s, which no link is; write {help_}")
    return float(v)


def parse_rate(text: str) -> float:
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
