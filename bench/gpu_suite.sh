#!/usr/bin/env bash
# The whole test suite on a CUDA machine (the device tool's H200), the CUDA-only tests included.
#
# That machine has torch/triton/safetensors/numpy/networkx but no network: it needs, carried with the call,
#   .whl/            wheels for gguf, diffusers, av, torchsde, trampoline, pydantic(+core, settings, deps)
#   .benchc/comfy.tgz   the ComfyUI 0.3.75 tree that .ci/setup_comfyui.sh puts in .comfy/ComfyUI, tarred
# Build both here (ignored through .git/info/exclude: /.whl/ and /.benchc/):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     gguf==0.19.0 diffusers av torchsde trampoline pydantic==2.11.9 pydantic-core==2.33.2 \
#     pydantic-settings==2.10.1 annotated-types typing-inspection python-dotenv pytest-xdist==3.8.0 execnet==2.1.2
#   (cd .comfy/ComfyUI && tar czf ../../.benchc/comfy.tgz --exclude=__pycache__ .)   # after .ci/setup_comfyui.sh
# and call the device tool with carry [".whl", ".benchc"].
# Usage there:  bash bench/gpu_suite.sh [pytest args]   (log and junit XML under $OUT when set)
#   arguments starting with tests/ run instead of the whole folder (e.g. a second call for the files a first one
#   did not reach: on the H200 the whole suite, ComfyUI server tests included, takes more than one 10-minute call
#   in one process).  With pytest-xdist among the wheels the files are spread over SUITE_WORKERS processes
#   (default 8; --dist loadfile: a file's tests stay in one process, as their module fixtures expect); every
#   test measures its own process (peak VRAM, RSS), and the H200's memory holds them all.  SUITE_WORKERS=0:
#   one process.  Measured on the H200 (2026-12-02): 6 workers ran ~89 % of the suite in 400 s, 15 workers
#   734 of 1133 tests in ~150 s but only 88 % of 1156 in 420 s
#   (each torch using every core); give the call 400 s or more, and -v -v so a cut log still names every test.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# the repository imports as `distorch`, as `pip install -e .` makes it here
ln -sfn "$PWD" /tmp/site/distorch
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if [ ! -d .comfy/ComfyUI/comfy ]; then
    mkdir -p .comfy/ComfyUI && tar xzf .benchc/comfy.tgz -C .comfy/ComfyUI || exit 1
fi
ln -sfn "$PWD" .comfy/ComfyUI/custom_nodes/ComfyUI-DisTorch
export DISTORCH_REQUIRE_COMFYUI=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/card.txt"
WHAT=tests
for arg in "$@"; do case "$arg" in tests/*) WHAT=""; break;; esac; done
PAR=""
WORKERS=${SUITE_WORKERS:-8}
if [ "$WORKERS" != 0 ] && python3 -c "import xdist" 2>/dev/null; then
    PAR="-n $WORKERS --dist loadfile"
    # each worker's torch would start one thread per core: 15 workers x 16 threads on 16 cores ran the suite
    # slower than 6 workers did (2026-12-02: 88 % in 420 s); give each worker its share of the cores
    export OMP_NUM_THREADS=$(( $(nproc) / WORKERS > 1 ? $(nproc) / WORKERS : 1 ))
fi
# every line with the second it was printed (a cut log still shows which files were slow)
stamp() { while IFS= read -r l; do printf '%(%s)T %s\n' -1 "$l"; done; }
python3 -m pytest $WHAT -o addopts="" -q -rfEs $PAR --durations=25 --junitxml="$OUT/junit.xml" "$@" 2>&1 | stamp | tee "$OUT/pytest.log"
