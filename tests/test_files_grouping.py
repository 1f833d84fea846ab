"""Grouping a checkpoint's tensor names into units (compiler/files.py, graph_from_tensors): the prefixes of a
full checkpoint, diffusers and unknown families, and where unknown block families fall among the blocks.
(Like the rest of the file tests, skipped without the gguf package: tests/weight_files.py.)"""
from distorch.compiler.files import graph_from_tensors
from distorch.compiler.graph import ROOT
from distorch.formats.tensor_info import TensorInfo

from weight_files import names


def _infos(keys, nbytes=4):
    return [TensorInfo(k, (1,), "F32", nbytes) for k in keys]


def test_grouping_prefixes_noindex_and_full_checkpoint():
    keys = ["model.diffusion_model.out.2.weight", "model.diffusion_model.time_embed.0.weight",
            "model.diffusion_model.input_blocks.10.0.in_layers.0.weight",
            "model.diffusion_model.input_blocks.2.0.in_layers.0.weight",
            "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight",
            "model.diffusion_model.middle_block.0.in_layers.0.weight",
            "model.diffusion_model.output_blocks.0.0.in_layers.0.weight",
            "model.diffusion_model.out.0.weight", "model.diffusion_model.label_emb.0.0.weight",
            "first_stage_model.decoder.conv_in.weight", "conditioner.embedders.0.transformer.x.weight"]
    g = graph_from_tensors(_infos(keys), "ckpt")
    assert names(g) == ["time_embed", "label_emb", "input_blocks.2", "input_blocks.10", "middle_block",
                        "output_blocks.0", "out"]
    assert g["middle_block"].kind == "block" and len(g["middle_block"].tensors) == 2
    assert g["out"].tensors == ["model.diffusion_model.out.2.weight", "model.diffusion_model.out.0.weight"]
    assert g.excluded == keys[-2:] and g.excluded_bytes == 8
    g2 = graph_from_tensors(_infos(keys), "ckpt", keep_other=True)
    assert "first_stage_model" in g2 and "conditioner" in g2
    assert g2.total_bytes == 4 * len(keys)


def test_grouping_diffusers_and_unknown_families():
    keys = ["proj_out.weight", "transformer_blocks.1.attn.to_q.weight", "x_embedder.weight",
            "single_transformer_blocks.0.proj_mlp.weight", "transformer_blocks.0.attn.to_q.weight",
            "zz_custom.0.a.b.weight", "zz_custom.1.a.b.weight", "norm_out.linear.weight",
            "pos_embed", "aaa_extra.weight", "time_text_embed.timestep_embedder.linear_1.weight"]
    g = graph_from_tensors(_infos(keys), "x")
    # known families by rank; an unknown list of blocks (zz_custom) runs among the blocks; another unknown
    # family sits right after the known family that appeared last before it (first-appearance order:
    # proj_out, transformer_blocks, x_embedder, single_transformer_blocks, zz_custom, norm_out, pos_embed,
    # aaa_extra, ...); a bare top-level tensor goes to ROOT, first
    assert names(g) == [ROOT, "x_embedder", "time_text_embed", "transformer_blocks.0", "transformer_blocks.1",
                        "zz_custom.0", "zz_custom.1", "single_transformer_blocks.0", "norm_out", "aaa_extra",
                        "proj_out"]
    assert g[ROOT].kind == "root" and g[ROOT].tensors == ["pos_embed"]
    assert g["zz_custom.0"].kind == "block"


def test_unknown_block_families_order_among_blocks():
    # HiDream-like names, as a safetensors file lists them (sorted): blocks must not land after final_layer
    keys = ["caption_projection.0.linear.weight", "double_stream_blocks.0.block.attn1.to_q.weight",
            "double_stream_blocks.1.block.attn1.to_q.weight", "final_layer.linear.weight",
            "single_stream_blocks.0.block.attn1.to_q.weight", "single_stream_blocks.1.block.attn1.to_q.weight",
            "t_embedder.timestep_embedder.linear_1.weight", "x_embedder.proj.weight",
            "my_single_things.0.a.b.weight", "my_single_things.1.a.b.weight",
            "my_pairs.0.a.b.weight", "my_pairs.1.a.b.weight"]
    g = graph_from_tensors(_infos(keys), "x")
    assert names(g) == ["caption_projection", "x_embedder", "t_embedder", "double_stream_blocks.0",
                        "double_stream_blocks.1", "my_pairs.0", "my_pairs.1", "single_stream_blocks.0",
                        "single_stream_blocks.1", "my_single_things.0", "my_single_things.1", "final_layer"]
