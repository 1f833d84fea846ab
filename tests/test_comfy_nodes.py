"""Node registration without ComfyUI: fake core classes and a fake backend stand in for ComfyUI.

(The same expectations run against a real ComfyUI server in test_comfy_server.py.)"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_specs import CORE_BASE, expected_nodes, spec_problems  # noqa: E402
from comfy_workflows import map_device  # noqa: E402

from distorch.comfy_nodes import nodes as N  # noqa: E402
from distorch.comfy_nodes import registry as R  # noqa: E402

DEVICES = ["cuda:0", "cuda:1", "cpu"]


def fake_loader(name, inputs, outputs, optional=None):
    """A V1 node class like ComfyUI's loaders; load() records its kwargs and returns tagged outputs."""
    calls = []

    def load(self, **kw):
        calls.append(kw)
        return tuple(f"{t}<{name}>" for t in outputs)

    spec = {"required": {k: (["a.safetensors", "b.safetensors"],) for k in inputs}}
    if optional:
        spec["optional"] = dict(optional)
    return type(name, (), {
        "INPUT_TYPES": classmethod(lambda cls: {s: dict(v) for s, v in spec.items()}),
        "RETURN_TYPES": tuple(outputs), "FUNCTION": "load", "load": load, "CATEGORY": "loaders", "calls": calls,
    })


class FakeBackend:
    """registry.backend() without ComfyUI: core classes from a dict, loads and compiles recorded."""

    def __init__(self, classes):
        self.classes = classes
        self.loads = []
        self.compiled = []
        self.registry = {"NODE_CLASS_MAPPINGS": {}, "NODE_DISPLAY_NAME_MAPPINGS": {}}   # ComfyUI's nodes.py

    def core_node_class(self, name):
        return self.classes.get(name)

    def device_list(self):
        return list(DEVICES)

    def load_on_device(self, device, fn, *args, **kw):
        self.loads.append(device)
        return fn(*args, **kw)

    def distorch(self, obj, compute_device, virtual_vram_gb, donor_device, expert, eject_models):
        self.compiled.append((obj, compute_device, virtual_vram_gb, donor_device, expert, eject_models))
        return f"distorch[{obj}]"

    def register_nodes(self, classes, display_names):
        self.registry["NODE_CLASS_MAPPINGS"].update(classes)
        self.registry["NODE_DISPLAY_NAME_MAPPINGS"].update(display_names)


def core_classes():
    out = {}
    for stem, (names, outs) in CORE_BASE.items():
        opt = {"device": (["default", "cpu"], {"advanced": True})} if stem in ("CLIPLoader", "DualCLIPLoader") else None
        if stem == "UNETLoader":
            names = ["unet_name"]
            opt = None
        cls = fake_loader(stem, names, outs, opt)
        if stem == "UNETLoader":  # weight_dtype with its real options
            base = cls.INPUT_TYPES

            def INPUT_TYPES(c, base=base):
                d = base()
                d["required"]["weight_dtype"] = (["default", "fp8_e4m3fn"],)
                return d
            cls.INPUT_TYPES = classmethod(INPUT_TYPES)
        out[stem] = cls
    return out


@pytest.fixture
def fake(monkeypatch):
    ad = FakeBackend(core_classes())
    monkeypatch.setattr(R, "backend", lambda: ad)
    # no ComfyUI here: the model-file lists the native GGUF nodes read from folder_paths
    monkeypatch.setattr(N, "gguf_filenames", lambda kind: [f"{kind}.gguf"])
    monkeypatch.setattr(N, "gguf_clip_filenames", lambda: ["clip.safetensors", "clip.gguf"])
    return ad


def test_build_registers_every_compat_node_with_its_inputs(fake):
    mapping = N.build()
    problems = []
    for name, exp in expected_nodes().items():
        if name not in mapping:
            problems.append(f"{name} not registered")
            continue
        cls = mapping[name]
        problems += spec_problems(name, exp, cls.INPUT_TYPES(), cls.RETURN_TYPES, cls.CATEGORY, DEVICES)
    assert not problems, "\n".join(problems)
    # the wrappers are generated from the core classes handed out by the backend
    assert mapping["UNETLoaderMultiGPU"].BASE_CLASS is fake.classes["UNETLoader"]
    assert mapping["UNETLoaderMultiGPU"].INPUT_TYPES()["required"]["weight_dtype"][0] == ["default", "fp8_e4m3fn"]


def test_core_inputs_never_go_stale(fake):
    """A new input of the core loader shows up in our node without any change on our side."""
    mapping = N.build()
    base = fake.classes["VAELoader"]
    old = base.INPUT_TYPES
    base.INPUT_TYPES = classmethod(lambda cls: {**old(), "optional": {"new_knob": ("INT", {"default": 3})}})
    spec = mapping["VAELoaderDisTorch2MultiGPU"].INPUT_TYPES()
    assert spec["optional"]["new_knob"][1]["default"] == 3
    assert spec["optional"]["new_knob"][1]["tooltip"]  # tooltips added to inputs we copy


