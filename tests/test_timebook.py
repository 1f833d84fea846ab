"""Placement from measured unit times (issue 10, criterion 5): runtime/timebook.py keeps what a compile's
profiled step measured, per model and device, and the next compile of the same model is placed from it."""
from __future__ import annotations

import json

import pytest
import torch

import distorch
from distorch.compiler.graph import ROOT, ModuleGraph, Unit
from distorch.compiler.plan import Plan, PlacedUnit
from distorch.runtime import timebook
from distorch.runtime.timebook import TimeBook, block_of, model_key

from runtime_toys import ToyDiT, nbytes, run, toy_inputs


def _graph(names=("a", "b", "c")):
    return ModuleGraph([Unit(ROOT, "root", kind="root")] + [Unit(n, "Block", param_bytes=100) for n in names])


def _plan(units, codec=None, key="k"):
    pu = [PlacedUnit(n, "Block", 100, "cpu", i, "sub" if "." in n else "block") for i, n in enumerate(units)]
    return Plan(compute="cpu", units=pu, source={"model_key": key}, codec=dict(codec or {}))


def test_sub_unit_times_fold_into_their_blocks_and_the_rest_goes_to_the_root():
    book = TimeBook()
    g = _graph()
    book.register("k", "cpu", g)
    m = {"times": {"a.q": 0.1, "a.k": 0.2, "b": 0.3, "c.x.y": 0.05}, "step_s": 1.0, "stall_s": 0.1}
    assert book.record(_plan(["a.q", "a.k", "b", "c.x.y"]), "sig1", m)
    sig, t, _ = book.lookup("k", "cpu", g)
    assert sig == "sig1"
    assert t["a"] == pytest.approx(0.3) and t["b"] == pytest.approx(0.3) and t["c"] == pytest.approx(0.05)
    assert t[ROOT] == pytest.approx(1.0 - 0.1 - 0.65)
    assert block_of("a.q.r", {"a", "a.q"}) == "a.q" and block_of("zz", {"a"}) == ROOT


def test_the_longest_complete_signature_places_and_partial_ones_do_not():
    book = TimeBook()
    g = _graph()
    book.register("k", "cpu", g)
    full = {"times": {"a": 0.1, "b": 0.1, "c": 0.1}, "step_s": 0.4, "stall_s": 0.0}
    book.record(_plan(["a", "b", "c"]), "small", full)
    book.record(_plan(["a", "b"]), "large", {"times": {"a": 1.0, "b": 1.0}, "step_s": 3.0, "stall_s": 0.0})
    assert book.lookup("k", "cpu", g)[0] == "small"       # "large" has no time for c
    book.record(_plan(["c"]), "large", {"times": {"c": 1.0}, "step_s": 3.5, "stall_s": 0.0})
    assert book.lookup("k", "cpu", g)[0] == "large"
    assert book.apply(g, "k", "cpu") == "large" and [u.time_s for u in g.units[1:]] == [1.0, 1.0, 1.0]
    assert book.lookup("other", "cpu", g) is None and book.lookup("k", "cuda:0", g) is None


def test_a_time_with_decoding_never_replaces_a_clean_one():
    book = TimeBook()
    g = _graph()
    book.register("k", "cpu", g)
    book.record(_plan(["a", "b", "c"]), "s", {"times": {"a": 0.1, "b": 0.1, "c": 0.1}, "step_s": 0.3, "stall_s": 0})
    book.record(_plan(["a", "b", "c"], codec={"a": 50}), "s",
                {"times": {"a": 0.5, "b": 0.2, "c": 0.1}, "step_s": 0.8, "stall_s": 0})
    t = book.lookup("k", "cpu", g)[1]
    assert t["a"] == 0.1 and t["b"] == 0.2                # a kept its clean time; b took the newer one
    book2 = TimeBook()
    book2.register("k", "cpu", g)
    book2.record(_plan(["a", "b", "c"], codec={"a": 50}), "s",
                 {"times": {"a": 0.5, "b": 0.2, "c": 0.1}, "step_s": 0.8, "stall_s": 0})
    assert book2.lookup("k", "cpu", g)[1]["a"] == 0.5     # nothing cleaner known: used
    book2.record(_plan(["a", "b", "c"]), "s", {"times": {"a": 0.2, "b": 0.2, "c": 0.1}, "step_s": 0.5, "stall_s": 0})
    assert book2.lookup("k", "cpu", g)[1]["a"] == 0.2


