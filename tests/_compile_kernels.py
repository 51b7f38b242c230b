"""Compile the Triton kernels of fastbert.kernels ahead of time for sm_90 and sm_80, without a GPU.

Each case is one kernel with the specialisation a launcher gives it on a GPU: argument types, the
values the JIT turns into constants (integers equal to 1, e.g. unit strides) or alignment hints
(pointers and integers divisible by 16), and the tile sizes / num_warps / num_stages that the
module's own config helper picks for that architecture. Every case goes through the whole Triton
pipeline (front end, TTGIR, LLVM, PTX, cubin) and then through the Triton-bundled ``ptxas -v``
once more for its register / spill report; a kernel whose shared memory exceeds the device's
per-block limit fails too (it compiles but cannot launch). This catches what the CPU interpreter
that runs the rest of the test suite cannot see: front-end type errors in compiled mode, layout or
lowering failures, ptxas errors and configurations that do not fit the device.

Run by tests/test_triton_compile.py in a subprocess, because the kernels modules choose between
interpreter and compiler when they are imported (TRITON_INTERPRET, which tests/conftest.py sets
on a machine without a GPU). Standalone:

    python tests/_compile_kernels.py [--family attention ...] [--json results.json]

Exit status: 0 when every case compiled and passed ptxas, 1 otherwise, 3 when this Triton cannot
compile ahead of time (no ASTSource / GPUTarget / bundled ptxas).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List

if os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y"):  # as Triton
    sys.exit("tests/_compile_kernels.py must run without TRITON_INTERPRET (the kernels modules "
             "would import in interpreter mode)")

import torch  # noqa: E402
import triton  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:  # pragma: no cover - depends on the installed Triton
    print(f"SKIP: triton {triton.__version__} has no ASTSource / GPUTarget ({exc})")
    sys.exit(3)

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
if not os.access(PTXAS, os.X_OK):
    print(f"SKIP: no bundled ptxas at {PTXAS}")
    sys.exit(3)

from fastbert.kernels import attention as att  # noqa: E402
from fastbert.kernels import block_sparse_attention as bsa  # noqa: E402
from fastbert.kernels import gelu  # noqa: E402
from fastbert.kernels import layer_norm as ln  # noqa: E402

# Target architectures: compute capability -> (ptxas arch, usable shared memory per block in bytes,
# i.e. cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100 / A100).
ARCHS = {90: ("sm_90a", 227 * 1024), 80: ("sm_80", 163 * 1024)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def ptr(dtype: str) -> str:
    """A tensor argument: Triton pointer type, e.g. '*fp16'."""
    return "*" + dtype


@dataclass
class Case:
    family: str                  # kernels module ("attention", "layer_norm", ...)
    name: str                    # readable id, e.g. "sm90-fwd-D64-fp16-causal"
    kernel: Any                  # the @triton.jit function
    args: Dict[str, Any]         # every parameter -> value (constexpr) or runtime stand-in
    num_warps: int
    num_stages: int
    cc: int


@dataclass
class Result:
    family: str
    name: str
    ok: bool
    seconds: float = 0.0
    shared: int = -1
    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    warnings: List[str] = field(default_factory=list)
    error: str = ""
    mma: str = ""                # tensor-core instructions in the PTX: "wgmma", "mma", or ""


# ------------------------------------------------------------------------------------------------
# Specialisation, as the JIT does it at launch
# ------------------------------------------------------------------------------------------------
def build_source(kernel, args: Dict[str, Any]) -> ASTSource:
    """ASTSource for ``kernel`` with the signature / constants / alignment hints that a launch with
    these arguments gets. Runtime stand-ins: a pointer type string for a tensor (fresh torch
    allocations are 16-byte aligned, so it gets tt.divisibility = 16), a Python int (1 becomes the
    constant 1, a multiple of 16 gets tt.divisibility = 16, >= 2**31 is i64), a float (fp32).
    Parameters marked do_not_specialize get neither. Same rules as Triton's
    native_specialize_impl in 3.6 and 3.8."""
    names = [p.name for p in kernel.params]
    missing = set(names) - set(args)
    extra = set(args) - set(names)
    if missing or extra:
        raise TypeError(f"{kernel.__name__}: missing {sorted(missing)}, unknown {sorted(extra)}")
    signature, constants, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = args[p.name]
        if p.is_constexpr:
            signature[p.name], constants[p.name] = "constexpr", v
        elif isinstance(v, str):
            signature[p.name] = v
            if not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            raise TypeError(f"{kernel.__name__}.{p.name}: runtime bool is not used by the launchers")
        elif isinstance(v, int):
            if v == 1 and not p.do_not_specialize:
                signature[p.name], constants[p.name] = "constexpr", 1
            else:
                signature[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                if v % 16 == 0 and not p.do_not_specialize:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}.{p.name}: unsupported stand-in {v!r}")
    return ASTSource(kernel, signature, constants, attrs)


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _key_token_strides(args: Dict[str, Any]) -> None:
    """The kernels name the token stride of k / v / dk / dv "n" (that of q / o / do / dq "m"):
    rename the "m" strides the case builders made for them, in place."""
    for pre in ("k", "v", "dk", "dv"):
        if f"stride_{pre}m" in args:
            args[f"stride_{pre}n"] = args.pop(f"stride_{pre}m")


def mma_kind(ptx: str) -> str:
    """Which tensor-core instructions the kernel issues: "wgmma" (Hopper's asynchronous warpgroup
    MMA, what sm_90 needs for full speed), "mma" (the Ampere-style warp mma.sync), or ""."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return ""


