"""Decode kernels on CUDA: the GEMV for every weight kind, tile option and split-K against fp32
references, with no silent fallback to torch. Skipped without CUDA (CI has none)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GROUP = 64


def _case(kind, M, N, K, zero, g):
    from graphquant.kernels import quant_triton as QT

    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    op = {"a": x}
    if kind == "W4A16":
        w = torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8, generator=g)
        s = torch.rand(N, K // GROUP, device="cuda", generator=g) * 1e-2
        z = torch.randint(0, 16, (N, K // GROUP), device="cuda", dtype=torch.uint8, generator=g) if zero else None
        op.update(w=w, w_scale=s, w_kind=QT.W_INT4, group=GROUP, w_zero=z)
        u = torch.stack([w & 0xF, w >> 4], -1).reshape(N, K).float()
        zz = z.float().repeat_interleave(GROUP, 1) if z is not None else 8.0
        W = (u - zz) * s.repeat_interleave(GROUP, 1)
    else:
        w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8, generator=g)
        s = torch.rand(N, device="cuda", generator=g) * 1e-2
        op.update(w=w, w_scale=s, w_kind=QT.W_INT8)
        if kind == "W8A8-fp8":
            op["w"] = (torch.randn(N, K, device="cuda", generator=g) * 40).to(torch.float8_e4m3fn)
            op["w_kind"] = QT.W_FP8
        W = op["w"].float() * s[:, None]
    a = x.float()
    if kind.startswith("W8A8"):
        q, sa = QT.quantize_rows(x, kind.endswith("fp8"))
        op.update(a=q, a_scale=sa)
        a = q.float() * sa
    bias = torch.randn(N, device="cuda", generator=g).to(torch.bfloat16)
    op["bias"] = bias
    return op, a @ W.t() + bias.float()


def eager_and_graphed(run, calls: int = 3) -> list:
    """``run()``'s results from ``calls`` eager calls, then from a CUDA graph captured once and replayed
    ``calls`` times (launch after launch, and replay after replay, must give the same results)."""
    outs = [run() for _ in range(calls)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = run()
    for _ in range(calls):
        graph.replay()
    torch.cuda.synchronize()
    return outs + [graphed]


def tuned_only(monkeypatch, key, impl: str, cfg: dict):
    """The measured decode table (``quant_triton._tuned``) holds one entry: ``key`` -> ``impl`` with ``cfg``."""
    from graphquant.kernels import quant_triton as QT

    monkeypatch.setattr(QT, "_tuned", lambda name: {key: dict(impl=impl, **cfg)})


def _every_config_matches(kernel, kind, M, N, K, configs, seed, tol=2e-5):
    """``kernel(**op, out_dtype=fp32, config=cfg)`` within ``tol`` (relative to the reference's largest value) of the
    fp32 reference for each config (and each zero-point option of int4); returns the last case's operands."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    for zero in ((False, True) if kind == "W4A16" else (False,)):
        op, ref = _case(kind, M, N, K, zero, g)
        for cfg in configs:
            out = kernel(**op, out_dtype=torch.float32, config=cfg)
            err = float((out - ref).abs().max() / ref.abs().max())
            assert err < tol, (kind, M, N, K, zero, cfg, err)
    return op


@pytest.mark.parametrize("kind", ["W8A16", "W4A16", "W8A8-int8", "W8A8-fp8"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("N,K", [(1024, 4096), (328, 1536)])
def test_gemv_matches_reference_for_every_tile_option(kind, M, N, K):
    from graphquant.kernels import int8_mm
    from graphquant.kernels import quant_triton as QT

    configs = [None] + [dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=4, num_stages=2)
                        for bn, bk, sk in [(4, 256, 1), (16, 1024, 4)]]  # each compiles: keep the call short
    _every_config_matches(QT.gemv, kind, M, N, K, configs, seed=M * 7 + N)
    assert "gemv" not in int8_mm._FAILED


@pytest.mark.parametrize("kind", ["W8A16", "W4A16"])
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("N,K", [(1024, 4096), (328, 1536)])
def test_gemv_packed_matches_reference_for_every_tile_option(kind, M, N, K):
    from graphquant.kernels import quant_triton as QT

    configs = [None] + [dict(BLOCK_N=bn, BLOCK_Q=bq, SPLIT_K=sk, num_warps=w, PREFETCH=pf)
                        for bn, bq, sk, w, pf in [(16, 32, 1, 4, False), (64, 64, 3, 8, False), (32, 128, 2, 4, True)]]
    op = _every_config_matches(QT.gemv_packed, kind, M, N, K, configs, seed=M * 5 + N)
    # a layout it cannot read as words is refused (None), not misread
    assert QT.gemv_packed(op["a"][:, 1:], op["w"][:, 1:], op["w_scale"], w_kind=op["w_kind"],
                          group=op.get("group", 0)) is None


@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("N,K", [(1024, 4096), (328, 1536)])
def test_w4_mma_matches_reference_for_every_tile_option(M, N, K):
    from graphquant.kernels import quant_triton as QT

    configs = [None] + [dict(BLOCK_N=bn, SPLIT_K=sk, num_warps=4, num_stages=st, PREFETCH=pf)
                        for bn, sk, st, pf in [(32, 1, 1, False), (64, 3, 3, True), (128, 2, 1, True)]]
    op = _every_config_matches(QT.w4_mma, "W4A16", M, N, K, configs, seed=M * 3 + N)
    # what it cannot take is refused (None): fp32 activations, more than 16 rows, other weight kinds
    assert QT.w4_mma(op["a"].float(), op["w"], op["w_scale"], group=GROUP) is None
    assert QT.w4_mma(op["a"], op["w"], op["w_scale"], w_kind=QT.W_INT8, group=GROUP) is None
    assert QT.w4_mma(op["a"].repeat(17, 1)[:17], op["w"], op["w_scale"], group=GROUP) is None


@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("N,K", [(1024, 4096), (328, 1536)])
def test_w4_i8mma_matches_reference_for_every_tile_option(M, N, K, monkeypatch):
    """W4A16 on the int8 tensor cores (``w4_i8mma``: the activation's exact int8 pieces, the nibbles as int8 codes
    by PTX): every tile option within 2e-5 of the fp32 reference, zero points or not, bf16 and fp16 activations
    alike, the same bits launch after launch and under CUDA-graph replay, and ``decode_mm`` runs it where the tuned
    table names it."""
    from graphquant.kernels import quant_triton as QT

    configs = [None] + [dict(BLOCK_N=bn, SPLIT_K=sk, GPS=gps, num_warps=nw, num_stages=st)
                        for bn, sk, gps, nw, st in [(32, 1, 4, 4, 2), (64, 3, 2, 4, 3), (128, 2, 4, 8, 3)]]
    op = _every_config_matches(QT.w4_i8mma, "W4A16", M, N, K, configs, seed=M * 13 + N)
    ref = QT.w4_i8mma(**op, out_dtype=torch.float32)
    got = QT.w4_i8mma(**dict(op, a=op["a"].half(), bias=op["bias"].half()), out_dtype=torch.float32)
    assert float((got - ref).abs().max() / ref.abs().max()) < 2e-5
    run = lambda: QT.w4_i8mma(**op, out_dtype=torch.bfloat16, config=configs[-1])  # noqa: E731
    outs = eager_and_graphed(run)
    assert all(torch.equal(o, outs[0]) for o in outs)
    tuned_only(monkeypatch, (QT.A_FLOAT, QT.W_INT4, N, K, QT.m_bucket(M)), "w4_i8mma", configs[-1])
    got = QT.decode_mm(op["a"], op["w"], op["w_scale"], w_kind=QT.W_INT4, w_zero=op["w_zero"], bias=op["bias"],
                       group=op["group"], out_dtype=torch.bfloat16)
    assert torch.equal(got, outs[0])
    assert QT.w4_i8mma(op["a"].repeat(5, 1), op["w"], op["w_scale"], group=GROUP) is None


@pytest.mark.parametrize("kind", ["W8A16", "W4A16", "W8A8-int8", "W8A8-fp8"])
def test_decode_kernels_store_the_silu_mul_of_an_interleaved_gate_up(kind):
    """Llama-3-8B's fused gate|up (28672 x 4096) at one row with the H200 table's kernel and tiles: ``decode_mm(...,
    glu=True)`` stores ``silu(gate) * up`` itself, equal to ``int8_mm.interleaved_glu`` of its plain output up to
    the last bit of a SiLU (Triton's sigmoid against torch's), launch after launch and in CUDA-graph replays."""
    from graphquant.kernels import quant_triton as QT
    from graphquant.kernels.int8_mm import interleaved_glu

    if "H200" not in torch.cuda.get_device_name(0):
        pytest.skip("the tuned table's gate|up entries are the H200's")
    g = torch.Generator(device="cuda").manual_seed(7)
    N, K = 28672, 4096
    if kind != "W4A16":
        op, _ = _case(kind, 1, N, K, False, g)
    else:  # the table's group: 128
        x = torch.randn(1, K, device="cuda", generator=g).to(torch.bfloat16)
        w = torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8, generator=g)
        s = torch.rand(N, K // 128, device="cuda", generator=g) * 1e-2
        op = dict(a=x, w=w, w_scale=s, w_kind=QT.W_INT4, group=128, w_zero=None,
                  bias=torch.randn(N, device="cuda", generator=g).to(torch.bfloat16))
    op = {k: v for k, v in op.items() if k in ("a", "w", "w_scale", "w_kind", "a_scale", "w_zero", "bias", "group")}
    a_kind = QT._a_kind(op["a"])
    assert QT.glu_decode_fits(1, N, K, a_kind, op["w_kind"], op.get("group", 0), op["a"].device)
    want = interleaved_glu(QT.decode_mm(**op, out_dtype=torch.bfloat16))
    outs = eager_and_graphed(lambda: QT.decode_mm(**op, out_dtype=torch.bfloat16, glu=True))
    assert all(torch.equal(o, outs[0]) for o in outs)
    got = outs[0]
    assert got.shape == (1, N // 2)
    assert ((got.float() - want.float()).abs() <= 2 ** -7 * want.float().abs() + 1e-30).all()
    assert (got == want).float().mean() > 0.99


def test_int4_linear_with_hadamard_makes_w4_i8mma_pieces_in_the_hadamard_kernel(monkeypatch):
    """``graphquant::int4_linear(..., hadamard=True)`` at one row where the table names ``w4_i8mma`` (Llama-3-8B's
    down projection, K = 14336): the online R4 makes the int8 pieces in its epilogue (two launches), bit for bit the
    result of the Hadamard op followed by the unfused product, within 2e-5 of the fp32 reference; at two rows it
    runs the unfused ops."""
    from graphquant import hadamard  # noqa: F401  registers graphquant::hadamard_transform
    from graphquant.kernels import hadamard_triton as HT
    from graphquant.kernels import int4_mm, int8_mm
    from graphquant.kernels import quant_triton as QT

    N, K = 512, 14336
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(2, K, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8, generator=g)
    s = torch.rand(N, K // 128, device="cuda", generator=g) * 1e-2
    bias = torch.randn(N, device="cuda", generator=g).to(torch.bfloat16)
    cfg = dict(BLOCK_N=64, SPLIT_K=4, GPS=4, num_warps=4, num_stages=3)
    tuned_only(monkeypatch, (QT.A_FLOAT, QT.W_INT4, N, K, 1), "w4_i8mma", cfg)
    calls = []
    real = HT.hadamard_pieces
    monkeypatch.setattr(HT, "hadamard_pieces", lambda *a: calls.append(a) or real(*a))
    for rows in (1, 2):
        got = int4_mm.int4_linear(x[:rows], w, s, None, bias, 128, "nibble", hadamard=True)
        xr = torch.ops.graphquant.hadamard_transform(x[:rows], False)
        want = int4_mm.int4_linear(xr, w, s, None, bias, 128, "nibble")
        assert torch.equal(got, want), rows
        u = torch.stack([w & 0xF, w >> 4], -1).reshape(N, K).float()
        ref = xr.float() @ ((u - 8) * s.repeat_interleave(128, 1)).t() + bias.float()
        assert float((got.float() - ref).abs().max() / ref.abs().max()) < 1e-2  # bf16 output
    assert len(calls) == 1 and "hadamard_pieces" not in int8_mm._FAILED


def test_int4_linear_gated_makes_the_w4_i8mma_operand_from_the_gate_up_pair(monkeypatch):
    """``graphquant::int4_linear(..., gated=True)`` at one row where the table names ``w4_i8mma`` (Llama-3-8B's
    down projection, K = 14336): the pieces launch computes ``silu(gate) * up`` from the pair (two launches, no
    SiLU·mul kernel), the product of ``int4_mm.silu_mul(pair)`` up to the SiLU's last-bit rounding (Triton's
    sigmoid against torch's), also replayed from a CUDA graph; two rows run the SiLU·mul and then the product."""
    from graphquant.kernels import int4_mm, int8_mm
    from graphquant.kernels import quant_triton as QT

    N, K = 512, 14336
    g = torch.Generator(device="cuda").manual_seed(6)
    pair = (torch.randn(2, 2 * K, device="cuda", generator=g) * 3).to(torch.bfloat16)
    w = torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8, generator=g)
    s = torch.rand(N, K // 128, device="cuda", generator=g) * 1e-2
    bias = torch.randn(N, device="cuda", generator=g).to(torch.bfloat16)
    cfg = dict(BLOCK_N=64, SPLIT_K=4, GPS=4, num_warps=4, num_stages=3)
    tuned_only(monkeypatch, (QT.A_FLOAT, QT.W_INT4, N, K, 1), "w4_i8mma", cfg)
    assert int4_mm.gated_decode_fits(N, K, 128, "nibble", torch.device("cuda"))
    assert not int4_mm.gated_decode_fits(N, K, 128, "cpu_tinygemm", torch.device("cuda"))
    assert not int4_mm.gated_decode_fits(N, 4096, 128, "nibble", torch.device("cuda"))  # not in the table
    calls = []
    real = QT.w4_i8mma
    monkeypatch.setattr(QT, "w4_i8mma", lambda *a, **k: calls.append(k.get("gated")) or real(*a, **k))
    for rows in (1, 2):
        got = int4_mm.int4_linear(pair[:rows], w, s, None, bias, 128, "nibble", gated=True)
        want = int4_mm.int4_linear(int4_mm.silu_mul(pair[:rows]), w, s, None, bias, 128, "nibble")
        if rows == 2:
            assert torch.equal(got, want)
        else:
            assert float((got.float() - want.float()).abs().max() / want.float().abs().max()) < 1e-2
            assert float((got == want).float().mean()) > 0.9
            outs = eager_and_graphed(lambda: int4_mm.int4_linear(pair[:1], w, s, None, bias, 128, "nibble",
                                                                 gated=True))
            assert all(torch.equal(o, got) for o in outs)
    assert calls[0] is True and "w4_i8mma_gated" not in int8_mm._FAILED


@pytest.mark.parametrize("glu", [False, True])
def test_add_rms_norm_int4_linear_makes_the_w4_i8mma_operand_in_the_norm_launch(monkeypatch, glu):
    """``graphquant::add_rms_norm_int4_linear`` at one row where the table names ``w4_i8mma`` (a Llama-3-8B gate|up
    slice, K = 4096; ``glu``: the interleaved gate|up's SiLU·mul in the product's epilogue): the residual sum bit for
    bit, the product that of the unfused add, ``int4_mm.rms_norm`` and ``int4_linear`` (the rsqrt's last bit aside),
    the same bits in CUDA-graph replays; two rows run the unfused ops."""
    from graphquant.kernels import int4_mm, int8_mm
    from graphquant.kernels import quant_triton as QT

    N, K = 1024, 4096
    g = torch.Generator(device="cuda").manual_seed(8)
    x = (torch.randn(2, K, device="cuda", generator=g) * 2).to(torch.bfloat16)
    r = (torch.randn(2, K, device="cuda", generator=g) * 8).to(torch.bfloat16)
    nw = (torch.rand(K, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    w = torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8, generator=g)
    s = torch.rand(N, K // 128, device="cuda", generator=g) * 1e-2
    cfg = dict(BLOCK_N=64, SPLIT_K=1, GPS=4, num_warps=4, num_stages=3)
    tuned_only(monkeypatch, (QT.A_FLOAT, QT.W_INT4, N, K, 1), "w4_i8mma", cfg)
    assert int4_mm.add_norm_decode_fits(N, K, 128, "nibble", torch.device("cuda"))
    assert not int4_mm.add_norm_decode_fits(N, K, 128, "cpu_tinygemm", torch.device("cuda"))
    calls = []
    real = QT.add_rms_norm_pieces
    monkeypatch.setattr(QT, "add_rms_norm_pieces", lambda *a: calls.append(a[0].shape) or real(*a))
    for rows in (1, 2):
        run = lambda: int4_mm.add_rms_norm_int4_linear(x[:rows], r[:rows], nw, 1e-5, w, s, None, None, 128,  # noqa
                                                       "nibble", glu)
        total, got = run()
        assert torch.equal(total, r[:rows] + x[:rows])
        want = int4_mm.int4_linear(int4_mm.rms_norm(r[:rows] + x[:rows], nw, 1e-5), w, s, None, None, 128, "nibble",
                                   glu=glu)
        assert got.shape == want.shape == (rows, N // 2 if glu else N)
        assert float((got.float() - want.float()).abs().max() / want.float().abs().max()) < 1e-2
        assert float((got == want).float().mean()) > 0.9
        if rows == 1:
            outs = eager_and_graphed(lambda: run()[1])
            assert all(torch.equal(o, got) for o in outs)
    assert calls == [(1, K)] * len(calls) and calls and "add_rms_norm_pieces" not in int8_mm._FAILED


@pytest.mark.parametrize("M", [1, 5, 16, 40])
@pytest.mark.parametrize("N,K", [(1024, 4096), (328, 1536)])
def test_w4_f16mma_matches_reference_for_every_tile_option(M, N, K, monkeypatch):
    """W4A16 on the 16-bit tensor cores with the weight as the right operand (``w4_f16mma``, its PTX nibble
    conversion, bf16 and fp16 activations): every tile option within 2e-5 of the fp32 reference, zero points or
    not, the same bits launch after launch and under CUDA-graph replay, and ``decode_mm`` runs it where the tuned
    table names it."""
    from graphquant.kernels import quant_triton as QT

    configs = [None] + [dict(BLOCK_N=bn, SPLIT_K=sk, num_warps=4, num_stages=st)
                        for bn, sk, st in [(32, 1, 2), (64, 3, 3), (128, 2, 4)]]
    op = _every_config_matches(QT.w4_f16mma, "W4A16", M, N, K, configs, seed=M * 11 + N)
    ref = QT.w4_f16mma(**op, out_dtype=torch.float32)  # fp16 holds these bf16 values exactly: the same sums
    got = QT.w4_f16mma(**dict(op, a=op["a"].half(), bias=op["bias"].half()), out_dtype=torch.float32)
    assert float((got - ref).abs().max() / ref.abs().max()) < 2e-5
    run = lambda: QT.w4_f16mma(**op, out_dtype=torch.bfloat16, config=configs[-1])  # noqa: E731
    outs = eager_and_graphed(run)
    assert all(torch.equal(o, outs[0]) for o in outs)
    tuned_only(monkeypatch, (QT.A_FLOAT, QT.W_INT4, N, K, QT.m_bucket(M)), "w4_f16mma", configs[-1])
    got = QT.decode_mm(op["a"], op["w"], op["w_scale"], w_kind=QT.W_INT4, w_zero=op["w_zero"], bias=op["bias"],
                       group=op["group"], out_dtype=torch.bfloat16)
    assert torch.equal(got, outs[0])


@pytest.mark.parametrize("M", [1, 5, 16, 40])
@pytest.mark.parametrize("N,K", [(1024, 4096), (328, 1544)])
def test_w8_mma_matches_reference_for_every_tile_option(M, N, K, monkeypatch):
    """W8A16 on the fp16 tensor cores (``w8_mma``, its PTX code conversion): every tile option within 2e-5 of the
    fp32 reference, the same bits launch after launch and under CUDA-graph replay, activations of any range (the
    per-row power-of-two scale), and ``int8_weight_only_linear`` runs it where the tuned table names it."""
    from graphquant.kernels import int8_mm
    from graphquant.kernels import quant_triton as QT

    configs = [None] + [dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=4, num_stages=st, ONE_SCALE=one)
                        for bn, bk, sk, st, one in [(64, 128, 1, 4, False), (128, 256, 1, 3, True),
                                                    (64, 256, 3, 3, False)]]
    op = _every_config_matches(QT.w8_mma, "W8A16", M, N, K, configs, seed=M * 13 + N)
    big = op["a"] * 3e4  # past fp16's range: the row scale brings it back
    ref = big.float() @ (op["w"].float() * op["w_scale"][:, None]).t()
    got = QT.w8_mma(big, op["w"], op["w_scale"], out_dtype=torch.float32)
    assert float((got - ref).abs().max() / ref.abs().max()) < 2e-5
    run = lambda: QT.w8_mma(**op, out_dtype=torch.bfloat16, config=configs[-1])  # noqa: E731
    outs = eager_and_graphed(run)
    assert all(torch.equal(o, outs[0]) for o in outs)
    tuned_only(monkeypatch, (QT.A_FLOAT, QT.W_INT8, N, K, QT.m_bucket(M)), "w8_mma", configs[-1])
    assert QT.decode_choice(M, N, K, QT.A_FLOAT, QT.W_INT8, 0, op["a"].device) == ("w8_mma", configs[-1])
    calls = []
    real = QT.w8_mma
    monkeypatch.setattr(QT, "w8_mma", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = int8_mm.int8_weight_only_linear(op["a"], op["w"], op["w_scale"], op["bias"])
    want = run().float()
    assert calls and "decode_mm" not in int8_mm._FAILED
    assert float((out.float() - want).abs().max()) <= float(want.abs().max()) * 1e-2


@pytest.mark.parametrize("kind", ["W8A8-int8", "W8A8-fp8"])
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("N,K", [(1024, 4096), (328, 1536)])
def test_wq_mm_swap_matches_the_unswapped_kernel(kind, M, N, K, monkeypatch):
    """W8A8 ``wq_mm`` with ``SWAP`` (the weight tile as the left operand, a warpgroup MMA on the codes): within
    2e-5 of the fp32 reference for every tile option (fp8: 1e-3, see ``_codes_dot_swapped``), int8 bit for bit the unswapped kernel (exact int32 sums),
    the same bits launch after launch and under CUDA-graph replay, and ``decode_mm`` runs it where the tuned table
    names it."""
    from graphquant.kernels import quant_triton as QT

    configs = [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=4, num_stages=st, SWAP=True)
               for bn, bk, sk, st in [(64, 128, 1, 4), (128, 256, 1, 3), (64, 256, 4, 3), (128, 128, 8, 3)]]
    # fp8: the tensor core sums each K step in its own precision (H200: 1.8e-4 of the largest output at K = 4096,
    # against bf16's 3.9e-3 rounding of the stored result)
    op = _every_config_matches(QT.wq_mm, kind, M, N, K, configs, seed=M * 17 + N,
                               tol=1e-3 if kind == "W8A8-fp8" else 2e-5)
    if kind == "W8A8-int8":
        plain = QT.wq_mm(**op, out_dtype=torch.float32, config=dict(configs[1], SWAP=False))
        assert torch.equal(QT.wq_mm(**op, out_dtype=torch.float32, config=configs[1]), plain)
    run = lambda: QT.wq_mm(**op, out_dtype=torch.bfloat16, config=configs[2])  # noqa: E731
    outs = eager_and_graphed(run)
    assert all(torch.equal(o, outs[0]) for o in outs)
    a_kind = QT.A_INT8 if kind == "W8A8-int8" else QT.A_FP8
    entry = {k: v for k, v in configs[2].items() if k != "BLOCK_M"}
    tuned_only(monkeypatch, (a_kind, op["w_kind"], N, K, QT.m_bucket(M)), "wq_mm", entry)
    calls = []
    real = QT.wq_mm
    monkeypatch.setattr(QT, "wq_mm", lambda *a, **k: calls.append(k.get("config")) or real(*a, **k))
    out = QT.decode_mm(**op, out_dtype=torch.bfloat16)
    assert calls and calls[0]["SWAP"] is True
    assert torch.equal(out, run())


def test_linear_entry_points_use_the_decode_kernels():
    """The int8 / fp8 / int4 linears route decode-sized M to ``decode_mm`` without falling back."""
    from graphquant.kernels import fp8_mm, int4_mm, int8_mm
    from graphquant.kernels import quant_triton as QT

    g = torch.Generator(device="cuda").manual_seed(0)
    calls = []
    real = QT.decode_mm

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append((k["w_kind"], out is not None))
        return out

    QT.decode_mm = spy
    try:
        for M in (1, 16):
            op, ref = _case("W8A16", M, 512, 1024, False, g)
            out = int8_mm.int8_weight_only_linear(op["a"], op["w"], op["w_scale"], op["bias"])
            assert float((out.float() - ref).abs().max() / ref.abs().max()) < 1e-2
            op, ref = _case("W8A8-int8", M, 512, 1024, False, g)
            out = int8_mm.int8_linear(op["a"], op["a_scale"], op["w"], op["w_scale"], op["bias"], torch.bfloat16)
            assert float((out.float() - ref).abs().max() / ref.abs().max()) < 1e-2
            op, ref = _case("W8A8-fp8", M, 512, 1024, False, g)
            out = fp8_mm.fp8_linear(op["a"], op["a_scale"], op["w"], op["w_scale"], op["bias"], torch.bfloat16)
            assert float((out.float() - ref).abs().max() / ref.abs().max()) < 1e-2
            op, ref = _case("W4A16", M, 512, 1024, True, g)
            out = int4_mm.int4_linear(op["a"], op["w"], op["w_scale"], op["w_zero"], op["bias"], GROUP, "nibble")
            assert float((out.float() - ref).abs().max() / ref.abs().max()) < 1e-2
    finally:
        QT.decode_mm = real
    assert calls == [(QT.W_INT8, True), (QT.W_INT8, True), (QT.W_FP8, True), (QT.W_INT4, True)] * 2
    assert not int8_mm._FAILED


@pytest.mark.parametrize("kind", ["W8A16", "W4A16", "W8A8-int8", "W8A8-fp8"])
@pytest.mark.parametrize("M", [1, 4])
def test_last_split_sums_equal_the_split_sum_launch(kind, M, monkeypatch):
    """With split-K, ``wq_mm`` / ``gemv_packed`` add the splits up in the tile's last split (one launch):
    bit for bit what ``split_sum`` gives, launch after launch and under CUDA-graph replay (the kernel resets
    its counters), for bf16 outputs with bias."""
    from graphquant.kernels import quant_triton as QT

    g = torch.Generator(device="cuda").manual_seed(3)
    op, _ = _case(kind, M, 4096, 14336, False, g)
    kernels = [QT.wq_mm]
    if kind in ("W8A16", "W4A16"):
        kernels.append(QT.gemv_packed)
        op = dict(op, group=op.get("group", 0))
    for kernel in kernels:
        cfg = (dict(BLOCK_N=32, BLOCK_Q=128, SPLIT_K=4, num_warps=4) if kernel is QT.gemv_packed
               else dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=4, num_warps=4, num_stages=3))
        run = lambda: kernel(**op, out_dtype=torch.bfloat16, config=cfg)  # noqa: E731
        outs = eager_and_graphed(run)
        monkeypatch.setattr(QT, "LAST_SPLIT_SUMS", False)
        want = run()
        monkeypatch.setattr(QT, "LAST_SPLIT_SUMS", True)
        for out in outs:
            assert torch.equal(out, want), (kernel.__name__, kind, M)
        assert int(QT.tile_counters(want.device, 1).abs().sum()) == 0


@pytest.mark.parametrize("n", [128, 4096, 14336])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_fused_hadamard_quantize_equals_the_two_ops(n, fp8, rows):
    """One kernel for QuaRot's online R4 + activation quantization gives the codes (and scales) of the
    Hadamard op followed by fake-quant, dynamic per-row and static."""
    from graphquant import hadamard  # noqa: F401  registers graphquant::hadamard_transform
    from graphquant.kernels import hadamard_triton as HT

    assert HT.fusable(n, torch.bfloat16)
    x = (torch.randn(rows, n, device="cuda") * 3).to(torch.bfloat16)
    assert_codes_of_fake_quant(lambda st: HT.hadamard_quantize(x, fp8, static_scale=st),
                               torch.ops.graphquant.hadamard_transform(x, False), fp8)


@pytest.mark.parametrize("n", [4096, 14336, 172 * 64])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_few_rows_epilogue_and_its_switches(n, fp8, static, rows, monkeypatch):
    """At decode sizes the quantization runs in the tiled transform's epilogue (every factored order, also
    11008 whose row fits no persistent kernel): a static scale per tile, a dynamic one from the tiles' maxima
    (a second launch). ``activation.FUSED_FEW_ROWS_STATIC`` / ``_DYNAMIC`` route ``quantize_static`` /
    ``quantize_dynamic`` through it with the same codes and scales as the two ops, launch after launch and
    under CUDA-graph replay."""
    from graphquant import hadamard  # noqa: F401  registers graphquant::hadamard_transform
    from graphquant.kernels import hadamard_triton as HT
    from graphquant.lowering import activation as A

    switch = "FUSED_FEW_ROWS_STATIC" if static else "FUSED_FEW_ROWS_DYNAMIC"
    monkeypatch.setattr(A, switch, True)
    x = (torch.randn(rows, n, device="cuda") * 3).to(torch.bfloat16)
    assert HT.fusable(n, torch.bfloat16, rows)
    kind = "per_tensor:sym:static" if static else "per_token:sym:dynamic"
    spec = f"{'fp8_e4m3' if fp8 else 'int8'}:{kind}:float:half_even"
    scale = torch.tensor(0.06, device="cuda")

    def run():
        out = A.quantize_static(x, scale, spec, hadamard=True) if static else A.quantize_dynamic(x, spec, True)
        return (out, None) if static else out

    assert A._fused_hadamard_quantize(x, static=static) is HT.hadamard_quantize
    one = eager_and_graphed(run)
    monkeypatch.setattr(A, switch, False)
    assert A._fused_hadamard_quantize(x, static=static) is None
    two = run()
    for q, s in one:
        assert torch.equal(q.view(torch.int8), two[0].view(torch.int8))
        assert static or torch.equal(s, two[1])
    big = torch.randn(HT.FEW_ROWS + 1, n, device="cuda", dtype=torch.bfloat16)
    assert A._fused_hadamard_quantize(big, static=static) is None


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("rows", [1, 16])
def test_split_dynamic_rows_switch_eager_and_compiled(fp8, rows, monkeypatch):
    """``activation.SPLIT_DYNAMIC_ROWS``: a few long rows get their per-token scales over tiles (two launches),
    eagerly and under ``torch.compile`` (one custom-op call instead of Inductor's kernels): fake-quant's codes
    and scales either way."""
    from graphquant.lowering import activation as A

    x = (torch.randn(rows, 14336, device="cuda") * 3).to(torch.bfloat16)
    spec = f"{'fp8_e4m3' if fp8 else 'int8'}:per_token:sym:dynamic:float:half_even"
    want = A.quantize_dynamic(x, spec)
    monkeypatch.setattr(A, "SPLIT_DYNAMIC_ROWS", True)
    assert A._split_rows(x) and not A._split_rows(x[:, :4096])
    eager = A.quantize_dynamic(x, spec)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: A.quantize_act_dynamic_node(t, spec), fullgraph=True)(x)
    for q, s in (eager, compiled):
        assert torch.equal(q.view(torch.int8), want[0].view(torch.int8))
        assert torch.equal(s.reshape(-1), want[1].reshape(-1))
    assert_codes_of_fake_quant(lambda st: A.quantize_dynamic(x, spec) if st is None else
                               (A.quantize_static(x, st, spec.replace("per_token", "per_tensor")
                                                  .replace("dynamic", "static")), None), x, fp8)


def assert_codes_of_fake_quant(quantize, y, fp8):
    """``quantize(static_scale)`` -> (codes, scale) gives fake-quant's codes of ``y``: per row with its own
    scales (``static_scale=None``), and under one static scale (then its scale is None)."""
    from graphquant.quant import fake_quant as FQ

    spec = f"{'fp8_e4m3' if fp8 else 'int8'}:per_token:sym:dynamic:float:half_even"
    q, s = quantize(None)
    q2, s2, _ = FQ.dynamic_quantize(y, spec)
    assert torch.equal(s, s2.float())
    assert torch.equal(q.float(), q2.float())
    st = s2.amax().reshape(())
    qs, none = quantize(st)
    assert none is None
    ref = FQ.quantize(y, st, torch.zeros((), dtype=torch.int32, device=y.device),
                      spec.replace("per_token", "per_tensor").replace("dynamic", "static"))
    assert torch.equal(qs.float(), ref.float())
