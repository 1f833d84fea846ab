#!/usr/bin/env bash
# The GPU benchmarks of issue 10 (criterion 5), issue 11 (criterion 6) and issue 14 (criterion 4, phase D): one
# device call, or several with PHASES (H200).
#
# Device tool:  run(command="bash bench/gpu_bench.sh", carry=[".whl", ".benchc"], kind="nvidia-h200", timeout_s=600)
# (.whl and .benchc as bench/gpu_suite.sh describes them.)  Everything it writes lands in $OUT:
#   comfy_vram_<gpu>.md/.json/.png    bench_comfy.py: Flux-dev bf16 in ComfyUI, 1024 and 512, s/it vs peak VRAM
#   wan_vram_<gpu>.md/.json/.png      bench_comfy_wan.py --mode vram: one Wan-14B fp8_scaled expert, 480x832x17
#   wan_workflow_<gpu>.md/.json       bench_comfy_wan.py --mode workflow: the two-expert workflow, one process
#                                     per configuration, cold / warm, host RSS breakdown
#   comfy_codec_<gpu>.md/.json        bench_comfy_codec.py (phase D): Flux-dev bf16 at 1024, DisTorch2 raw vs
#                                     compressed vs ComfyUI's loading, decode GB/s, a T5-XXL-shaped encoder
#   results.tgz: the JSONs, *.log (full output of each phase), card.txt, timing.txt (the device tool brings
#                back at most 8 files per call; a first run lost its Wan results to that)
# Phases (each under `timeout`; every script writes its results after each row, so a phase cut short keeps
# the rows it finished, and each has its own --deadline so it stops starting rows in time):
#   0. setup (wheels, ComfyUI tree)                                                     ~10 s
#   W. in the background from the start: the Wan files (2 x 14.3 GB experts + 2 x 613 MB LoRAs, on disk in
#      /tmp/distorch_wan, made once and reused by every later process)                  ~40-70 s, overlapped
#   A. Flux (FLUX_S, default 275 s): make + load the 22.17 GiB model, wait for W, plain, ComfyUI partial at
#      5 budgets x 2 resolutions, DisTorch2 at 10 budgets (one compile each, both resolutions)
#   B. Wan vram (WANV_S, default 95 s): plain, ComfyUI partial at 3 budgets, DisTorch2 at 3 budgets
#   D. compressed bf16 streaming (CODEC_S, default 500 s; run it alone: PHASES=D): make + load the Flux model
#      (~45 s), plain (~10 s), decode GB/s (~5 s), DisTorch2 compressed and raw fully offloaded (virtual_vram_gb=30,
#      ~25 s each), ComfyUI at its lowest budget (~20 s), then per partial budget 16 and 8 GiB: compressed, raw,
#      ComfyUI (~65 s each), then the T5-XXL-shaped encoder: its state dict, plain, compressed, raw (~90 s);
#      about 370 s in all, a --deadline of CODEC_S - 25 s stops starting rows in time
#   C. Wan workflow (the rest, about 200 s): plain, distorch:13, comfy:13, distorch:30, distorch:9
# Override: FLUX_S=.. WANV_S=.. CODEC_S=.. TOTAL_S=.. (the whole, default 575) PHASES=A|B|C|D|.. FLUX_ARGS=..
#           WANV_ARGS=.. WANW_ARGS=.. CODEC_ARGS=..
#   e.g. the codec bench alone:  run(command="PHASES=D bash bench/gpu_bench.sh", carry=[".whl", ".benchc"], ...)
# CPU rehearsal of this script (tiny models, no wheels, no GPU; tests/test_bench_smoke.py runs it):
#   SMOKE=1 PY=/work/venv/bin/python OUT=/tmp/gb bash bench/gpu_bench.sh
set -o pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-/tmp/gpu_bench}
export OUT
mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-575}
FLUX_S=${FLUX_S:-275}
WANV_S=${WANV_S:-95}
CODEC_S=${CODEC_S:-500}
WAN_DIR=${WAN_DIR:-/tmp/distorch_wan}
el() { echo $(( $(date +%s) - START )); }
note() { echo "[gpu_bench $(el)s] $*" | tee -a "$OUT/timing.txt"; }

PY=${PY:-python3}
PHASES=${PHASES:-ABC}      # A Flux, B Wan vram, C Wan workflow (measured on an H200, 2026-12-01: A alone with 10
#                            budgets x 2 resolutions + 5 ComfyUI points x 2 takes ~450 s, B+C ~400 s: give them
#                            two calls, PHASES=A FLUX_S=540 TOTAL_S=560, then PHASES=BC WANV_S=150 TOTAL_S=560);
#                            D, the codec bench, is not in the default: a call of its own, PHASES=D (CODEC_S=500)
SMOKE=${SMOKE:-0}
TINY=""
: > "$OUT/timing.txt"

