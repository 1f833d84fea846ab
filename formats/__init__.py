"""formats: weights files and the quantized tensor type, below the compiler and the runtime.

    tensor_info    TensorInfo: one tensor of a weights file (name, shape, dtype, bytes, offset); no torch
    safetensors    the one .safetensors header parser (planning and `load_into`) + ranged reads; no torch
    gguf_reader    the one bounded GGUF header walk (planning and `load_gguf`); no torch
    gguf_core      GGUFTensor itself (quantized until used; moving it never dequantizes; strict mode)
    gguf_tensor    GGUFTensor re-exported + its op mixin, the thin GGUF op classes, the row-gathering embedding
    gguf_loader    load_gguf / inspect_gguf: a .gguf file -> state dict of memory-mapped tensors
    gguf_names     llama.cpp tensor names of GGUF text encoders -> original names
    dequant        the dequantization table (one kernel per GGML type), backend switch, visible fallback
    dequant_triton the Triton kernel behind dequant's CUDA path (imported only when used)
    testing        GGUF weights without a file, for tests and benchmarks

Nothing is imported here: planning from a file imports tensor_info / safetensors / gguf_reader only,
which do not import torch.
"""
