"""Drop-in ``torch.nn`` modules on fastbert's fused ops (same constructors, parameter names and
``state_dict`` as their torch counterparts), and new attention layers.

=============================  =============================================================
``MultiheadAttention``          ``torch.nn.MultiheadAttention`` on ``scaled_dot_product_attention``
``TransformerEncoderLayer``     ``torch.nn.TransformerEncoderLayer`` with fused output sublayers
``TransformerEncoder``          ``torch.nn.TransformerEncoder``, padding-free with a padding mask
``LayerNorm``, ``GELU``         ``torch.nn.LayerNorm`` / ``torch.nn.GELU``
``GEGLU``                       ``gelu(a) * g`` of a packed (..., 2N) input, on ``geglu``
``BlockSparseSelfAttention``    self-attention on ``block_sparse_attention`` (layout or preset)
``LinformerSelfAttention``      self-attention on ``linformer_attention``
=============================  =============================================================

Every module takes a keyword-only ``backend`` (None/"auto", "triton", "cuda", "torch") passed to
each fastbert op it calls. The drop-ins have ``from_torch(module)``, which builds the fastbert
module on the very same Parameter objects; :func:`fastbert.optimize` does that across a model.
"""
from .attention import MultiheadAttention
from .block_sparse_attention import BlockSparseSelfAttention
from .gelu import GEGLU, GELU
from .layer_norm import LayerNorm
from .linformer_attention import LinformerSelfAttention
from .transformer import TransformerEncoder, TransformerEncoderLayer

__all__ = [
    "MultiheadAttention",
    "TransformerEncoderLayer",
    "TransformerEncoder",
    "LayerNorm",
    "GELU",
    "GEGLU",
    "BlockSparseSelfAttention",
    "LinformerSelfAttention",
]
