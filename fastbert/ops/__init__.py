"""Public ops, one module per op family: checks, backend dispatch and the registered kernels."""
from .attention import scaled_dot_product_attention, varlen_attention
from .block_sparse_attention import block_sparse_attention
from .gelu import bias_gelu, geglu, gelu
from .layer_norm import add_layer_norm, layer_norm
from .linformer_attention import linformer_attention

__all__ = [
    "scaled_dot_product_attention",
    "varlen_attention",
    "block_sparse_attention",
    "linformer_attention",
    "layer_norm",
    "add_layer_norm",
    "gelu",
    "bias_gelu",
    "geglu",
]