def compile_case(case: Case) -> Result:
    res = Result(case.family, case.name, ok=False)
    t0 = time.perf_counter()
    try:
        src = build_source(case.kernel, case.args)
        compiled = triton.compile(src, target=GPUTarget("cuda", case.cc, 32),
                                  options={"num_warps": case.num_warps,
                                           "num_stages": case.num_stages})
    except Exception as exc:  # noqa: BLE001 - every compile error is a test failure, reported
        res.seconds = time.perf_counter() - t0
        msg = str(exc).strip().splitlines()
        res.error = f"{type(exc).__name__}: " + " | ".join(msg[-12:])[:2000]
        return res
    res.shared = int(compiled.metadata.shared)
    res.mma = mma_kind(compiled.asm["ptx"])
    arch, smem_limit = ARCHS[case.cc]
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        proc = subprocess.run([PTXAS, "-v", f"--gpu-name={arch}", ptx, "-o",
                               os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True)
    res.seconds = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    regs, spills = _RE_REGS.search(log), _RE_SPILL.search(log)
    res.registers = int(regs.group(1)) if regs else -1
    if spills:
        res.spill_stores, res.spill_loads = int(spills.group(1)), int(spills.group(2))
    res.warnings = [line.split("warning", 1)[-1].strip(" :")
                    for line in log.splitlines() if "warning" in line.lower()]
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    if proc.returncode != 0 or errors:
        res.error = f"ptxas exit {proc.returncode}: " + " | ".join(errors or log.splitlines()[-5:])
    elif res.shared > smem_limit:
        res.error = f"needs {res.shared} B of shared memory, the device has {smem_limit} B"
    else:
        res.ok = True
    return res


# ------------------------------------------------------------------------------------------------
# attention.py
# ------------------------------------------------------------------------------------------------
# attention_config() reads the device's compute capability and shared memory through
# _device_limits(device index) (torch.cuda.get_device_properties, which needs a GPU). Point it at
# the two targets instead: device index 0 is an H100, 1 an A100, with the shared memory above.
_FAKE_DEVICES = {0: (90, ARCHS[90][1]), 1: (80, ARCHS[80][1])}
att._device_limits = _FAKE_DEVICES.__getitem__
att._cached_config.cache_clear()
_DEVICE_INDEX = {90: 0, 80: 1}

# Shapes of the launches: dense (B, H, L, D) contiguous, L = 512, BERT-base heads; varlen packs
# 4 sequences of at most 384 tokens into (total, H, D).
_B, _H, _L, _TOTAL, _NSEQ, _MAXSEQ = 2, 12, 512, 1000, 4, 384


def _dense_strides(h, l, d):
    return (h * l * d, l * d, d, 1)


def _attention_case(kind: str, cc: int, dt: str, d: int, mask: str = "none", causal: bool = False,
                    dropout: bool = False, varlen: bool = False, kv_group: int = 1,
                    alibi: bool = False, window: bool = False, key_limit: bool = False) -> Case:
    dtype = DTYPES[dt]
    mask_kind = {"none": att.MASK_NONE, "bool": att.MASK_BOOL, "float": att.MASK_FLOAT}[mask]
    if varlen:
        assert mask in ("none", "float"), "varlen masks here: MPNet's shared float bias"
        heads, rows_shape, seqlen = _H, (_H, _TOTAL), _MAXSEQ
        qkv = att._varlen_strides(torch.empty(_TOTAL, _H, d, device="meta"))
        cu = ptr("i32")
    else:
        heads, rows_shape, seqlen = _H, (_B, _H, _L), _L
        qkv = _dense_strides(_H, _L, d)
        cu = ptr(dt)  # the dense launchers pass q for the unused cu_seqlens pointers
    assert not key_limit or (mask == "bool" and not varlen), "key limits come from dense bool masks"
    cu_k = ptr("i32") if key_limit else cu  # int32 (B,) key limits (kernels.key_limits)
    mask_ptr = {"none": ptr(dt), "bool": ptr("u8"), "float": ptr(dt)}[mask]
    # masks as the ops see them: bool key-padding mask (B, 1, 1, Lk), float mask (B, H, Lq, Lk)
    m_strides = {"none": (0, 0, 0, 0), "bool": (_L, 0, 0, 1),
                 "float": (_H * _L * _L, _L * _L, _L, 1)}[mask]
    if varlen and mask == "float":  # a (1, H, L, L) relative-position bias shared by the sequences
        m_strides = (0, _MAXSEQ * _MAXSEQ, _MAXSEQ, 1)
    l_strides = att._stats_strides(rows_shape)
    bd = att._block_dim(d)
    bm, bn, warps, stages = att.attention_config(
        kind, d, d, dtype, torch.device("cuda", _DEVICE_INDEX[cc]),
        dropout, mask != "none")
    common = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bd,
                  IS_VARLEN=varlen, MASK_KIND=mask_kind, IS_CAUSAL=causal, HAS_DROPOUT=dropout,
                  HAS_ALIBI=alibi, HAS_WINDOW=window, DOT_PRECISION=att._dot_precision(dtype))
    common["KEY_LIMIT"] = att.key_limit_align(seqlen) if key_limit else 0
    # ALiBi slopes: fp32 (H,) (batch stride 0, head stride 1); without, q stands in, strides 0
    alibi_args = dict(Alibi=ptr("fp32") if alibi else ptr(dt), stride_ab=0,
                      stride_ah=1 if alibi else 0,
                      # a 128-token window (ModernBERT's local layers: 64 keys each side)
                      window_left=64 if window else 0, window_right=64 if window else 0)
    # the seed is a (1,) int64 device tensor (fastbert._rng.dropout_seed); without dropout the
    # launchers pass q as the (unread) pointer
    rng = dict(dropout_p=0.1, dropout_scale=1 / 0.9, Seed=ptr("i64") if dropout else ptr(dt))
    strides = {}
    if kind == "fwd":
        kernel = att._attention_fwd_kernel
        tensors = dict(Q=ptr(dt), K=ptr(dt), V=ptr(dt), Mask=mask_ptr, Out=ptr(dt), Stats=ptr("fp32"),
                       CuSeqlensQ=cu, CuSeqlensK=cu_k)
        for pre in ("q", "k", "v", "o"):
            strides.update(zip((f"stride_{pre}{s}" for s in "bhmd"), qkv))
        extra = dict(num_heads=heads, kv_group=kv_group, num_m_blocks=triton.cdiv(seqlen, bm),
                     seqlen_q=seqlen, seqlen_k=seqlen, sm_scale_log2=0.18, **rng)
    elif kind == "bwd_dkdv":
        kernel = att._attention_bwd_dkdv_kernel
        tensors = dict(Q=ptr(dt), K=ptr(dt), V=ptr(dt), Mask=mask_ptr, DO=ptr(dt), Stats=ptr("fp32"),
                       Delta=ptr("fp32"), DK=ptr(dt), DV=ptr(dt), CuSeqlensQ=cu, CuSeqlensK=cu_k)
        for pre in ("q", "k", "v", "do", "dk", "dv"):
            strides.update(zip((f"stride_{pre}{s}" for s in "bhmd"), qkv))
        extra = dict(num_heads=heads, kv_group=kv_group, num_n_blocks=triton.cdiv(seqlen, bn),
                     seqlen_q=seqlen, seqlen_k=seqlen, sm_scale=0.125, sm_scale_log2=0.18, **rng)
    elif kind == "bwd_dq":
        kernel = att._attention_bwd_dq_kernel
        store_ds = mask == "float"  # dS only for a float mask that needs its gradient
        tensors = dict(Q=ptr(dt), K=ptr(dt), V=ptr(dt), Mask=mask_ptr, DO=ptr(dt), Stats=ptr("fp32"),
                       Delta=ptr("fp32"), DQ=ptr(dt), DS=ptr("fp32") if store_ds else ptr(dt),
                       CuSeqlensQ=cu, CuSeqlensK=cu_k)
        for pre in ("q", "k", "v", "do", "dq"):
            strides.update(zip((f"stride_{pre}{s}" for s in "bhmd"), qkv))
        ds = (_H * seqlen * seqlen, seqlen * seqlen, seqlen, 1) if store_ds else (0, 0, 0, 0)
        strides.update(zip(("stride_dsb", "stride_dsh", "stride_dsm", "stride_dsn"), ds))
        extra = dict(num_heads=heads, kv_group=kv_group, num_m_blocks=triton.cdiv(seqlen, bm),
                     seqlen_q=seqlen, seqlen_k=seqlen, sm_scale=0.125, sm_scale_log2=0.18,
                     STORE_DS=store_ds, **rng)
    else:
        raise ValueError(kind)
    _key_token_strides(strides)
    strides.update(zip(("stride_mb", "stride_mh", "stride_mm", "stride_mn"), m_strides))
    strides.update(zip(("stride_lb", "stride_lh", "stride_lm", "stride_ls"), l_strides))
    args = {**tensors, **strides, **extra, **common, **alibi_args}
    variant = "-".join(f for f, on in (("causal", causal), (f"{mask}mask", mask != "none"),
                                       ("dropout", dropout), ("varlen", varlen),
                                       (f"gqa{kv_group}", kv_group > 1), ("alibi", alibi),
                                       ("window", window), ("keylimit", key_limit))
                       if on) or "plain"
    name = f"sm{cc}-{kind}-D{d}-{dt}-{variant}-BM{bm}-BN{bn}-w{warps}-s{stages}"
    return Case("attention", name, kernel, args, warps, stages, cc)