def test_off_by_environment_and_no_key_no_record(monkeypatch):
    book = TimeBook()
    g = _graph()
    book.register("k", "cpu", g)
    m = {"times": {"a": 0.1, "b": 0.1, "c": 0.1}, "step_s": 0.3, "stall_s": 0}
    assert not book.record(_plan(["a", "b", "c"], key=None), "s", m)
    monkeypatch.setenv(timebook.ENV_OFF, "0")
    assert not book.record(_plan(["a", "b", "c"]), "s", m)
    monkeypatch.delenv(timebook.ENV_OFF)
    assert book.record(_plan(["a", "b", "c"]), "s", m)
    monkeypatch.setenv(timebook.ENV_OFF, "off")
    assert book.lookup("k", "cpu", g) is None


def test_the_book_survives_the_process_in_its_folder_and_ignores_a_broken_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(timebook.ENV_DIR, str(tmp_path))
    g = _graph()
    a = TimeBook()
    a.register("k", "cpu", g)
    a.record(_plan(["a", "b", "c"]), "s", {"times": {"a": 0.1, "b": 0.2, "c": 0.3}, "step_s": 0.7, "stall_s": 0})
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and json.loads(files[0].read_text())["sigs"]["s"]["times"]["c"] == 0.3
    b = TimeBook()                                         # a later process
    assert b.lookup("k", "cpu", g)[1]["b"] == 0.2
    files[0].write_text("{not json")
    c = TimeBook()
    assert c.lookup("k", "cpu", g) is None
    assert any("could not read unit times" in r.getMessage() for r in caplog.records)


def test_model_key_follows_names_bytes_and_kinds():
    assert model_key(_graph()) == model_key(_graph())
    assert model_key(_graph()) != model_key(_graph(("a", "b", "d")))
    g = _graph()
    g.units[1].param_bytes = 101
    assert model_key(g) != model_key(_graph())


def test_a_second_compile_of_a_measured_model_is_placed_from_its_measured_times():
    """CPU end to end: the first compile's profiled steps go into the book; a second compile of the same model
    (same graph) is placed from them (basis "learned", the root and every unit timed), still measures its own
    step, and computes exactly what the model computes."""
    torch.manual_seed(0)
    m = ToyDiT(depth=6).eval()
    args = toy_inputs()
    with torch.no_grad():
        ref = m(*args)
    off = 0.5 * nbytes(m) / 2**30
    h = distorch.compile(m, compute="cpu", offload_gb=off, donors=["cpu"], example_args=args, progress=False,
                         profile=True)
    assert h.plan.predicted["basis"] not in ("learned", "measured") and h.plan.source["model_key"]
    for out in run(m, args, 4):
        assert torch.equal(out, ref)
    assert h.plan.predicted["basis"] == "measured"
    measured = dict(h.runtime.autotune.measured["times"])
    h.undo()
    h2 = distorch.compile(m, compute="cpu", offload_gb=off, donors=["cpu"], example_args=args, progress=False,
                          profile=True)
    try:
        pr = h2.plan.predicted
        assert pr["basis"] == "learned" and pr["learned_from"]
        assert h2.plan.source["model_key"] == h.plan.source["model_key"]
        times = {u.name: u.time_s for u in h2.graph.units}
        assert all(t is not None for t in times.values())
        for n, t in measured.items():                      # block-level units keep exactly what was measured
            if n in times and h2.graph[n].kind != "sub":
                assert times[n] == pytest.approx(t)
        for out in run(m, args, 4):
            assert torch.equal(out, ref)
        assert h2.plan.predicted["basis"] == "measured"   # its own step measured again
    finally:
        h2.undo()
    timebook.BOOK.clear()
    h3 = distorch.compile(m, compute="cpu", offload_gb=off, donors=["cpu"], example_args=args, progress=False)
    assert h3.plan.predicted["basis"] not in ("learned", "measured")
    h3.undo()


def test_the_largest_input_decides_and_the_others_break_near_ties():
    from distorch.passes.budget import primary_then_regret
    # column 0: the input measured (1024x1024), column 1: a shorter one (512x512)
    raw, some, all_coded = [0.160, 0.123], [0.162, 0.095], [0.174, 0.080]
    assert primary_then_regret([raw, some, all_coded], 0.001) == 1      # 1.3 % slower at 1024, far better at 512
    assert primary_then_regret([raw, all_coded], 0.001) == 0            # 9 % slower at 1024: not taken
    assert primary_then_regret([[0.2], [0.1]], 0.001) == 1


