"""CPU tests of fastbert.benchmarks and bench/: arguments, the no-GPU path, case enumeration, the
work formulas, timing statistics, correctness gating, the JSON/CSV writer, the table, the plots,
the README table tool and the GPU run script. The GPU timings themselves run only on a GPU."""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fastbert import reference
from fastbert._library import fast_ops
from fastbert.benchmarks import attention, bert, common, norms, report, runner, sparse, timing
from fastbert.benchmarks.common import Case, Impl, Prepared, Unavailable

REPO = Path(__file__).resolve().parents[1]


def _args(*argv):
    p = argparse.ArgumentParser()
    runner.add_arguments(p)
    return p.parse_args(list(argv))


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------
# Arguments, the no-GPU path, case selection
# ----------------------------------------------------------------------------------------------
def test_arguments_parse():
    a = _args("--op", "attention", "--op", "norms,gelu", "--quick", "--out", "d", "--budget-s", "30",
              "--impl", "sdpa", "--rep-ms", "5", "--no-plots")
    assert runner._split(a.op) == ["attention", "norms", "gelu"]
    assert a.quick and a.out == "d" and a.budget_s == 30.0 and a.impl == ["sdpa"]
    assert a.rep_ms == 5.0 and a.no_plots and not a.list_cases
    d = _args()
    assert d.op is None and not d.quick and d.out is None and d.budget_s is None


def test_no_gpu_message_and_exit_code(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = runner.run(_args("--quick", "--out", str(tmp_path / "res")))
    err = capsys.readouterr().err
    assert rc == 2
    assert "no CUDA GPU" in err and "fastbert check" in err
    assert not (tmp_path / "res").exists()


def test_unknown_op_is_refused(capsys):
    assert runner.run(_args("--op", "attentoin", "--list")) == 2
    err = capsys.readouterr().err
    assert "attentoin" in err and "layer_norm" in err and "attention" in err
    assert runner.run(_args("--op", ",", "--list")) == 2  # not "every op"
    assert "--op was given no name" in capsys.readouterr().err


def test_list_needs_no_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runner.run(_args("--list", "--quick", "--op", "sparse")) == 0
    out = capsys.readouterr().out
    n = len(sparse.cases(quick=True))
    assert f"{n} cases" in out and "sparse/linformer" in out and "flex" in out


@pytest.mark.parametrize("family", runner.FAMILIES)
def test_case_enumeration(family):
    full = runner.all_cases(quick=False, families=(family,))
    quick = runner.all_cases(quick=True, families=(family,))
    assert full and quick
    ids = [c.id for c in full]
    assert len(ids) == len(set(ids)), "case names must be unique"
    assert {c.id for c in quick} <= set(ids)
    for c in full:
        assert c.family == family and c.op in runner.OPS_BY_FAMILY[family]
        assert c.work > 0 and c.metric in ("TFLOP/s", "GB/s")
        assert c.x_key in c.params and c.series
        names = [i.name for i in c.impls]
        assert len(names) == len(set(names))
        assert any(i.ours for i in c.impls) and any(not i.ours for i in c.impls)


def test_quick_selection_stays_small():
    quick = runner.all_cases(quick=True)
    assert 20 <= len(quick) <= 51
    assert {c.family for c in quick} == set(runner.FAMILIES)


def test_select_by_op_and_family():
    ln = runner.select_cases(["layer_norm"], quick=False)
    assert ln and all(c.op == "layer_norm" for c in ln)
    mixed = runner.select_cases(["sparse", "gelu"], quick=True)
    assert {c.family for c in mixed} == {"sparse", "norms"}
    assert all(c.op == "gelu" for c in mixed if c.family == "norms")
    with pytest.raises(ValueError, match="unknown --op"):
        runner.select_cases(["nope"])


def test_case_shapes_follow_the_issues():
    for c in attention.cases():
        p = c.params
        if p.get("kind") == "long":
            assert p["B"] * p["Lq"] == 16384 and p["H"] * p["D"] == 2048
        elif p.get("kind") == "bert":
            assert (p["B"], p["H"], p["D"]) == (32, 12, 64) and p["Lq"] in (128, 512)
        elif p.get("kind") == "local":  # ModernBERT's local layers
            assert p["B"] * p["Lq"] == 16384 and p["window"] == [64, 64] and p["H"] == 12
        elif p.get("kind") == "gqa":    # Llama-style grouped-query heads
            assert p["B"] * p["Lq"] == 16384 and (p["H"], p["Hkv"], p["D"]) == (32, 8, 128)
            assert p["Lq"] in (2048, 8192) and c.dtype == torch.float16
        else:  # varlen: lengths average about half the maximum
            assert 0.35 * p["Lmax"] <= p["mean_len"] <= 0.65 * p["Lmax"]
            assert max(p["seqlens"]) == p["Lmax"] and sum(p["seqlens"]) == p["total"]
    for c in sparse.cases():
        if c.op == "block_sparse_attention":
            assert 4096 <= c.params["L"] <= 16384 and c.params["B"] * c.params["L"] == 16384
            assert abs(c.params["density"] - c.params["target_density"]) < 0.01
    for c in norms.cases():
        assert c.params["rows"] == 16384 and c.params["N"] in (768, 1024, 4096, 8192)
    for c in bert.cases():
        assert c.params["B"] == 32 and c.params["L"] in ((512, 1024) if c.params["arch"] == "modernbert"
                                                         else (128, 512))
        if c.params["fill"] == "half":
            assert 0.35 * c.params["L"] <= c.params["mean_len"] <= 0.65 * c.params["L"]


# ----------------------------------------------------------------------------------------------
# Work formulas
# ----------------------------------------------------------------------------------------------
def test_attention_flops():
    assert common.attention_flops(2, 3, 5, 7, 8) == 4 * 2 * 3 * 5 * 7 * 8
    assert common.attention_flops(2, 3, 7, 7, 8, causal=True) == 2 * 2 * 3 * 7 * 7 * 8
    with pytest.raises(ValueError, match="Lq == Lk"):  # which pairs a causal Lq != Lk mask keeps
        common.attention_flops(2, 3, 5, 7, 8, causal=True)  # depends on its alignment
    with pytest.raises(ValueError, match="Lk == Lq"):
        attention.dense_case(2, 2, 64, 64, torch.float16, lk=128, causal=True)
    assert common.attention_flops(1, 1, 4, 4, 8, pass_="bwd") == 2.5 * 4 * 4 * 4 * 8
    assert common.attention_flops(1, 1, 4, 4, 8, pass_="fwd+bwd") == 3.5 * 4 * 4 * 4 * 8
    assert common.attention_flops(1, 1, 4, 4, 8, dv=16) == 2 * 4 * 4 * 8 + 2 * 4 * 4 * 16
    assert common.varlen_attention_flops([3, 5], 2, 8) == 4 * 2 * 8 * (9 + 25)


def test_block_sparse_flops_counts_visited_pairs():
    layout = torch.tensor([[[1, 0, 1], [0, 1, 0]], [[1, 1, 1], [0, 0, 1]]], dtype=torch.bool)
    lq, lk, bs, d, b = 40, 70, 32, 8, 3        # last block row/column shorter than 32
    pairs = int(reference.layout_to_mask(layout, bs, lq, lk).sum())
    assert common.block_sparse_flops(layout, bs, b, 2, lq, lk, d) == 4.0 * b * d * pairs
    shared = layout[:1]
    pairs1 = int(reference.layout_to_mask(shared, bs, lq, lk).sum())
    assert common.block_sparse_flops(shared, bs, b, 5, lq, lk, d) == 4.0 * b * d * pairs1 * 5


def test_sparse_case_work_matches_its_layout():
    c = sparse.sparse_case(1, 4, 1024, 64, 0.25)
    lay = sparse.random_layout(4, 8, 8, 0.25, seed=1000 * 1024 + 25 + 64)
    assert c.work == common.block_sparse_flops(lay, 128, 1, 4, 1024, 1024, 64)
    dense = [i for i in c.impls if i.variant == "dense"]
    assert dense and all(i.work == common.attention_flops(1, 4, 1024, 1024, 64) for i in dense)


@pytest.mark.parametrize("pass_,factor", [("bwd", 2.5), ("fwd+bwd", 3.5)])
def test_sparse_case_work_counts_the_pass(pass_, factor):
    """The backward block-sparse cases (published as 'sparse bwd') count 2.5x the forward's flops
    (3.5x forward + backward), both fastbert's visited blocks (L a multiple of the block: the
    shortcut 4 * D * blocks * block^2) and the dense baselines' full L x L: dropping the pass
    factor from either publishes a rate 2.5x off (its speedups, by time, would not show it)."""
    b, h, l, d, block = 2, 4, 1024, 64, 128
    c = sparse.sparse_case(b, h, l, d, 0.25, pass_=pass_)
    assert c.pass_ == pass_ and l % block == 0
    lay = sparse.random_layout(h, 8, 8, 0.25, seed=1000 * l + 25 + d)
    assert int(lay.sum()) == h * 16                  # round(0.25 * 8 * 8) blocks per head
    assert c.work == factor * 4 * b * d * h * 16 * block * block
    dense = [i for i in c.impls if i.variant == "dense"]
    assert len(dense) == 2 and all(i.work == factor * 4 * b * h * l * l * d for i in dense)
    assert all(c.work_of(i) == c.work for i in c.impls if i.variant is None)


def test_random_layout():
    lay = sparse.random_layout(3, 10, 10, 0.3, seed=7)
    assert lay.dtype == torch.bool and lay.shape == (3, 10, 10)
    assert (lay.sum(dim=(1, 2)) == 30).all()
    assert lay.diagonal(dim1=1, dim2=2).all()
    assert torch.equal(lay, sparse.random_layout(3, 10, 10, 0.3, seed=7))
    assert not torch.equal(lay, sparse.random_layout(3, 10, 10, 0.3, seed=8))
    assert sparse.random_layout(1, 6, 6, 0.01).sum() == 6   # never fewer than the diagonal
    with pytest.raises(ValueError):
        sparse.random_layout(1, 4, 4, 0.0)


def test_linformer_and_bert_flops():
    b, h, n, k, d = 2, 3, 64, 8, 16
    proj = 2 * 2 * b * h * k * n * d
    assert common.linformer_flops(b, h, n, n, k, d) == proj + 4 * b * h * n * k * d
    # BERT-base at B32 L384 is 2.26 TFLOP forward (shared/ANCHORS.md)
    assert common.bert_flops([384] * 32) == pytest.approx(2.26e12, rel=0.01)
    assert common.bert_flops([10, 20], hidden=4, layers=1, intermediate=16) == \
        2 * 30 * (4 * 16 + 2 * 4 * 16) + 4 * (100 + 400) * 4
    lin = 12 * 2 * 128 * (4 * 768 ** 2 + 2 * 768 * 3072)
    att = 12 * 4 * 128 ** 2 * 768
    assert common.bert_flops([128], pass_="fwd+bwd") == pytest.approx(3 * lin + 3.5 * att)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_modernbert_flops(pass_):
    """ModernBERT: the GeGLU MLP (Wi: h -> 2i, Wo: i -> h) and Wqkv / Wo in every layer; attention
    over every pair in the global layers (0, 3, 6, ...) and over the pairs with |q - k| <= window in
    the others, counted here pair by pair."""
    h, i, layers, every, w = 8, 12, 5, 3, 2
    lens = [1, 2, 4, 7]
    lin_f, att_f = common.LINEAR_FLOP_FACTOR[pass_], common.PASS_FLOP_FACTOR[pass_]
    want = 0.0
    for layer in range(layers):
        for n in lens:
            pairs = sum(1 for q in range(n) for k in range(n) if layer % every == 0 or abs(q - k) <= w)
            want += 2 * n * (4 * h * h + 3 * h * i) * lin_f + 4 * h * pairs * att_f
    got = common.modernbert_flops(lens, hidden=h, layers=layers, intermediate=i, global_every=every,
                                  window=w, pass_=pass_)
    assert got == pytest.approx(want, rel=1e-12)
    # one global layer in one: BERT's attention term, with the GeGLU's 3hi in place of BERT's 2hi
    assert common.modernbert_flops([9], hidden=h, layers=1, intermediate=i, pass_=pass_) == \
        pytest.approx(common.bert_flops([9], hidden=h, layers=1, intermediate=1.5 * i, pass_=pass_))
    with pytest.raises(ValueError, match="global_every"):
        common.modernbert_flops(lens, global_every=0)
    # the same layers named one by one, as a transformers 5.x config lists them
    types = ["full_attention" if layer % every == 0 else "sliding_attention" for layer in range(layers)]
    assert common.modernbert_flops(lens, hidden=h, layers=layers, intermediate=i, window=w,
                                   pass_=pass_, layer_types=types) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="layer_types"):
        common.modernbert_flops(lens, layers=2, layer_types=["full_attention"])
    with pytest.raises(ValueError, match="layer_types"):
        common.modernbert_flops(lens, layers=1, layer_types=["global"])