def _attention_small_cases(cc: int) -> List[Case]:
    """The delta preprocessing (BLOCK_M = 64 on a GPU, 4 warps) and the dropout-mask kernel."""
    d, bd = 80, att._block_dim(80)
    pre = dict(Out=ptr("fp16"), DO=ptr("fp16"), Delta=ptr("fp32"), CuSeqlensQ=ptr("i32"),
               stride_ob=0, stride_oh=d, stride_om=_H * d, stride_od=1,
               stride_dob=0, stride_doh=d, stride_dom=_H * d, stride_dod=1,
               stride_lb=0, stride_lh=_TOTAL, stride_lm=1, num_heads=_H,
               num_m_blocks=triton.cdiv(_MAXSEQ, 64), seqlen_q=_MAXSEQ,
               HEAD_DIM_V=d, BLOCK_M=64, BLOCK_DV=bd, IS_VARLEN=True)
    mask = dict(Keep=ptr("u8"), numel=_B * _H * _L * _L, dropout_p=0.1, Seed=ptr("i64"), BLOCK=1024)
    # key limits of a HuggingFace-style (B, 1, Lq, Lk) bool padding mask, as kernels.key_limits runs it
    limit = dict(Mask=ptr("u8"), Limit=ptr("i32"), mask_heads=1, mask_rows=_L, seqlen_k=_L,
                 chunks=triton.cdiv(_L, 16), stride_mb=_L * _L, stride_mh=0, stride_mm=_L, stride_mn=1,
                 BLOCK_R=16, BLOCK_N=min(128, triton.next_power_of_2(_L)), ALIGN=att.key_limit_align(_L))
    return [Case("attention", f"sm{cc}-bwd_preprocess-D80-fp16-varlen", att._attention_bwd_preprocess_kernel,
                 pre, 4, 3, cc),
            Case("attention", f"sm{cc}-dropout_mask", att._attention_dropout_mask_kernel, mask, 4, 3, cc),
            Case("attention", f"sm{cc}-key_limit", att._key_limit_kernel, limit, 4, 3, cc)]


