"""Property-based tests (hypothesis) for the three input grammars of issue 12 (done-criterion 7):

* allocation strings (passes/allocation.py: parse_allocation + budgets),
* device specs (compiler/inventory.py: declare; grammar in compiler/device_spec.py),
* sizes (compiler/device_spec.py: parse_size; the CLI's --offload / --window),
* and the `distorch plan` command line fed with all three.

Each input is drawn from the grammar itself (valid and near-valid pieces: huge digit strings, exponents,
signs, unknown units, non-ASCII digits, long runs of spaces, duplicate devices and links), from random
edits of such strings, or from random text over the grammars' alphabet.  The property is always "a clear
error or a valid result": either the parser raises the project's error type (a DisTorchError with a short,
non-empty message) or it returns a result that satisfies every documented bound; never another exception.

Each test prints how many inputs it tried (and how many were accepted) straight to the terminal, also
under `pytest -q`.  DISTORCH_HYPOTHESIS_EXAMPLES (default 1200) sets the examples per grammar.
"""
import json
import math
import os
import time
from decimal import Decimal, localcontext

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from distorch.cli import MAX_VRAM_GIB, main, parse_vram, parse_window  # noqa: E402
from distorch.compiler import device_spec as specmod  # noqa: E402
from distorch.compiler.device_spec import normalize_device, parse_size  # noqa: E402
from distorch.compiler.inventory import Inventory, declare  # noqa: E402
from distorch.errors import AllocationError, DisTorchError, InventoryError  # noqa: E402
from distorch.passes.allocation import MAX_BYTES, budgets, entries_to_dicts, parse_allocation  # noqa: E402

N = int(os.environ.get("DISTORCH_HYPOTHESIS_EXAMPLES", "1200"))
SETTINGS = settings(max_examples=N, deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])
EiB = 1 << 60
MAX_MSG = 2000          # a "clear" error: one line of readable length, whatever the input's length


# --- pieces of the grammars ------------------------------------------------------------------------------
# Few draws per piece (one sampled_from where possible): generating is most of the cost of these tests.
# Valid pieces are listed more often than broken ones (one_of picks its branches evenly).

def _cases(*units: str) -> list[str]:
    return sorted({v for u in units for v in (u, u.upper(), u.capitalize(), u[:-1] + u[-1].upper())})


ws = st.one_of(st.sampled_from(["", "", "", "", " ", "  ", "\t"]),
               st.integers(100, 32000).map(lambda n: " " * n))                 # long runs: no backtracking
good_number = st.one_of(st.integers(0, 99999).map(str),
                        st.tuples(st.integers(0, 9999), st.integers(0, 999999)).map(lambda t: f"{t[0]}.{t[1]}"),
                        st.sampled_from(["0", "1", "0.5", ".5", "1.", "12", "24", "0.2126", "100", "00012"]))
bad_number = st.one_of(
    st.integers(15, 1200).map(lambda n: "9" * n),                          # overflows float / int formatting
    st.integers(15, 1200).map(lambda n: "0." + "0" * n + "1"),
    st.integers(2000, 5000).map(lambda n: "1" * n + "." + "5" * n),         # > 4300 digits: int() refuses
    st.sampled_from(["1e300", "1e-300", "1E3", "inf", "nan", "-3", "+3", "-0", "1_000", "0x10", "",
                     ".", "..5", "1.2.3", "\u0663", "\u00b2", "\uff11", "\u0661\u0662", "0.0000001"]),
)
number = st.one_of(good_number, good_number, good_number, bad_number)
size_unit = st.one_of(
    st.sampled_from(_cases("b", "k", "kb", "kib", "m", "mb", "mib", "g", "gb", "gib", "t", "tb", "tib")),
    st.sampled_from(["", "xb", "eb", "e3", "%", "gb/s", "tflops", "byte", "GiBs", "g b", "\uff47\uff42", "\u212a"]),
)
speed_unit = st.one_of(
    st.sampled_from(_cases("b/s", "kb/s", "mb/s", "gb/s", "tb/s", "kib/s", "mib/s", "gib/s", "tib/s")),
    st.sampled_from(["", "gb", "gbps", "GB/h", "/s", "gb/ s"]),
)
rate_unit = st.one_of(
    st.sampled_from(_cases("flops", "gflops", "tflops", "tf", "pflops")),
    st.sampled_from(["", "tflop", "TFLOP/s", "gb", "%"]),
)
good_device = st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:1", "CUDA:1", "cuda:00", "cuda:01", "cuda:2",
                               "xpu:0", "mps", "cpu:0", " cuda:1 "])
