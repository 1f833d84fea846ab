"""`distorch` command line.

    distorch plan FILE [--compute DEV] [--vram GB] [--donor DEV[,DEV...]] [--expert STRING]
                       [--devices SPEC] [--json]

FILE is a .safetensors / .gguf file (only its header is read) or a built-in model shape (flux-dev, sdxl,
wan2.1-14b, ...).  Without --devices the machine is probed (compiler/inventory.py); with it, the plan is
made for the declared machine, e.g.

    distorch plan flux-dev --compute cuda:0 --devices cuda:0=12GiB,cpu=32GiB --vram 16

Bad input prints one line naming the bad part on stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

GiB = 1 << 30


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: same style, exit code 2
        self.print_usage(sys.stderr)
        print(f"distorch: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="distorch", description="DisTorch: place a diffusion model across GPUs and CPU RAM.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    pl = sub.add_parser("plan", help="show where each part of a model would live, and the predicted step cost",
                        description="Place FILE's units on the compute device and donors; print the table, "
                                    "the v2 expert string and the predicted step overhead. GB = 2^30 bytes.")
    pl.add_argument("file", metavar="FILE", help=".safetensors/.gguf file or built-in shape (flux-dev, sdxl, "
                                                 "wan2.1-14b)")
    pl.add_argument("--compute", metavar="DEV", help="device that runs the model (default: first GPU, else cpu)")
    pl.add_argument("--vram", metavar="GB", help="GB (2^30 bytes) of the model to keep OFF the compute device "
                                                  "(virtual_vram_gb; default 0)")
    pl.add_argument("--donor", metavar="DEV[,DEV...]", default=None,
                    help="where offloaded GB live (default cpu); several: fastest link filled first")
    pl.add_argument("--expert", metavar="STRING", default=None,
                    help="allocation string (fractions, bytes with '*', or percentages); overrides --vram/--donor")
    pl.add_argument("--devices", metavar="SPEC", default=None,
                    help="declare the machine instead of probing it, e.g. cuda:0=12GiB,cpu=32GiB[;cpu>cuda:0=25GB/s]")
    pl.add_argument("--window", metavar="BYTES", default=None,
                    help="streaming window on the compute device (e.g. 2GiB; default: 2-3 slots of the largest "
                         "offloaded unit)")
    pl.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def _gb(b: float) -> str:
    return f"{b / GiB:.2f} GB"


def _types(types: dict) -> str:
    return ", ".join(f"{t} x{n}" for t, n in sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"


def format_table(plan, graph, inventory) -> str:
    model = plan.model_bytes
    pr = plan.predicted
    lines = [f"DisTorch plan: {graph.source or 'model'}: {_gb(model)} in {len(plan.units)} units, computing on "
             f"{plan.compute} (devices {inventory.source}; GB = 2^30 bytes)", ""]
    hdr = f"{'device':<10} {'memory':>10} {'model GB':>10} {'model %':>8} {'units':>6}  layers"
    lines += [hdr, "-" * len(hdr)]
    for d, info in plan.devices.items():
        pct = 100.0 * info["bytes"] / model if model else 0.0
        lines.append(f"{d:<10} {_gb(info['total']):>10} {_gb(info['bytes']):>10} {pct:>7.1f}% {info['units']:>6}  "
                     f"{_types(info['types'])}")
    lines.append("")
    if plan.window_bytes:
        n = pr.get("n_slots", 0)
        lines.append(f"streaming window on {plan.compute}: {n} slot(s), {_gb(plan.window_bytes)}; peak on "
                     f"{plan.compute}: {_gb(pr.get('peak_bytes', 0))}")
    lines.append(f"v2 Expert String: {plan.expert_string}")
    over = pr["overhead_s"]
    pct = 100.0 * over / pr["compute_s"] if pr["compute_s"] else 0.0
    links = ", ".join(f"{k} {_gb(b)} at {inventory.bandwidth(*k.split('>')) / 1e9:.1f} GB/s"
                      for k, b in pr.get("per_link_bytes", {}).items())
    lines.append(f"predicted step: {pr['step_s']:.4f} s = compute {pr['compute_s']:.4f} s + overhead {over:.4f} s "
                 f"(+{pct:.1f}%); floor {pr['floor_s']:.4f} s" + (f" [{links}]" if links else ""))
    lines.append(f"(compute time from {pr.get('basis', '?')}; see compiler/cost.py)")
    return "\n".join(lines)


def _plan(args) -> int:
    from .compiler.inventory import declare, probe, parse_size
    from .errors import DisTorchError
    from .passes.partition import partition
    from .passes.schedule import schedule
    from .passes.verify import verify

    if args.devices:
        inv = declare(args.devices)
    else:
        inv = probe(cache=True, progress=True)
    compute = args.compute
    if compute is None:
        gpus = [d for d in inv.devices if d != "cpu"]
        if not gpus:
            raise DisTorchError("no GPU found on this machine: plan for the machine you mean with --devices, e.g. "
                                "--compute cuda:0 --devices cuda:0=12GiB,cpu=32GiB (or --compute cpu)")
        compute = gpus[0]
    if not args.devices and compute.strip().lower() not in inv.devices:
        raise DisTorchError(f"compute device {compute!r} is not on this machine (found: {', '.join(inv.devices)}); "
                            f"to plan for another machine pass --devices, e.g. --devices {compute}=12GiB,cpu=32GiB")
    window = parse_size(args.window, "--window") if args.window else None
    if args.expert and args.vram is not None:
        print("distorch: note: --expert overrides --vram/--donor", file=sys.stderr)
    from .compiler.files import graph_from_file
    graph = graph_from_file(args.file)
    plan = partition(graph, inv, compute, vram_gb=args.vram, donors=args.donor, expert=args.expert,
                     window_bytes=window)
    sched = schedule(plan, graph)
    verify(plan, sched)
    if args.json:
        d = plan.to_dict()
        d["model_bytes"] = plan.model_bytes
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
    from .errors import DisTorchError
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
