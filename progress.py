"""Progress of long work (file loads, weights into their homes, compiles, link probes), where people look.

Library code reports a stage and never prints:

    with progress.stage("loading flux1-dev.safetensors", total=nbytes, unit="B") as st:
        for chunk in ...:
            st.update(len(chunk))

and a stage shows itself through the *reporter* of the process:

    in ComfyUI         comfy.utils.ProgressBar (the node's bar in the UI); comfy_nodes/comfy_api.py installs
                       it with set_reporter() -- the library never imports ComfyUI
    on a terminal      a bar on stderr: tqdm's when tqdm is installed (it is optional), else a one-line bar
    otherwise          no bar; plain log lines (one every LOG_EVERY_S seconds while the stage runs)

Whatever the reporter, a stage that was shown ends with ONE log line at INFO on the logger
"distorch.progress": label, amount, seconds and the rate (GB/s, 10^9 bytes per second, for byte stages):

    distorch: weights -> homes: 11.07 GiB in 4.2 s (2.83 GB/s)

A stage is shown when it is enabled (the `progress=` flag of the API) and big enough (`min_total`, e.g.
256 MiB for byte stages); a stage that is not shown logs its end line at DEBUG.

`tick()` advances the innermost open stage of this thread (for code that runs inside a stage but does not
hold it, e.g. the passes of distorch.compile).

A reporter is a callable `reporter(label, total, unit) -> bar`, where `bar.update(done)` takes the
amount done so far (absolute) and `bar.close()` ends it; `set_reporter(None)` restores the default.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Callable, Optional, Protocol, TextIO

__all__ = ["Stage", "stage", "tick", "set_reporter", "get_reporter", "Bar", "Reporter", "TextBar",
           "format_amount", "LOG_EVERY_S"]

log = logging.getLogger("distorch.progress")

LOG_EVERY_S = 30.0          # without a bar: one progress line per this many seconds of a long stage


class Bar(Protocol):
    def update(self, done: int) -> None: ...

    def close(self) -> None: ...


Reporter = Callable[[str, int, str], Bar]

_reporter: Optional[Reporter] = None
_local = threading.local()


def set_reporter(reporter: Optional[Reporter]) -> Optional[Reporter]:
    """Install `reporter` for every stage shown from now on (None: the default); returns the previous one."""
    global _reporter
    old, _reporter = _reporter, reporter
    return old


def get_reporter() -> Optional[Reporter]:
    """The installed reporter, or None when the default (terminal bar or log lines) is used."""
    return _reporter


def format_amount(n: float, unit: str) -> str:
    """'1.25 GiB' for bytes (2^30), '12 tensors' for other units."""
    if unit == "B":
        if n >= 2**30:
            return f"{n / 2**30:.2f} GiB"
        return f"{n / 2**20:.1f} MiB"
    return f"{int(n)} {unit}"


class TextBar:
    """A one-line bar rewritten in place with '\\r' (for a terminal only); throttled to 4 writes/s."""

    def __init__(self, label: str, total: int, unit: str, stream: Optional[TextIO] = None) -> None:
        self.label, self.total, self.unit = label, max(int(total), 1), unit
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.last = 0.0

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < 0.25 and done < self.total:
            return
        self.last = now
        frac = min(done / self.total, 1.0)
        bar = "#" * int(30 * frac)
        tail = f"{format_amount(done, self.unit)}/{format_amount(self.total, self.unit)}"
        if self.unit == "B":
            tail += f" {done / max(now - self.t0, 1e-9) / 1e9:.2f} GB/s"
        self.stream.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% {tail}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class _TqdmBar:
    def __init__(self, label: str, total: int, unit: str):
        import tqdm
        kw = dict(unit="B", unit_scale=True, unit_divisor=1024) if unit == "B" else dict(unit=f" {unit}")
        self.bar = tqdm.tqdm(total=total, desc=label, leave=False, dynamic_ncols=True, **kw)

    def update(self, done: int) -> None:
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _default_bar(label: str, total: int, unit: str) -> Optional[Bar]:
    """A terminal bar when stderr is a terminal, else None (log lines only)."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty:
        return None
    try:
        return _TqdmBar(label, total, unit)
    except Exception:        # tqdm not installed (it is optional)
        return TextBar(label, total, unit)


class Stage:
    """One long piece of work: `update(n)` adds n done, `close()` ends it (and logs its line).

    label       what runs, e.g. "distorch: loading model.safetensors"
    total       how much there is, in `unit` ("B" for bytes: the end line gives GiB and GB/s)
    enabled     False: no bar and the end line at DEBUG (the API's progress=False)
    min_total   below this total the stage is not shown either
    stream      a TextBar on this stream, whatever the reporter (tests)
    """

    def __init__(self, label: str, total: int, unit: str = "B", *, enabled: bool = True, min_total: int = 0,
                 stream: Optional[TextIO] = None) -> None:
        self.label, self.unit = label, unit
        self.total = max(int(total), 0)
        self.done = 0
        self.t0 = time.perf_counter()
        self.last_log = self.t0
        self.shown = bool(enabled) and self.total > 0 and self.total >= min_total
        self.closed = False
        self.bar: Optional[Bar] = None
        if self.shown:
            if stream is not None:
                self.bar = TextBar(label, self.total, unit, stream)
            else:
                try:
                    self.bar = (_reporter or _default_bar)(label, self.total, unit)
                except Exception:     # a reporter that fails never fails the work
                    log.debug("progress reporter failed for %r", label, exc_info=True)
                    self.bar = None
        _stack().append(self)

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        if not self.shown:
            return
        if self.bar is not None:
            try:
                self.bar.update(min(self.done, self.total))
            except Exception:
                log.debug("progress bar update failed for %r", self.label, exc_info=True)
                self.bar = None
            return
        now = time.perf_counter()
        if now - self.last_log >= LOG_EVERY_S and self.done < self.total:
            self.last_log = now
            log.info("%s: %.0f%% (%s of %s)%s", self.label, 100 * self.done / max(self.total, 1),
                     format_amount(self.done, self.unit), format_amount(self.total, self.unit), self._rate(now))

    def _rate(self, now: float) -> str:
        if self.unit != "B":
            return ""
        return f" ({self.done / max(now - self.t0, 1e-9) / 1e9:.2f} GB/s)"

    def summary(self) -> str:
        """'label: 11.07 GiB in 4.2 s (2.83 GB/s)'."""
        now = time.perf_counter()
        return (f"{self.label}: {format_amount(self.done, self.unit)} in {now - self.t0:.1f} s"
                f"{self._rate(now)}")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        st = _stack()
        if self in st:
            st.remove(self)
        if self.bar is not None:
            try:
                self.bar.close()
            except Exception:
                log.debug("progress bar close failed for %r", self.label, exc_info=True)
        log.log(logging.INFO if self.shown else logging.DEBUG, "%s", self.summary())

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stage(label: str, total: int, unit: str = "B", *, enabled: bool = True, min_total: int = 0) -> Stage:
    """A Stage, for `with`: closed (and its line logged) when the block ends."""
    return Stage(label, total, unit, enabled=enabled, min_total=min_total)


def _stack() -> list:
    st = getattr(_local, "stack", None)
    if st is None:
        st = _local.stack = []
    return st


def tick(n: int = 1) -> None:
    """Advance the innermost open stage of this thread by n (nothing when none is open)."""
    st = _stack()
    if st:
        st[-1].update(n)
