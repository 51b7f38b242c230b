#!/usr/bin/env bash
# compute-sanitizer over a short run of every CUDA kernel of the extension fastbert._C (csrc/):
# memcheck (out-of-bounds / misaligned accesses), racecheck (shared-memory hazards) and synccheck
# (illegal __syncthreads / __syncwarp use), each over the same Python driver, which calls every op
# forward and backward on small awkward shapes that take every kernel path (register-resident and
# looped LayerNorm, vectorised and scalar loads, multi-warp rows, every mask kind, dropout, the
# fused tensor-core attention, dense and over packed sequences).
#
# For a session with a GPU, after installing with the extension built:
#   bash bench/sanitize_cuda.sh [LOG_DIR]          (LOG_DIR defaults to $OUT, else /tmp)
# Writes LOG_DIR/sanitize_<tool>.log and exits non-zero if any tool reports an error.
# SANITIZE_TOOLS="memcheck racecheck synccheck initcheck" picks the tools (initcheck is off by
# default: it also reports torch's own reads of fresh allocations). Only kernels of the fastbert
# namespace are checked (--kernel-regex), which keeps the run to a few minutes.
# A last pass, memcheck over the Triton kernels (SANITIZE_TRITON=0 skips it), runs the same kinds
# of calls with backend="triton" (dense, varlen and block-sparse attention with masks, dropout and
# gradients; LayerNorm, add+LayerNorm, GELU) and checks every kernel (no name filter), into
# LOG_DIR/sanitize_memcheck_triton.log.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${1:-${OUT:-/tmp}}"
PY="${PYTHON:-python3}"
TOOLS="${SANITIZE_TOOLS:-memcheck racecheck synccheck}"
mkdir -p "$LOG_DIR"

if ! command -v compute-sanitizer >/dev/null 2>&1; then
    echo "compute-sanitizer not found (it ships with the CUDA toolkit: \$CUDA_HOME/bin)" >&2
    exit 2
fi
"$PY" -c "import fastbert._C" || { echo "fastbert._C is not built: install with FASTBERT_BUILD_CUDA=1" >&2; exit 2; }

driver="$(mktemp --suffix=.py)"
trap 'rm -f "$driver"' EXIT
cat > "$driver" <<'PYEOF'
import torch

import fastbert
from fastbert import reference

assert torch.cuda.is_available(), "needs a GPU"
torch.manual_seed(0)
dev = "cuda"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def leaf(*shape, dtype=F16, scale=1.0):
    return (torch.randn(shape, device=dev) * scale).to(dtype).requires_grad_(True)


def backward(out):
    out.backward(torch.randn_like(out))


# LayerNorm: fast paths (768 warp / 4096 block per row), generic vectorised (1000, 8192: multi-warp
# rows), scalar (97, unaligned row stride), with and without affine parameters.
for rows, width, dtype in [(67, 768, F16), (3, 4096, BF16), (67, 1000, F16), (5, 8192, F32), (33, 97, BF16)]:
    x, w, b = leaf(rows, width, dtype=dtype), leaf(width, dtype=dtype), leaf(width, dtype=dtype)
    backward(fastbert.layer_norm(x, (width,), w, b, backend="cuda"))
    backward(fastbert.layer_norm(x, (width,), backend="cuda"))
big = leaf(33, 100, dtype=F16)
backward(fastbert.layer_norm(big[:, 3:], (97,), backend="cuda"))

# add + bias + dropout + residual + LayerNorm
for rows, width, dtype in [(67, 768, F16), (9, 1000, BF16), (17, 97, F32), (3, 4096, F16)]:
    x, r = leaf(rows, width, dtype=dtype), leaf(rows, width, dtype=dtype)
    w, b, ib = leaf(width, dtype=dtype), leaf(width, dtype=dtype), leaf(width, dtype=dtype)
    out, s = fastbert.add_layer_norm(x, r, w, b, input_bias=ib, dropout_p=0.1, return_residual=True, backend="cuda")
    torch.autograd.backward([out, s], [torch.randn_like(out), torch.randn_like(s)])
    backward(fastbert.add_layer_norm(x, r, None, None, backend="cuda"))

# bias + GELU (vectorised, scalar, no bias)
for shape, dtype in [((129, 768), F16), ((67, 97), BF16), ((5, 3, 7), F32)]:
    x, b = leaf(*shape, dtype=dtype), leaf(shape[-1], dtype=dtype)
    backward(fastbert.bias_gelu(x, b, backend="cuda"))
    backward(fastbert.gelu(x, "tanh", backend="cuda"))