def test_modernbert_case_counts_its_own_flops():
    pytest.importorskip("transformers")
    tiny = dict(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                global_attn_every_n_layers=2, local_attention=4)
    case = bert.bert_case(3, 12, "half", dtype=torch.float32, config=tiny, arch="modernbert")
    assert case.work == common.modernbert_flops(case.params["seqlens"], hidden=16, layers=4,
                                                intermediate=32, global_every=2, window=2)
    assert case.work != common.bert_flops(case.params["seqlens"], hidden=16, layers=4, intermediate=32)


def test_modernbert_case_counts_the_layer_types_of_its_config():
    """transformers 5.x lets a config list its layers' attention types; the case counts the list
    the model is built from (here 3 global layers of 4, where every 2nd would give 2)."""
    transformers = pytest.importorskip("transformers")
    types = ["full_attention", "full_attention", "sliding_attention", "full_attention"]
    tiny = dict(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                global_attn_every_n_layers=2, local_attention=4, layer_types=types)
    if "layer_types" not in transformers.ModernBertConfig().to_dict():
        pytest.skip(f"transformers {transformers.__version__}'s ModernBertConfig has no layer_types")
    case = bert.bert_case(3, 12, "half", dtype=torch.float32, config=tiny, arch="modernbert")
    lens = case.params["seqlens"]
    assert case.work == common.modernbert_flops(lens, hidden=16, layers=4, intermediate=32,
                                                window=2, layer_types=types)
    assert case.work != common.modernbert_flops(lens, hidden=16, layers=4, intermediate=32,
                                                global_every=2, window=2)


@pytest.mark.parametrize("pass_,lin,att", [("bwd", 2.0, 2.5), ("fwd+bwd", 3.0, 3.5)])
def test_linformer_and_bert_flops_of_the_backward(pass_, lin, att):
    """The projections E K and F V, like BERT's linear layers, are plain matmuls: their backward
    is 2x their forward (dX and dW), so forward + backward counts 3x, while attention counts
    2.5x / 3.5x; the published Linformer 'fwd+bwd' cases (and the case's work) use this."""
    b, h, n, k, d = 2, 3, 64, 8, 16
    proj = 2 * 2 * b * h * k * n * d
    attention_work = 4 * b * h * n * k * d
    assert common.linformer_flops(b, h, n, n, k, d, pass_=pass_) == lin * proj + att * attention_work
    case = sparse.linformer_case(b, h, n, k, d, pass_=pass_)
    assert case.work == lin * proj + att * attention_work
    assert common.bert_flops([10, 20], hidden=4, layers=1, intermediate=16, pass_=pass_) == \
        lin * 2 * 30 * (4 * 16 + 2 * 4 * 16) + att * 4 * (100 + 400) * 4


@pytest.mark.parametrize("pass_,factor", [("fwd", 1.0), ("bwd", 2.5), ("fwd+bwd", 3.5)])
def test_key_padding_case_counts_the_real_keys_only(pass_, factor):
    """The dense '-pad' cases count the useful flops, as the varlen and BERT cases do: each query
    attends only its sequence's real keys (the mask the case gives every implementation), so the
    work is 4 * D * H * (unmasked query-key pairs) (x2.5 bwd, x3.5 fwd+bwd), the sum over the
    batch of 4 * H * Lq * len_b * D, not the full 4 * B * H * Lq * Lk * D: fastbert's kernels skip
    the padded keys, and crediting it with them doubled its TFLOP/s and % of ceiling."""
    b, h, lq, lk, d = 4, 3, 24, 40, 16
    case = attention.dense_case(b, h, lq, d, torch.float32, lk=lk, key_padding=True, pass_=pass_)
    s = case.setup("cpu")
    lens = s.lens.tolist()
    assert lens == attention.seqlens(b, lk, seed=lk) and max(lens) == lk and min(lens) < lk
    pairs = int(s.mask.expand(b, 1, lq, lk).sum())   # the attended pairs of the mask itself
    assert pairs == lq * sum(lens)
    assert case.work == factor * 4 * d * h * pairs
    assert case.work == factor * sum(4 * h * lq * n * d for n in lens)
    assert case.work < common.attention_flops(b, h, lq, lk, d, pass_=pass_)
    assert case.params["mean_len"] == sum(lens) / b
    # the unpadded case still counts every key
    plain = attention.dense_case(b, h, lq, d, torch.float32, lk=lk, pass_=pass_)
    assert plain.work == factor * 4 * b * h * lq * lk * d


def test_norm_bytes():
    # LayerNorm of 16384 x 768 fp16 moves 50 MB (shared/ANCHORS.md)
    assert common.norm_bytes("layer_norm", "fwd", 16384, 768, 2) == 2 * 16384 * 768 * 2 + 2 * 768 * 2
    assert common.norm_bytes("layer_norm", "fwd", 16384, 768, 2) == pytest.approx(50.3e6, rel=0.01)
    # bias + GELU of 16384 x 3072 fp16: ~201 MB (67 us at 3 TB/s)
    assert common.norm_bytes("bias_gelu", "fwd", 16384, 3072, 2) == pytest.approx(201.3e6, rel=0.01)
    r, n, s = 10, 8, 2
    assert common.norm_bytes("add_layer_norm", "fwd", r, n, s) == 3 * r * n * s + 3 * n * s
    assert common.norm_bytes("add_layer_norm", "bwd", r, n, s) == 4 * r * n * s + 5 * n * s
    # geglu: the input holds 2N columns; forward reads it and writes N, backward reads dy and it
    assert common.norm_bytes("geglu", "fwd", r, n, s) == (2 + 1) * r * n * s
    assert common.norm_bytes("geglu", "fwd+bwd", r, n, s) == (3 + 1 + 2 + 2) * r * n * s
    # mixed precision: fp16 input, fp32 residual / parameters / results; two input gradients
    assert common.norm_bytes("add_layer_norm", "fwd", r, n, 2, 4, 4) == r * n * (2 + 4 + 4) + 3 * n * 4
    assert common.norm_bytes("add_layer_norm", "bwd", r, n, 2, 4, 4) == r * n * (4 + 2 + 4 + 2 + 4) + 5 * n * 4
    with pytest.raises(ValueError, match="residual_itemsize"):
        common.norm_bytes("layer_norm", "fwd", r, n, 2, 4, 4)
    assert common.norm_bytes("gelu", "bwd", r, n, s) == 3 * r * n * s
    assert common.norm_bytes("gelu", "fwd+bwd", r, n, s) == 5 * r * n * s
    with pytest.raises(ValueError):
        common.norm_bytes("softmax", "fwd", r, n, s)


def test_add_layer_norm_bytes_of_the_training_forms():
    """With dropout the mask is regenerated from a seed (never moved): the forward moves what it
    moves without dropout; the backward writes the input's gradient apart from the residual's.
    return_residual writes the pre-norm sum in the forward."""
    r, n, s = 10, 8, 2
    big, vec = r * n * s, n * s
    alb = norms.add_layer_norm_bytes
    assert alb("fwd", r, n, s) == common.norm_bytes("add_layer_norm", "fwd", r, n, s)
    assert alb("bwd", r, n, s) == common.norm_bytes("add_layer_norm", "bwd", r, n, s)
    assert alb("fwd", r, n, s, dropout=True) == 3 * big + 3 * vec
    assert alb("bwd", r, n, s, dropout=True) == 5 * big + 5 * vec  # dy, x, r in; dx, dr out
    assert alb("fwd+bwd", r, n, s, dropout=True) == 8 * big + 8 * vec
    assert alb("fwd", r, n, s, dropout=True, return_residual=True) == 4 * big + 3 * vec
    # mixed precision already writes the two input gradients apart
    assert alb("bwd", r, n, 2, 4, 4, dropout=True) == common.norm_bytes("add_layer_norm", "bwd",
                                                                          r, n, 2, 4, 4)
    assert alb("fwd", r, n, 2, 4, 4, return_residual=True) == r * n * (2 + 4 + 4 + 4) + 3 * n * 4
    with pytest.raises(ValueError, match="forward only"):
        alb("bwd", r, n, s, dropout=True, return_residual=True)
    # BERT-base's training output sublayer, 16384 x 768 fp16: 75.5 MB forward, 125.8 MB backward
    assert alb("fwd", 16384, 768, 2, dropout=True) == pytest.approx(75.5e6, rel=0.001)
    assert alb("bwd", 16384, 768, 2, dropout=True) == pytest.approx(125.8e6, rel=0.001)


