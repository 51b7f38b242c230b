"""Whole models built on fastbert: :class:`BertEncoder`, the padding-free BERT encoder, and
:class:`ModernBertEncoder`, the padding-free ModernBERT encoder (transformers 5.x)."""
from .bert import BertEncoder, BertLayer, PreLNBertLayer
from .modernbert import ModernBertEncoder, ModernBertLayer

__all__ = ["BertEncoder", "BertLayer", "ModernBertEncoder", "ModernBertLayer", "PreLNBertLayer"]
