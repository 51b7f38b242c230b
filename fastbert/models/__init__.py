"""Whole models built on fastbert: :class:`BertEncoder`, the padding-free BERT encoder."""
from .bert import BertEncoder, BertLayer

__all__ = ["BertEncoder", "BertLayer"]