@pytest.mark.parametrize("small_step, small_stall", [(0.14, 0.0), (0.9, 0.76)], ids=["computing", "link-bound"])
def test_other_inputs_measured_come_with_the_placement_as_time_scales(small_step, small_stall):
    """The 512x512 input runs at 0.35x the 1024x1024 compute.  Measured in a streamed row it may wait for the
    link most of its step (512x512 at 18 GiB off: 0.84x the 1024x1024 step): the primary input and the scales
    come from compute (unit and root times), not from the step."""
    book = TimeBook()
    g = _graph()
    book.register("k", "cpu", g)
    t = {"a": 0.1, "b": 0.1, "c": 0.1}
    book.record(_plan(["a", "b", "c"]), "1024", {"times": t, "step_s": 0.4, "stall_s": 0})
    book.record(_plan(["a", "b", "c"]), "512", {"times": {k: v / 3 for k, v in t.items()}, "step_s": small_step,
                                                 "stall_s": small_stall})
    assert book.apply(g, "k", "cpu") == "1024" and g.time_scales == [0.35]
    assert g["a"].time_s == 0.1
    from distorch.passes.budget import scenario_units
    from distorch.compiler.inventory import declare
    sc = scenario_units(g, "cpu", declare("cpu=8GiB"))
    assert [round(s[1].time_s, 4) for s in sc] == [0.1, 0.035]


def test_scales_compare_only_the_units_both_inputs_measured():
    book = TimeBook()
    g = _graph()
    book.register("k", "cpu", g)
    book.record(_plan(["a", "b", "c"]), "1024", {"times": {"a": 0.2, "b": 0.1, "c": 0.1}, "step_s": 0.4,
                                                  "stall_s": 0})
    book.record(_plan(["a"]), "512", {"times": {"a": 0.05}, "step_s": 0.05, "stall_s": 0})
    # 512 measured a and its root (0): on those two units it takes 0.05 / (0.2 + 0.0) of the 1024 compute
    assert book.apply(g, "k", "cpu") == "1024" and g.time_scales == [0.25]


def _coded_plan(units, coded, priced, scale=1.0):
    p = _plan(units, codec={n: 50 for n in coded})
    p.predicted = {"codec": {"decode_s_by_unit": dict(priced), "decode_scale": scale}}
    return p


def test_decoding_is_priced_from_a_step_that_streamed_compressed():
    """The book learns what decoding cost beside the compute: a block's time with decoding less its clean
    time for the same input, over the codec pass's price; the next placement gets it as decode_scale."""
    book = TimeBook()
    g = _graph()
    book.register("k", "cpu", g)
    book.record(_plan(["a.q", "a.k", "b", "c"]), "s", {"times": {"a.q": 0.1, "a.k": 0.1, "b": 0.1, "c": 0.1},
                                                       "step_s": 0.4, "stall_s": 0})
    assert "decode_scale" not in book.entries[("k", "cpu")]
    # a.q and b streamed compressed, priced at 0.01 s each (at a scale of 1.25 already); they took 0.03 more
    m = {"times": {"a.q": 0.13, "a.k": 0.1, "b": 0.13, "c": 0.1}, "step_s": 0.46, "stall_s": 0}
    assert book.record(_coded_plan(["a.q", "a.k", "b", "c"], ["a.q", "b"], {"a.q": 0.0125, "b": 0.0125}, 1.25),
                       "s", m)
    assert book.entries[("k", "cpu")]["decode_scale"] == pytest.approx(0.06 / 0.02)
    assert book.apply(g, "k", "cpu") == "s" and g.decode_scale == pytest.approx(3.0)
    assert ModuleGraph.from_dict(json.loads(json.dumps(g.to_dict()))).decode_scale == pytest.approx(3.0)
    # clean times still place (the coded ones were not kept)
    assert g["a"].time_s == pytest.approx(0.2) and g["b"].time_s == pytest.approx(0.1)


def test_no_decode_scale_without_clean_references_and_within_bounds():
    book = TimeBook()
    g = _graph()
    book.register("k", "cpu", g)
    m = {"times": {"a": 0.5, "b": 0.1, "c": 0.1}, "step_s": 0.7, "stall_s": 0}
    book.record(_coded_plan(["a", "b", "c"], ["a"], {"a": 0.01}), "s", m)      # nothing clean to compare with
    assert "decode_scale" not in book.entries[("k", "cpu")]
    book2 = TimeBook()
    book2.register("k", "cpu", g)
    book2.record(_plan(["a", "b", "c"]), "s", {"times": {"a": 0.1, "b": 0.1, "c": 0.1}, "step_s": 0.3, "stall_s": 0})
    book2.record(_coded_plan(["a", "b", "c"], ["a"], {"a": 0.01}), "s", m)     # 0.4 s for 0.01 priced: at most 4x
    assert book2.entries[("k", "cpu")]["decode_scale"] == timebook.DECODE_SCALE_MAX
    book2.record(_coded_plan(["a", "b", "c"], ["a"], {"a": 0.01}), "other", m)  # another input: no reference
    assert book2.entries[("k", "cpu")]["decode_scale"] == timebook.DECODE_SCALE_MAX
    book2.record(_coded_plan(["a", "b", "c"], ["a"], {}), "s", m)               # no prices: nothing learned
    assert book2.entries[("k", "cpu")]["decode_scale"] == timebook.DECODE_SCALE_MAX
