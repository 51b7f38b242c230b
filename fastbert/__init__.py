"""fastbert: fused Triton and CUDA kernels for BERT-style transformer encoders.

Functional API (see each function's docstring for shapes)::

    fastbert.scaled_dot_product_attention  fastbert.varlen_attention
    fastbert.block_sparse_attention        fastbert.linformer_attention
    fastbert.layer_norm                    fastbert.add_layer_norm
    fastbert.gelu                          fastbert.bias_gelu
    fastbert.geglu
    fastbert.unpad_input                   fastbert.pad_input

Modules: ``fastbert.nn`` (drop-ins for torch.nn / HuggingFace layers), ``fastbert.optimize(model)``
swaps them into an existing model (``fastbert.restore`` undoes it), ``fastbert.models.BertEncoder``
is a padding-free BERT encoder.

Every op takes ``backend=None | "auto" | "triton" | "cuda" | "torch"``; ``fastbert.reference``
holds the pure-PyTorch ground truth and ``fastbert.backends`` the dispatch.
"""
from . import backends, integrations, models, nn, reference, sparsity
from .ops import (add_layer_norm, bias_gelu, block_sparse_attention, geglu, gelu, layer_norm,
                  linformer_attention, scaled_dot_product_attention, varlen_attention)
from .optimize import optimize, restore
from .padding import pad_input, unpad_input
from .version import __version__

__all__ = [
    "__version__",
    "scaled_dot_product_attention",
    "varlen_attention",
    "block_sparse_attention",
    "linformer_attention",
    "layer_norm",
    "add_layer_norm",
    "gelu",
    "bias_gelu",
    "geglu",
    "unpad_input",
    "pad_input",
    "optimize",
    "restore",
    "backends",
    "reference",
    "sparsity",
    "nn",
    "models",
    "integrations",
]
