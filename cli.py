"""`distorch` command line.

    distorch plan FILE [--compute DEV] [--offload GiB | --max-vram GiB] [--donor DEV[,DEV...]]
                       [--expert STRING] [--devices SPEC] [--window SIZE] [--granularity auto|block|sub]
                       [--compress auto|on|off] [--json]
    distorch --version

FILE is a .safetensors / .gguf file (only its header is read) or a built-in model shape (every name in
compiler/shapes.py BUILTINS, listed by `distorch plan --help`).  Without --devices the machine is probed
(compiler/inventory.py, grammar in compiler/device_spec.py); with it, the plan is made for the declared machine, e.g.

    distorch plan flux-dev --compute cuda:0 --devices cuda:0=12GiB,cpu=32GiB --offload 16
    distorch plan flux-dev --compute cuda:0 --devices cuda:0=12GiB,cpu=32GiB --max-vram 8

Units, as parsed and as printed: GiB = 2^30 bytes, GB = 10^9 bytes (GB/s = 10^9 bytes/s); sizes need a
unit (`--devices cuda:0=12` is an error that suggests 12GiB).  The budget is one of --offload (GiB of the
model kept off the compute device, ComfyUI's virtual_vram_gb: the model then holds at most its size minus
that there, slots and scratch included) and --max-vram (GiB the model may hold on the compute device:
resident weights + ring slots + dequant scratch + runtime buffers); each is a number of GiB or a size
with its unit.  Neither keeps the model resident.  `--vram` is refused with a hint naming the two.  Allocation strings (--expert) keep ComfyUI-MultiGPU's convention: their "gb" is GiB.

Bad input prints one line naming the bad part on stderr and exits with code 2 (never a traceback): every
value is checked where it is parsed and every check raises a DisTorchError.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import TYPE_CHECKING

from .errors import DisTorchError

if TYPE_CHECKING:
    from .compiler.graph import ModuleGraph
    from .compiler.inventory import Inventory
    from .compiler.plan import Plan

GiB = 1 << 30
MAX_VRAM_GIB = float(1 << 30)    # 1 EiB: --offload / --max-vram above this is a typo, never a machine


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: same style, exit code 2
        self.print_usage(sys.stderr)
        print(f"distorch: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _version() -> str:
    """The package's __version__.  Looked up, not imported: cli sits below the package's __init__ in the
    layer order (tests/test_layers.py), and the package is always imported before its cli module."""
    pkg = sys.modules.get(__package__ or "")
    v = getattr(pkg, "__version__", None)
    if v:
        return str(v)
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("distorch")
    except PackageNotFoundError:
        return "unknown"


def _builtins() -> tuple[str, ...]:
    from .compiler.shapes import BUILTINS
    return BUILTINS


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="distorch", description="DisTorch: place a diffusion model across GPUs and CPU RAM.")
    p.add_argument("--version", action="version", version=f"distorch {_version()}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    pl = sub.add_parser("plan", help="show where each part of a model would live, and the predicted step cost",
                        description="Place FILE's units on the compute device and donors; print the table, "
                                    "the v2 expert string and the predicted step overhead. Units: GiB = 2^30 "
                                    "bytes, GB = 10^9 bytes, GB/s = 10^9 bytes/s; sizes need a unit.")
    pl.add_argument("file", metavar="FILE", help=".safetensors/.gguf file or a built-in shape: "
                                                 + ", ".join(_builtins()))
    pl.add_argument("--compute", metavar="DEV", help="device that runs the model (default: first GPU, else cpu)")
    pl.add_argument("--offload", metavar="GiB", help="GiB (2^30 bytes) of the model to keep OFF the compute device "
                                                      "(virtual_vram_gb; default 0), e.g. 16 or 12.5; the model then "
                                                      "holds at most its size minus that on the compute device, slots "
                                                      "included; a size with a unit works too (e.g. 16GiB, 17GB)")
    pl.add_argument("--max-vram", metavar="GiB", dest="max_vram",
                    help="GiB the compiled model may hold on the compute device: resident weights + streaming "
                         "slots + dequant scratch (activations not included), e.g. 8; exclusive with --offload")
    pl.add_argument("--vram", metavar="GiB", help=argparse.SUPPRESS)   # refused: see _plan
    pl.add_argument("--donor", metavar="DEV[,DEV...]", default=None,
                    help="where offloaded weights live (default cpu); several: fastest link filled first")
    pl.add_argument("--expert", metavar="STRING", default=None,
                    help="allocation string (fractions, bytes with '*', or percentages; its byte unit gb means "
                         "GiB, as in ComfyUI-MultiGPU); overrides --offload/--max-vram/--donor")
    pl.add_argument("--devices", metavar="SPEC", default=None,
                    help="declare the machine instead of probing it, e.g. cuda:0=12GiB,cpu=32GiB[;cpu>cuda:0=25GB/s] "
                         "(GiB = 2^30 bytes, GB = 10^9 bytes; a unit is required)")
    pl.add_argument("--window", metavar="SIZE", default=None,
                    help="streaming window on the compute device (e.g. 2GiB; default: 2-3 slots of the largest "
                         "offloaded unit)")
    pl.add_argument("--granularity", choices=("auto", "block", "sub"), default="auto",
                    help="stream whole blocks, the layers inside them (sub), or whichever the simulation "
                         "predicts faster, or as fast in less VRAM (auto, the default; as the nodes do)")
    pl.add_argument("--compress", choices=("auto", "on", "off"), default="auto",
                    help="stream offloaded bf16/fp16 weights losslessly compressed, decoded on the compute device: "
                         "where the simulation predicts a faster step (auto, the default; as the nodes do), "
                         "every offloaded unit that has such weights (on), or never (off); a weights file's "
                         "units are rated at the typical ratio (0.68 bf16, 0.86 fp16)")
    pl.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def _gb(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def _size(b: float) -> str:
    """GiB, or MiB below 0.1 GiB (runtime buffers, scratch of small models)."""
    return _gb(b) if b >= GiB / 10 or b == 0 else f"{b / 2**20:.1f} MiB"


def parse_vram(text: str | float, opt: str = "--offload") -> float:
    """--offload / --max-vram: a number of GiB ('16', '12.5') or a size with its unit ('16GiB', '17GB') ->
    GiB as a float.  Finite, >= 0 and at most 1 EiB, or a DisTorchError naming the value."""
    from .compiler.device_spec import parse_size, show, split_number
    s = str(text).strip()
    help_ = (f"give the GiB of the model to keep off the compute device, e.g. {opt} 16 or {opt} 12.5GiB"
             if opt == "--offload" else
             f"give the GiB the model may hold on the compute device, e.g. {opt} 8 or {opt} 7.5GiB")
    if s.startswith("-"):
        raise DisTorchError(f"{opt} {show(text)} is negative: {help_}")
    try:
        if not s.isascii():
            raise ValueError(s)   # float() would read other scripts' digits; the grammar is ASCII
        v = float(s)     # a plain number of GiB, as virtual_vram_gb always was ('16', '12.5', '1e1')
    except ValueError:
        if not split_number(s)[0]:
            raise DisTorchError(f"{opt} {show(text)} is not a number: {help_}") from None
        v = parse_size(s, opt) / GiB    # a size with its unit
    if math.isnan(v):
        raise DisTorchError(f"{opt} {show(text)} is not a number: {help_}")
    if v < 0:
        raise DisTorchError(f"{opt} {show(text)} is negative: {help_}")
    if v > MAX_VRAM_GIB:   # inf included
        raise DisTorchError(f"{opt} {show(text)} is more than 1 EiB (2^30 GiB), which no machine has: {help_}")
    return v


def parse_window(text: str) -> int:
    """--window: a size with its unit ('2GiB'), above 0."""
    from .compiler.device_spec import parse_size, show
    b = parse_size(text, "--window")
    if b <= 0:
        raise DisTorchError(f"--window {show(text)} must be above 0: give e.g. 2GiB, or leave it out for the default")
    return b


def _types(types: dict) -> str:
    return ", ".join(f"{t} x{n}" for t, n in sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"


def format_table(plan: Plan, graph: ModuleGraph, inventory: Inventory) -> str:
    model = plan.model_bytes
    pr = plan.predicted
    lines = [f"DisTorch plan: {graph.source or 'model'}: {_gb(model)} in {len(plan.units)} units, computing on "
             f"{plan.compute} (devices {inventory.source}; GiB = 2^30 bytes, GB/s = 10^9 bytes/s)", ""]
    hdr = f"{'device':<10} {'memory':>11} {'model GiB':>11} {'model %':>8} {'units':>6}  layers"
    lines += [hdr, "-" * len(hdr)]
    for d, info in plan.devices.items():
        pct = 100.0 * info["bytes"] / model if model else 0.0
        lines.append(f"{d:<10} {_gb(info['total']):>11} {_gb(info['bytes']):>11} {pct:>7.1f}% {info['units']:>6}  "
                     f"{_types(info['types'])}")
    lines.append("")
    if plan.window_bytes:
        n = pr.get("n_slots", 0)
        lines.append(f"streaming window on {plan.compute}: {n} slot(s), {_gb(plan.window_bytes)}")
    peak = pr.get("compute_peak_bytes", pr.get("peak_bytes", 0))
    parts = [f"{_size(pr.get('resident_bytes', 0))} resident"]
    if pr.get("window_footprint_bytes"):
        parts.append(f"{_size(pr['window_footprint_bytes'])} slots")
    for k, what in (("dequant_scratch_bytes", "dequant scratch"), ("dequant_transient_bytes", "transient dequant"),
                    ("codec_scratch_bytes", "decode scratch"), ("runtime_buffers_bytes", "runtime buffers")):
        if pr.get(k):
            parts.append(f"{_size(pr[k])} {what}")
    budget = pr.get("budget_bytes")
    lines.append(f"footprint on {plan.compute}: {_size(peak)} = {' + '.join(parts)}"
                 + (f" (budget {_size(budget)})" if budget is not None else "") + "; activations come on top")
    lines.append(f"v2 Expert String: {plan.expert_string}")
    over = pr["overhead_s"]
    pct = 100.0 * over / pr["compute_s"] if pr["compute_s"] else 0.0
    links = ", ".join(f"{k} {_gb(b)} at {inventory.bandwidth(*k.split('>')) / 1e9:.1f} GB/s"
                      for k, b in pr.get("per_link_bytes", {}).items())
    lines.append(f"predicted step: {pr['step_s']:.4f} s = compute {pr['compute_s']:.4f} s + overhead {over:.4f} s "
                 f"(+{pct:.1f}%); floor {pr['floor_s']:.4f} s" + (f" [{links}]" if links else ""))
    lines.append(f"(compute time from {pr.get('basis', '?')}; see compiler/cost.py)")
    gran = pr.get("granularity")
    if gran:
        what = "the layers inside blocks" if gran.get("chosen") == "sub" else "whole blocks"
        alt = ""
        if gran.get("sub_step_s") and gran.get("block_step_s"):
            alt = (f" (predicted step: whole blocks {gran['block_step_s']:.4f} s, layers {gran['sub_step_s']:.4f} s"
                   f"; passes/granularity.py)")
        lines.append(f"streams {what}{alt}")
    c = pr.get("codec") or {}
    if c.get("units"):
        lines.append(f"compressed ({c['mode']}): {len(c['units'])} units stream {_gb(c['raw_bytes'])} as "
                     f"{_gb(c['stored_bytes'])}, decoded on {plan.compute} in {c['decode_s_per_step'] * 1e3:.1f} ms "
                     f"per step (all raw: {c['step_s_raw']:.4f} s; passes/codec_choice.py)")
        if c.get("room_bytes"):
            lines.append(f"  {_size(c['room_bytes'])} more of the model is offloaded to make room for the decode scratch "
                         f"(without it: {c['step_s_without_room']:.4f} s)")
    elif c:
        lines.append(f"compression: none (--compress {c['mode']}"
                     + (": no faster step predicted)" if c["mode"] == "auto" else ")"))
    return "\n".join(lines)


def _plan(args) -> int:
    from .compiler.device_spec import normalize_device
    from .compiler.inventory import declare, probe
    from .passes.partition import partition
    from .passes.schedule import schedule
    from .passes.verify import verify

    # every value is parsed (and so checked) before the inventory is probed or the file is read
    if args.vram is not None:
        raise DisTorchError(f"--vram {args.vram} is gone: it did not bound what the model holds on the compute "
                            f"device. Give --offload {args.vram} (GiB of the model kept off it, ComfyUI's "
                            f"virtual_vram_gb) or --max-vram GiB (what the model may hold on it)")
    if args.offload is not None and args.max_vram is not None:
        raise DisTorchError("--offload and --max-vram both given: give one (GiB kept off the compute device, or "
                            "GiB the model may hold on it)")
    offload = parse_vram(args.offload, "--offload") if args.offload is not None else None
    max_vram = parse_vram(args.max_vram, "--max-vram") if args.max_vram is not None else None
    window = parse_window(args.window) if args.window is not None else None
    compute = normalize_device(args.compute) if args.compute is not None else None
    if args.devices is not None:
        inv = declare(args.devices)
    else:
        inv = probe(cache=True, progress=True)
    if compute is None:
        gpus = [d for d in inv.devices if d != "cpu"]
        if not gpus:
            raise DisTorchError("no GPU found on this machine: plan for the machine you mean with --devices, e.g. "
                                "--compute cuda:0 --devices cuda:0=12GiB,cpu=32GiB (or --compute cpu)")
        compute = gpus[0]
    if args.devices is None and compute not in inv.devices:
        raise DisTorchError(f"compute device {compute!r} is not on this machine (found: {', '.join(inv.devices)}); "
                            f"to plan for another machine pass --devices, e.g. --devices {compute}=12GiB,cpu=32GiB")
    if args.expert and (offload is not None or max_vram is not None):
        print("distorch: note: --expert overrides --offload/--max-vram/--donor", file=sys.stderr)
    from .compiler.files import graph_from_file, leaf_graph_from_file
    from .passes.granularity import place as place_granularity
    graph = graph_from_file(args.file)
    budget = dict(offload_gb=offload, max_vram_gb=max_vram, donors=args.donor, expert=args.expert,
                  window_bytes=window)
    if args.granularity == "block" or args.expert or window is not None:
        plan = partition(graph, inv, compute, **budget)
    else:   # whole blocks or the layers inside them, as the nodes choose (passes/granularity.py)
        graph, plan = place_granularity(graph, lambda: leaf_graph_from_file(args.file), inv, compute, budget,
                                        args.granularity)
    from .passes.codec_choice import choose_codec_with_room
    room = None
    if not args.expert and window is None:
        def room(cap: int):
            return partition(graph, inv, compute, max_vram_gb=cap / GiB, donors=args.donor)
    plan = choose_codec_with_room(plan, graph, inv, mode=args.compress, repartition=room)
    for w in plan.predicted.get("warnings", ()):
        print(f"distorch: warning: {w}", file=sys.stderr)
    sched = schedule(plan, graph)
    verify(plan, sched)
    if args.json:
        d = plan.to_dict()
        d["model_bytes"] = plan.model_bytes
        d["compute_peak_bytes"] = plan.predicted["compute_peak_bytes"]
        d["schedule"] = sched.to_dict()
        d["inventory"] = inv.to_dict()
        d["graph_source"] = graph.source
        print(json.dumps(d, indent=1))
    else:
        print(format_table(plan, graph, inv))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.cmd == "plan":
            return _plan(args)
    except BrokenPipeError:  # `distorch plan ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except (DisTorchError, ValueError, OSError) as e:
        print(f"distorch: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