def _attention_dmask_case(cc: int, dt: str, d: int, causal: bool = False,
                          dropout: bool = False) -> Case:
    """The broadcast-mask gradient kernel, for a (1, 1, Lq, Lk) bias summed over batch and heads."""
    dtype = DTYPES[dt]
    bd = att._block_dim(d)
    bm, bn, warps, stages = att._dmask_config(dtype, d, torch.device("cuda", _DEVICE_INDEX[cc]))
    qkv = _dense_strides(_H, _L, d)
    args = dict(Q=ptr(dt), K=ptr(dt), V=ptr(dt), Mask=ptr(dt), DO=ptr(dt), Stats=ptr("fp32"),
                Delta=ptr("fp32"), DMask=ptr("fp32"), Alibi=ptr(dt), stride_ab=0, stride_ah=0,
                window_left=0, window_right=0)
    for pre, tok in (("q", "m"), ("k", "n"), ("v", "n"), ("do", "m")):
        args.update(zip((f"stride_{pre}{x}" for x in ("b", "h", tok, "d")), qkv))
    args.update(zip(("stride_mb", "stride_mh", "stride_mm", "stride_mn"), (0, 0, _L, 1)))
    args.update(zip(("stride_lb", "stride_lh", "stride_lm", "stride_ls"),
                    att._stats_strides((_B, _H, _L))))
    args.update(num_heads=_H, kv_group=1, seqlen_q=_L, seqlen_k=_L, mask_heads=1, loop_b=_B, loop_h=_H,
                sm_scale_log2=0.18, dropout_p=0.1, dropout_scale=1 / 0.9,
                Seed=ptr("i64") if dropout else ptr(dt),
                HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bd,
                IS_CAUSAL=causal, HAS_DROPOUT=dropout, HAS_ALIBI=False, HAS_WINDOW=False,
                DOT_PRECISION=att._dot_precision(dtype))
    variant = "-".join(f for f, on in (("causal", causal), ("dropout", dropout)) if on) or "plain"
    name = f"sm{cc}-bwd_dmask-D{d}-{dt}-{variant}-BM{bm}-BN{bn}-w{warps}-s{stages}"
    return Case("attention", name, att._attention_bwd_dmask_kernel, args, warps, stages, cc)


def attention_cases() -> List[Case]:
    """sm_90: every variant at fp16, every dtype, head dims 40 / 128 / 256 (128 also plain: the
    shape of the issue's H100 throughput targets; grouped-query; ALiBi; sliding window; key limits).
    sm_80 (its own tables): GQA, key limits,
    float mask + dropout at fp16, fp32, head dims 128 / 256 (bf16)."""
    kinds = ("fwd", "bwd_dkdv", "bwd_dq")
    causal, bool_mask = dict(causal=True), dict(mask="bool")
    float_drop = dict(mask="float", dropout=True)
    varlen = dict(causal=True, dropout=True, varlen=True)
    heavy = dict(mask="bool", dropout=True)
    gqa = dict(causal=True, kv_group=4)  # 12 query heads on 3 key / value heads
    alibi = dict(mask="bool", alibi=True)  # key padding + ALiBi (MosaicBERT / Jina-BERT style)
    window = dict(mask="bool", window=True)  # key padding + sliding window (ModernBERT's local layers)
    keylimit = dict(mask="bool", key_limit=True)  # key padding, padded keys skipped (BERT batches)
    varlen_bias = dict(mask="float", varlen=True)  # MPNet's relative-position bias, padding-free
    specs = {90: [("fp16", 64, causal), ("fp16", 64, bool_mask), ("fp16", 64, float_drop),
                  ("fp16", 64, varlen), ("bf16", 64, causal), ("fp32", 64, causal),
                  ("fp16", 40, {}), ("fp16", 128, {}), ("fp16", 128, heavy), ("fp16", 256, causal),
                  ("bf16", 128, gqa), ("fp16", 64, alibi), ("bf16", 64, window),
                  ("fp16", 64, keylimit), ("fp16", 64, varlen_bias)],
             80: [("fp16", 64, float_drop), ("fp32", 64, causal), ("fp16", 64, gqa), ("fp16", 64, keylimit),
                  ("fp16", 128, heavy), ("bf16", 256, causal)]}
    cases = []
    for cc, cc_specs in specs.items():
        for dt, d, var in cc_specs:
            cases += [_attention_case(k, cc, dt, d, **var) for k in kinds]
        cases += _attention_small_cases(cc)
        cases += [_attention_dmask_case(cc, "fp16", 64, causal=True, dropout=True),
                  _attention_dmask_case(cc, "bf16", 128), _attention_dmask_case(cc, "fp32", 64),
                  _attention_dmask_case(cc, "fp16", 256, dropout=True)]
    return cases


