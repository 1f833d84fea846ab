"""Expert allocation strings (the `expert_mode_allocations` input of the DisTorch2 nodes).

Grammar::

    STRING := ENTRY ( ';' ENTRY )* [ ';' ]           blank string = "not set"
    ENTRY  := DEVICE ',' VALUE
    VALUE  := NUMBER                                  fraction of the device's TOTAL memory, 0..1
            | NUMBER UNIT [ '*' ]  |  '*'             bytes; UNIT b, k/kb, m/mb, g/gb (t/tb), binary,
                                                      case-insensitive; '*' = this device takes the rest
            | NUMBER '%'                              share of the model, normalised by the sum of shares

    cuda:0,0.2126;cpu,0.0851            fractions
    cuda:0,4gb;cpu,*                    bytes, cpu takes the rest
    cuda:0,500mb;cuda:1,3.0g;cpu,5gb*   bytes, cpu takes max(5 GiB, the rest)
    cuda:0,25%;cpu,75%                  percentages
    cuda:0,8%;cuda:1,8%;cpu,4%          = 40% / 40% / 20%

The mode of an entry is decided by the syntax of its VALUE only (never by letters in the device name),
and every entry of one string must use the same mode.  NUMBER is ASCII digits with an optional decimal
point (no sign, no exponent); a byte amount is at most 1 EiB, a percentage at most 10^6.  Device names are
canonical (`CUDA` and `cuda:00` are `cuda:0`), and each device has one entry.

`parse_allocation` returns plain data (a list of AllocationEntry); `budgets` turns it into a byte budget
per device for a model of a given size: fraction * device total memory (exact decimal arithmetic,
rounded down to whole bytes), byte amounts as written (the `*` device gets the rest of the model, or its
own amount if that is larger), percentages as share / sum of shares * model bytes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, asdict
from decimal import Decimal, ROUND_FLOOR, localcontext
from typing import Iterable

from ..errors import AllocationError

# Byte units of the allocation strings.  "gb" here means GiB (2^30 bytes) and always has: these strings come
# from ComfyUI-MultiGPU's DisTorch2 nodes and saved workflows, where "4gb" is 4 * 2^30.  The explicit binary
# names (kib, mib, gib, tib) mean the same and say so.
_BYTE_UNITS = {"b": 1,
               "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
               "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
               "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
               "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
MAX_BYTES = 1 << 60          # 1 EiB: more is a typo, never a device
MAX_PERCENT = Decimal(10) ** 6
# One number: ASCII digits, optional decimal point, no sign or exponent.  Only ever used with .match() and
# nothing after it in the pattern: it cannot backtrack, so parsing is linear in the string's length.
_NUM_RE = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_DEVICE = re.compile(r"([a-z][a-z0-9_]*)(?::([0-9]+))?", re.ASCII)
_UNIT = re.compile(r"[a-z]+", re.ASCII)
MAX_DEVICE_NAME = 64

FORMS = ("fractions of device memory, e.g. cuda:0,0.25;cpu,0.5 | byte amounts, e.g. cuda:0,4gb;cpu,* | "
         "percentages of the model, e.g. cuda:0,25%;cpu,75%")


def _show(text, limit: int = 60) -> str:
    s = str(text)
    return repr(s[:limit]) + f"... ({len(s)} characters)" if len(s) > limit else repr(s)


@dataclass
class AllocationEntry:
    device: str
    mode: str                 # "fraction" | "bytes" | "percent"
    value: float | int | None  # fraction 0..1 (Decimal) | bytes (int; None for a bare '*') | percent (float)
    rest: bool = False        # bytes mode: this device takes whatever is left
    text: str = ""            # the entry as written

    def to_dict(self) -> dict:
        return asdict(self)


def _entry_mode(device: str, value: str, entry: str):
    v = value.strip()
    e = _show(entry)
    if v.startswith("-"):
        raise AllocationError(f"entry {e}: negative amount {_show(v)}; amounts are >= 0 ({FORMS})")
    if v == "*":
        return "bytes", None, True
    m = _NUM_RE.match(v)
    if not m:
        raise AllocationError(f"entry {e}: cannot read amount {_show(v)}; write {FORMS}")
    num, tail = m.group(0), v[m.end():].strip()
    d = Decimal(num)          # num matched _NUM_RE: a finite Decimal of any length, no rounding
    if not tail:
        if d > 1:
            n = num if len(num) <= 20 else num[:20] + "..."
            raise AllocationError(
                f"entry {e}: fraction {_show(num, 20)} is above 1 (a plain number is a fraction of {device}'s "
                f"total memory, 0..1); for bytes write e.g. {device},{n}gb, for a share of the model {device},{n}%")
        return "fraction", d, False
    if tail == "%":
        if d > MAX_PERCENT:
            raise AllocationError(f"entry {e}: percentage {_show(num, 20)}% is too large (at most {MAX_PERCENT}%; "
                                  f"percentages are shares of the model, e.g. cuda:0,25%;cpu,75%)")
        return "percent", float(d), False
    rest = tail.endswith("*")
    unit = (tail[:-1] if rest else tail).strip()
    if not unit.isascii() or unit.lower() not in _BYTE_UNITS:
        if _UNIT.fullmatch(unit.lower()):
            raise AllocationError(f"entry {e}: unknown unit {_show(unit, 20)}; byte units are b, k/kb, m/mb, g/gb, "
                                  f"t/tb (binary: gb = GiB = 2^30 bytes), e.g. {device},4gb")
        raise AllocationError(f"entry {e}: cannot read amount {_show(v)}; write {FORMS}")
    with localcontext() as ctx:
        ctx.prec = 60
        b = d * _BYTE_UNITS[unit.lower()]
    if b > MAX_BYTES:
        raise AllocationError(f"entry {e}: {_show(v, 30)} is more than 1 EiB (2^60 bytes), which no device has; "
                              f"write e.g. {device},4gb")
    return "bytes", int(b.to_integral_value(rounding=ROUND_FLOOR)), rest


def _device(name: str, entry: str) -> str:
    dev = name.lower()
    if dev == "cuda":
        dev = "cuda:0"
    m = _DEVICE.fullmatch(dev) if len(dev) <= MAX_DEVICE_NAME else None
    if not m:
        raise AllocationError(f"entry {_show(entry)}: {_show(name)} is not a device name (write cpu, cuda:0, ...)")
    return dev if m.group(2) is None else f"{m.group(1)}:{int(m.group(2))}"   # cuda:00 is cuda:0


def parse_allocation(text: str | None, devices: Iterable[str] | None = None) -> list[AllocationEntry]:
    """Parse an allocation string.  `devices`: the known device names (an Inventory works too); an entry
    naming another device is an error that lists them.  Blank/None -> [] (not set).  Every error is an
    AllocationError naming the bad entry; parsing is linear in the length of `text`."""
    if text is None or not str(text).strip():
        return []
    known = None if devices is None else list(getattr(devices, "devices", devices))
    out: list[AllocationEntry] = []
    for raw in str(text).split(";"):
        entry = raw.strip()
        if not entry:
            continue
        parts = [p.strip() for p in entry.split(",")]
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise AllocationError(f"malformed entry {_show(entry)}: each entry is DEVICE,AMOUNT separated by ';' "
                                  f"({FORMS})")
        dev = _device(parts[0], entry)
        if known is not None and dev not in known:
            raise AllocationError(f"entry {_show(entry)}: device {dev!r} is not available "
                                  f"(known devices: {', '.join(known) or 'none'})")
        if any(e.device == dev for e in out):
            raise AllocationError(f"entry {_show(entry)}: device {dev!r} appears twice; give each device one entry")
        mode, value, rest = _entry_mode(dev, parts[1], entry)
        out.append(AllocationEntry(dev, mode, value, rest, entry))
    if not out:
        return []
    modes = {e.mode for e in out}
    if len(modes) > 1:
        ex = ", ".join(f"{_show(e.text, 30)} is {e.mode}" for e in out[:6]) + (", ..." if len(out) > 6 else "")
        raise AllocationError(f"mixed amount kinds in {_show(text)} ({ex}); use one kind for every entry: {FORMS}")
    stars = [e for e in out if e.rest]
    if len(stars) > 1:
        raise AllocationError(f"more than one '*' in {_show(text)} ({', '.join(_show(e.text, 30) for e in stars)}); "
                              f"only one device can take the rest")
    if out[0].mode == "percent" and sum(e.value for e in out) <= 0:
        raise AllocationError(f"percentages in {_show(text)} add up to 0; give at least one device a share above 0")
    # fractions are kept as Decimal internally for exact budgets; entries_to_dicts exposes floats
    return out


def budgets(entries: list[AllocationEntry], totals: dict[str, int], model_bytes: int) -> dict[str, int]:
    """Byte budget per device for a model of `model_bytes`, given each device's TOTAL memory."""
    out: dict[str, int] = {}
    if not entries:
        return out
    mode = entries[0].mode
    if mode == "fraction":
        for e in entries:
            tot = totals.get(e.device)
            if tot is None:
                raise AllocationError(f"entry {e.text!r}: total memory of {e.device!r} is unknown")
            out[e.device] = int((Decimal(e.value) * tot).to_integral_value(rounding=ROUND_FLOOR))
    elif mode == "percent":
        s = sum(Decimal(str(e.value)) for e in entries)
        for e in entries:
            out[e.device] = int((Decimal(str(e.value)) / s * model_bytes).to_integral_value(rounding=ROUND_FLOOR))
        # flooring may lose a few bytes: give them to the largest share so the shares cover the model
        short = model_bytes - sum(out.values())
        if short > 0:
            big = max(entries, key=lambda e: e.value).device
            out[big] += short
    else:
        fixed = sum(e.value or 0 for e in entries if not e.rest)
        for e in entries:
            if e.rest:
                out[e.device] = max(e.value or 0, model_bytes - fixed)
            else:
                out[e.device] = int(e.value)
    return out


def entries_to_dicts(entries: list[AllocationEntry]) -> list[dict]:
    return [{"device": e.device, "mode": e.mode,
             "value": (float(e.value) if e.mode == "fraction" else e.value), "rest": e.rest} for e in entries]
