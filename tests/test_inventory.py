"""Inventory: declared specs (grammar, units, links, errors), defaults, CPU probe."""
import json
import math

import pytest

from distorch.compiler import inventory as invmod
from distorch.compiler.inventory import declare, parse_size, probe, Inventory
from distorch.errors import InventoryError, DisTorchError

GiB, MiB = 1 << 30, 1 << 20


def test_declare_devices():
    inv = declare("cuda:0=24GiB,cuda:1=12GiB,cpu=64GiB")
    assert list(inv.devices) == ["cuda:0", "cuda:1", "cpu"]
    assert inv.devices["cuda:0"].total_bytes == 24 * GiB
    assert inv.devices["cuda:1"].free_bytes == 12 * GiB  # free = total when not given
    assert inv.source == "declared"


def test_declare_free_units_rate_links():
    inv = declare("CUDA:0=24gb/20.5GB free@600TFLOPS, cpu=512m;cpu>cuda:0=20GB/s;cuda:0>cpu=10GiB/s")
    d = inv.devices["cuda:0"]
    assert d.total_bytes == 24 * GiB and d.free_bytes == int(20.5 * GiB)
    assert inv.devices["cpu"].total_bytes == 512 * MiB
    assert inv.rate("cuda:0") == 600e12
    assert inv.bandwidth("cpu", "cuda:0") == 20e9
    assert inv.bandwidth("cuda:0", "cpu") == 10 * GiB


def test_both_way_link_and_plain_cuda():
    inv = declare("cuda=8GiB,cuda:1=8GiB;cuda:0<>cuda:1=400GB/s")
    assert "cuda:0" in inv.devices
    assert inv.bandwidth("cuda:0", "cuda:1") == inv.bandwidth("cuda:1", "cuda:0") == 400e9


def test_defaults():
    inv = declare("cuda:0=8GiB,cuda:1=8GiB,cpu=16GiB")
    assert inv.bandwidth("cpu", "cuda:0") == 25e9
    assert inv.bandwidth("cuda:1", "cuda:0") == 25e9
    assert math.isinf(inv.bandwidth("cuda:0", "cuda:0"))
    assert inv.rate("cuda:0") == 400e12
    assert inv.rate("cpu") == 1e12


@pytest.mark.parametrize("s,n", [("1024", 1024), ("1k", 1024), ("2KiB", 2048), ("1.5g", int(1.5 * GiB)),
                                 ("3TB", 3 << 40), ("10 MiB", 10 * MiB)])
def test_parse_size(s, n):
    assert parse_size(s) == n


@pytest.mark.parametrize("spec,needle", [
    ("", "empty"),
    ("cuda:0", "NAME=SIZE"),
    ("cuda:0=lots", "'lots'"),
    ("cuda:0=24GiB/30GiB", "more than its total"),
    ("cuda:0=24GiB,cuda:0=12GiB", "twice"),
    ("cuda:0=24GiB;cpu>cuda:0=25GB/s", "not declared"),
    ("cuda:0=24GiB,cpu=8GiB;cpu-cuda:0=25GB/s", "SRC>DST"),
    ("cuda:0=24GiB,cpu=8GiB;cpu>cuda:0=fast", "'fast'"),
    ("cuda:0=24GiB,cpu=8GiB;cpu>cuda:0=0GB/s", "above zero"),
    ("gpu 0=24GiB", "bad device name"),
    ("cuda:0=24GiB@many", "compute rate"),
])
def test_declare_errors(spec, needle):
    with pytest.raises(InventoryError) as ei:
        declare(spec)
    assert needle in str(ei.value)
    assert isinstance(ei.value, DisTorchError)


def test_require_lists_known():
    inv = declare("cuda:0=8GiB,cpu=16GiB")
    with pytest.raises(InventoryError, match="known: cuda:0, cpu"):
        inv.require("cuda:3")
    assert inv.require("CUDA:0").name == "cuda:0"


def test_dict_round_trip():
    inv = declare("cuda:0=8GiB/6GiB,cpu=16GiB;cpu>cuda:0=12GB/s")
    again = Inventory.from_dict(json.loads(json.dumps(inv.to_dict())))
    assert again == inv


def test_probe_cpu_only(monkeypatch, tmp_path, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    inv = probe(cache=True)
    assert list(inv.devices) == ["cpu"]
    assert inv.source == "probed"
    cpu = inv.devices["cpu"]
    assert cpu.total_bytes > 0 and 0 < cpu.free_bytes <= cpu.total_bytes
    assert "no CUDA" in capsys.readouterr().err


def test_probe_host_memory_matches_meminfo():
    tot, free = invmod._host_memory()
    with open("/proc/meminfo") as f:
        first = f.readline()
    assert tot == int(first.split()[1]) * 1024
    assert free <= tot