# GEGLU: packed (vectorised; odd width: scalar), a separate gate, the halves of one matrix
for shape, dtype in [((129, 2 * 1152), F16), ((67, 2 * 97), BF16), ((5, 3, 14), F32)]:
    x = leaf(*shape, dtype=dtype)
    backward(fastbert.geglu(x, backend="cuda"))
    backward(fastbert.geglu(*x.chunk(2, dim=-1), "tanh", backend="cuda"))
    a, g = leaf(*shape[:-1], shape[-1] // 2, dtype=dtype), leaf(*shape[:-1], shape[-1] // 2, dtype=dtype)
    backward(fastbert.geglu(a, g, backend="cuda"))

# attention, unfused (with gradients): masks of every kind, causal, dropout, multi-warp rows (Lk 1000)
for (b, h, lq, lk, d, dtype) in [(2, 2, 97, 130, 40, F16), (1, 2, 17, 512, 64, BF16), (1, 1, 5, 1000, 64, F32)]:
    q, k, v = leaf(b, h, lq, d, dtype=dtype), leaf(b, h, lk, d, dtype=dtype), leaf(b, h, lk, d, dtype=dtype)
    pad = (torch.arange(lk, device=dev)[None, :] < torch.tensor([lk // 2, lk][:b], device=dev)[:, None])
    masks = [None, pad.view(b, 1, 1, lk), torch.randn(lq, lk, device=dev, dtype=dtype),
             torch.randn(lq, lk, device=dev)]
    for m in masks:
        backward(fastbert.scaled_dot_product_attention(q, k, v, m, dropout_p=0.1, is_causal=True, backend="cuda"))
        backward(fastbert.scaled_dot_product_attention(q, k, v, m, backend="cuda"))

# attention, fused tensor-core forward (inference)
with torch.no_grad():
    for (b, h, lq, lk, d, dtype, causal) in [(2, 2, 130, 97, 64, F16, False), (1, 1, 512, 512, 128, BF16, True),
                                             (1, 2, 17, 1, 64, F16, False)]:
        q = torch.randn(b, lq, h, d, device=dev, dtype=dtype).transpose(1, 2)  # strided (B, L, H, D)
        k, v = torch.randn(b, h, lk, d, device=dev, dtype=dtype), torch.randn(b, h, lk, d, device=dev, dtype=dtype)
        m = torch.rand(b, 1, 1, lk, device=dev) > 0.3
        fastbert.scaled_dot_product_attention(q, k, v, m, is_causal=causal, backend="cuda")
        fastbert.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cuda")
        for bias in (torch.randn(1, h, lq, lk, device=dev, dtype=dtype), torch.randn(b, 1, 1, lk, device=dev)):
            fastbert.scaled_dot_product_attention(q, k, v, bias, is_causal=causal, backend="cuda")
    # the same kernel over packed sequences: Lq != Lk, a sequence without queries, one without keys
    cu_q = torch.tensor([0, 5, 135, 135, 199], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, 20, 84, 91, 91], dtype=torch.int32, device=dev)
    for d, dtype, causal in [(64, F16, False), (128, BF16, True)]:
        qp = torch.randn(199, 3, d, device=dev, dtype=dtype)
        kp, vp = torch.randn(91, 3, d, device=dev, dtype=dtype), torch.randn(91, 3, d, device=dev, dtype=dtype)
        fastbert.varlen_attention(qp, kp, vp, cu_q, cu_k, 130, 64, is_causal=causal, backend="cuda")

# the dropout mask helper
seed = torch.tensor([1234], dtype=torch.int64, device=dev)
torch.ops.fastbert_cuda.dropout_mask(seed, [1001], 0.3)
torch.cuda.synchronize()


def triton_calls():
    """The Triton kernels on small awkward shapes: every mask kind, causal, dropout, varlen,
    block-sparse (layout block 64 and 128, L not a multiple of it), row widths around the looped
    LayerNorm, forward and backward."""
    from fastbert import sparsity

    T = dict(backend="triton")
    # (Lk 300, 320: the bool masks get key limits, the padded key blocks are skipped; 320 rounds
    # the limits up to 16)
    for (b, h, lq, lk, d, dtype) in [(2, 2, 97, 130, 40, F16), (2, 2, 17, 300, 128, BF16), (1, 1, 33, 5, 80, F32),
                                     (2, 1, 40, 320, 64, F16)]:
        q, k, v = leaf(b, h, lq, d, dtype=dtype), leaf(b, h, lk, d, dtype=dtype), leaf(b, h, lk, d, dtype=dtype)
        pad = (torch.arange(lk, device=dev)[None, :] < torch.tensor([lk // 2 + 1, lk][:b], device=dev)[:, None])
        bias = (torch.randn(lq, lk, device=dev) * 0.1).to(dtype).requires_grad_(True)
        for m in [None, pad.view(b, 1, 1, lk), bias]:
            backward(fastbert.scaled_dot_product_attention(q, k, v, m, dropout_p=0.1, is_causal=True, **T))
            backward(fastbert.scaled_dot_product_attention(q, k, v, m, **T))
    # grouped-query (K/V heads read in place, dK/dV looped over each group), ALiBi and a sliding
    # window (only the blocks it reaches), with a trainable broadcast bias (its own kernel)
    q, kv = leaf(2, 4, 97, 64, dtype=F16), leaf(2, 2, 130, 64, dtype=F16)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=dev)
    bias = (torch.randn(1, 1, 97, 130, device=dev) * 0.1).half().requires_grad_(True)
    for causal in (False, True):
        backward(fastbert.scaled_dot_product_attention(q, kv, kv, bias, dropout_p=0.1, is_causal=causal,
                                                       enable_gqa=True, alibi_slopes=slopes,
                                                       window_size=(17, 5), **T))
    lens = torch.tensor([0, 5, 102, 103], dtype=torch.int32, device=dev)
    qp, kp, vp = leaf(103, 2, 64), leaf(103, 2, 64), leaf(103, 2, 64)
    backward(fastbert.varlen_attention(qp, kp, vp, lens, lens, 97, 97, dropout_p=0.1, is_causal=True, **T))
    kp1 = leaf(103, 1, 64)
    backward(fastbert.varlen_attention(qp, kp1, kp1, lens, lens, 97, 97, window_size=(8, 8),
                                       alibi_slopes=slopes[:2], **T))
    for bs, l in [(64, 300), (128, 257)]:
        q, k, v = leaf(2, 2, l, 64), leaf(2, 2, l, 64), leaf(2, 2, l, 64)
        layout = sparsity.bigbird(l, bs, num_heads=2, seed=0, device=dev)
        pad = torch.ones(2, 1, 1, l, dtype=torch.bool, device=dev)
        pad[0, ..., l // 2:] = False
        backward(fastbert.block_sparse_attention(q, k, v, layout, bs, pad, dropout_p=0.1, **T))
    for rows, width, dtype in [(67, 768, F16), (5, 8192, F32), (3, 9000, BF16), (33, 97, F16)]:
        x, r = leaf(rows, width, dtype=dtype), leaf(rows, width, dtype=dtype)
        w, b = leaf(width, dtype=dtype), leaf(width, dtype=dtype)
        backward(fastbert.layer_norm(x, (width,), w, b, **T))
        backward(fastbert.add_layer_norm(x, r, w, b, input_bias=b, dropout_p=0.1, **T))
        backward(fastbert.bias_gelu(x, b, "tanh", **T))
        backward(fastbert.geglu(x, r, **T))
    torch.cuda.synchronize()


import os  # noqa: E402

if os.environ.get("SANITIZE_TRITON_CALLS") == "1":
    triton_calls()
print("driver done")
PYEOF

# Every allocation its own cudaMalloc, so that an access past the end of a tensor leaves its
# allocation (the caching allocator would hide it inside a larger block).
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
rc=0
run_tool() {  # run_tool TOOL LOG [extra compute-sanitizer args...]
    local tool=$1 log=$2 status
    shift 2
    echo "=== compute-sanitizer --tool $tool $* (log: $log)"
    compute-sanitizer --tool "$tool" --error-exitcode 3 --print-limit 50 "$@" \
        "$PY" "$driver" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ] || ! grep -q "driver done" "$log"; then
        echo "=== $tool: FAILED (exit $status)"
        rc=1
    else
        echo "=== $tool: clean"
    fi
}
for tool in $TOOLS; do
    run_tool "$tool" "$LOG_DIR/sanitize_${tool}.log" --kernel-regex kns=fastbert
done
if [ "${SANITIZE_TRITON:-1}" = 1 ]; then
    SANITIZE_TRITON_CALLS=1 run_tool memcheck "$LOG_DIR/sanitize_memcheck_triton.log"
fi
exit "$rc"