def test_device_loader_calls_backend_and_replaces_core_device_input(fake):
    cls = N.build()["CLIPLoaderMultiGPU"]
    spec = cls.INPUT_TYPES()
    assert spec["optional"]["device"][0] == DEVICES  # ours replaces CLIPLoader's ["default", "cpu"]
    out = cls().load(clip_name="a.safetensors", type="sd3", device="cuda:1")
    assert out == ("CLIP<CLIPLoader>",)
    assert fake.loads == ["cuda:1"]
    assert fake.classes["CLIPLoader"].calls[-1] == {"clip_name": "a.safetensors", "type": "sd3", "device": "default"}


def test_distorch2_loader_compiles_output_with_its_inputs(fake):
    mapping = N.build()
    out = mapping["UNETLoaderDisTorch2MultiGPU"]().load(
        unet_name="a.safetensors", weight_dtype="default", compute_device="cuda:1", virtual_vram_gb=7.5,
        donor_device="cpu", expert_mode_allocations="cuda:1,25%;cpu,75%", eject_models=True)
    assert out == ("distorch[MODEL<UNETLoader>]",)
    assert fake.compiled[-1] == ("MODEL<UNETLoader>", "cuda:1", 7.5, "cpu", "cuda:1,25%;cpu,75%", True)
    assert fake.classes["UNETLoader"].calls[-1] == {"unet_name": "a.safetensors", "weight_dtype": "default"}
    # checkpoint: only the MODEL is compiled, CLIP and VAE pass through
    out = mapping["CheckpointLoaderSimpleDisTorch2MultiGPU"]().load(ckpt_name="a.safetensors")
    assert out == ("distorch[MODEL<CheckpointLoaderSimple>]", "CLIP<CheckpointLoaderSimple>", "VAE<CheckpointLoaderSimple>")
    assert fake.compiled[-1][1:] == ("cuda:0", 4.0, "cpu", "", True)  # defaults: first GPU, 4 GB, cpu, eject
    # CLIP: device input named `device`, eject defaults to False
    out = mapping["DualCLIPLoaderDisTorch2MultiGPU"]().load(clip_name1="a.safetensors", clip_name2="b.safetensors",
                                                            type="flux", device="cuda:1")
    assert fake.compiled[-1][1:] == ("cuda:1", 4.0, "cpu", "", False)
    assert fake.loads[-1] == "cuda:1"


def test_legacy_gguf_distorch_use_other_vram(fake):
    cls = N.build()["UnetLoaderGGUFDisTorchMultiGPU"]
    assert cls.BASE_CLASS is N.UnetLoaderGGUFNative  # ComfyUI-GGUF absent: our own base
    fake.classes["UnetLoaderGGUF"] = fake_loader("UnetLoaderGGUF", ["unet_name"], ["MODEL"])
    base_calls = fake.classes["UnetLoaderGGUF"].calls
    cls = N.build_late()["UnetLoaderGGUFDisTorchMultiGPU"]  # ComfyUI-GGUF present: generated from its class
    assert cls.BASE_CLASS is fake.classes["UnetLoaderGGUF"]
    cls().load(unet_name="a.safetensors", device="cuda:0", virtual_vram_gb=3.0, use_other_vram=True)
    assert fake.compiled[-1][1:4] == ("cuda:0", 3.0, "cuda:1,cpu")
    cls().load(unet_name="a.safetensors", device="cuda:1", virtual_vram_gb=3.0, use_other_vram=False)
    assert fake.compiled[-1][1:4] == ("cuda:1", 3.0, "cpu")
    assert base_calls[-1] == {"unet_name": "a.safetensors"}


def test_native_gguf_nodes_without_comfyui_gguf(fake, monkeypatch):
    monkeypatch.setattr(N, "gguf_filenames", lambda kind: ["x.gguf"])
    monkeypatch.setattr(N, "gguf_clip_filenames", lambda: ["c.safetensors", "t5.gguf"])
    adv = N.build()["UnetLoaderGGUFAdvancedMultiGPU"].INPUT_TYPES()["required"]
    assert adv["unet_name"][0] == ["x.gguf"]
    assert adv["dequant_dtype"] == (N.GGUF_DTYPES, adv["dequant_dtype"][1])
    assert adv["dequant_dtype"][1]["default"] == "default" and adv["patch_on_device"][1]["default"] is False
    clip = N.build()["DualCLIPLoaderGGUFMultiGPU"].INPUT_TYPES()["required"]
    assert clip["clip_name1"][0] == ["c.safetensors", "t5.gguf"]
    assert clip["type"][0] == ["a.safetensors", "b.safetensors"]  # the type list comes from core DualCLIPLoader
    # loading needs ComfyUI-GGUF or a backend GGUF loader: a clear error, not a crash
    with pytest.raises(NotImplementedError, match="ComfyUI-GGUF"):
        N.UnetLoaderGGUFNative().load_unet("x.gguf")