# ------------------------------------------------------------------------------------------------
# block_sparse_attention.py
# ------------------------------------------------------------------------------------------------
def _bsa_case(kind: str, cc: int, dt: str, d: int, block: int = 64, mask: str = "none",
              dropout: bool = False, per_head_layout: bool = False, mask_grad: bool = False) -> Case:
    """mask_grad: a float mask that requires grad (the dq kernel also writes dS)."""
    dtype = DTYPES[dt]
    # _tiles only looks at device.type ("cuda": GPU tiles); it does not depend on the architecture.
    # The delta preprocessing runs with the dq kernel's BLOCK_M.
    tile_kind = "bwd_dq" if kind == "bwd_preprocess" else kind
    bm, bn, warps, stages = bsa._tiles(block, d, d, dtype, torch.device("cuda"), tile_kind, None, None)
    if kind == "bwd_preprocess":
        warps, stages = 4, 3  # launched without num_warps / num_stages: Triton's defaults
    h, l = _H, _L
    nb = triton.cdiv(l, block)
    hl = h if per_head_layout else 1
    t = _dense_strides(h, l, d)
    mask_ptr = {"none": ptr(dt), "bool": ptr("u8"), "float": ptr(dt)}[mask]
    m_strides = {"none": (0, 0, 0, 0), "bool": (l, 0, 0, 1), "float": (h * l * l, l * l, l, 1)}[mask]
    flags = dict(HAS_MASK=mask != "none", MASK_IS_BOOL=mask == "bool", HAS_DROPOUT=dropout,
                 BLOCK=block, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bsa._pad_dim(d),
                 BLOCK_DV=bsa._pad_dim(d), DOT_PRECISION=bsa._dot_precision(dtype))
    sizes = dict(H=h, HL=hl, NBQ=nb, NBK=nb, Lq=l, Lk=l, D=d, DV=d)
    # the seed is a (1,) int64 device tensor (fastbert._rng.dropout_seed); without dropout the
    # launchers pass q as the (unread) pointer
    drop = dict(dropout_p=0.1, dropout_scale=1 / 0.9, Seed=ptr("i64") if dropout else ptr(dt))
    store_ds = mask_grad and mask == "float"
    strides = lambda *names: {f"stride_{n}{s}": v for n in names for s, v in zip("bhmd", t)}  # noqa: E731
    if kind == "fwd":
        kernel = bsa._block_sparse_attention_fwd_kernel
        args = dict(Q=ptr(dt), K=ptr(dt), V=ptr(dt), Out=ptr(dt), Stats=ptr("fp32"), Mask=mask_ptr,
                    QCount=ptr("i32"), QIndex=ptr("i32"), **strides("q", "k", "v", "o"),
                    **sizes, qk_scale=0.18, **drop, **flags)
    elif kind == "bwd_dq":
        kernel = bsa._block_sparse_attention_bwd_dq_kernel
        args = dict(Q=ptr(dt), K=ptr(dt), V=ptr(dt), DO=ptr(dt), DQ=ptr(dt), Stats=ptr("fp32"),
                    Delta=ptr("fp32"), Mask=mask_ptr, DS=ptr("fp32") if store_ds else ptr(dt),
                    QCount=ptr("i32"), QIndex=ptr("i32"),
                    **strides("q", "k", "v", "do", "dq"), **sizes, qk_scale=0.18, sm_scale=0.125,
                    **drop, **flags, STORE_DS=store_ds)
        ds = (h * l * l, l * l, l, 1) if store_ds else (0, 0, 0, 0)
        args.update(zip(("stride_dsb", "stride_dsh", "stride_dsm", "stride_dsn"), ds))
    elif kind == "bwd_dkdv":
        kernel = bsa._block_sparse_attention_bwd_dkdv_kernel
        args = dict(Q=ptr(dt), K=ptr(dt), V=ptr(dt), DO=ptr(dt), DK=ptr(dt), DV_=ptr(dt),
                    Stats=ptr("fp32"), Delta=ptr("fp32"), Mask=mask_ptr, KCount=ptr("i32"),
                    KIndex=ptr("i32"), **strides("q", "k", "v", "do", "dk", "dv"), **sizes,
                    qk_scale=0.18, sm_scale=0.125, **drop, **flags)
    elif kind == "bwd_dmask":  # a (1, 1, Lq, Lk) float mask, summed over batch and heads
        kernel = bsa._block_sparse_attention_bwd_dmask_kernel
        m_strides = (0, 0, l, 1)
        args = dict(Q=ptr(dt), K=ptr(dt), V=ptr(dt), DO=ptr(dt), Stats=ptr("fp32"),
                    Delta=ptr("fp32"), Mask=ptr(dt), Layout=ptr("u8"), DMask=ptr("fp32"),
                    **strides("q", "k", "v", "do"), **sizes, MH=1, loop_b=_B, loop_h=h,
                    qk_scale=0.18, **drop, HAS_DROPOUT=dropout, BLOCK=block, BLOCK_M=bm,
                    BLOCK_N=bn, BLOCK_D=bsa._pad_dim(d), BLOCK_DV=bsa._pad_dim(d),
                    DOT_PRECISION=bsa._dot_precision(dtype))
    elif kind == "bwd_preprocess":
        kernel = bsa._block_sparse_attention_bwd_preprocess_kernel
        args = dict(Out=ptr(dt), DO=ptr(dt), Delta=ptr("fp32"), **strides("o", "do"), H=h, Lq=l,
                    DV=d, BLOCK_M=bm, BLOCK_DV=bsa._pad_dim(d))
    else:
        raise ValueError(kind)
    _key_token_strides(args)
    args.update(zip(("stride_mb", "stride_mh", "stride_mm", "stride_mn"), m_strides))
    if kind == "bwd_preprocess":
        for s in ("stride_mb", "stride_mh", "stride_mm", "stride_mn"):
            args.pop(s)
    variant = "-".join(f for f, on in ((f"{mask}mask", mask != "none"), ("maskgrad", store_ds),
                                       ("dropout", dropout), ("headlayout", per_head_layout))
                       if on) or "plain"
    name = f"sm{cc}-{kind}-block{block}-D{d}-{dt}-{variant}-BM{bm}-BN{bn}-w{warps}-s{stages}"
    return Case("block_sparse_attention", name, kernel, args, warps, stages, cc)


