"""Allocation-string grammar: every form of COMPAT.md, every error."""
from decimal import Decimal

import pytest

from distorch.errors import AllocationError, DisTorchError
from distorch.passes.allocation import budgets, parse_allocation, entries_to_dicts

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10
DEVS = ["cuda:0", "cuda:1", "cpu"]
TOTALS = {"cuda:0": 24 * GiB, "cuda:1": 12 * GiB, "cpu": 64 * GiB}


def test_fraction_form():
    e = parse_allocation("cuda:0,0.2126;cpu,0.0851", DEVS)
    assert [(x.device, x.mode) for x in e] == [("cuda:0", "fraction"), ("cpu", "fraction")]
    assert e[0].value == Decimal("0.2126")
    b = budgets(e, TOTALS, 10 * GiB)
    assert b["cuda:0"] == int(Decimal("0.2126") * 24 * GiB)
    assert b["cpu"] == int(Decimal("0.0851") * 64 * GiB)


def test_fraction_edge_values():
    e = parse_allocation("cuda:0,1;cpu,0;cuda:1,.5", DEVS)
    assert [x.value for x in e] == [1, 0, Decimal("0.5")]
    assert budgets(e, TOTALS, 1)["cuda:1"] == 6 * GiB


def test_bytes_star_rest():
    e = parse_allocation("cuda:0,4gb;cpu,*", DEVS)
    assert [x.mode for x in e] == ["bytes", "bytes"]
    assert e[0].value == 4 * GiB and not e[0].rest
    assert e[1].value is None and e[1].rest
    b = budgets(e, TOTALS, 10 * GiB)
    assert b == {"cuda:0": 4 * GiB, "cpu": 6 * GiB}


def test_bytes_three_devices_with_valued_star():
    e = parse_allocation("cuda:0,500mb;cuda:1,3.0g;cpu,5gb*", DEVS)
    assert [x.value for x in e] == [500 * MiB, 3 * GiB, 5 * GiB]
    assert [x.rest for x in e] == [False, False, True]
    # the rest is larger than 5 GiB: cpu takes the rest
    b = budgets(e, TOTALS, 20 * GiB)
    assert b["cpu"] == 20 * GiB - 500 * MiB - 3 * GiB
    # the rest is smaller than its own amount: it keeps its amount
    assert budgets(e, TOTALS, 4 * GiB)["cpu"] == 5 * GiB


@pytest.mark.parametrize("text,expected", [
    ("cpu,1b", 1), ("cpu,2k", 2 * KiB), ("cpu,2KB", 2 * KiB), ("cpu,1.5m", int(1.5 * MiB)), ("cpu,3MB", 3 * MiB),
    ("cpu,2.25G", int(2.25 * GiB)), ("cpu,7Gb", 7 * GiB), ("cpu, 4 gb ", 4 * GiB), ("cpu,.5gb", GiB // 2),
])
def test_byte_units_binary_case_insensitive(text, expected):
    assert parse_allocation(text, DEVS)[0].value == expected


def test_percent_normalised():
    e = parse_allocation("cuda:0,25%;cpu,75%", DEVS)
    assert [x.mode for x in e] == ["percent", "percent"]
    b = budgets(e, TOTALS, 1000)
    assert b == {"cuda:0": 250, "cpu": 750}
    e = parse_allocation("cuda:0,8%;cuda:1,8%;cpu,4%", DEVS)
    b = budgets(e, TOTALS, 1000)
    assert b == {"cuda:0": 400, "cuda:1": 400, "cpu": 200}
    b = budgets(e, TOTALS, 1001)
    assert sum(b.values()) == 1001


def test_mode_from_value_not_device_name():
    # 'mps' has an m, 'xpu_gb' letters g/b: the values are fractions, so this is fraction mode
    e = parse_allocation("mps,0.5;xpu_gb:0,0.25", ["mps", "xpu_gb:0"])
    assert {x.mode for x in e} == {"fraction"}


def test_blank_is_not_set():
    assert parse_allocation("", DEVS) == []
    assert parse_allocation("   ", DEVS) == []
    assert parse_allocation(None, DEVS) == []
    assert budgets([], TOTALS, 5) == {}


def test_trailing_separator_and_spaces():
    e = parse_allocation(" cuda:0 , 0.5 ; cpu,0.25; ", DEVS)
    assert [x.device for x in e] == ["cuda:0", "cpu"]


def test_plain_data():
    d = entries_to_dicts(parse_allocation("cuda:0,0.5;cpu,0.25", DEVS))
    assert d == [{"device": "cuda:0", "mode": "fraction", "value": 0.5, "rest": False},
                 {"device": "cpu", "mode": "fraction", "value": 0.25, "rest": False}]


@pytest.mark.parametrize("text,needle", [
    ("cuda:0;cpu,0.5", "'cuda:0'"),                    # malformed entry, no value
    ("cuda:0,0.5,1", "'cuda:0,0.5,1'"),                 # too many parts
    (",0.5", "',0.5'"),                                 # no device
    ("cuda:0,", "'cuda:0,'"),                           # no value
    ("cuda:2,0.5", "known devices: cuda:0, cuda:1, cpu"),  # unknown device, lists the known ones
    ("cuda:0,-0.5", "negative"),
    ("cuda:0,-4gb;cpu,*", "negative"),
    ("cuda:0,abc", "'abc'"),                            # non-numeric
    ("cuda:0,4xb", "unknown unit"),
    ("cuda:0,1.5", "above 1"),
    ("cuda:0,4", "above 1"),
    ("cuda:0,4gb*;cpu,*", "more than one '*'"),
    ("cuda:0,0.5;cpu,4gb", "mixed"),
    ("cuda:0,25%;cpu,0.5", "mixed"),
    ("cuda:0,25%;cpu,*", "mixed"),
    ("cuda:0,0%;cpu,0%", "add up to 0"),
    ("cuda:0,0.5;cuda:0,0.2", "twice"),
    ("cuda 0,0.5", "not a device name"),
])
def test_errors_name_the_bad_entry(text, needle):
    with pytest.raises(AllocationError) as ei:
        parse_allocation(text, DEVS)
    assert needle in str(ei.value)
    assert isinstance(ei.value, DisTorchError) and isinstance(ei.value, ValueError)


def test_fraction_above_one_suggests_other_forms():
    with pytest.raises(AllocationError) as ei:
        parse_allocation("cuda:0,4", DEVS)
    assert "cuda:0,4gb" in str(ei.value) and "cuda:0,4%" in str(ei.value)


def test_no_device_list_accepts_any_name():
    assert parse_allocation("cuda:7,0.5", None)[0].device == "cuda:7"
