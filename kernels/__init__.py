"""Triton kernels of fastbert, installed as ``fastbert.kernels``.

One module per op family; each holds ``@triton.jit`` kernels and their launchers only (no autograd,
no dispatch). Import the modules lazily: importing this package does not import triton.
"""
