"""Where a bench's wall time goes: a sampling profiler over Python stacks (no dependency, any thread).

    s = StackSampler(period=0.01); s.start()
    ... the work ...
    s.stop(); rep = s.report(top=15); print(s.text(rep))

Every `period` seconds the sampler reads sys._current_frames() and, per thread, counts the innermost frame
and the innermost frame inside DisTorch and inside ComfyUI's `comfy` package.  A frame that is blocked in
C (a copy, cudaHostRegister, a read) is the Python line that called it, so the counts give seconds per line
of Python, native time included.  Threads idle in a wait (a pool worker with nothing to do) are not counted.
The cost is one stack walk per thread per period (~10 us at 10 ms).
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time

_IDLE = {("threading.py", "wait"), ("queue.py", "get"), ("thread.py", "_worker"), ("selectors.py", "select"),
         ("threading.py", "_wait_for_tstate_lock")}
_SELF = os.path.abspath(__file__)


def _short(fn: str) -> str:
    parts = fn.replace("\\", "/").split("/")
    for anchor in ("distorch", "comfy", "comfy_extras", "bench", "torch", "safetensors"):
        if anchor in parts[:-1]:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i:])
    return "/".join(parts[-2:])


def _in(fn: str, what: str) -> bool:
    f = fn.replace("\\", "/")
    if what == "distorch":
        return "/distorch/" in f or "/main/" in f and "/bench/" not in f and "/.comfy/" not in f
    return "/comfy/" in f and "/distorch/" not in f


class StackSampler(threading.Thread):
    """See the module docstring."""

    def __init__(self, period: float = 0.01) -> None:
        super().__init__(daemon=True, name="bench-sampler")
        self.period = period
        self._halt = threading.Event()
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.samples = 0
        self.t0 = self.t1 = 0.0

    def run(self) -> None:
        self.t0 = time.perf_counter()
        me = threading.get_ident()
        while not self._halt.wait(self.period):
            names = {t.ident: t.name for t in threading.enumerate()}
            self.samples += 1
            for tid, frame in sys._current_frames().items():
                if tid == me:
                    continue
                leaf = frame
                if (os.path.basename(leaf.f_code.co_filename), leaf.f_code.co_name) in _IDLE:
                    continue
                tname = names.get(tid, str(tid))
                tname = "main" if tname == "MainThread" else tname.rstrip("0123456789_-")
                c = self.counts[tname]
                c["leaf " + self._where(leaf)] += 1
                got_d = got_c = False
                f = frame
                while f is not None and not (got_d and got_c):
                    fn = f.f_code.co_filename
                    if not got_d and _in(fn, "distorch"):
                        c["distorch " + self._where(f)] += 1
                        got_d = True
                    if not got_c and _in(fn, "comfy"):
                        c["comfy " + self._where(f)] += 1
                        got_c = True
                    f = f.f_back
        self.t1 = time.perf_counter()

    @staticmethod
    def _where(f) -> str:
        return f"{_short(f.f_code.co_filename)}:{f.f_code.co_name}:{f.f_lineno}"

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def report(self, top: int = 15) -> dict:
        """{thread: {"busy_s", "leaf"/"distorch"/"comfy": [(where, seconds)]}}, threads by busy time."""
        out = {}
        for t, c in self.counts.items():
            rows: dict[str, list] = {"leaf": [], "distorch": [], "comfy": []}
            for k, n in c.most_common():
                kind, _, where = k.partition(" ")
                if len(rows[kind]) < top:
                    rows[kind].append((where, round(n * self.period, 3)))
            busy = sum(n for k, n in c.items() if k.startswith("leaf ")) * self.period
            out[t] = {"busy_s": round(busy, 3), **rows}
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["busy_s"]))

    @staticmethod
    def text(rep: dict, threads: int = 3, top: int = 10) -> str:
        lines = []
        for t, r in list(rep.items())[:threads]:
            lines.append(f"  thread {t}: busy {r['busy_s']:.2f} s")
            for kind in ("distorch", "comfy", "leaf"):
                for where, s in r[kind][:top]:
                    lines.append(f"    {kind:8s} {s:7.2f} s  {where}")
        return "\n".join(lines)