def test_add_layer_norm_dropout_cases():
    drop = [c for c in norms.cases() if c.params.get("dropout_p")]
    assert {(c.pass_, c.dtype, c.params["N"], bool(c.params.get("return_residual")))
            for c in drop} == {(p, d, n, rr) for p in ("fwd", "bwd")
                               for d in (torch.float16, torch.bfloat16) for n in norms.WIDTHS
                               for rr in ((False, True) if p == "fwd" else (False,))}
    assert all(c.params["dropout_p"] == norms.DROPOUT_P == 0.1 for c in drop)
    assert sorted(c.name for c in drop if c.quick) == [
        "add_layer_norm-bwd-R16384-N768-fp16-dropout0.1",
        "add_layer_norm-fwd-R16384-N768-fp16-dropout0.1"]
    for c in drop:
        rr = bool(c.params.get("return_residual"))
        assert c.name.endswith("-dropout0.1" + ("-return_residual" if rr else ""))
        assert c.series.endswith("dropout 0.1" + (" return_residual" if rr else ""))
        assert c.work == norms.add_layer_norm_bytes(c.pass_, 16384, c.params["N"], 2, 2, 2,
                                                    dropout=True, return_residual=rr)
        assert [i.name for i in c.impls] == ["fastbert-triton", "fastbert-cuda", "torch-eager",
                                             "torch-compile"]
    with pytest.raises(ValueError, match="forward with dropout"):
        norms.norm_case("add_layer_norm", 768, pass_="bwd", dropout_p=0.1, return_residual=True)
    with pytest.raises(ValueError, match="forward with dropout"):
        norms.norm_case("add_layer_norm", 768, return_residual=True)
    with pytest.raises(ValueError, match="for add_layer_norm"):
        norms.norm_case("layer_norm", 768, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        norms.norm_case("add_layer_norm", 768, dropout_p=1.0)


def test_metric_value_and_ceiling_fraction():
    from fastbert.benchmarks.ceilings import copy_bytes, fraction_of_ceiling, matmul_flops

    assert report.metric_value("TFLOP/s", 2e12, 1000.0) == pytest.approx(2.0)
    assert report.metric_value("GB/s", 3e9, 1.0) == pytest.approx(3000.0)
    assert report.metric_value("GB/s", 3e9, None) is None
    assert copy_bytes(100) == 200 and matmul_flops(10) == 2000
    ceil = {"copy_gbps": 3000.0, "matmul_tflops": 800.0}
    assert fraction_of_ceiling("GB/s", 1500.0, ceil) == 0.5
    assert fraction_of_ceiling("TFLOP/s", 200.0, ceil) == 0.25
    assert fraction_of_ceiling("TFLOP/s", 200.0, None) is None


# ----------------------------------------------------------------------------------------------
# Timing statistics
# ----------------------------------------------------------------------------------------------
def test_quantiles_match_numpy():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 17):
        xs = torch.rand(n, generator=g).tolist()
        t = timing.summarize(xs, "events")
        assert t.reps == n
        for q, v in ((0.2, t.p20_ms), (0.5, t.p50_ms), (0.8, t.p80_ms)):
            assert v == pytest.approx(float(np.percentile(xs, 100 * q)))
    with pytest.raises(ValueError):
        timing.quantile([], 0.5)


def test_rotation_count():
    l2 = 50 << 20
    assert timing.rotation_count(3 * l2, l2) == 1
    assert timing.rotation_count(l2, l2) == 3
    assert timing.rotation_count(67_115_008, 52_428_800) == 3  # BERT-size LN fwd on an H100's L2
    assert timing.rotation_count(2 * l2 + 1, l2) == 2
    assert timing.rotation_count(10 << 20, l2) == 8
    assert timing.rotation_count(40 << 20, l2) == 4
    assert timing.rotation_count(1 << 20, 0) == 1


class _FakeCuda:
    """torch.cuda's timing surface on a simulated clock (milliseconds): a call ``fn`` made outside
    a capture takes ``per_call_ms``; inside ``graph(g)`` it is recorded into ``g``, and each
    ``g.replay()`` takes the recorded calls' time. Events read the clock."""

    def __init__(self, per_call_ms):
        self.per_call_ms, self.now, self.capturing, self.captured = per_call_ms, 0.0, None, []
        cuda = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = cuda.now

            def elapsed_time(self, end):
                return end.t - self.t

        class CUDAGraph:
            def __init__(self):
                self.recorded = 0

            def replay(self):
                cuda.now += self.recorded * cuda.per_call_ms

        class Stream:
            def wait_stream(self, other):
                pass

        self.Event, self.CUDAGraph, self.Stream = Event, CUDAGraph, Stream

    def call(self, i):
        if self.capturing is not None:
            self.captured.append(i)
            self.capturing.recorded += 1
        else:
            self.now += self.per_call_ms

    def graph(self, g):
        @contextlib.contextmanager
        def capture():
            self.capturing = g
            try:
                yield
            finally:
                self.capturing = None
        return capture()

    def stream(self, s):
        return contextlib.nullcontext()

    def current_stream(self):
        return self.Stream()

    def synchronize(self):
        pass


