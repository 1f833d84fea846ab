"""distorch.progress: stages report through the installed reporter (ComfyUI's ProgressBar in ComfyUI), a
terminal bar, or log lines; every shown stage ends with one INFO line with time and GB/s; no print."""
import io
import logging
import pathlib
import re

import pytest

from distorch import progress as P
from distorch.runtime.store import Progress

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Recorder:
    def __init__(self):
        self.bars = []

    def __call__(self, label, total, unit):
        rec = {"label": label, "total": total, "unit": unit, "done": [], "closed": False}
        self.bars.append(rec)

        class Bar:
            def update(self, done):
                rec["done"].append(done)

            def close(self):
                rec["closed"] = True
        return Bar()


@pytest.fixture
def reporter():
    rec = Recorder()
    old = P.set_reporter(rec)
    yield rec
    P.set_reporter(old)


def test_stage_reports_through_reporter_and_logs_one_info_line(reporter, caplog):
    caplog.set_level(logging.DEBUG, logger="distorch.progress")
    with P.stage("distorch: loading x", total=3 << 30, unit="B") as st:
        for _ in range(3):
            st.update(1 << 30)
    assert reporter.bars == [{"label": "distorch: loading x", "total": 3 << 30, "unit": "B",
                              "done": [1 << 30, 2 << 30, 3 << 30], "closed": True}]
    lines = [r for r in caplog.records if r.name == "distorch.progress"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert re.fullmatch(r"distorch: loading x: 3\.00 GiB in \d+\.\d s \(\d+\.\d\d GB/s\)", lines[0].getMessage())


def test_small_or_disabled_stage_is_not_shown_and_logs_at_debug(reporter, caplog):
    caplog.set_level(logging.DEBUG, logger="distorch.progress")
    Progress(10 << 20, "small").close()                    # under 256 MiB
    Progress(0, "off").close()                             # progress=False
    P.Stage("disabled", 1 << 30, enabled=False).close()
    assert reporter.bars == []
    assert [r.levelno for r in caplog.records if r.name == "distorch.progress"] == [logging.DEBUG] * 3


def test_tick_advances_innermost_open_stage(reporter):
    with P.stage("outer", 5, "passes"):
        P.tick()
        with P.stage("inner", 2, "probes"):
            P.tick(2)
        P.tick()
    P.tick()    # no stage open: nothing
    assert [b["done"] for b in reporter.bars] == [[1, 2], [2]]


def test_without_terminal_no_bar_only_log_lines(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="distorch.progress")
    old = P.set_reporter(None)
    try:
        buf = io.StringIO()
        monkeypatch.setattr("sys.stderr", buf)              # not a TTY
        monkeypatch.setattr(P, "LOG_EVERY_S", 0.0)
        st = P.Stage("distorch: weights -> homes", 2 << 30)
        st.update(1 << 30)
        st.update(1 << 30)
        st.close()
        assert buf.getvalue() == ""                          # no '\r' bar in a log file
        msgs = [r.getMessage() for r in caplog.records if r.name == "distorch.progress"]
        assert msgs[0].startswith("distorch: weights -> homes: 50%") and "GB/s" in msgs[0]
        assert msgs[-1].startswith("distorch: weights -> homes: 2.00 GiB in")
    finally:
        P.set_reporter(old)


def test_terminal_bar_on_a_stream():
    buf = io.StringIO()
    st = Progress(512 << 20, "distorch: loading m.safetensors", stream=buf)
    st.update(512 << 20)
    st.close()
    out = buf.getvalue()
    assert out.startswith("\rdistorch: loading m.safetensors [") and "100.0%" in out and out.endswith("\n")


def test_a_failing_reporter_never_fails_the_work():
    def broken(label, total, unit):
        raise RuntimeError("boom")
    old = P.set_reporter(broken)
    try:
        with P.stage("x", 1 << 30) as st:
            st.update(1 << 30)
    finally:
        P.set_reporter(old)


def test_no_print_in_library_code():
    """Messages go through logging; only the CLI (cli.py) and the demo's main print."""
    offenders = []
    for sub in ("compiler", "passes", "runtime", "formats", "comfy_nodes"):
        for f in (ROOT / sub).rglob("*.py"):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if re.search(r"(?<![\w.])print\(", code):
                    offenders.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    for f in ("__init__.py", "errors.py", "progress.py"):
        for i, line in enumerate((ROOT / f).read_text().splitlines(), 1):
            if re.search(r"(?<![\w.])print\(", line.split("#", 1)[0]):
                offenders.append(f"{f}:{i}")
    assert not offenders, offenders


def test_loggers_are_fixed_distorch_names():
    bad = []
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT)
        if rel.parts[0] in ("tests", "bench") or rel.parts[0].startswith("."):
            continue
        for m in re.finditer(r"getLogger\(([^)]*)\)", f.read_text()):
            if m.group(1) and not re.fullmatch(r'"distorch(\.[a-z0-9_.]+)?"', m.group(1)):  # () = root (demo main)
                bad.append(f"{rel}: getLogger({m.group(1)})")
    assert not bad, bad