def block_sparse_attention_cases() -> List[Case]:
    """sm_90: every variant at fp16 (layout block 64), every dtype, head dims 40 / 128 / 256 with
    layout blocks 16 / 128 / 64, fp32 (its own tiles) at D = 128 with the heaviest variant. sm_80
    (same tiles): fp16 float mask + dropout, bf16 D = 128, fp32 D = 64 at layout block 128. The
    float mask variant requires grad (the dq kernel also writes dS)."""
    kinds = ("fwd", "bwd_dq", "bwd_dkdv")
    plain, bool_mask = {}, dict(mask="bool", per_head_layout=True)
    float_drop = dict(mask="float", dropout=True, mask_grad=True)
    specs = {90: [("fp16", 64, 64, plain), ("fp16", 64, 64, bool_mask), ("fp16", 64, 64, float_drop),
                  ("bf16", 64, 64, plain), ("fp32", 64, 64, plain), ("fp16", 40, 16, plain),
                  ("fp16", 128, 128, dict(dropout=True)), ("fp16", 256, 64, plain),
                  ("fp32", 128, 64, float_drop)],
             80: [("fp16", 64, 64, float_drop),
                  ("bf16", 128, 128, dict(dropout=True)), ("fp32", 64, 128, float_drop)]}
    cases = []
    for cc, cc_specs in specs.items():
        for dt, d, block, var in cc_specs:
            cases += [_bsa_case(k, cc, dt, d, block, **var) for k in kinds]
        cases.append(_bsa_case("bwd_preprocess", cc, "fp16", 64))
        cases += [_bsa_case("bwd_dmask", cc, dt, d, block, dropout=dropout, per_head_layout=True)
                  for dt, d, block, dropout in (("fp16", 64, 64, True), ("bf16", 128, 128, False),
                                                ("fp32", 64, 64, True), ("fp32", 128, 64, False),
                                                ("fp16", 256, 64, True), ("fp32", 256, 64, False))]
        cases.append(Case("block_sparse_attention", f"sm{cc}-dropout_mask",
                          bsa._block_sparse_attention_dropout_mask_kernel,
                          dict(Keep=ptr("u8"), Lq=_L, Lk=_L, dropout_p=0.1, Seed=ptr("i64"),
                               BLOCK_M=32, BLOCK_N=32), 4, 3, cc))
    return cases


# ------------------------------------------------------------------------------------------------
# layer_norm.py and gelu.py (launched without num_stages: Triton's default, 3)
# ------------------------------------------------------------------------------------------------
_M = 4096  # rows ([M, N] after the launchers' reshape)
_PLAIN = dict(residual=False, input_bias=False, dropout=False, weight=True, bias=True, store_sum=False)
_FULL = dict(residual=True, input_bias=True, dropout=True, weight=True, bias=True, store_sum=True)


def _ln_row_args(dt: str, n: int, col_stride: int = 1) -> Dict[str, Any]:
    rs = n * col_stride
    return dict(X=ptr(dt), stride_xm=rs, stride_xn=col_stride, R=ptr(dt), stride_rm=rs,
                stride_rn=col_stride, XB=ptr(dt), W=ptr(dt))


