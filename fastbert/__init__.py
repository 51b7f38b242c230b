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
import importlib.util as _util
import os as _os
import sys as _sys

_root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
_kernels = _os.path.join(_root, "kernels")
# The fastbert checkout this package is imported from, or None for an installed copy.
_checkout_root = (_root if _os.path.isfile(_os.path.join(_root, "setup.py"))
                  and _os.path.isfile(_os.path.join(_kernels, "attention.py")) else None)
if _checkout_root is not None:
    # Imported from a checkout. Its Triton kernels live in kernels/ beside this package and are
    # installed as fastbert.kernels (setup.py's package_dir); without an installer's mapping, or
    # with another checkout's editable install mapping fastbert.kernels to *its* kernels/, this
    # checkout's own kernels/ is mapped here, as the installers do.
    _spec = _util.find_spec(__name__ + ".kernels")
    if (_spec is None or not _spec.origin
            or _os.path.dirname(_os.path.realpath(_spec.origin)) != _kernels):
        _spec = _util.spec_from_file_location(__name__ + ".kernels",
                                              _os.path.join(_kernels, "__init__.py"),
                                              submodule_search_locations=[_kernels])
        _sys.modules[_spec.name] = kernels = _util.module_from_spec(_spec)
        _spec.loader.exec_module(kernels)

from . import backends, integrations, models, nn, reference, sparsity  # noqa: E402
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