# ---- 0. setup (as bench/gpu_suite.sh)
if [ "$SMOKE" = 1 ]; then
    TINY="--tiny"; TAG=cpu; WAN_DIR=${WAN_DIR_SMOKE:-/tmp/distorch_wan_tiny}
    FLUX_ARGS=${FLUX_ARGS:---model-dir /tmp/distorch_bench_tiny}
else
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUT/setup.log" 2>&1 || { echo "wheel install failed"; tail -20 "$OUT/setup.log"; exit 1; }
    ln -sfn "$PWD" /tmp/site/distorch
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    if [ ! -d .comfy/ComfyUI/comfy ]; then
        mkdir -p .comfy/ComfyUI && tar xzf .benchc/comfy.tgz -C .comfy/ComfyUI || { echo "ComfyUI tarball missing"; exit 1; }
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
    TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 | $PY -c \
          "import sys; sys.path.insert(0, 'bench'); import bench_comfy as B; print(B.card_tag(sys.stdin.read().strip()))")
fi
export PYTHONUNBUFFERED=1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/card.txt"
free -g | tee -a "$OUT/card.txt"
df -h /tmp /dev/shm | tee -a "$OUT/card.txt"
note "setup done, card tag $TAG"

# ---- preflight (~10 s): distorch.compile under torch.inference_mode, as ComfyUI's executor runs the loaders;
# a failure here would fail every DisTorch2 row below, so stop and keep the device time
PRE_DEV=cuda:0; [ "$SMOKE" = 1 ] && PRE_DEV=cpu
$PY - "$PRE_DEV" > "$OUT/preflight.log" 2>&1 <<'PREFLIGHT'
import sys
import torch
import distorch
dev = sys.argv[1]
torch.manual_seed(0)
x = torch.randn(16, 1024)
with torch.inference_mode():          # weights made, compiled and run in inference mode, as inside ComfyUI
    m = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])
    ref = m.to(dev)(x.to(dev)).cpu()
    m = m.to("cpu")
    h = distorch.compile(m, compute=dev, offload_gb=16 / 1024, donors=["cpu"], progress=False)
    ok = all(torch.equal(m(x.to(dev)).cpu(), ref) for _ in range(3))
    print("preflight:", "ok" if ok else "OUTPUT DIFFERS", h.stats.get("streamed_units"), "streamed units")
    h.undo()
sys.exit(0 if ok else 1)
PREFLIGHT
PRE=$?
if [ "$PRE" != 0 ]; then note "preflight failed (exit $PRE): not running the benchmarks"; tail -n 15 "$OUT/preflight.log"; exit 1; fi
note "$(tail -n 1 "$OUT/preflight.log")"

has() { case "$PHASES" in *"$1"*) return 0;; esac; return 1; }

# ---- W. Wan files in the background (the flag is touched whether or not it worked: nobody waits forever)
MADE="$WAN_DIR/.made_by_gpu_bench"
mkdir -p "$WAN_DIR"; rm -f "$MADE"
if has B || has C; then
    ( $PY bench/bench_comfy_wan.py --mode make $TINY --model-dir "$WAN_DIR" > "$OUT/wan_make.log" 2>&1
      echo "exit $?" >> "$OUT/wan_make.log"; touch "$MADE" ) &
    MAKE_PID=$!
else
    touch "$MADE"; MAKE_PID=""
fi

# ---- A. Flux in ComfyUI
if has A; then
    note "A: Flux (limit ${FLUX_S}s)"
    timeout -k 5 "$FLUX_S" $PY bench/bench_comfy.py $TINY --deadline $((FLUX_S - 20)) --wait-for "$MADE" \
        --out "bench/results/comfy_vram_${TAG}.md" ${FLUX_ARGS:-} > "$OUT/flux.log" 2>&1
    note "A: exit $?"
    grep "bench_comfy" "$OUT/flux.log" | tail -n 4
fi
[ -n "$MAKE_PID" ] && wait "$MAKE_PID" && note "W: $(tail -n 1 "$OUT/wan_make.log")"
if ! has B && ! has C; then WANV_S=0; fi