def _layer_norm_cases_for(cc: int, dt: str, n: int, feat: Dict[str, bool], col_stride: int = 1,
                          tag: str = "", rdt: str = "") -> List[Case]:
    """``rdt``: a residual dtype other than the input's ``dt`` (mixed precision): residual,
    parameters, outputs and the sum's gradient in ``rdt``, the input's gradient stored apart."""
    m = _M
    mixed = bool(rdt) and rdt != dt
    rdt = rdt or dt
    offset_64 = ln._offset_64(m, n)
    looped = n > ln.MAX_FUSED_N
    # the seed is a (1,) int64 device tensor (fastbert._rng.dropout_seed); without dropout the
    # launchers pass the input rows as the (unread) pointer
    drop = dict(SEED=ptr("i64") if feat["dropout"] else ptr(dt), dropout_p=0.1, dropout_scale=1 / 0.9)
    tag = (tag or ("full" if feat["residual"] else "plain")) + (f"-{rdt}residual" if mixed else "")
    rows = dict(_ln_row_args(dt, n, col_stride), R=ptr(rdt), XB=ptr(rdt), W=ptr(rdt))
    fwd = dict(**rows, B=ptr(rdt), Y=ptr(rdt), S=ptr(rdt),
               MEAN=ptr("fp32"), RSTD=ptr("fp32"), M=m, N=n, eps=1e-5, **drop,
               HAS_RESIDUAL=feat["residual"], HAS_INPUT_BIAS=feat["input_bias"],
               HAS_DROPOUT=feat["dropout"], HAS_WEIGHT=feat["weight"], HAS_BIAS=feat["bias"],
               STORE_SUM=feat["store_sum"], OFFSET_64=offset_64)
    # backward: every gradient requested, as for trainable weight / bias / input bias
    grads = dict(DY=ptr(rdt), stride_dym=n * col_stride, stride_dyn=col_stride, DSUM=ptr(rdt),
                 stride_dsm=n * col_stride, stride_dsn=col_stride, **rows,
                 MEAN=ptr("fp32"), RSTD=ptr("fp32"), M=m, N=n, **drop,
                 HAS_RESIDUAL=feat["residual"], HAS_INPUT_BIAS=feat["input_bias"],
                 HAS_DROPOUT=feat["dropout"], HAS_WEIGHT=feat["weight"], HAS_DSUM=feat["store_sum"],
                 OFFSET_64=offset_64)
    needs = dict(NEED_DW=feat["weight"], NEED_DB=feat["bias"], NEED_DXB=feat["input_bias"])
    name = f"sm{cc}-{{}}-N{n}{'-colstride%d' % col_stride if col_stride != 1 else ''}-{dt}-{tag}"
    if not looped:
        bm, bn, w = ln._one_pass_config(n)
        bbm, bbn, bw = ln._one_pass_config(n, ln.BWD_TILE_ELEMS, ln.BWD_ELEMS_PER_THREAD)
        return [
            Case("layer_norm", name.format("fwd") + f"-BM{bm}-w{w}", ln._layer_norm_fwd_kernel,
                 dict(fwd, BLOCK_M=bm, BLOCK_N=bn), w, 3, cc),
            Case("layer_norm", name.format("bwd") + f"-BM{bbm}-w{bw}", ln._layer_norm_bwd_kernel,
                 dict(grads, DS=ptr(rdt), DX=ptr(dt), DW_PART=ptr("fp32"), DB_PART=ptr("fp32"),
                      DXB_PART=ptr("fp32"), STORE_DX=feat["dropout"] or mixed, **needs,
                      BLOCK_M=bbm, BLOCK_N=bbn), bw, 3, cc)]
    w = ln.LOOPED_NUM_WARPS
    loop = dict(BLOCK_M=1, BLOCK_N=ln.LOOPED_BLOCK_N)
    return [
        Case("layer_norm", name.format("fwd_looped"), ln._layer_norm_fwd_looped_kernel,
             dict(fwd, **loop), w, 3, cc),
        Case("layer_norm", name.format("bwd_looped"), ln._layer_norm_bwd_looped_kernel,
             dict(grads, DS=ptr(rdt), DX=ptr(dt), C1=ptr("fp32"), C2=ptr("fp32"),
                  STORE_DX=feat["dropout"] or mixed, STORE_C=feat["input_bias"], **loop), w, 3, cc),
        Case("layer_norm", name.format("bwd_cols"), ln._layer_norm_bwd_cols_kernel,
             dict(grads, C1=ptr("fp32"), C2=ptr("fp32"), DW_PART=ptr("fp32"), DB_PART=ptr("fp32"),
                  DXB_PART=ptr("fp32"), **needs, BLOCK_M=ln.COLS_BLOCK_M,
                  BLOCK_N=ln.COLS_BLOCK_N), 8, 3, cc)]


def layer_norm_cases() -> List[Case]:
    """sm_90: every dtype plain and full (add + dropout + residual), odd strided rows, the widest
    one-pass rows, the looped kernels (also with 64-bit offsets). sm_80: fp16 full, looped."""
    cases = []
    for dt in DTYPES:
        cases += _layer_norm_cases_for(90, dt, 768, _PLAIN)
        cases += _layer_norm_cases_for(90, dt, 768, _FULL)
    cases += _layer_norm_cases_for(90, "fp16", 97, dict(_PLAIN, weight=False), col_stride=2,
                                   tag="noweight")
    cases += _layer_norm_cases_for(90, "fp16", 4096, _FULL)
    cases += _layer_norm_cases_for(90, "fp16", ln.MAX_FUSED_N, _PLAIN)   # widest one-pass row
    cases += _layer_norm_cases_for(90, "bf16", 3 * ln.LOOPED_BLOCK_N + 100, _FULL)   # looped
    cases += _layer_norm_cases_for(90, "fp32", 2 ** 19, _PLAIN)   # looped, M * N >= 2**31
    # mixed precision (a bf16 / fp16 matmul output, an fp32 residual stream), without dropout:
    # the input's gradient is stored apart because of its dtype alone
    cases += _layer_norm_cases_for(90, "bf16", 768, dict(_FULL, dropout=False), rdt="fp32")
    cases += _layer_norm_cases_for(90, "bf16", 3 * ln.LOOPED_BLOCK_N + 100, _FULL, rdt="fp32")
    cases += _layer_norm_cases_for(80, "fp16", 768, dict(_FULL, dropout=False), rdt="fp32")
    cases += _layer_norm_cases_for(80, "fp16", 768, _FULL)
    cases += _layer_norm_cases_for(80, "fp16", 3 * ln.LOOPED_BLOCK_N + 100, _FULL)
    for cc in (90, 80):
        cases.append(Case("layer_norm", f"sm{cc}-dropout_keep_mask", ln._dropout_keep_mask_kernel,
                          dict(MASK=ptr("u8"), M=_M, N=768, SEED=ptr("i64"), dropout_p=0.1,
                               OFFSET_64=False, BLOCK_M=4, BLOCK_N=1024), 8, 3, cc))
    return cases