bad_device = st.sampled_from(["gpu 0", "", "cuda:", ":0", "cuda:\u0663", "cuda:0:1", "0cuda", "cuda:-1", "cpu>",
                              "c=d", "cuda:" + "9" * 5000, "x" * 70, "cu\u0627da", "cuda :0"])
device = st.one_of(good_device, good_device, good_device, bad_device)


@st.composite
def size_text(draw):
    return draw(ws) + draw(number) + draw(ws) + draw(size_unit) + draw(ws)


@st.composite
def alloc_value(draw):
    kind = draw(st.sampled_from(["fraction", "bytes", "bytes", "star", "percent", "percent", "other"]))
    if kind == "star":
        return draw(st.sampled_from(["*", " * ", "*gb", "**"]))
    n = draw(number)
    if kind == "fraction":
        return n
    if kind == "bytes":
        return n + draw(size_unit) + draw(st.sampled_from(["", "", "*", " *", "**"]))
    if kind == "percent":
        return n + draw(st.sampled_from(["%", "%", " %", "%%", "%*"]))
    return draw(st.sampled_from(["-" + n, n + "-", "", ",", n + "," + n]))


@st.composite
def alloc_string(draw):
    entries = draw(st.lists(st.tuples(device, alloc_value()), min_size=0, max_size=4))
    sep = draw(st.sampled_from([";", ";", "; ", ";;"]))
    comma = draw(st.sampled_from([",", ",", ",", " , ", ",,", ""]))
    return sep.join(f"{d}{comma}{v}" for d, v in entries) + draw(st.sampled_from(["", "", ";", " ", ";x"]))


@st.composite
def device_spec(draw):
    devs = []
    for _ in range(draw(st.integers(0, 3))):
        d = draw(device) + draw(st.sampled_from(["=", "=", "=", " = ", "", "=="])) + draw(size_text())
        extra = draw(st.sampled_from(["", "", "free", "rate", "both"]))
        if extra in ("free", "both"):
            d += "/" + draw(size_text()) + draw(st.sampled_from(["", " free", "FREE"]))
        if extra in ("rate", "both"):
            d += "@" + draw(number) + draw(rate_unit)
        devs.append(d)
    spec = ",".join(devs)
    for _ in range(draw(st.integers(0, 2))):
        links = []
        for _ in range(draw(st.integers(0, 2))):
            arrow = draw(st.sampled_from([">", ">", "<>", "<>", ">>", "<", "-", " > ", "<>>"]))
            links.append(draw(device) + arrow + draw(device) + "=" + draw(number) + draw(speed_unit))
        spec += ";" + ",".join(links)
    return spec


SPELLINGS = {"cpu": ["cpu", "CPU", " cpu"], "cuda:0": ["cuda:0", "cuda", "CUDA:00", "cuda:000"],
             "cuda:1": ["cuda:1", "Cuda:01"], "cuda:2": ["cuda:2"], "xpu:0": ["xpu:0", "XPU:00"], "mps": ["mps"]}