# ---- B. Wan, one expert: s/it against peak VRAM
if has B; then
note "B: Wan vram (limit ${WANV_S}s)"
timeout -k 5 "$WANV_S" $PY bench/bench_comfy_wan.py --mode vram $TINY --model-dir "$WAN_DIR" --deadline $((WANV_S - 15)) \
    --out "bench/results/wan_vram_${TAG}.md" ${WANV_ARGS:-} > "$OUT/wan_vram.log" 2>&1
note "B: exit $?"
grep "bench_wan" "$OUT/wan_vram.log" | tail -n 3
fi

# ---- D. compressed bf16 streaming in ComfyUI (issue 14): raw vs compressed vs ComfyUI's own loading
if has D; then
    note "D: codec (limit ${CODEC_S}s)"
    timeout -k 5 "$CODEC_S" $PY bench/bench_comfy_codec.py $TINY --deadline $((CODEC_S - 25)) \
        --out "bench/results/comfy_codec_${TAG}.md" ${CODEC_ARGS:-} > "$OUT/codec.log" 2>&1
    note "D: exit $?"
    grep "bench_comfy" "$OUT/codec.log" | tail -n 4
fi

# ---- C. Wan two-expert workflow, one process per configuration: what is left of TOTAL_S
if has C; then
WANW_S=$(( TOTAL_S - $(el) ))
[ "$WANW_S" -lt 60 ] && WANW_S=60
note "C: Wan workflow (limit ${WANW_S}s)"
timeout -k 5 "$WANW_S" $PY bench/bench_comfy_wan.py --mode workflow $TINY --model-dir "$WAN_DIR" \
    --deadline $((WANW_S - 5)) --out "bench/results/wan_workflow_${TAG}.md" ${WANW_ARGS:-} > "$OUT/wan_workflow.log" 2>&1
note "C: exit $?"
fi

# ---- charts again from the JSON (a phase cut short never drew its own), then the summary
for f in comfy_vram wan_vram; do
    [ -f "$OUT/${f}_${TAG}.json" ] && $PY bench/bench_comfy.py --plot "$OUT/${f}_${TAG}.json" "$OUT/${f}_${TAG}.png" \
        > /dev/null 2>> "$OUT/plot.log"
done
note "done"
echo; echo "=================== summary ==================="
for f in comfy_vram wan_vram; do
    echo "--- $f"; grep -E "^(Summary|Skipped)" "$OUT/${f}_${TAG}.md" 2>/dev/null || echo "(no results)"
    grep -E "^\| [0-9]" "$OUT/${f}_${TAG}.md" 2>/dev/null | head -n 12
    # every row in one line each (should the files not come back, the numbers are in the call's output)
    [ -f "$OUT/${f}_${TAG}.json" ] && $PY - "$OUT/${f}_${TAG}.json" <<'PYEOF' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["rows"]:
    g = lambda k, f="%.3f": "" if r.get(k) is None else f % r[k]
    print(f"row {r['res']} | {r['name']} | off {r['off'] / 2**30:.2f} | peak {r['peak'] / 2**30:.2f} | s/it {g('s_it')}"
          f" | x floor {g('x_floor')} | pred {g('pred_step')} / {g('pred_step_after')} | runtime {g('meas_step')}"
          f" | gpu {g('gpu_step', '%.4f')} gap {g('gpu_gap', '%.4f')} | same {r.get('same', '')}")
PYEOF
done
echo "--- wan_workflow"; grep -E "^\|" "$OUT/wan_workflow_${TAG}.md" 2>/dev/null || echo "(no results)"
grep -E "^Skipped" "$OUT/wan_workflow_${TAG}.md" 2>/dev/null
if has D; then
    echo "--- comfy_codec"
    awk '/^## Headline/{on=1} /^s\/it = /{on=0} on' "$OUT/comfy_codec_${TAG}.md" 2>/dev/null || echo "(no results)"
    grep -E "^(Skipped|Not run)" "$OUT/comfy_codec_${TAG}.md" 2>/dev/null
fi
echo "--- errors (last lines of each log with Traceback)"
for l in "$OUT"/*.log; do grep -q Traceback "$l" && { echo "## $l"; grep -A 3 -E "Error|error:" "$l" | tail -n 8; }; done
cat "$OUT/timing.txt"
# the device tool brings back at most 8 files per call: keep the .md/.png results, pack the rest
if [ "$SMOKE" != 1 ]; then
    (cd "$OUT" && tar czf results.tgz --ignore-failed-read ./*.json ./*.log timing.txt card.txt 2>/dev/null \
        && rm -f ./*.json ./*.log timing.txt card.txt)
    ls "$OUT"
fi
