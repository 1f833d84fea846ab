"""Booting a REAL ComfyUI (0.3.75, set up by .ci/setup_comfyui.sh) for the node pack's tests.

- `comfy_missing_reason()` / `require_comfy()`: skip when ComfyUI is not set up, or FAIL when the
  environment says it must be there (DISTORCH_REQUIRE_COMFYUI=1, as CI sets it).
- `ComfyInProcess`: ComfyUI imported into this process on CPU (import order as main.py), builtin
  extra nodes loaded, this pack loaded the way ComfyUI loads any custom-node folder.
- `ComfyServer`: a real headless `main.py --cpu` server with this pack in its custom_nodes/.
- `boot_inprocess()`: ComfyUI imported once per process on CPU, for tests that call node functions directly.

The test models come from comfy_models, saved workflows from comfy_workflows, COMPAT.md's node specs
from comfy_specs, node calls (load, LoRA, sample) from comfy_calls.
"""
import asyncio
import importlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY_DIR = Path(os.environ.get("DISTORCH_COMFYUI_DIR", REPO / ".comfy" / "ComfyUI"))
PACK_NAME = "ComfyUI-DisTorch"  # the folder name users clone into (a dash: not importable by name)

REQUIRED_MODULES = ("torch", "torchvision", "transformers", "aiohttp", "av", "torchsde", "safetensors", "yaml")


def comfy_missing_reason():
    """None when a usable ComfyUI is set up, else why not."""
    if not (COMFY_DIR / "main.py").is_file():
        return f"ComfyUI not found at {COMFY_DIR} (run .ci/setup_comfyui.sh VENV)"
    import importlib.util
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return f"ComfyUI's requirements missing in {sys.executable}: {', '.join(missing)} (run .ci/setup_comfyui.sh)"
    return None