@st.composite
def valid_spec(draw):
    """A spec the grammar accepts (the bounds may still refuse a value now and then)."""
    devs = draw(st.lists(st.sampled_from(sorted(SPELLINGS)), min_size=1, max_size=4, unique=True))
    parts = []
    for d in devs:
        n, unit = draw(st.integers(1, 4096)), draw(st.sampled_from(_cases("gib", "gb", "mib", "g", "tb", "tib")))
        p = f"{draw(st.sampled_from(SPELLINGS[d]))}={n}{draw(ws)}{unit}"
        extra = draw(st.sampled_from(["", "free", "rate", "both"]))
        if extra in ("free", "both"):
            p += f"/{draw(st.integers(0, n))}{unit}" + draw(st.sampled_from(["", " free"]))
        if extra in ("rate", "both"):
            p += f"@{draw(st.integers(1, 2000))}{draw(st.sampled_from(_cases('tflops', 'tf', 'gflops')))}"
        parts.append(p)
    spec, seen = ",".join(parts), set()
    links = []
    for a, b, both in draw(st.lists(st.tuples(st.sampled_from(devs), st.sampled_from(devs), st.booleans()),
                                    max_size=4)):
        dirs = {(a, b), (b, a)} if both else {(a, b)}
        if a == b or dirs & seen:
            continue
        seen |= dirs
        speed = f"{draw(st.integers(1, 2000))}{draw(st.sampled_from(_cases('gb/s', 'gib/s', 'mb/s', 'tb/s')))}"
        links.append(f"{a}{'<>' if both else '>'}{b}={speed}")
    if links:
        spec += ";" + ",".join(links)
    return spec


@st.composite
def valid_alloc(draw):
    """An allocation string the grammar accepts for DEVS, in one of its three forms."""
    devs = draw(st.lists(st.sampled_from(["cpu", "cuda:0", "cuda:1", "xpu:0"]), min_size=1, max_size=4, unique=True))
    mode = draw(st.sampled_from(["fraction", "bytes", "percent"]))
    star = draw(st.integers(0, len(devs))) if mode == "bytes" else -1
    out = []
    for i, d in enumerate(devs):
        name = draw(st.sampled_from(SPELLINGS[d]))
        if mode == "fraction":
            v = draw(st.sampled_from(["0", "1", "0.5", ".25", "1.0"]) | st.integers(0, 9999).map(lambda k: f"0.{k:04d}"))
        elif mode == "percent":
            v = f"{draw(st.integers(1, 100))}%"
        elif i == star and draw(st.booleans()):
            v = "*"
        else:
            v = f"{draw(st.integers(0, 4096))}{draw(st.sampled_from(_cases('gb', 'mb', 'g', 'gib', 'kb', 'b')))}"
            v += "*" if i == star else ""
        out.append(f"{name}{draw(st.sampled_from([',', ', ', ' , ']))}{v}")
    return ";".join(out) + draw(st.sampled_from(["", ";", " "]))


@st.composite
def mutated(draw, base, alphabet):
    """A string of `base` with a few random edits (insert / delete / replace / duplicate a slice)."""
    s = draw(base)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(s)))
        j = min(len(s), i + draw(st.integers(1, 8)))
        op, c = draw(st.sampled_from(["ins", "del", "rep", "dup"])), draw(st.sampled_from(alphabet))
        s = {"ins": s[:i] + c + s[i:], "del": s[:i] + s[j:], "rep": s[:i] + c + s[j:],
             "dup": s[:j] + s[i:j] + s[j:]}[op]
    return s


ALPHA = "0123456789.,;:=/@<>*%-+ eEgGiIbBkKmMtTsSfFlLoOpPcCuUdDaArxX\t\u0663\u00b2_"
alloc_inputs = st.one_of(valid_alloc(), valid_alloc(), alloc_string(), alloc_string(),
                         mutated(st.one_of(valid_alloc(), alloc_string()), ALPHA), st.text(alphabet=ALPHA, max_size=60))
spec_inputs = st.one_of(valid_spec(), valid_spec(), device_spec(), device_spec(),
                        mutated(st.one_of(valid_spec(), device_spec()), ALPHA), st.text(alphabet=ALPHA, max_size=60))
size_inputs = st.one_of(size_text(), size_text(), mutated(size_text(), ALPHA), st.text(alphabet=ALPHA, max_size=20))


# --- the properties --------------------------------------------------------------------------------------

