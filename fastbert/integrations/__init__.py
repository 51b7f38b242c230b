"""Integrations with other libraries. ``fastbert.integrations.huggingface`` imports
``transformers`` (and registers the "fastbert" attention implementation) when it is imported;
nothing here is imported by ``import fastbert``."""
