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
and every entry of one string must use the same mode.

`parse_allocation` returns plain data (a list of AllocationEntry); `budgets` turns it into a byte budget
per device for a model of a given size: fraction * device total memory (exact decimal arithmetic,
rounded down to whole bytes), byte amounts as written (the `*` device gets the rest of the model, or its
own amount if that is larger), percentages as share / sum of shares * model bytes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, asdict
from decimal import Decimal, ROUND_FLOOR
from typing import Iterable

from ..errors import AllocationError

_BYTE_UNITS = {"b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "g": 1 << 30, "gb": 1 << 30, "t": 1 << 40, "tb": 1 << 40}
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_FRACTION = re.compile(r"^" + _NUM + r"$")
_BYTES = re.compile(r"^" + _NUM + r"\s*([a-z]+)\s*(\*?)$", re.I)
_PERCENT = re.compile(r"^" + _NUM + r"\s*%$")
_DEVICE = re.compile(r"^[a-z][a-z0-9_]*(:\d+)?$")

FORMS = ("fractions of device memory, e.g. cuda:0,0.25;cpu,0.5 | byte amounts, e.g. cuda:0,4gb;cpu,* | "
         "percentages of the model, e.g. cuda:0,25%;cpu,75%")


@dataclass
class AllocationEntry:
    device: str
    mode: str                 # "fraction" | "bytes" | "percent"
    value: float | int | None  # fraction 0..1 | bytes (int; None for a bare '*') | percent
    rest: bool = False        # bytes mode: this device takes whatever is left
    text: str = ""            # the entry as written

    def to_dict(self) -> dict:
        return asdict(self)


def _entry_mode(device: str, value: str, entry: str):
    v = value.strip()
    if v.startswith("-"):
        raise AllocationError(f"entry {entry!r}: negative amount {v!r}; amounts are >= 0 ({FORMS})")
    if v == "*":
        return "bytes", None, True
    m = _FRACTION.match(v)
    if m:
        f = Decimal(m.group(1))
        if f > 1:
            raise AllocationError(
                f"entry {entry!r}: fraction {v} is above 1 (a plain number is a fraction of {device}'s total "
                f"memory, 0..1); for bytes write e.g. {device},{v}gb, for a share of the model {device},{v}%")
        return "fraction", f, False
    m = _PERCENT.match(v)
    if m:
        return "percent", float(m.group(1)), False
    m = _BYTES.match(v)
    if m:
        unit = m.group(2).lower()
        if unit not in _BYTE_UNITS:
            raise AllocationError(f"entry {entry!r}: unknown unit {m.group(2)!r}; byte units are b, k/kb, "
                                  f"m/mb, g/gb (binary), e.g. {device},4gb")
        return "bytes", int(Decimal(m.group(1)) * _BYTE_UNITS[unit]), bool(m.group(3))
    raise AllocationError(f"entry {entry!r}: cannot read amount {v!r}; write {FORMS}")


def parse_allocation(text: str | None, devices: Iterable[str] | None = None) -> list[AllocationEntry]:
    """Parse an allocation string.  `devices`: the known device names (an Inventory works too); an entry
    naming another device is an error that lists them.  Blank/None -> [] (not set)."""
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
            raise AllocationError(f"malformed entry {entry!r}: each entry is DEVICE,AMOUNT separated by ';' "
                                  f"({FORMS})")
        dev = parts[0].lower()
        if dev == "cuda":
            dev = "cuda:0"
        if not _DEVICE.match(dev):
            raise AllocationError(f"entry {entry!r}: {parts[0]!r} is not a device name (write cpu, cuda:0, ...)")
        if known is not None and dev not in known:
            raise AllocationError(f"entry {entry!r}: device {dev!r} is not available "
                                  f"(known devices: {', '.join(known) or 'none'})")
        if any(e.device == dev for e in out):
            raise AllocationError(f"entry {entry!r}: device {dev!r} appears twice; give each device one entry")
        mode, value, rest = _entry_mode(dev, parts[1], entry)
        out.append(AllocationEntry(dev, mode, value, rest, entry))
    if not out:
        return []
    modes = {e.mode for e in out}
    if len(modes) > 1:
        ex = ", ".join(f"{e.text!r} is {e.mode}" for e in out)
        raise AllocationError(f"mixed amount kinds in {text!r} ({ex}); use one kind for every entry: {FORMS}")
    stars = [e for e in out if e.rest]
    if len(stars) > 1:
        raise AllocationError(f"more than one '*' in {text!r} ({', '.join(repr(e.text) for e in stars)}); "
                              f"only one device can take the rest")
    if out[0].mode == "percent" and sum(e.value for e in out) <= 0:
        raise AllocationError(f"percentages in {text!r} add up to 0; give at least one device a share above 0")
    # fractions are kept as Decimal internally for exact budgets; expose floats in plain data
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