def test_cuda_graph_timing_is_per_call(monkeypatch):
    """A launch-bound call is timed as replays of a graph holding ``calls`` calls (one rotation
    over the input sets, repeated to at least GRAPH_MIN_CALLS): each replay's time is divided by
    the calls it holds, or every such case would read ~20x too slow. Runs the real
    CudaTimer.measure on a simulated CUDA clock (a call = 1/16 ms, exact in binary)."""
    fake = _FakeCuda(per_call_ms=0.0625)
    monkeypatch.setattr(timing, "torch", types.SimpleNamespace(cuda=fake))
    timer = timing.CudaTimer(rep_ms=10.0)
    monkeypatch.setattr(timer, "_flush", lambda: None)
    t = timer.measure(fake.call, n_inputs=3, graph=True)
    calls = 3 * -(-timing.GRAPH_MIN_CALLS // 3)          # 21: whole rotations over 3 input sets
    assert t.method == "cudagraph" and t.note == f"{calls} calls per graph replay"
    assert t.p20_ms == t.p50_ms == t.p80_ms == 0.0625
    assert t.reps >= timer.min_reps and fake.captured == list(range(calls))
    # a call too long for a graph, or graph=False, is timed with events, per call too
    slow = _FakeCuda(per_call_ms=0.5)       # over GRAPH_BELOW_MS
    monkeypatch.setattr(timing, "torch", types.SimpleNamespace(cuda=slow))
    t = timer.measure(slow.call, n_inputs=3, graph=True)
    assert t.method == "events" and t.p50_ms == 0.5 and slow.captured == []


def test_copy_ceiling_counts_the_bytes_it_moves():
    """The copy ceiling divides the bytes the copy reads plus writes (2x its buffer) by its time:
    a timer that sees the copy's real buffer (meta tensors: nothing allocated) on a device moving
    1000 GB/s and computing 500 TFLOP/s gets exactly those ceilings back."""
    from fastbert.benchmarks import ceilings

    class Timer:
        def measure(self, fn):
            out = fn(0)
            if out.dtype == torch.float16:                       # the copy: dst returned
                moved = 2 * out.numel() * out.element_size()     # src read, dst written
                ms = moved / 1000e9 * 1e3
            else:                                                # the (n x n) @ (n x n) matmul
                n = out.shape[0]
                ms = 2.0 * n ** 3 / 500e12 * 1e3
            return timing.Timing(ms, ms, ms, 1, "fake")

    for quick in (True, False):
        c = ceilings.measure_ceilings(Timer(), quick=quick, device="meta")
        assert c.copy_gbps == pytest.approx(1000.0) and c.matmul_tflops == pytest.approx(500.0)
        assert c.copy_bytes == (512 << 20 if quick else 2 << 30) and c.matmul_n == 8192


@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwd+bwd"])
def test_timed_calls_rotate_over_the_input_sets(pass_):
    """Call i of a timed function uses input set i % n in every pass, the backward included (its
    forwards run once per set, outside the timing, and call i back-propagates set i % n's):
    rotating keeps the inputs out of L2 between calls, as in a model."""
    seen = []

    def forward(s):
        seen.append(s.k)
        return s.x * 2.0

    states = [common.ns(k=k, x=torch.ones(3, requires_grad=pass_ != "fwd"),
                        do=torch.full((3,), float(k + 1))) for k in range(3)]
    case = _toy_case([], pass_)
    fn = runner._timed_fn(case, Prepared(forward), states, lambda s: s.do)
    if pass_ == "bwd":
        assert seen == [0, 1, 2]                         # the forwards, outside the timing
        seen.clear()
    for i in range(6):
        fn(i)
    if pass_ == "bwd":
        assert seen == []
    else:
        assert seen == [0, 1, 2, 0, 1, 2]
    if pass_ != "fwd":   # each set back-propagated twice: 2 * (2 * do)
        for k, s in enumerate(states):
            assert torch.equal(s.x.grad, torch.full((3,), 4.0 * (k + 1))), k


# ----------------------------------------------------------------------------------------------
# Running cases on CPU: checks gate the timing; failures become rows
# ----------------------------------------------------------------------------------------------
SMOKE_IMPLS = ["sdpa-math", "fastbert-cuda", "torch-eager", "torch-linformer", "sdpa-dense"]


def test_run_cases_on_cpu_end_to_end(capsys):
    cases = [
        attention.dense_case(2, 3, 48, 16, torch.float32, key_padding=True, pass_="fwd+bwd"),
        attention.varlen_case(3, 40, 2, 16, torch.float32, pass_="fwd"),
        sparse.linformer_case(1, 2, 64, 8, 16, dtype=torch.float32, pass_="fwd+bwd"),
        norms.norm_case("add_layer_norm", 40, torch.float32, pass_="bwd", rows=17),
        norms.norm_case("add_layer_norm", 40, torch.float16, pass_="bwd", rows=17,
                        residual_dtype=torch.float32),
        norms.norm_case("geglu", 40, torch.float32, pass_="fwd+bwd", rows=17),
    ]
    seen = []
    rows = runner.run_cases(cases, device="cpu", timer=timing.CpuTimer(reps=2),
                            impl_filter=SMOKE_IMPLS, progress=False,
                            ceilings={"copy_gbps": 1.0, "matmul_tflops": 1.0},
                            on_case=lambda rs: seen.append(len(rs)))
    assert len(seen) == len(cases) and sum(seen) == len(rows)
    by = {(r["case"], r["impl"]): r for r in rows}
    for case, impl in [(cases[0].name, "sdpa-math"), (cases[1].name, "sdpa-math-padded"),
                       (cases[2].name, "torch-linformer"), (cases[2].name, "sdpa-dense"),
                       (cases[3].name, "torch-eager"), (cases[4].name, "torch-eager"),
                       (cases[5].name, "torch-eager")]:
        r = by[(case, impl)]
        assert r["status"] == "ok", r
        assert r["check"] and "worst error" in r["check"]
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["timing"] == "cpu"
        assert r["value"] > 0 and r["pct_of_ceiling"] is not None
    assert by[(cases[4].name, "torch-eager")]["dtype"] == "fp16+fp32"
    assert cases[4].name.endswith("-fp16+fp32")
    cuda = by[(cases[0].name, "fastbert-cuda")]
    assert cuda["status"] == "unavailable" and cuda["reason"]
    # the Linformer case's dense baseline is credited with dense flops
    assert by[(cases[2].name, "sdpa-dense")]["work"] == common.attention_flops(1, 2, 64, 64, 16,
                                                                                 pass_="fwd+bwd")
    text = report.format_table(rows, {"copy_gbps": 1.0, "matmul_tflops": 1.0})
    assert cases[0].name in text and "not run here" in text


def test_liger_geglu_peer_gets_two_contiguous_inputs(monkeypatch):
    """Liger's GEGLU copies non-contiguous inputs inside the call; the peer is given the two
    contiguous tensors it gets in real use (a fake Liger module here, which refuses strided
    inputs), and its two gradients are checked as the packed input's."""
    seen = []

    class FakeGELUMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            if not (a.is_contiguous() and b.is_contiguous()):
                raise AssertionError("strided inputs reached the fake Liger kernel")
            seen.append(a.shape)
            ctx.save_for_backward(a, b)
            return torch.nn.functional.gelu(a, approximate="tanh") * b

        @staticmethod
        def backward(ctx, g):
            a, b = ctx.saved_tensors
            with torch.enable_grad():
                a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
                out = torch.nn.functional.gelu(a_, approximate="tanh") * b_
                return torch.autograd.grad(out, (a_, b_), g)

    fake = types.ModuleType("liger_kernel.ops.geglu")
    fake.LigerGELUMulFunction = FakeGELUMul
    for name in ("liger_kernel", "liger_kernel.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.geglu", fake)
    cases = [norms.norm_case("geglu", 40, torch.float32, pass_=p, rows=17) for p in ("fwd", "bwd")]
    rows = runner.run_cases(cases, device="cpu", timer=timing.CpuTimer(reps=2),
                            impl_filter=["liger"], progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert all("worst error" in r["check"] for r in rows) and seen
    assert all(s == (17, 40) for s in seen)


def _triton_runs_here():
    from fastbert import backends

    return not backends.backend_reasons("triton", torch.device("cpu"), explicit=True)


@pytest.mark.parametrize("pass_, dtype, return_residual, compiled", [
    ("fwd", torch.float16, False, True), ("fwd", torch.float32, True, True),
    ("bwd", torch.float16, False, True), ("bwd", torch.float32, False, False)])
def test_dropout_case_runs_on_cpu(pass_, dtype, return_residual, compiled):
    """add_layer_norm with dropout 0.1, tiny: fastbert's Triton kernels (the interpreter), torch
    eager and torch.compile (CPU inductor) each pass the check on their own mask, read off the
    probe run that replays their generator; the CUDA backend is unavailable here."""
    case = norms.norm_case("add_layer_norm", 40, dtype, pass_=pass_, rows=17, dropout_p=0.1,
                           return_residual=return_residual)
    impls = ["fastbert-triton", "fastbert-cuda", "torch-eager"] + (["torch-compile"] if compiled else [])
    rows = runner.run_cases([case], device="cpu", timer=timing.CpuTimer(reps=2), impl_filter=impls,
                            progress=False, ceilings={"copy_gbps": 1.0, "matmul_tflops": 1.0})
    by = {r["impl"]: r for r in rows}
    assert sorted(by) == sorted(impls)
    ran = ["torch-eager"] + (["torch-compile"] if compiled else [])
    if _triton_runs_here():
        ran.append("fastbert-triton")
    else:
        assert by["fastbert-triton"]["status"] == "unavailable"
    for name in ran:
        r = by[name]
        assert r["status"] == "ok", r
        assert "worst error" in r["check"] and r["value"] > 0
        assert r["work"] == norms.add_layer_norm_bytes(pass_, 17, 40, dtype.itemsize, dtype.itemsize,
                                                       dtype.itemsize, dropout=True,
                                                       return_residual=return_residual)
    assert by["fastbert-cuda"]["status"] == "unavailable" and by["fastbert-cuda"]["reason"]


P = 0.1


def _ln(s, w, b):
    return torch.nn.functional.layer_norm(s, (s.shape[-1],), w, b, 1e-5)


def _unscaled(x, r, w, b, ib, ret):
    """Drops, but forgets the 1 / (1 - p) scale of the kept elements."""
    s = torch.nn.functional.dropout(x + ib, P, training=True) * (1 - P) + r
    return (_ln(s, w, b), s) if ret else _ln(s, w, b)


def _fastbert_unscaled(x, r, w, b, ib, ret):
    """fastbert's Triton kernel on input and input_bias times (1 - p): its own (seed-regenerated)
    mask, kept elements without the 1 / (1 - p) scale."""
    from fastbert import add_layer_norm

    return add_layer_norm(x * (1 - P), r, w, b, 1e-5, input_bias=ib * (1 - P), dropout_p=P,
                          return_residual=ret, backend="triton")


def _other_mask_in_backward(x, r, w, b, ib, ret):
    """The right forward, with the gradients of another mask."""
    s = torch.nn.functional.dropout(x + ib, P, training=True) + r
    other = _ln(torch.nn.functional.dropout(x + ib, P, training=True) + r, w, b)
    out = _ln(s, w, b).detach() + (other - other.detach())
    return (out, s) if ret else out


def _timed_call_draws_another_mask(x, r, w, b, ib, ret):
    """Right in the form the probe runs; the timed form draws a random number more first."""
    if not ret:
        torch.rand((), device=x.device)
    return norms._add_ln_dropout_eager(x, r, w, b, ib, P, ret)


def _drops_too_much(x, r, w, b, ib, ret):
    """Drops 30%, scaled as if it dropped 10%: every value is 0 or 1 / (1 - 0.1) in the probe."""
    s = torch.nn.functional.dropout(x + ib, 0.3, training=True) * (0.7 / 0.9) + r
    return (_ln(s, w, b), s) if ret else _ln(s, w, b)


def _fake_dropout_impl(name, fn):
    """A deliberately wrong add_layer_norm with dropout, built as the case's implementations are
    (so that the check gets its mask probe)."""
    def make_run(case, s):
        return lambda st, ret: fn(st.x, st.residual, st.weight, st.bias, st.input_bias, ret)
    return norms._dropout_impl(name, make_run, False)


@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
def test_dropout_check_catches_wrong_kernels(pass_):
    """The dropout check fails a kernel that forgets the 1 / (1 - p) scale (torch's dropout, or
    fastbert's own kernel fed pre-scaled inputs), whose gradients come from another mask (bwd only:
    its forward is right and passes), whose timed call draws another mask than the probe, whose
    kept fraction is off, or that left no probe; torch eager passes alongside."""
    case = norms.norm_case("add_layer_norm", 40, torch.float32, pass_=pass_, rows=17, dropout_p=P)
    fakes = [("unscaled", _unscaled), ("other-mask-in-backward", _other_mask_in_backward),
             ("timed-call-draws-another-mask", _timed_call_draws_another_mask),
             ("drops-too-much", _drops_too_much)]
    if _triton_runs_here():
        fakes.append(("fastbert-unscaled", _fastbert_unscaled))
    case.impls += [_fake_dropout_impl(name, fn) for name, fn in fakes]
    case.impls.append(Impl("no-probe", lambda c, s: Prepared(
        lambda st: norms._add_ln_dropout_eager(*norms._inputs("add_layer_norm", st), P))))
    rows = runner.run_cases([case], device="cpu", timer=timing.CpuTimer(reps=1),
                            impl_filter=["torch-eager"] + [n for n, _ in fakes] + ["no-probe"],
                            progress=False)
    by = {r["impl"]: r for r in rows}
    assert by["torch-eager"]["status"] == "ok", by["torch-eager"]
    expected = {"unscaled": "pre-norm sum of the mask probe",
                "fastbert-unscaled": "pre-norm sum of the mask probe",
                "other-mask-in-backward": "grad x" if pass_ == "bwd" else None,
                "timed-call-draws-another-mask": "output", "drops-too-much": "kept fraction",
                "no-probe": "no probe run recorded"}
    for name, what in expected.items():
        if name not in by:
            continue
        r = by[name]
        if what is None:
            assert r["status"] == "ok", r
            continue
        assert r["status"] == "wrong", r
        assert what in r["reason"] and r["p50_ms"] is None, r


def _toy_case(impls, pass_="fwd", check=True):
    def setup(device):
        x = torch.randn(8, 4, device=device).requires_grad_(pass_ != "fwd")
        return common.ns(device=torch.device(device), x=x, do=torch.randn(8, 4))

    def chk(s, out, grads, variant):
        items = [("output", out, torch.tanh(s.x.detach().double()), torch.tanh(s.x.detach()))]
        items += [("grad x", g, (1 - torch.tanh(s.x.detach().double()) ** 2) * s.do.double(), None)
                  for g in grads]
        return common.compare(items)

    return Case("norms", "gelu", f"toy-{pass_}", pass_, torch.float32, {"N": 4}, "GB/s", 256.0, "N",
                "toy", setup, impls, leaves=lambda s: [s.x], check=chk if check else None)


def _impl(name, fn, **kw):
    return Impl(name, lambda case, s: Prepared(lambda st: fn(st.x)), **kw)


def test_wrong_results_are_caught_before_timing():
    calls = []

    def wrong(x):
        calls.append(1)
        return torch.tanh(x) * 1.001

    def broken(x):
        raise RuntimeError("kernel exploded\nmore text")

    def unavailable(case, s):
        raise Unavailable("needs a GPU with 1 TB of memory")

    impls = [_impl("good", torch.tanh), _impl("fastbert-wrong", wrong, ours=True),
             _impl("fastbert-broken", broken, ours=True), Impl("peer-missing", unavailable)]
    for pass_ in ("fwd", "bwd", "fwd+bwd"):
        calls.clear()
        rows = runner.run_cases([_toy_case(impls, pass_)], device="cpu",
                                timer=timing.CpuTimer(reps=2), progress=False)
        by = {r["impl"]: r for r in rows}
        assert by["good"]["status"] == "ok" and by["good"]["speedup_vs_best_peer"] == 1.0
        assert by["fastbert-wrong"]["status"] == "wrong"
        assert "differs from fastbert.reference" in by["fastbert-wrong"]["reason"]
        assert by["fastbert-wrong"]["p50_ms"] is None and len(calls) == 1  # never timed
        assert by["fastbert-broken"]["status"] == "error"
        assert "RuntimeError: kernel exploded" in by["fastbert-broken"]["reason"]
        assert by["peer-missing"]["status"] == "unavailable"
        assert by["peer-missing"]["reason"] == "needs a GPU with 1 TB of memory"


def test_budget_and_quick_skips():
    impls = [_impl("good", torch.tanh), _impl("slow-peer", torch.tanh, skip_in_quick="too slow")]
    rows = runner.run_cases([_toy_case(impls)], device="cpu", timer=timing.CpuTimer(reps=1),
                            progress=False, quick=True)
    by = {r["impl"]: r for r in rows}
    assert by["good"]["status"] == "ok"
    assert by["slow-peer"]["status"] == "skipped" and by["slow-peer"]["reason"] == "too slow"
    rows = runner.run_cases([_toy_case(impls), _toy_case(impls, "bwd")], device="cpu",
                            timer=timing.CpuTimer(reps=1), progress=False, budget_s=0.0)
    assert len(rows) == 4 and all(r["status"] == "skipped" for r in rows)
    assert "time budget" in rows[0]["reason"]
    rows = runner.run_cases([_toy_case(impls)], device="cpu", timer=timing.CpuTimer(reps=1),
                            progress=False, budget_s=0.0, impl_filter=["good"])
    assert [r["impl"] for r in rows] == ["good"]  # skipped rows only for what --impl selects


def test_progress_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    p = runner.Progress(2)
    p.update("attention/a")
    p.update("attention/b")
    p.close()
    err = capsys.readouterr().err
    assert "[1/2] attention/a" in err and "[2/2] attention/b" in err
    quiet = runner.Progress(1, enabled=False)
    quiet.update("x")
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------
# FlexAttention block masks (eager FlexAttention on CPU)
# ----------------------------------------------------------------------------------------------
def _dense_map(num, idx, nk):
    b, h, nq = num.shape
    out = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for qi in range(nq):
                out[bi, hi, qi, idx[bi, hi, qi, : num[bi, hi, qi]].long()] = True
    return out


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("layout_block", [32, 64, 128])
def test_block_mask_from_layout_is_equivalent(layout_block):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    l, d = 320, 16   # not a multiple of 128: the last flex block is cut
    nb = -(-l // layout_block)
    lay = sparse.random_layout(2, nb, nb, 0.4, seed=layout_block)
    bm = attention.block_mask_from_layout(lay, layout_block, l, l)
    # independent expectation: tile the token mask into 128-blocks
    tm = reference.layout_to_mask(lay, layout_block, l, l)
    nq = -(-l // 128)
    pad = torch.zeros(2, nq * 128, nq * 128, dtype=torch.bool)
    pad[:, :l, :l] = tm
    inside = torch.zeros_like(pad)
    inside[:, :l, :l] = True
    t = pad.view(2, nq, 128, nq, 128)
    active = t.any(4).any(2)
    full = (t | ~inside.view(2, nq, 128, nq, 128)).all(4).all(2) & active
    got_full = _dense_map(bm.full_kv_num_blocks, bm.full_kv_indices, nq)[0]
    got_partial = _dense_map(bm.kv_num_blocks, bm.kv_indices, nq)[0]
    assert torch.equal(got_full, full)
    assert torch.equal(got_partial, active & ~full)
    q, k, v = (torch.randn(1, 2, l, d) for _ in range(3))
    out = flex.flex_attention(q, k, v, block_mask=bm)
    ref = reference.block_sparse_attention(q.double(), k.double(), v.double(), lay, layout_block)
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_block_mask_from_token_mask_causal_and_padding():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    for kw in ({"causal": True}, {"key_padding": True}, {"window": (20, 7)}):
        s = attention.dense_case(3, 2, 200, 16, torch.float32, **kw).setup("cpu")
        bm = attention._dense_block_mask(s)
        q, k, v = attention.bhld(s)
        out = flex.flex_attention(q, k, v, block_mask=bm)
        ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                     attn_mask=s.mask, is_causal=s.causal,
                                                     window_size=s.window)
        assert (out.double() - ref).abs().max() < 1e-5


def test_window_case_counts_only_the_window_and_runs_on_cpu():
    assert attention.window_pairs(5, 5, (1, 1)) == 13
    assert attention.window_pairs(4, 6, (-1, -1)) == 24
    assert attention.window_pairs(3, 3, (0, -1)) == 6
    case = attention.dense_case(2, 2, 64, 16, torch.float32, window=(8, 8), pass_="fwd+bwd")
    assert case.name.endswith("-window8_8") and case.params["window"] == [8, 8]
    full = common.attention_flops(2, 2, 64, 64, 16, pass_="fwd+bwd")
    assert case.work == pytest.approx(full * attention.window_pairs(64, 64, (8, 8)) / 64 ** 2)
    rows = runner.run_cases([case], device="cpu", timer=timing.CpuTimer(reps=1),
                            impl_filter=["sdpa-math", "fastbert-triton"], progress=False,
                            ceilings={"copy_gbps": 1.0, "matmul_tflops": 1.0})
    by = {r["impl"]: r for r in rows}
    assert by["sdpa-math"]["status"] == "ok", by["sdpa-math"]  # the window as an SDPA bool mask
    if by["fastbert-triton"]["status"] != "unavailable":       # Triton on CPU: interpreter only
        assert by["fastbert-triton"]["status"] == "ok", by["fastbert-triton"]
    windowed = [c for c in attention.cases() if "window" in c.params]
    assert windowed and any(c.quick for c in windowed)
    with pytest.raises(ValueError, match="window"):
        attention.dense_case(1, 1, 8, 16, window=(2, 2), causal=True)


def test_gqa_cases_names_and_flops():
    gqa = [c for c in attention.cases() if c.params.get("kind") == "gqa"]
    assert sorted((c.params["Lq"], c.pass_) for c in gqa) == [
        (2048, "fwd"), (2048, "fwd+bwd"), (8192, "fwd"), (8192, "fwd+bwd")]
    assert [c.name for c in gqa if c.quick] == ["fwd-B2-H32-Hkv8-L8192-D128-fp16"]
    for c in gqa:
        p = c.params
        assert c.name == f"{c.pass_}-B{p['B']}-H32-Hkv8-L{p['Lq']}-D128-fp16"
        assert c.series == f"gqa {c.pass_} D128 fp16 Hq32/Hkv8"
        # every query head does its own QK^T and PV: 4 * B * Hq * Lq * Lk * D (x3.5 fwd+bwd)
        factor = {"fwd": 1.0, "fwd+bwd": 3.5}[c.pass_]
        assert c.work == factor * 4 * p["B"] * 32 * p["Lq"] ** 2 * 128
        assert c.work == common.attention_flops(p["B"], 32, p["Lq"], p["Lq"], 128, pass_=c.pass_)
        assert {"sdpa-flash", "sdpa-math", "flex", "flash-attn"} <= {i.name for i in c.impls}
    mha = attention.dense_case(2, 4, 8, 16)
    assert "Hkv" not in mha.params and "Hkv" not in mha.name and "Hq" not in mha.series
    with pytest.raises(ValueError, match="kv_heads"):
        attention.dense_case(1, 4, 8, 16, kv_heads=3)


def _sdpa_wrong_head_map(case, s):
    """GQA with the K/V heads tiled (query head h -> K/V head h % Hkv) instead of grouped
    (h // (Hq / Hkv)): the check must call it wrong."""
    def fwd(st):
        q, k, v = attention.bhld(st)
        r = q.shape[1] // k.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(q, k.repeat(1, r, 1, 1),
                                                                v.repeat(1, r, 1, 1))
    return Prepared(fwd)


def test_gqa_case_runs_on_cpu(monkeypatch):
    """A tiny GQA case (6 query heads, 3 K/V heads, Lq != Lk): SDPA's math backend with
    enable_gqa and fastbert's Triton kernel (the interpreter) pass the check against
    fastbert.reference with enable_gqa; a wrong head mapping is caught. The check budget is cut
    to 5 heads' scores, as big cases are cut: it checks whole groups only (query heads 0-3 with
    K/V heads 0-1), so that the checked K/V gradients are complete."""
    from fastbert import backends

    monkeypatch.setattr(attention, "CHECK_SCORE_ELEMS", 5 * 17 * 40)
    case = attention.dense_case(2, 6, 17, 16, torch.float32, lk=40, kv_heads=3, pass_="fwd+bwd")
    assert case.name == "fwd+bwd-B2-H6-Hkv3-L17-Lk40-D16-fp32" and case.params["Hkv"] == 3
    assert case.work == common.attention_flops(2, 6, 17, 40, 16, pass_="fwd+bwd")
    s = case.setup("cpu")
    assert s.q.shape == (2, 17, 6, 16) and s.k.shape == s.v.shape == (2, 40, 3, 16)
    case.impls.append(Impl("sdpa-wrong-head-map", _sdpa_wrong_head_map))
    rows = runner.run_cases([case], device="cpu", timer=timing.CpuTimer(reps=1),
                            impl_filter=["sdpa-math", "fastbert-triton", "sdpa-wrong-head-map",
                                         "xformers"],
                            progress=False, ceilings={"copy_gbps": 1.0, "matmul_tflops": 1.0})
    by = {r["impl"]: r for r in rows}
    assert by["sdpa-math"]["status"] == "ok", by["sdpa-math"]
    assert "worst error" in by["sdpa-math"]["check"]
    assert by["sdpa-wrong-head-map"]["status"] == "wrong", by["sdpa-wrong-head-map"]
    assert by["xformers"]["status"] == "unavailable"
    if backends.backend_reasons("triton", torch.device("cpu"), explicit=True):
        assert by["fastbert-triton"]["status"] == "unavailable"
    else:                                                          # the interpreter runs it
        assert by["fastbert-triton"]["status"] == "ok", by["fastbert-triton"]


# ----------------------------------------------------------------------------------------------
# Results files, table, plots, README table
# ----------------------------------------------------------------------------------------------
def _row(case, impl, ours, status="ok", p50=1.0, family="attention", x=128, metric="TFLOP/s",
         work=2e9, series="bert fwd D64 fp16"):
    r = {k: None for k in report.ROW_FIELDS}
    r.update(family=family, op="scaled_dot_product_attention", case=case, impl=impl, ours=ours,
             status=status, metric=metric, work=work, x_key="Lq", x=x, series=series,
             params={"Lq": x}, **{"pass": "fwd"}, dtype="fp16")
    if status == "ok":
        r.update(p20_ms=0.9 * p50, p50_ms=p50, p80_ms=1.1 * p50, reps=10, timing="events")
    else:
        r["reason"] = f"{impl} is {status}"
    return r


def _run_record(rows, gpu="NVIDIA H100 80GB HBM3", date="2026-11-20", run_id="r1"):
    ceil = {"copy_gbps": 3000.0, "matmul_tflops": 800.0}
    by = {}
    for r in rows:
        by.setdefault(r["case"], []).append(r)
    for rs in by.values():
        report.annotate_case(rs, ceil)
    env = {"gpu": gpu, "driver": "580.1", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
           "fastbert": "0.1.0", "commit": "abc123", "timestamp": f"{date}T10:00:00+00:00"}
    return {"run_id": run_id, "started": f"{date}T10:00:00+00:00", "env": env, "ceilings": ceil,
            "rows": rows, "plots": []}


def _sample_rows():
    rows = []
    for x in (128, 512):
        case = f"fwd-B32-H12-L{x}-D64-fp16"
        rows += [_row(case, "fastbert-triton", True, p50=0.5, x=x),
                 _row(case, "sdpa-flash", False, p50=0.75, x=x),
                 _row(case, "sdpa-math", False, p50=3.0, x=x),
                 _row(case, "fastbert-cuda", True, status="unavailable", x=x)]
    rows.append(_row("ln", "fastbert-triton", True, status="wrong", family="norms",
                     metric="GB/s", series="layer_norm fwd fp16"))
    rows.append(_row("ln", "torch-eager", False, p50=0.02, family="norms", metric="GB/s", work=5e7,
                     x=768, series="layer_norm fwd fp16"))
    return rows


def test_annotate_and_table():
    run = _run_record(_sample_rows())
    r = {(x["case"], x["impl"]): x for x in run["rows"]}
    ours = r[("fwd-B32-H12-L128-D64-fp16", "fastbert-triton")]
    assert ours["best_peer"] == "sdpa-flash" and ours["speedup_vs_best_peer"] == pytest.approx(1.5)
    assert ours["value"] == pytest.approx(4.0) and ours["pct_of_ceiling"] == pytest.approx(0.5)
    text = report.format_table(run["rows"], run["ceilings"])
    assert "1.50x" in text and "fastbert-triton *" in text
    assert "WRONG" in text and "not run here" in text
    assert "fastbert-cuda: fastbert-cuda is unavailable [2]" in text
    assert text.index("fastbert-triton *") < text.index("sdpa-flash")


def test_json_and_csv_are_appended(tmp_path):
    run1 = _run_record(_sample_rows(), run_id="r1")
    report.write_json(tmp_path, run1)
    report.append_csv(tmp_path, run1, run1["rows"])
    run1["finished"] = "later"
    run1["rows"][0]["check_err"] = float("inf")  # JSON has no inf: written as null
    report.write_json(tmp_path, run1)            # the same run again: replaced, not duplicated
    run2 = _run_record(_sample_rows()[:3], run_id="r2")
    report.write_json(tmp_path, run2)
    report.append_csv(tmp_path, run2, run2["rows"])
    data = report.load_results(tmp_path)
    assert [r["run_id"] for r in data["runs"]] == ["r1", "r2"]
    assert data["runs"][0]["finished"] == "later" and data["runs"][0]["rows"][0]["check_err"] is None
    with open(tmp_path / "results.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(run1["rows"]) + 3
    assert lines[0]["gpu"] == "NVIDIA H100 80GB HBM3" and lines[0]["commit"] == "abc123"
    assert float(lines[0]["p50_ms"]) == 0.5 and json.loads(lines[0]["params"]) == {"Lq": 128}
    assert lines[-1]["run_id"] == "r2"
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError):
        report.load_results(tmp_path / "bad.json")


def test_plots_from_a_results_file(tmp_path):
    pytest.importorskip("matplotlib")
    report.write_json(tmp_path, _run_record(_sample_rows()))
    rows = report.load_results(tmp_path)["runs"][-1]["rows"]
    paths = report.plot_results(rows, tmp_path / "plots", title="test")
    assert sorted(p.name for p in paths) == ["attention.png", "norms.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_plots_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert report.plot_results(_sample_rows(), tmp_path) == []
    assert "matplotlib" in capsys.readouterr().err


def test_markdown_and_markers():
    run = _run_record(_sample_rows())
    md = report.markdown_summary(run, ["bench/results/x/attention.png"])
    assert "| fwd-B32-H12-L128-D64-fp16 | fastbert-triton | 4.0 TFLOP/s | sdpa-flash |" in md
    assert "1.50x" in md and "H100" in md and "abc123" in md
    assert "| ln | wrong | - | torch-eager |" in md
    assert "![attention](bench/results/x/attention.png)" in md
    text = "intro\n<!-- bench:begin -->\nold\n<!-- bench:end -->\nrest\n"
    new = report.replace_between_markers(text, "NEW")
    assert new == "intro\n<!-- bench:begin -->\nNEW\n<!-- bench:end -->\nrest\n"
    with pytest.raises(ValueError):
        report.replace_between_markers("no markers", "x")


def test_markdown_row_is_fastbert_own_result_against_the_fastest_peer():
    """Each README row shows fastbert's own implementation (never a variant computing another
    function, like the block-sparse case's dense baseline run on fastbert's dense kernel, even
    when faster) against the fastest peer, the one its speedup is computed against (not the
    first peer listed)."""
    sparse_case = "fwd-B2-H16-L8192-D64-blk128-random10-fp16"
    rows = [_row(sparse_case, "fastbert-triton", True, p50=10.0, family="sparse", work=2e12),
            dict(_row(sparse_case, "fastbert-triton-dense", True, p50=5.0, family="sparse",
                      work=2e12), variant="dense"),
            dict(_row(sparse_case, "sdpa-dense", False, p50=8.0, family="sparse", work=2e12),
                 variant="dense"),
            _row("ln", "fastbert-triton", True, p50=1.0, family="norms", metric="GB/s", work=1e9),
            _row("ln", "torch-eager", False, p50=4.0, family="norms", metric="GB/s", work=1e9),
            _row("ln", "liger", False, p50=2.0, family="norms", metric="GB/s", work=1e9)]
    md = report.markdown_summary(_run_record(rows))
    # 2e12 flops in 10 ms = 200 TFLOP/s = 25% of 800; sdpa-dense 250 TFLOP/s; 8 / 10 = 0.80x
    assert (f"| {sparse_case} | fastbert-triton | 200.0 TFLOP/s | sdpa-dense | 250.0 TFLOP/s "
            "| 0.80x | 25% |") in md
    # 1e9 bytes in 1 ms = 1000 GB/s = 33% of 3000; liger 500 GB/s; 2 / 1 = 2.00x
    assert "| ln | fastbert-triton | 1000.0 GB/s | liger | 500.0 GB/s | 2.00x | 33% |" in md


def test_results_dir_name_and_latest(tmp_path):
    run = _run_record(_sample_rows())
    assert report.results_dir_name(run) == "2026-11-20-h100-80gb-hbm3"
    for name in ("2026-11-19-h200", "2026-11-21-h100-80gb-hbm3", "notes"):
        (tmp_path / name).mkdir()
    report.write_json(tmp_path / "2026-11-19-h200", run)
    assert report.latest_results_dir(tmp_path).name == "2026-11-19-h200"
    report.write_json(tmp_path / "2026-11-21-h100-80gb-hbm3", run)
    assert report.latest_results_dir(tmp_path).name == "2026-11-21-h100-80gb-hbm3"
    with pytest.raises(FileNotFoundError):
        report.latest_results_dir(tmp_path / "nothing")


def test_make_readme_table_tool(tmp_path, capsys):
    tool = _load(REPO / "bench" / "make_readme_table.py", "make_readme_table")
    src = tmp_path / "out" / "bench"
    report.write_json(src, _run_record(_sample_rows()))
    report.append_csv(src, _run_record(_sample_rows()), _sample_rows())
    (src / "attention.png").write_bytes(b"\x89PNG fake")
    root = tmp_path / "results"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench:begin -->\nstale\n<!-- bench:end -->\n")
    assert tool.main(["--import", str(src), "--results-root", str(root), "--write", str(readme)]) == 0
    dest = root / "2026-11-20-h100-80gb-hbm3"
    assert (dest / "results.json").exists() and (dest / "attention.png").exists()
    text = readme.read_text()
    assert "stale" not in text and "sdpa-flash" in text
    assert "results/2026-11-20-h100-80gb-hbm3/attention.png" in text
    # importing the same run again merges instead of duplicating it
    assert tool.main(["--import", str(src), "--results-root", str(root)]) == 0
    assert len(report.load_results(dest)["runs"]) == 1
    with open(dest / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(_sample_rows())  # the CSV repeats no row
    capsys.readouterr()
    assert tool.main(["--results-root", str(root)]) == 0
    assert "| fwd-B32-H12-L512-D64-fp16 |" in capsys.readouterr().out
    readme.write_text("no markers here")
    assert tool.main(["--results-root", str(root), "--write", str(readme)]) == 1
    assert tool.main(["--results-root", str(tmp_path / "empty")]) == 1


def test_readme_table_merges_a_benchmark_split_over_two_calls(tmp_path):
    """A quick benchmark run as two device calls (FASTBERT_BENCH_ARGS="--op attention", then
    "--op norms"), imported one after the other into the same folder: the table shows both; a
    case measured in both shows the later row."""
    tool = _load(REPO / "bench" / "make_readme_table.py", "make_readme_table")
    rows = _sample_rows()
    first = [r for r in rows if r["family"] != "norms"]
    second = [dict(r, p50_ms=0.01) if r["impl"] == "torch-eager" else r for r in rows if r["family"] == "norms"]
    for i, part in enumerate((first, second)):
        src = tmp_path / f"out{i}" / "bench"
        report.write_json(src, _run_record(part, run_id=f"r{i}"))
        tool.import_results(src, tmp_path / "results")
    dest = tmp_path / "results" / "2026-11-20-h100-80gb-hbm3"
    assert len(report.load_results(dest)["runs"]) == 2
    block = tool.make_block(dest, tmp_path)
    assert "| fwd-B32-H12-L512-D64-fp16 |" in block and "| ln |" in block
    merged = tool.merged_run(report.load_results(dest)["runs"] + [_run_record(second, run_id="r2")])
    assert len(merged["rows"]) == len(rows)


def test_readme_table_of_several_runs_takes_the_latest_run_environment(tmp_path):
    """A results folder holding two runs (a benchmark split over two device calls, or over two
    days): --import files it under the latest run's date, and the README block prints the latest
    run's commit, date and ceilings (the rows' values were computed with those ceilings)."""
    tool = _load(REPO / "bench" / "make_readme_table.py", "make_readme_table")
    rows = _sample_rows()
    old = _run_record([r for r in rows if r["family"] != "norms"], date="2026-11-20", run_id="r1")
    new = _run_record([r for r in rows if r["family"] == "norms"], date="2026-11-21", run_id="r2")
    old["env"]["commit"], new["env"]["commit"] = "old000000000", "new111111111"
    new["ceilings"] = {"copy_gbps": 3350.0, "matmul_tflops": 900.0}
    src = tmp_path / "out" / "bench"
    report.write_json(src, old)
    report.write_json(src, new)
    root, readme = tmp_path / "results", tmp_path / "README.md"
    readme.write_text("<!-- bench:begin -->\n<!-- bench:end -->\n")
    assert tool.main(["--import", str(src), "--results-root", str(root), "--write", str(readme)]) == 0
    assert [p.name for p in root.iterdir()] == ["2026-11-21-h100-80gb-hbm3"]
    merged = tool.merged_run([old, new])
    assert merged["env"]["commit"] == "new111111111" and merged["ceilings"] == new["ceilings"]
    assert merged["started"] == new["started"] and len(merged["rows"]) == len(rows)
    text = readme.read_text()
    assert "2026-11-21, fastbert 0.1.0 at commit `new111111111`" in text and "old0000" not in text
    assert "copy 3350 GB/s (read + written), bf16 matmul 900 TFLOP/s" in text
    assert "| fwd-B32-H12-L128-D64-fp16 |" in text and "| ln |" in text


def test_readme_table_speedup_is_against_the_peer_it_shows(tmp_path):
    """A case measured with every peer, then again with only some (``--impl``): the merged table
    takes the case's rows whole from the later run, so its speedup and best peer agree (a merge
    per implementation once printed 1.33x beside a peer faster than fastbert)."""
    tool = _load(REPO / "bench" / "make_readme_table.py", "make_readme_table")
    rows = _sample_rows()
    case = rows[0]["case"]
    first = [dict(r) for r in rows if r["case"] == case]
    ours = next(r for r in first if r["ours"] and r["status"] == "ok")
    peers = [r for r in first if not r["ours"] and r["status"] == "ok"]
    assert len(peers) == 2, "the sample case needs two peers"
    ours["p50_ms"] = 0.030
    for i, r in enumerate(peers):
        r["p50_ms"] = 0.020 if i == 0 else 0.040  # the first peer beats fastbert
    fast_peer = peers[0]["impl"]
    second = [dict(r, p50_ms=0.030 if r is ours else 0.040) for r in first if r["impl"] != fast_peer]
    merged = tool.merged_run([_run_record(first, run_id="r1"), _run_record(second, run_id="r2")])
    assert {r["impl"] for r in merged["rows"]} == {r["impl"] for r in second}
    block = report.markdown_summary(merged)
    line = next(l for l in block.splitlines() if l.startswith(f"| {case} |"))
    assert fast_peer not in line and "1.33x" in line
    # and the printed speedup is computed from the peer shown, whatever the stored field says
    only = _run_record(first, run_id="r1")
    next(r for r in only["rows"] if r["impl"] == ours["impl"])["speedup_vs_best_peer"] = 9.0
    line = next(l for l in report.markdown_summary(only).splitlines() if l.startswith(f"| {case} |"))
    assert fast_peer in line and "0.67x" in line


def test_import_files_each_gpus_runs_under_its_own_gpu(tmp_path):
    """An --out folder reused on an A100 and then an H100: each GPU's runs go to its own results
    directory, never under the other's heading."""
    tool = _load(REPO / "bench" / "make_readme_table.py", "make_readme_table")
    src = tmp_path / "out" / "bench"
    report.write_json(src, _run_record(_sample_rows(), gpu="NVIDIA A100-SXM4-80GB", date="2026-11-19",
                                       run_id="a"))
    report.write_json(src, _run_record(_sample_rows(), date="2026-11-20", run_id="h"))
    (src / "attention.png").write_bytes(b"\x89PNG fake")
    root = tmp_path / "results"
    dest = tool.import_results(src, root)
    assert dest.name == "2026-11-20-h100-80gb-hbm3"
    assert sorted(p.name for p in root.iterdir()) == ["2026-11-19-a100-sxm4-80gb",
                                                     "2026-11-20-h100-80gb-hbm3"]
    for name, run_id in (("2026-11-19-a100-sxm4-80gb", "a"), ("2026-11-20-h100-80gb-hbm3", "h")):
        runs = report.load_results(root / name)["runs"]
        assert [r["run_id"] for r in runs] == [run_id]
        with open(root / name / "results.csv", newline="") as f:
            assert len(list(csv.DictReader(f))) == len(_sample_rows())
    assert (dest / "attention.png").exists()
    assert not (root / "2026-11-19-a100-sxm4-80gb" / "attention.png").exists()


def test_import_rebuilds_the_csv_the_gpu_run_leaves_out(tmp_path):
    tool = _load(REPO / "bench" / "make_readme_table.py", "make_readme_table")
    out = tmp_path / "out"
    report.write_json(out / "bench", _run_record(_sample_rows()))
    (out / "overhead.json").write_text('{"meta": {}, "rows": []}')  # beside bench/, as gpu_run.sh
    dest = tool.import_results(out / "bench", tmp_path / "results")
    with open(dest / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(_sample_rows()) and rows[0]["run_id"]
    assert json.loads((dest / "overhead.json").read_text()) == {"meta": {}, "rows": []}


# ----------------------------------------------------------------------------------------------
# bench/: the GPU run script and the pytest-benchmark entry points
# ----------------------------------------------------------------------------------------------
def test_gpu_run_script():
    script = REPO / "bench" / "gpu_run.sh"
    text = script.read_text()
    assert "set -o pipefail" in text and "timeout" in text and "tee" in text
    assert "--no-build-isolation --no-deps -e ." in text and 'FASTBERT_TEST_SHARD="$i/$shards"' in text
    assert "-m bigmem" in text
    assert "bench --quick --out" in text and "FASTBERT_COMMIT" in text
    subprocess.run(["bash", "-n", str(script)], check=True)
    ok = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "STAGE" in ok.stdout
    bad = subprocess.run(["bash", str(script), "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_bench_files_are_pytest_benchmark_entry_points():
    for family in runner.FAMILIES:
        path = REPO / "bench" / f"bench_{family}.py"
        mod = _load(path, f"bench_{family}_under_test")
        assert mod.FAMILY == family and callable(getattr(mod, f"test_{family}"))
        marks = mod.pytestmark if isinstance(mod.pytestmark, list) else [mod.pytestmark]
        assert any(m.name == "skipif" for m in marks)
        params = [m for m in getattr(mod, f"test_{family}").pytestmark if m.name == "parametrize"]
        ids = [p.id for p in params[0].args[1]]
        assert ids and len(ids) == len(set(ids))


def test_overhead_script_with_stubbed_kernels(tmp_path, monkeypatch):
    mod = _load(REPO / "bench" / "bench_overhead.py", "bench_overhead_under_test")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert mod.main(["--stub"]) == 2  # --stub runs Triton on CPU tensors: needs the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert mod.main([]) == 2  # without a GPU the real kernels cannot be timed
    out = tmp_path / "overhead.json"
    assert mod.main(["--stub", "--calls", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["mode"] == "stub"
    rows = {(r["op"], r["pass"], r["impl"]): r["us_per_call"] for r in data["rows"]}
    for op in ("scaled_dot_product_attention", "varlen_attention", "block_sparse_attention",
               "layer_norm", "add_layer_norm", "bias_gelu"):
        for pass_ in ("fwd", "fwd+bwd"):
            assert rows[(op, pass_, "fastbert-triton")] > 0
    assert rows[("layer_norm", "fwd", "torch-eager")] > 0
    # the stubs were put back
    assert fast_ops() and all(op.impl is not op.fake for op in fast_ops())


def test_bert_case_on_cpu_with_a_tiny_model():
    pytest.importorskip("transformers")
    tiny = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                vocab_size=50, max_position_embeddings=32)
    case = bert.bert_case(3, 12, "half", dtype=torch.float32, config=tiny)
    rows = runner.run_cases([case], device="cpu", timer=timing.CpuTimer(reps=1), progress=False,
                            impl_filter=["hf-sdpa", "hf-eager"], quick=True)
    by = {r["impl"]: r for r in rows}
    assert by["hf-sdpa"]["status"] == "ok" and by["hf-eager"]["status"] == "ok", rows
    assert by["hf-sdpa-compile"]["status"] == "skipped"
    assert "real tokens" in by["hf-sdpa"]["check"]
    assert case.work == common.bert_flops(case.params["seqlens"], hidden=16, layers=1,
                                          intermediate=32)


def test_bert_amp_case_on_cpu_with_a_tiny_model():
    """Mixed-precision training: fp32 weights under autocast to bf16, HF SDPA and fastbert.optimize
    (each checked against the fp32 model, HF SDPA under the same autocast as the yardstick)."""
    pytest.importorskip("transformers")
    tiny = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                vocab_size=50, max_position_embeddings=32)
    case = bert.bert_case(3, 12, "full", pass_="fwd+bwd", dtype=torch.bfloat16, config=tiny,
                          amp=True)
    assert "-amp-bf16" in case.name and case.dtype_label == "amp-bf16"
    rows = runner.run_cases([case], device="cpu", timer=timing.CpuTimer(reps=1), progress=False,
                            impl_filter=["hf-sdpa", "fastbert-optimize"], quick=True)
    by = {r["impl"]: r for r in rows}
    for impl in ("hf-sdpa", "fastbert-optimize"):
        assert by[impl]["status"] == "ok", by[impl]
        assert by[impl]["dtype"] == "amp-bf16" and "real tokens" in by[impl]["check"]
    assert any(c.params["L"] == 128 and c.dtype_label == "amp-bf16" for c in bert.cases(quick=True))


@pytest.mark.parametrize("arch", ["deberta-v3", "mpnet", "modernbert", "distilbert"])
def test_other_encoder_cases_on_cpu(arch):
    """DeBERTa-v3, MPNet, ModernBERT and DistilBERT, tiny: the HF attentions each has (eager;
    ModernBERT and DistilBERT SDPA too) and fastbert.optimize (ModernBERT and DistilBERT: also
    their padding-free encoder), inference on a padded batch and mixed-precision training, each
    checked against the fp32 / fp64 HF model with HF eager / SDPA as the yardstick."""
    transformers = pytest.importorskip("transformers")
    if arch == "modernbert" and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("optimize() swaps ModernBERT with transformers 5.x only")
    tiny = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                vocab_size=50, max_position_embeddings=32)
    if arch == "deberta-v3":
        tiny["position_buckets"] = 8
    if arch == "modernbert":
        tiny.update(num_hidden_layers=2, global_attn_every_n_layers=2, local_attention=4,
                    pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2, sep_token_id=1)
    infer = bert.bert_case(3, 12, "half", dtype=torch.float32, config=tiny, arch=arch)
    train = bert.bert_case(3, 12, "full", pass_="fwd+bwd", dtype=torch.bfloat16, config=tiny,
                           amp=True, arch=arch)
    assert infer.name.startswith(arch + "-infer-") and infer.params["arch"] == arch
    sdpa = arch in ("modernbert", "distilbert")
    hf_impls = ["hf-eager", "hf-sdpa"] if sdpa else ["hf-eager"]
    compile_impl = "hf-sdpa-compile" if sdpa else "hf-eager-compile"
    encoder = {"modernbert": "fastbert-ModernBertEncoder", "distilbert": "fastbert-BertEncoder",
               "mpnet": "fastbert-BertEncoder"}
    ours = ["fastbert-optimize"] + ([encoder[arch]] if arch in encoder else [])
    assert [i.name for i in infer.impls] == hf_impls + [compile_impl] + ours
    rows = runner.run_cases([infer, train], device="cpu", timer=timing.CpuTimer(reps=1),
                            progress=False, quick=True)
    by = {(r["case"], r["impl"]): r for r in rows}
    for case in (infer, train):
        for impl in hf_impls + ours:
            row = by[(case.name, impl)]
            assert row["status"] == "ok" and "real tokens" in row["check"], row
        assert by[(case.name, compile_impl)]["status"] == "skipped"
    assert "0 left" in by[(infer.name, "fastbert-optimize")]["reason"]  # the optimize report
    quick = {c.name for c in bert.cases(quick=True)}
    assert any(n.startswith(arch + "-") for n in quick)
    with pytest.raises(ValueError, match="arch"):
        bert.bert_case(3, 12, arch="gpt2")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_torch_encoder_case_on_cpu_with_a_tiny_model():
    """torch.nn.TransformerEncoder, tiny: torch's padded path, its nested-tensor fast path
    (inference only: the note says whether torch took it), fastbert.optimize and
    fastbert.nn.TransformerEncoder, each checked on the real tokens."""
    tiny = dict(d_model=16, nhead=2, dim_feedforward=32, num_layers=2)
    infer = bert.torch_encoder_case(3, 12, "half", dtype=torch.float32, config=tiny)
    train = bert.torch_encoder_case(3, 12, "half", pass_="fwd+bwd", dtype=torch.float32, config=tiny)
    assert infer.name.startswith("torch-encoder-infer-") and "torch-nested" not in [i.name for i in train.impls]
    rows = runner.run_cases([infer, train], device="cpu", timer=timing.CpuTimer(reps=1),
                            progress=False, quick=True)
    by = {(r["case"], r["impl"]): r for r in rows}
    for case in (infer, train):
        for impl in ("torch-padded", "fastbert-optimize", "fastbert-TransformerEncoder"):
            row = by[(case.name, impl)]
            assert row["status"] == "ok" and "real tokens" in row["check"], row
        assert by[(case.name, "torch-compile")]["status"] == "skipped"
    nested = by[(infer.name, "torch-nested")]
    assert nested["status"] == "ok" and "nested-tensor fast path" in nested["reason"], nested
    assert case.work == common.bert_flops(case.params["seqlens"], hidden=16, layers=2, intermediate=32,
                                          pass_="fwd+bwd")
    assert any(c.name.startswith("torch-encoder-") for c in bert.cases(quick=True))


def test_environment_records_versions_and_commit(monkeypatch):
    monkeypatch.setenv("FASTBERT_COMMIT", "0123abcd" * 5)
    env = report.environment()
    assert env["commit"] == "0123abcd" * 5 and env["commit_source"] == "FASTBERT_COMMIT"
    assert env["torch"] == torch.__version__ and env["fastbert"]
    for key in ("gpu", "driver", "triton", "cuda", "timestamp", "cuda_extension", "peers"):
        assert key in env
    monkeypatch.delenv("FASTBERT_COMMIT")
    commit, source = report.git_commit()
    assert source in ("git", "none") and commit


def test_run_command_end_to_end_on_cpu(monkeypatch, tmp_path, capsys):
    """The whole command (ceilings, cases, table, JSON/CSV, plots, exit code) with its device
    pointed at the CPU and the toy cases above; on a GPU the same code times CUDA kernels."""
    from fastbert.benchmarks import ceilings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runner, "DEVICE", "cpu")
    monkeypatch.setattr(ceilings, "measure_ceilings", lambda timer, quick, device: ceilings.Ceilings(
        copy_gbps=1.0, matmul_tflops=1.0, copy_bytes=1, matmul_n=1))
    good = [_impl("good", torch.tanh), _impl("fastbert-good", torch.tanh, ours=True)]
    monkeypatch.setattr(runner, "select_cases",
                        lambda ops, quick=False: [_toy_case(good), _toy_case(good, "fwd+bwd")])
    out = tmp_path / "res"
    assert runner.run(_args("--quick", "--out", str(out), "--no-plots")) == 0
    printed = capsys.readouterr().out
    assert "toy-fwd" in printed and "fastbert-good *" in printed and "rows: 4 ok" in printed
    run = report.load_results(out)["runs"][-1]
    assert run["finished"] and run["ceilings"]["copy_gbps"] == 1.0 and len(run["rows"]) == 4
    assert run["args"]["quick"] is True and run["env"]["torch"] == torch.__version__
    assert (out / "results.csv").exists()
    # a wrong fastbert result makes the command fail (exit 1) and says which
    bad = [_impl("good", torch.tanh), _impl("fastbert-bad", torch.sin, ours=True)]
    monkeypatch.setattr(runner, "select_cases", lambda ops, quick=False: [_toy_case(bad)])
    assert runner.run(_args("--out", str(out), "--no-plots")) == 1
    assert "fastbert-bad" in capsys.readouterr().err
    assert len(report.load_results(out)["runs"]) == 2


def test_a_wrong_peer_does_not_fail_the_command(monkeypatch, tmp_path, capsys):
    """Exit code 1 is for fastbert's own results only (the module docstring): a peer that is wrong
    or fails is recorded as such, and the command still exits 0."""
    from fastbert.benchmarks import ceilings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runner, "DEVICE", "cpu")
    monkeypatch.setattr(ceilings, "measure_ceilings", lambda timer, quick, device: ceilings.Ceilings(
        copy_gbps=1.0, matmul_tflops=1.0, copy_bytes=1, matmul_n=1))

    def broken(x):
        raise RuntimeError("peer kernel exploded")

    impls = [_impl("peer-wrong", torch.sin), _impl("peer-broken", broken),
             _impl("fastbert-good", torch.tanh, ours=True)]
    monkeypatch.setattr(runner, "select_cases", lambda ops, quick=False: [_toy_case(impls)])
    out = tmp_path / "res"
    assert runner.run(_args("--out", str(out), "--no-plots")) == 0
    assert "fastbert result(s) wrong" not in capsys.readouterr().err
    status = {r["impl"]: r["status"] for r in report.load_results(out)["runs"][-1]["rows"]}
    assert status == {"peer-wrong": "wrong", "peer-broken": "error", "fastbert-good": "ok"}


def test_run_command_refuses_what_it_cannot_do_before_measuring(monkeypatch, tmp_path, capsys):
    """--impl matching nothing, and an --out that cannot be written, are usage errors (exit 2)
    said before any measurement (they used to record nothing and exit 0, or crash after the
    ceilings were measured); --list lists only what --impl selects."""
    from fastbert.benchmarks import ceilings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runner, "DEVICE", "cpu")
    measured = []
    monkeypatch.setattr(ceilings, "measure_ceilings", lambda *a, **k: measured.append(1))
    good = [_impl("good", torch.tanh), _impl("fastbert-good", torch.tanh, ours=True)]
    monkeypatch.setattr(runner, "select_cases", lambda ops, quick=False: [_toy_case(good)])
    assert runner.run(_args("--impl", "nothing", "--out", str(tmp_path / "a"), "--no-plots")) == 2
    err = capsys.readouterr().err
    assert "no implementation matches --impl nothing" in err and "fastbert-good" in err
    afile = tmp_path / "afile"
    afile.write_text("")
    assert runner.run(_args("--out", str(afile), "--no-plots")) == 2
    assert "cannot write the results to" in capsys.readouterr().err and not measured
    assert runner.run(_args("--impl", "fastbert", "--list")) == 0
    listed = capsys.readouterr().out
    assert "fastbert-good" in listed and "good," not in listed and ", good" not in listed


@pytest.mark.parametrize("content,words", [
    ("[1, 2]", "not a fastbert bench results file"),
    ('{"format": "fastbert-bench/1", "runs": [1]}', "run 0 is not a fastbert bench run"),
    ('{"format": "fastbert-bench/1", "runs": [{"rows": [3]}]}', "run 0 is not a fastbert bench run"),
    ("not json", "is not valid JSON"),
])
def test_malformed_results_files_are_value_errors_naming_the_file(tmp_path, content, words):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=words) as e:
        report.load_results(path)
    assert str(path) in str(e.value)


def test_dispatch_table_skips_malformed_rows_and_refuses_a_directory(tmp_path):
    from fastbert import dispatch

    run = _run_record(_sample_rows())
    run["env"]["capability"] = "9.0"
    run["rows"][0]["p50_ms"] = "abc"
    run["rows"][1]["params"] = [1]
    dispatch.build_table([run, dict(run, env=[1])])  # no TypeError / AttributeError
    report.write_json(tmp_path / "r", run)
    with pytest.raises(ValueError, match="is a directory"):
        dispatch.write_table([tmp_path / "r"], tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
