"""Issue 13's rough edges: stats after undo, placement tables never cut names, the demo on a device this
torch cannot use, plots without matplotlib fail before any work, a second pack owning the node names."""
import logging
import types

import pytest
import torch

import distorch
from distorch.compiler.plan import Plan, PlacedUnit
from distorch.errors import DisTorchError
from distorch.runtime import plots
from distorch.runtime.api import placement_table

CFG = dict(dim=128, heads=2, double=3, single=5, in_ch=8, ctx_dim=16, pooled_dim=8)


def _compiled(profile=False):
    from distorch.demo import TinyFlux
    torch.manual_seed(0)
    m = TinyFlux(**CFG).eval()
    args = (torch.randn(1, 16, 8), torch.tensor([0.5]), torch.randn(1, 8, 16), torch.randn(1, 8))
    total = sum(p.numel() * p.element_size() for p in m.parameters())
    h = distorch.compile(m, compute="cpu", offload_gb=0.5 * total / 2**30, donors=["cpu"], example_args=args,
                         progress=False, profile=profile)
    return m, args, h


def test_stats_after_undo_are_the_last_stats_and_live_views_raise_clearly():
    m, args, h = _compiled(profile=True)
    with torch.no_grad():
        m(*args)
        m(*args)
    before = h.stats
    h.undo()
    after = h.stats
    assert after["steps"] == before["steps"] == 2 and after["streamed_units"] == before["streamed_units"]
    assert "steps 2" in h.stats_text()
    for call in (h.step_times, h.timeline, h.unit_times):
        with pytest.raises(DisTorchError, match="after undo"):
            call()
    h.undo()        # twice: nothing
    assert "active=False" in repr(h)


def _plan(names):
    units = [PlacedUnit(name=n, type="FluxTransformerBlockWithAVeryLongTypeName", bytes=2**20 * (i + 1),
                        device="cuda:0" if i % 2 else "cpu", order=i) for i, n in enumerate(names)]
    return Plan(compute="cuda:0", units=units)


def test_placement_table_never_cuts_unit_names():
    names = [f"transformer.transformer_blocks.{i}.attention_and_feed_forward_block" for i in (1, 10, 11)]
    table = placement_table(_plan(names))
    rows = table.splitlines()[1:4]
    assert [r.split()[0] for r in rows] == names
    assert len(set(rows)) == 3
    assert "GiB" in table and " GB " not in table


def test_allocation_table_says_gib():
    pytest.importorskip("distorch.comfy_nodes.state")
    from distorch.comfy_nodes import state
    if not hasattr(state, "allocation_table"):
        pytest.skip("no allocation_table")
    t = state.allocation_table(_plan(["a", "b"]))
    assert "memory GiB" in t and "model GiB" in t and " GB" not in t


def test_demo_on_cuda_without_cuda_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from distorch import demo
    assert demo.main(["--device", "cuda:0"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda:0" in err and "--device cpu" in err and "Traceback" not in err
    with pytest.raises(DisTorchError, match="--device cpu"):
        demo.build_demo_model("cuda:0")


def test_plots_without_matplotlib_fail_before_any_work(monkeypatch, capsys):
    import importlib.util
    from distorch import demo
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    built = []
    monkeypatch.setattr(demo, "build_demo_model", lambda *a, **k: built.append(1))
    with pytest.raises(plots.PlotDependencyError) as e:
        plots.require()
    assert "pip install matplotlib" in str(e.value) and "pip install -e .[plot]" in str(e.value)
    assert "distorch[plot]" not in str(e.value)
    with pytest.raises(plots.PlotDependencyError):
        demo.write_plots("/nonexistent/never-written")
    assert demo.main(["--plots", "/nonexistent/never-written", "--device", "cpu"]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert built == []                        # failed before any work


def test_placement_png_legend_colours_match_bars(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex
    seen = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, path, **kw):
        ax = fig.axes[0]
        seen["legend"] = {t.get_text(): to_hex(h.get_facecolor())
                          for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
        seen["bars"] = {to_hex(p.get_facecolor()) for p in ax.patches}
        return real_savefig(fig, path, **kw)
    plt.Figure.savefig = spy
    try:
        plots.placement_png(_plan(["a", "b", "c"]), str(tmp_path / "p.png"))
    finally:
        plt.Figure.savefig = real_savefig
    colours = set(seen["legend"].values())
    assert len(colours) == 2 and colours == seen["bars"], seen


# ---------------------------------------------------------------- two packs, same node names
def test_second_pack_owning_the_node_names_gets_one_clear_log_line(monkeypatch, caplog):
    import distorch.comfy_nodes as pack
    from distorch.comfy_nodes import nodes as N, registry as R

    ours = {"UNETLoaderDisTorch2MultiGPU": type("UNETLoaderDisTorch2MultiGPU", (), {}),
            "DeviceSelectorMultiGPU": type("DeviceSelectorMultiGPU", (), {})}
    theirs = {n: type(n, (), {"RELATIVE_PYTHON_MODULE": "custom_nodes.ComfyUI-MultiGPU"}) for n in ours}
    theirs["MultiGPUOnlyNode"] = type("MultiGPUOnlyNode", (), {"RELATIVE_PYTHON_MODULE": "custom_nodes.ComfyUI-MultiGPU"})
    registry = {}
    written = {}
    be = types.SimpleNamespace(registered_nodes=lambda: registry,
                               register_nodes=lambda c, d: (written.update(c), registry.update(c)))
    monkeypatch.setattr(R, "backend", lambda: be)
    monkeypatch.setattr(pack, "NODE_CLASS_MAPPINGS", dict(ours))
    monkeypatch.setattr(pack, "NODE_DISPLAY_NAME_MAPPINGS", {})
    late = type("LTXVLoaderMultiGPU", (), {"BASE_CLASS": object})
    monkeypatch.setattr(N, "build_late", lambda: {"LTXVLoaderMultiGPU": late})
    caplog.set_level(logging.INFO, logger="distorch.comfy")

    # ComfyUI-MultiGPU loaded after DisTorch: it owns the shared names; DisTorch changes nothing of it
    registry.update(theirs)
    registry["LTXVLoaderMultiGPU"] = type("LTXVLoaderMultiGPU", (), {"RELATIVE_PYTHON_MODULE": "custom_nodes.ComfyUI-MultiGPU"})
    pack._register_late()
    assert written == {}                                      # its late wrapper is not overwritten either
    lines = [r for r in caplog.records if "ComfyUI-MultiGPU" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    msg = lines[0].getMessage()
    assert "owns 2 node name(s)" in msg and "UNETLoaderDisTorch2MultiGPU" in msg and ".disabled" in msg
    assert registry["UNETLoaderDisTorch2MultiGPU"] is theirs["UNETLoaderDisTorch2MultiGPU"]

    # DisTorch loaded after it: DisTorch owns them, one INFO line says so
    caplog.clear()
    registry.clear()
    registry.update(theirs)
    registry.update(ours)
    assert pack.check_name_owners() == {}
    lines = [r for r in caplog.records if "ComfyUI-MultiGPU" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "DisTorch owns" in lines[0].getMessage()

    # alone: nothing said
    caplog.clear()
    registry.clear()
    registry.update(ours)
    assert pack.check_name_owners() == {}
    assert not [r for r in caplog.records if "installed too" in r.getMessage()]
