"""The baselines the streaming benches set against DisTorch, each installed on the model and taken off again
with undo():

  SyncBaseline  bench_stream.py's sync_pinned: each offloaded block's parameters copied from pinned host
                tensors with blocking per-tensor copies right before the block runs, dropped after
  ComfyStyle    bench_gguf.py's comfy_gguf_pinned / comfy_gguf_pageable: ComfyUI-GGUF-style, every GGUF
                weight's bytes in one host buffer, copied synchronously right before its layer runs, then
                dequantized; nothing prefetched, nothing kept
"""
from __future__ import annotations

import torch

import stream_kit as K


class SyncBaseline:
    """Copy-before-each-block with blocking per-tensor copies from pinned host tensors."""

    def __init__(self, model, offloaded: set, dev: str):
        self.hooks = []
        self.dev = torch.device(dev)
        self.held = {}
        for name in offloaded:
            m = model.get_submodule(name)
            ps = list(m.parameters())
            host = [p.data.to("cpu").clone() if K._CPU else p.data.to("cpu").pin_memory() for p in ps]
            for p, h in zip(ps, host):
                p.data = h
            self.held[name] = (ps, host)
            self.hooks.append(m.register_forward_pre_hook(self._pre(ps, host)))
            self.hooks.append(m.register_forward_hook(self._post(ps, host)))

    def _pre(self, ps, host):
        dev = self.dev

        def pre(mod, args):
            for p, h in zip(ps, host):
                p.data = h.to(dev, non_blocking=False)
        return pre

    def _post(self, ps, host):
        def post(mod, args, out):
            for p, h in zip(ps, host):
                p.data = h
        return post

    def undo(self):
        for h in self.hooks:
            h.remove()
        for ps, host in self.held.values():
            for p, h in zip(ps, host):
                p.data = h.to(self.dev)
        self.held = {}


class ComfyStyle:
    """GGUF weights' bytes in one host buffer (pinned or pageable); each layer copies its bytes with a
    blocking copy right before it runs, then dequantizes; nothing prefetched, nothing kept."""

    def __init__(self, model, pinned: bool, dev):
        from distorch.runtime import gguf_stream as gs
        from distorch.runtime.arena import HostArena
        self.dev = dev
        self.layers = []
        ps = []
        for _, m in model.named_modules():
            w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
            if w is not None and gs.is_gguf(w):
                ps.append((m, w))
        self.nbytes = sum(w.raw.numel() for _, w in ps)
        self.arena = HostArena(sum((w.raw.numel() + 255) // 256 * 256 for _, w in ps) + 4096,
                               pin=pinned and not K._CPU)
        self.pinned = self.arena.pinned
        for m, w in ps:
            v = self.arena.take(w.raw.numel())[:w.raw.numel()]
            v.copy_(w.raw)
            self.layers.append((m, w, w.raw))
            gs.set_raw(w, v)
            m.gguf_dequant_override = self._override
        K._sync()

    @staticmethod
    def _override(module, name, t, device, dtype):
        from distorch.runtime import gguf_stream as gs
        from distorch.formats.dequant import dequantize
        if gs.is_gguf(t):
            raw = t.raw.to(device, non_blocking=False)          # synchronous copy, every call
            return dequantize(raw, t.qtype, t.shape, dtype or t.dtype, check=False)
        return t.to(device=device, dtype=dtype or t.dtype)

    def undo(self):
        from distorch.runtime import gguf_stream as gs
        for m, w, old in self.layers:
            gs.set_raw(w, old)
            del m.gguf_dequant_override
        self.layers = []
        self.arena.release()
        self.arena = None