def _gelu_cases_for(cc: int, dt: str, n: int, approx: bool, bias: bool = True) -> List[Case]:
    bm, bn = gelu._config(n)
    w = gelu.NUM_WARPS
    kind = "tanh" if approx else "erf"
    name = f"sm{cc}-{{}}-N{n}-{dt}-{kind}{'' if bias else '-nobias'}-BM{bm}-BN{bn}"
    flags = dict(HAS_BIAS=bias, APPROX_TANH=approx, BLOCK_M=bm, BLOCK_N=bn)
    return [
        Case("gelu", name.format("fwd"), gelu._bias_gelu_fwd_kernel,
             dict(X=ptr(dt), stride_xm=n, stride_xn=1, BIAS=ptr(dt), Y=ptr(dt), M=_M, N=n,
                  **flags), w, 3, cc),
        Case("gelu", name.format("bwd"), gelu._bias_gelu_bwd_kernel,
             dict(DY=ptr(dt), stride_dym=n, stride_dyn=1, X=ptr(dt), stride_xm=n, stride_xn=1,
                  BIAS=ptr(dt), DX=ptr(dt), DB_PART=ptr("fp32"), M=_M, N=n, G=88, NEED_DBIAS=bias,
                  **flags), w, 3, cc)]


def _geglu_cases_for(cc: int, dt: str, n: int, approx: bool) -> List[Case]:
    """The packed layout (a (rows, 2N) input; both halves read with row stride 2N)."""
    bm, bn = gelu._config(n)
    name = f"sm{cc}-geglu_{{}}-N{n}-{dt}-{'tanh' if approx else 'erf'}-BM{bm}-BN{bn}"
    args = dict(A=ptr(dt), stride_am=2 * n, stride_an=1, G=ptr(dt), stride_gm=2 * n, stride_gn=1,
                DY=ptr(dt), stride_dym=n, stride_dyn=1, OUT=ptr(dt), DG=ptr(dt), M=_M, N=n,
                APPROX_TANH=approx, BLOCK_M=bm, BLOCK_N=bn)
    return [
        Case("gelu", name.format("fwd"), gelu._geglu_kernel,
             dict(args, stride_om=n, stride_dgm=n, BWD=False), gelu.NUM_WARPS, 3, cc),
        Case("gelu", name.format("bwd"), gelu._geglu_kernel,
             dict(args, stride_om=2 * n, stride_dgm=2 * n, BWD=True), gelu.NUM_WARPS, 3, cc)]


def gelu_cases() -> List[Case]:
    """sm_90: every dtype (erf), tanh, odd width without bias, N = 1. sm_80: fp16 erf and tanh.
    GEGLU: sm_90 bf16 erf and fp16 tanh at ModernBERT-base's 1152, sm_80 fp16 erf."""
    cases = []
    for dt in DTYPES:
        cases += _gelu_cases_for(90, dt, 3072, approx=False)
    cases += _gelu_cases_for(90, "fp16", 3072, approx=True)
    cases += _gelu_cases_for(90, "fp16", 97, approx=False, bias=False)
    cases += _gelu_cases_for(90, "bf16", 1, approx=True)
    cases += _gelu_cases_for(80, "fp16", 3072, approx=False)
    cases += _gelu_cases_for(80, "bf16", 3072, approx=True)
    cases += _geglu_cases_for(90, "bf16", 1152, approx=False)
    cases += _geglu_cases_for(90, "fp16", 1152, approx=True)
    cases += _geglu_cases_for(80, "fp16", 1152, approx=False)
    return cases


FAMILIES = {
    "attention": attention_cases,
    "block_sparse_attention": block_sparse_attention_cases,
    "layer_norm": layer_norm_cases,
    "gelu": gelu_cases,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES))
    parser.add_argument("--json", help="write the per-case results to this file")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    opts = parser.parse_args(argv)
    cases = [c for fam in (opts.family or FAMILIES) for c in FAMILIES[fam]()]
    print(f"triton {triton.__version__}: compiling {len(cases)} kernels for sm_90a / sm_80 "
          f"(ptxas {PTXAS})", flush=True)
    global _CASES
    _CASES = cases
    if opts.jobs > 1:
        # fork: the workers inherit the case list (and the patched device limits); only indices
        # and results cross the process boundary
        with multiprocessing.get_context("fork").Pool(opts.jobs) as pool:
            stream = pool.imap(_compile_index, range(len(cases)))
            results = _report(stream)
    else:
        results = _report(map(_compile_index, range(len(cases))))
    failed = [r for r in results if not r.ok]
    spilling = [r for r in results if r.spill_stores or r.spill_loads]
    print(f"{len(results) - len(failed)}/{len(results)} compiled; {len(spilling)} with register "
          f"spills; {sum(bool(r.warnings) for r in results)} with ptxas warnings")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump([r.__dict__ for r in results], f, indent=1)
    return 1 if failed else 0


_CASES: List[Case] = []


def _compile_index(i: int) -> Result:
    return compile_case(_CASES[i])


def _report(results) -> List[Result]:
    out = []
    for r in results:
        out.append(r)
        spill = f" spills {r.spill_stores}/{r.spill_loads} B" if r.spill_stores or r.spill_loads else ""
        status = "ok  " if r.ok else "FAIL"
        mma = f", {r.mma}" if r.mma else ""
        print(f"{status} {r.family}/{r.name}: smem {r.shared} B, {r.registers} regs{mma}{spill}"
              f"{' [' + '; '.join(r.warnings) + ']' if r.warnings else ''} ({r.seconds:.1f}s)"
              f"{'  ' + r.error if r.error else ''}", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