class Tally:
    def __init__(self):
        self.tried = self.ok = 0
        self.t0 = time.perf_counter()

    def report(self, capsys, what: str, asked: int = N) -> None:
        dt = time.perf_counter() - self.t0
        with capsys.disabled():
            print(f"\n[hypothesis] {what}: {self.tried} inputs tried in {dt:.1f} s "
                  f"({self.ok} valid results, {self.tried - self.ok} clear errors)")
        assert self.tried >= min(asked, 500), "hypothesis ran fewer examples than asked"


def _clear(e: Exception, kind=DisTorchError) -> None:
    assert isinstance(e, kind), f"{type(e).__name__}: {e}"
    msg = str(e)
    assert msg and len(msg) < MAX_MSG and "\n" not in msg, msg[:300]


DEVS = ["cuda:0", "cuda:1", "cpu", "xpu:0"]
TOTALS = {"cuda:0": 24 << 30, "cuda:1": 12 << 30, "cpu": 64 << 30, "xpu:0": 1}


def test_allocation_strings(capsys):
    tally = Tally()

    @SETTINGS
    @given(text=alloc_inputs, known=st.booleans(), model=st.integers(0, 1 << 50))
    def prop(text, known, model):
        tally.tried += 1
        try:
            entries = parse_allocation(text, DEVS if known else None)
        except Exception as e:  # noqa: BLE001 - the property: only AllocationError may come out
            _clear(e, AllocationError)
            return
        tally.ok += 1
        assert isinstance(entries, list)
        if not entries:
            assert not text.replace(";", "").strip()
            return
        assert len({e.mode for e in entries}) == 1
        assert len({e.device for e in entries}) == len(entries)
        assert sum(e.rest for e in entries) <= 1
        for e in entries:
            assert normalize_device(e.device) == e.device          # one canonical spelling per device
            if known:
                assert e.device in DEVS
            if e.mode == "fraction":
                assert isinstance(e.value, Decimal) and 0 <= e.value <= 1 and not e.rest
            elif e.mode == "bytes":
                assert (e.value is None and e.rest) or (isinstance(e.value, int) and 0 <= e.value <= MAX_BYTES)
            else:
                assert e.mode == "percent" and isinstance(e.value, float) and 0 <= e.value <= 1e6
        json.dumps(entries_to_dicts(entries), allow_nan=False)
        if known:
            b = budgets(entries, TOTALS, model)
            assert set(b) == {e.device for e in entries}
            assert all(isinstance(v, int) and v >= 0 for v in b.values())
            if entries[0].mode == "percent":
                assert sum(b.values()) == model
            if entries[0].mode == "bytes" and any(e.rest for e in entries):
                assert sum(b.values()) >= model

    prop()
    tally.report(capsys, "allocation strings")


def _check_inventory(inv: Inventory) -> None:
    assert inv.devices
    for name, d in inv.devices.items():
        assert normalize_device(name) == name == d.name
        assert isinstance(d.total_bytes, int) and isinstance(d.free_bytes, int)
        assert 0 <= d.free_bytes <= d.total_bytes <= EiB and d.total_bytes > 0
    for (a, b), bw in inv.links.items():
        assert a in inv.devices and b in inv.devices and a != b
        assert math.isfinite(bw) and specmod.MIN_LINK_BPS <= bw <= specmod.MAX_LINK_BPS
        assert inv.bandwidth(a, b) == bw
    for d, r in inv.compute_rate.items():
        assert d in inv.devices
        assert math.isfinite(r) and specmod.MIN_RATE_FLOPS <= r <= specmod.MAX_RATE_FLOPS
        assert inv.rate(d) == r
    again = Inventory.from_dict(json.loads(json.dumps(inv.to_dict(), allow_nan=False)))
    assert again == inv


def test_device_specs(capsys):
    tally = Tally()

    @SETTINGS
    @given(spec=spec_inputs)
    def prop(spec):
        tally.tried += 1
        t = time.process_time()      # CPU time: a busy CI machine does not make it flaky
        try:
            inv = declare(spec)
        except Exception as e:  # noqa: BLE001
            _clear(e, InventoryError)
            return
        finally:
            assert time.process_time() - t < 1.0, f"{len(spec)} characters took {time.process_time() - t:.2f} s"
        tally.ok += 1
        _check_inventory(inv)

    prop()
    tally.report(capsys, "device specs")


