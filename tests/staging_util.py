"""Shared by the staging tests (tests/test_upload.py, tests/test_download.py): a tensor's bytes, and a device side
whose copies run late."""
from __future__ import annotations

import threading

import torch

from distorch.runtime.upload import HostCopies


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of t's elements in order, flat (uint8)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


class Deferred(HostCopies):
    """Copies that run only when the pipeline waits for their buffer (or at finish): an asynchronous device
    whose copies are late.  A buffer reused before its wait would hand the late copies the wrong bytes (an
    upload refilling it, a download draining it).  `honour_wait=False`: waits run nothing, to show the checks
    built on this catch a missing wait.  Waits come from the pipeline's threads, hence the lock."""

    def __init__(self, honour_wait=True):
        self.lock = threading.Lock()
        self.queued, self.pending, self.waits = [], [], 0
        self.honour_wait = honour_wait

    def issue(self, pairs):
        self.queued = list(pairs)

    def done(self, i):
        with self.lock:
            if self.honour_wait:
                assert all(b != i for b, _ in self.pending), "a buffer was issued again before the pipeline waited"
            self.pending.append((i, self.queued))

    def wait(self, i):
        with self.lock:
            self.waits += 1
            if self.honour_wait:
                self._run([p for p in self.pending if p[0] == i])

    def finish(self):
        with self.lock:
            self._run(list(self.pending))

    def _run(self, todo):
        for p in todo:
            self.pending.remove(p)
            for d, s in p[1]:
                d.copy_(s)
