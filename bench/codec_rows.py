"""The pieces of bench/bench_comfy_codec.py's rows: its log line (say), the runtime's statistics of a DisTorch
state, what the runtime compressed and streamed (codec_facts: codec statistics, home bytes, streamed bytes, link
floors), a row's host-memory breakdown from RssSampler windows, the DISTORCH_COMPRESS switch around a node call,
and the decode speed of formats.bf16_codec.decode_triton on one of the model's own weights.

    facts = codec_facts(runtime_stats(state), plan, bw)      with Compress("on"): ...      decode_speed(a, ...)
"""
from __future__ import annotations

import os
import sys
import time

from bench_util import T0

COMPRESS_ENV = "DISTORCH_COMPRESS"


def say(*a):
    print("[bench_comfy_codec %6.1fs]" % (time.perf_counter() - T0), *a, file=sys.stderr, flush=True)


def runtime_stats(st) -> dict:
    """The runtime's statistics of a DisTorch state: the live handle's, else the last sampling run's."""
    if st is None:
        return {}
    if st.handle is not None:
        return dict(st.handle.stats)
    return dict(st.last_stats or {})


def codec_facts(stats: dict, plan, bw: float | None) -> dict:
    """What the runtime compressed and streamed: codec statistics (None: nothing compressed), the bytes the
    host homes hold, the bytes one step moves (measured per link, else the plan's units as streamed), the
    link floor of those bytes and today's raw link floor (the plan's offloaded bytes, raw)."""
    off = plan.offloaded_bytes() if plan is not None else 0
    codec = stats.get("codec") or None
    streamed = sum((stats.get("bytes_per_step") or {}).values())
    if not streamed:
        streamed = off - (codec or {}).get("raw_bytes", 0) + (codec or {}).get("stored_bytes", 0)
    homes = sum(v for k, v in (stats.get("home_bytes") or {}).items() if str(k).startswith("cpu"))
    pred = dict((plan.predicted or {}).get("codec") or {}) if plan is not None else {}
    if isinstance(pred.get("units"), list):         # the planner's choice, its unit names counted
        pred["units"] = len(pred["units"])
    return {"off": off, "codec": codec, "ratio": (codec or {}).get("ratio"),
            "stored_bytes": (codec or {}).get("stored_bytes"), "encode_s": (codec or {}).get("encode_s"),
            "codec_units": len(getattr(plan, "codec", None) or {}), "pred_codec": pred or None,
            "streamed": streamed, "home_bytes": homes, "homes_x_raw": homes / off if off and homes else None,
            "floor": streamed / bw if bw else None, "raw_floor": off / bw if bw else None}


def host_fields(host: dict | None, before: dict | None = None, after: dict | None = None) -> dict:
    """The host-memory breakdown of a row from RssSampler windows (bytes)."""
    host = host or {"at_peak": {}, "max": {}}
    mx = host["max"]
    return {"rss_peak": host["at_peak"].get("VmRSS", 0), "rss_anon_peak": mx.get("RssAnon", 0),
            "rss_file_peak": mx.get("RssFile", 0), "rss_shmem_peak": mx.get("RssShmem", 0),
            "pinned_peak": mx.get("distorch_pinned", 0), "comfy_pinned_peak": mx.get("comfy_pinned", 0),
            "rss_before": (before or {}).get("VmRSS"), "rss_after": (after or {}).get("VmRSS")}


class Compress:
    """DISTORCH_COMPRESS set to `mode` inside the block (None: as it was), restored after."""

    def __init__(self, mode: str | None):
        self.mode, self.old = mode, None

    def __enter__(self):
        self.old = os.environ.get(COMPRESS_ENV)
        if self.mode is not None:
            os.environ[COMPRESS_ENV] = self.mode

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(COMPRESS_ENV, None)
        else:
            os.environ[COMPRESS_ENV] = self.old


def decode_speed(a, model, torch, cpu: bool, dev) -> dict:
    """decode_triton on one of the model's own block weights (a 3072 x 12288 Linear weight where there is one):
    output GB/s of the median launch (CUDA events), the weight's ratio, bit-exact check, a device-to-device
    copy of the output's size for reference."""
    sd = model.model.diffusion_model.state_dict()
    name = "double_blocks.0.img_mlp.2.weight"
    if name not in sd or sd[name].dtype != torch.bfloat16:
        name = max((k for k, v in sd.items() if v.dim() == 2 and v.dtype == torch.bfloat16),
                   key=lambda k: sd[k].numel(), default=None)
    if cpu or name is None:
        return {"weight": name or "-", "shape": list(sd[name].shape) if name else [], "gbps": None,
                "note": "n/a (CPU run: the Triton kernel needs a GPU)" if cpu else
                        "n/a (the model holds no bf16 weight)"}
    w = sd[name]
    d = {"weight": name, "shape": list(w.shape), "gbps": None}
    from concurrent.futures import ThreadPoolExecutor
    from distorch.formats import bf16_codec as codec
    from distorch.formats.bf16_encode import encode
    import bench_codec as BK      # imported here: it needs the distorch package importable
    if not codec.triton_available():
        d["note"] = "n/a (Triton not importable)"
        return d
    host = w.detach().to("cpu")
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        t = time.perf_counter()
        enc = encode(host, executor=pool)
        enc_s = time.perf_counter() - t
    ref = w.detach().to(dev)
    g = enc.to(dev)
    out = torch.empty_like(ref)
    codec.decode_triton(g, out)
    exact = BK.exact(out, ref)
    s = BK.device_time(lambda: codec.decode_triton(g, out), a.decode_reps)
    s_copy = BK.device_time(lambda: ref.copy_(out), a.decode_reps)
    nb = w.numel() * w.element_size()
    d.update(gbps=nb / s / 1e9, decode_s=s, copy_gbps=nb / s_copy / 1e9, ratio=enc.ratio, widths=list(enc.meta.widths),
             exact=exact, encode_mbps=nb / enc_s / 1e6)
    say(f"decode {name} {tuple(w.shape)}: {d['gbps']:.0f} GB/s (copy {d['copy_gbps']:.0f}), ratio {enc.ratio:.4f}, "
        f"exact {exact}")
    del g, out, ref
    return d