def _exact_size(text: str):
    """What parse_size must return for a NUMBER UNIT text, or None when it must fail (the grammar, written
    out independently of the parser)."""
    s = text.strip()
    i = 0
    while i < len(s) and s[i] in "0123456789.":
        i += 1
    num, unit = s[:i], s[i:].strip()
    if not unit.isascii():
        return None
    unit = unit.lower()
    if not num or num.count(".") > 1 or num == ".":
        return None
    mult = {"b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10 ** 3, "m": 1 << 20, "mib": 1 << 20, "mb": 10 ** 6,
            "g": 1 << 30, "gib": 1 << 30, "gb": 10 ** 9, "t": 1 << 40, "tib": 1 << 40, "tb": 10 ** 12}.get(unit)
    if mult is None:
        return None
    with localcontext() as ctx:
        ctx.prec = 200
        v = Decimal(num) * mult
    return int(v) if v <= EiB else None


def test_sizes(capsys):
    tally = Tally()

    @SETTINGS
    @given(text=size_inputs)
    def prop(text):
        tally.tried += 1
        want = _exact_size(text)
        try:
            got = parse_size(text, "size")
        except Exception as e:  # noqa: BLE001
            _clear(e, InventoryError)
            assert want is None, f"{text!r} should be {want} bytes"
        else:
            tally.ok += 1
            assert want is not None and got == want, (text, got, want)
        for f, lo, hi in ((parse_window, 1, EiB), (parse_vram, 0, MAX_VRAM_GIB)):
            try:
                v = f(text)
            except Exception as e:  # noqa: BLE001
                _clear(e)
            else:
                assert math.isfinite(v) and lo <= v <= hi

    prop()
    tally.report(capsys, "sizes (parse_size, --window, --offload)")


def test_plan_command_line(capsys):
    """The whole `distorch plan` with generated --devices / --offload / --window / --expert values: exit 0 with
    a plan or exit 2 with one line on stderr, never a traceback."""
    tally = Tally()
    n = max(50, N // 20)

    def mostly(good, other):      # one_of does not pick its branches evenly: choose with a number instead
        return st.integers(0, 3).flatmap(lambda i: good if i else other)

    good_devices = st.sampled_from(["cuda:0=12GiB,cpu=32GiB", "cuda=12GiB,cpu=32GiB;cpu>cuda:0=25GB/s",
                                    "cuda:00=13GB/12GB,cpu=64GiB@2TF"])
    good_vram = st.sampled_from(["16", "20", "16GiB", "18.5GB", "1.6e1"])

    @settings(SETTINGS, max_examples=n)
    @given(devices=mostly(good_devices, spec_inputs), vram=mostly(good_vram, size_inputs),
           window=mostly(st.sampled_from([None, None, "2GiB", "3000MB"]), size_inputs),
           expert=mostly(st.none(), alloc_inputs))
    def prop(devices, vram, window, expert):
        tally.tried += 1
        argv = ["plan", "flux-dev", "--compute", "cuda:0", f"--devices={devices}", "--json"]
        for opt, v in (("--offload", vram), ("--window", window), ("--expert", expert)):
            if v is not None:
                argv.append(f"{opt}={v}")      # the '=' form: a value may start with '-' 
        capsys.readouterr()
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc in (0, 2)
        assert "Traceback" not in err
        if rc == 0:
            tally.ok += 1
            d = json.loads(out)
            assert sum(v["bytes"] for v in d["devices"].values()) == d["model_bytes"]
        else:
            last = err.rstrip("\n").split("\n")[-1]        # a "note:" line may come first
            assert out == "" and last.startswith("distorch: error: ") and len(last) < MAX_MSG + 40, err[-500:]

    prop()
    tally.report(capsys, "distorch plan command lines", n)