def test_other_packs_wrapped_only_when_installed(fake):
    assert not any(k.startswith(("WanVideo", "HyVideo", "LTXV")) for k in N.build_late())
    wan = fake_loader("WanVideoModelLoader", ["model"], ["WANVIDEOMODEL"], {"quantization": (["disabled"],)})
    fake.classes["WanVideoModelLoader"] = wan
    late = N.build_late()
    assert "WanVideoModelLoaderMultiGPU" in late and "HyVideoModelLoaderMultiGPU" not in late
    spec = late["WanVideoModelLoaderMultiGPU"].INPUT_TYPES()
    assert set(spec["required"]) == {"model"} and set(spec["optional"]) == {"quantization", "device"}
    assert late["WanVideoModelLoaderMultiGPU"].RETURN_TYPES == ("WANVIDEOMODEL",)


def test_v3_style_core_node_is_wrapped(fake):
    class NodeOutput:
        def __init__(self, *args):
            self.args = args

    class TripleV3:
        calls = []

        @classmethod
        def define_schema(cls):
            return None

        @classmethod
        def GET_SCHEMA(cls):
            return None

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {f"clip_name{i}": (["a"],) for i in (1, 2, 3)}, "hidden": {"unique_id": "UNIQUE_ID"}}

        RETURN_TYPES = ("CLIP",)

        @classmethod
        def execute(cls, **kw):
            cls.calls.append(kw)
            return NodeOutput("CLIP<v3>")

    fake.classes["TripleCLIPLoader"] = TripleV3
    cls = N.build()["TripleCLIPLoaderDisTorch2MultiGPU"]
    assert "hidden" not in cls.INPUT_TYPES()
    out = cls().load(clip_name1="a", clip_name2="a", clip_name3="a", device="cpu", virtual_vram_gb=0.0)
    assert out == ("distorch[CLIP<v3>]",)
    assert TripleV3.calls == [{"clip_name1": "a", "clip_name2": "a", "clip_name3": "a"}]


def test_checkpoint_advanced_places_each_part(fake):
    mapping = N.build()
    out = mapping["CheckpointLoaderAdvancedMultiGPU"]().load_checkpoint("a.safetensors", "cuda:0", "cpu", "cuda:1")
    assert out == ("MODEL<CheckpointLoaderSimple>", "CLIP<CheckpointLoaderSimple>", "VAE<CheckpointLoaderSimple>")
    assert fake.loads == ["cuda:0", "cpu", "cuda:1"]
    out = mapping["CheckpointLoaderAdvancedDisTorch2MultiGPU"]().load_checkpoint(
        "a.safetensors", "cuda:0", 6.0, "cpu", "cpu", 1.0, "cpu", "cuda:0", "", "cpu,*", True, False)
    assert out[0] == "distorch[MODEL<CheckpointLoaderSimple>]" and out[1] == "distorch[CLIP<CheckpointLoaderSimple>]"
    assert fake.compiled[-2][1:] == ("cuda:0", 6.0, "cpu", "", False)
    assert fake.compiled[-1][1:] == ("cpu", 1.0, "cpu", "cpu,*", False)


def test_device_list_defaults_on_cpu_only_machine(fake, monkeypatch):
    monkeypatch.setattr(fake, "device_list", lambda: ["cpu"])
    spec = N.build()["UNETLoaderDisTorch2MultiGPU"].INPUT_TYPES()["optional"]
    assert spec["compute_device"][0] == ["cpu"] and spec["compute_device"][1]["default"] == "cpu"
    assert spec["donor_device"][1]["default"] == "cpu"
    assert map_device("cuda:1", ["cpu"]) == "cpu"
    assert map_device("cuda:1", ["cuda:0", "cpu"]) == "cuda:0"
    assert map_device("cpu", ["cuda:0", "cpu"]) == "cpu"


def test_late_registration_adds_to_comfyui_registry(fake, monkeypatch):
    import distorch.comfy_nodes as pack
    registry = fake.registry
    monkeypatch.setattr(pack, "NODE_CLASS_MAPPINGS", dict(N.build()))
    monkeypatch.setattr(pack, "NODE_DISPLAY_NAME_MAPPINGS", {})
    pack._register_late()
    assert registry["NODE_CLASS_MAPPINGS"] == {}  # nothing new appeared
    fake.classes["LTXVLoader"] = fake_loader("LTXVLoader", ["ckpt_name"], ["MODEL", "VAE"])
    pack._register_late()
    assert set(registry["NODE_CLASS_MAPPINGS"]) == {"LTXVLoaderMultiGPU"}
    assert registry["NODE_DISPLAY_NAME_MAPPINGS"]["LTXVLoaderMultiGPU"]