def require_comfy():
    import pytest
    reason = comfy_missing_reason()
    if reason is None:
        return
    if os.environ.get("DISTORCH_REQUIRE_COMFYUI") == "1":
        pytest.fail(f"DISTORCH_REQUIRE_COMFYUI=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def progress(msg):
    print(f"[comfy_harness] {msg}", file=sys.stderr, flush=True)


MODEL_FOLDERS = {"checkpoints": "checkpoints", "diffusion_models": "unet", "text_encoders": "text_encoders",
                 "vae": "vae", "controlnet": "controlnet", "clip_vision": "clip_vision", "diffusers": "diffusers"}


def install_pack(base):
    """base/custom_nodes/ComfyUI-DisTorch -> the repository root, as a user's clone would sit there."""
    link = Path(base) / "custom_nodes" / PACK_NAME
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return link


def make_frontend(base):
    fe = Path(base) / "frontend"
    fe.mkdir(parents=True, exist_ok=True)
    (fe / "index.html").write_text("<!doctype html><title>headless test</title>\n")
    return fe


# ------------------------------------------------------------------------------------------------
# In-process ComfyUI
# ------------------------------------------------------------------------------------------------
class ComfyInProcess:
    """ComfyUI imported into this process (CPU), with this pack loaded from base/custom_nodes."""

    def __init__(self, base):
        self.base = Path(base)
        path = str(COMFY_DIR)
        if path not in sys.path:
            sys.path.insert(0, path)
        import comfy.options
        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args
        args.cpu = True
        args.base_directory = str(self.base)
        args.disable_all_custom_nodes = False
        importlib.import_module("utils.extra_config")  # before `nodes`, as main.py does, else utils = comfy/utils.py
        import comfy.model_management  # noqa: F401
        import nodes
        import folder_paths
        self.nodes = nodes
        self.folder_paths = folder_paths
        # Another test may have imported ComfyUI first (base directory already fixed): point the
        # folders this harness uses at `base` explicitly.
        for name, sub in MODEL_FOLDERS.items():
            path = self.base / "models" / sub
            path.mkdir(parents=True, exist_ok=True)
            folder_paths.add_model_folder_path(name, str(path), is_default=True)
        for sub, setter in (("input", folder_paths.set_input_directory), ("output", folder_paths.set_output_directory),
                            ("temp", folder_paths.set_temp_directory)):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
            setter(str(self.base / sub))
        if "TripleCLIPLoader" not in nodes.NODE_CLASS_MAPPINGS:  # builtin extra nodes not loaded yet
            t = time.time()
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
            progress(f"ComfyUI builtin nodes loaded in {time.time() - t:.1f}s")
        self.pack_path = install_pack(self.base)
        before = set(nodes.NODE_CLASS_MAPPINGS)
        ok = asyncio.run(nodes.load_custom_node(str(self.pack_path), ignore=set(), module_parent="custom_nodes"))
        if not ok:
            raise RuntimeError(f"ComfyUI failed to load {self.pack_path} (see the log above)")
        self.pack_nodes = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
        self.pack_module = sys.modules[str(self.pack_path).replace(".", "_x_")]

    def validate(self, prompt):
        """ComfyUI's own validation of an API-format prompt: (valid, error, node_errors)."""
        import execution
        valid, error, _outputs, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
        return valid, error, node_errors


# ------------------------------------------------------------------------------------------------
# Server
# ------------------------------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """`python main.py --cpu ...` in a subprocess; stdout+stderr go to base/server.log."""

    def __init__(self, base, timeout=180.0):
        self.base = Path(base)
        install_pack(self.base)
        fe = make_frontend(self.base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, str(COMFY_DIR / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--front-end-root", str(fe)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t = time.time()
        self.proc = subprocess.Popen(cmd, cwd=str(COMFY_DIR), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ComfyUI server exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    self.get("/system_stats", timeout=2)
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
                if time.time() - t > timeout:
                    raise RuntimeError(f"ComfyUI server not up after {timeout:.0f}s:\n{self.log_tail()}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.time() - t
        progress(f"ComfyUI server up on port {self.port} in {self.startup_s:.1f}s")

    def log_text(self):
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n=6000):
        return self.log_text()[-n:]

    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path, payload, timeout=30):
        """(status, json body) of a POST; HTTP errors return their body instead of raising."""
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")

    def run(self, prompt, timeout=300):
        """Queue a prompt and wait for it; returns its /history entry. Raises on validation errors."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "distorch-tests"})
        if status != 200:
            raise AssertionError(f"/prompt refused the workflow ({status}): {json.dumps(body, indent=1)[:4000]}")
        pid = body["prompt_id"]
        t = time.time()
        while time.time() - t < timeout:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                st = hist[pid]["status"]
                if st.get("status_str") != "success" or not st.get("completed"):
                    raise AssertionError(f"prompt {pid} failed: {json.dumps(st)[:4000]}\n{self.log_tail()}")
                return hist[pid]
            if self.proc.poll() is not None:
                raise AssertionError(f"server died while running the prompt:\n{self.log_tail()}")
            time.sleep(0.3)
        raise AssertionError(f"prompt {pid} did not finish in {timeout}s:\n{self.log_tail()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------------------------------------
# In-process ComfyUI (for tests that call node functions directly)
# ---------------------------------------------------------------------------------------------
def boot_inprocess():
    """Skip (or fail under DISTORCH_REQUIRE_COMFYUI=1) without ComfyUI; else import it the way main.py
    does, on CPU, once per process. Returns (comfy.model_management, nodes, folder_paths)."""
    import pytest
    reason = comfy_missing_reason()
    if reason is not None:
        if os.environ.get("DISTORCH_REQUIRE_COMFYUI") == "1":
            raise RuntimeError(f"DISTORCH_REQUIRE_COMFYUI=1 but {reason}")
        pytest.skip(reason, allow_module_level=True)
    if "comfy.model_management" not in sys.modules:
        if str(COMFY_DIR) not in sys.path:
            sys.path.insert(0, str(COMFY_DIR))
        import comfy.options
        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args
        args.cpu = True
        importlib.import_module("utils.extra_config")  # before `nodes`, else `utils` is comfy/utils.py
    import comfy.model_management as mm
    import nodes
    import folder_paths
    return mm, nodes, folder_paths
