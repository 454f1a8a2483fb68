"""Every graphquant Triton kernel compiles for an H100/H200 (sm_90) on a machine without a GPU.

The kernels only run on CUDA, so CPU CI never executes them; a kernel that Triton's front end
rejects (an fp8 branch of ``quant_triton.codes`` once returned two types and failed only on the
GPU) would otherwise land unnoticed. Here Triton's driver is replaced by one that reports an sm_90
target, every launch compiles its kernel (``warmup``) instead of running it, and the launch
wrappers are called with CPU tensors for each weight kind, activation kind, quantization epilogue
and Hadamard plan the decode and prefill paths use. Skipped without Triton, and on machines with a
GPU (the GPU tests compile and run the real kernels there).
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels here")

BF = torch.bfloat16


@pytest.fixture
def compile_only(monkeypatch):
    """Launches compile for sm_90 and return; yields the list of (kernel, error) found."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction
    except ImportError as e:  # a Triton whose internals moved: nothing to check with
        pytest.skip(f"this Triton ({triton.__version__}) has no {e.name}")
    target = GPUTarget("cuda", 90, 32)

    class Sm90Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return target

        def is_active(self):
            return True

    from graphquant.kernels import hadamard_triton as HT
    from graphquant.kernels import quant_triton as QT

    errors, touched = [], set()
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        touched.add(self)
        try:
            return run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - every failure is reported by the test
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            errors.append((self.fn.__name__, f"{type(cause).__name__}: {str(cause)[-400:]}"))

    monkeypatch.setattr(driver, "_active", Sm90Driver())  # restored afterwards (no real driver exists here)
    monkeypatch.setattr(JITFunction, "run", compile_instead)
    monkeypatch.setattr(QT, "_sm_count", lambda index: 132)
    monkeypatch.setattr(QT, "_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(HT, "_multiprocessors", lambda device: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    try:
        yield errors
    finally:
        for fn in touched:  # no sm_90 binary stays cached for this process's real device
            fn.device_caches.clear()


def _call(errors, what, fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a wrapper that fails before launching is an error too
        errors.append((what, f"{type(e).__name__}: {str(e)[:300]}"))


def _weight(kind, N, K):
    from graphquant.kernels import quant_triton as QT

    if kind.startswith("int4"):
        return dict(w=torch.zeros(N, K // 2, dtype=torch.uint8), w_scale=torch.rand(N, K // 128), w_kind=QT.W_INT4,
                    group=128, w_zero=torch.zeros(N, K // 128, dtype=torch.uint8) if kind == "int4z" else None)
    if kind == "fp8":
        return dict(w=torch.zeros(N, K, dtype=torch.float8_e4m3fn), w_scale=torch.rand(N), w_kind=QT.W_FP8)
    return dict(w=torch.zeros(N, K, dtype=torch.int8), w_scale=torch.rand(N), w_kind=QT.W_INT8)


def _activation(kind, M, K):
    if kind == "float":
        return dict(a=torch.randn(M, K, dtype=BF))
    dtype = torch.float8_e4m3fn if kind == "fp8" else torch.int8
    return dict(a=torch.zeros(M, K, dtype=dtype), a_scale=torch.rand(M, 1))


def test_decode_and_quantization_kernels_compile_for_sm90(compile_only):
    from graphquant.kernels import quant_triton as QT

    errors = compile_only
    N, K = 512, 1024
    for fp8 in (False, True):
        _call(errors, f"quantize_rows fp8={fp8}", lambda: QT.quantize_rows(torch.randn(3, K, dtype=BF), fp8))
        _call(errors, f"quantize_rows static fp8={fp8}",
              lambda: QT.quantize_rows(torch.randn(3, K, dtype=BF), fp8, torch.tensor(0.1)))
        _call(errors, f"quantize_rows split fp8={fp8}",  # a few long rows over tiles (two launches)
              lambda: QT.quantize_rows(torch.randn(2, 14336, dtype=BF), fp8, split=True))
    cases = [("float", "int8"), ("float", "int4"), ("float", "int4z"), ("int8", "int8"), ("fp8", "fp8")]
    for a_kind, w_kind in cases:
        bias = torch.randn(N, dtype=BF)
        for M in (1, 3):
            op = {**_activation(a_kind, M, K), **_weight(w_kind, N, K)}
            _call(errors, f"gemv {a_kind}/{w_kind} M={M}", lambda: QT.gemv(**op, bias=bias, out_dtype=BF))
        op = {**_activation(a_kind, 16, K), **_weight(w_kind, N, K)}
        _call(errors, f"wq_mm {a_kind}/{w_kind}", lambda: QT.wq_mm(**op, bias=bias, out_dtype=BF))
        tiles = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2)
        for split in (1, 4):  # one split writes the result; four write a workspace that split_sum adds up
            _call(errors, f"wq_mm {a_kind}/{w_kind} split={split}",
                  lambda: QT.wq_mm(**op, bias=bias, out_dtype=BF, config=dict(tiles, SPLIT_K=split)))
            if a_kind != "float":  # the weight tile as the left operand (warpgroup MMA on the codes)
                _call(errors, f"wq_mm {a_kind}/{w_kind} split={split} swap",
                      lambda: QT.wq_mm(**op, bias=bias, out_dtype=BF,
                                       config=dict(tiles, BLOCK_N=128, BLOCK_K=256, SPLIT_K=split, SWAP=True)))
        if a_kind == "float":
            for M in (1, 4):
                op = {**_activation(a_kind, M, K), **_weight(w_kind, N, K)}
                for prefetch in (False, True):
                    _call(errors, f"gemv_packed {w_kind} M={M} prefetch={prefetch}",
                          lambda: QT.gemv_packed(**op, bias=bias, out_dtype=BF,
                                                 config=dict(BLOCK_N=32, BLOCK_Q=64, SPLIT_K=2, num_warps=4,
                                                             PREFETCH=prefetch)))
                if w_kind.startswith("int4"):
                    for prefetch, split in ((False, 1), (True, 2)):
                        def w4_mma():  # None would mean it refused the operands: nothing compiled
                            out = QT.w4_mma(**op, bias=bias, out_dtype=BF,
                                            config=dict(BLOCK_N=64, SPLIT_K=split, num_warps=4, num_stages=2,
                                                        PREFETCH=prefetch))
                            if out is None:
                                raise AssertionError("w4_mma refused the operands")

                        _call(errors, f"w4_mma {w_kind} M={M} prefetch={prefetch} split={split}", w4_mma)
    for M, split in ((1, 1), (16, 4), (40, 2)):  # W8A16 on the fp16 tensor cores (its PTX conversion)
        op = {**_activation("float", M, K), **_weight("int8", N, K)}

        def w8_mma():  # None would mean it refused the operands: nothing compiled
            if QT.w8_mma(**op, bias=torch.randn(N, dtype=BF), out_dtype=BF,
                         config=dict(BLOCK_N=128, BLOCK_K=256, SPLIT_K=split, num_warps=4, num_stages=3,
                                     ONE_SCALE=split == 4)) is None:
                raise AssertionError("w8_mma refused the operands")

        _call(errors, f"w8_mma M={M} split={split}", w8_mma)
    for M, split, zero, dtype in ((1, 1, False, BF), (16, 4, True, torch.float16), (40, 2, False, BF)):  # W4A16,
        # the weight as the right operand
        op = {**_activation("float", M, K), **_weight("int4z" if zero else "int4", N, K)}

        def w4_f16mma():  # None would mean it refused the operands: nothing compiled
            if QT.w4_f16mma(**dict(op, a=op["a"].to(dtype)), bias=torch.randn(N, dtype=dtype), out_dtype=BF,
                            config=dict(BLOCK_N=128, SPLIT_K=split, num_warps=4, num_stages=3)) is None:
                raise AssertionError("w4_f16mma refused the operands")

        _call(errors, f"w4_f16mma M={M} split={split} zero={zero} {dtype}", w4_f16mma)
    for M, split, zero, dtype, gated in ((1, 1, False, BF, False), (2, 4, True, torch.float16, False),
                                         (4, 2, False, BF, False), (1, 4, False, BF, True),
                                         (1, 2, False, torch.float16, True)):  # W4A16 on the int8 tensor cores
        # (its pieces launch, with the SiLU·mul of a gate|up pair when gated, and the PTX nibble unpacking)
        op = {**_activation("float", M, 2 * K if gated else K), **_weight("int4z" if zero else "int4", N, K)}

        def w4_i8mma():  # None would mean it refused the operands: nothing compiled
            if QT.w4_i8mma(**dict(op, a=op["a"].to(dtype)), bias=torch.randn(N, dtype=dtype), out_dtype=BF,
                           config=dict(BLOCK_N=64, SPLIT_K=split, GPS=4, num_warps=4, num_stages=3),
                           gated=gated) is None:
                raise AssertionError("w4_i8mma refused the operands")

        _call(errors, f"w4_i8mma M={M} split={split} zero={zero} {dtype} gated={gated}", w4_i8mma)
    from graphquant.kernels.int8_gemm import int8_gemm  # prefill W8A8, its default Hopper tile

    a, w = torch.randint(-127, 128, (300, K), dtype=torch.int8), torch.randint(-127, 128, (N, K), dtype=torch.int8)
    for sa, sw, bias in ((torch.rand(300, 1), torch.rand(N), torch.randn(N, dtype=BF)),
                         (torch.rand(1), torch.rand(1), None)):
        _call(errors, f"int8_gemm bias={bias is not None}", lambda: int8_gemm(a, w, sa, sw, bias, BF))
    _call(errors, "int8_gemm K % BLOCK_K != 0", lambda: int8_gemm(a[:, :1000], w[:, :1000], sa, sw, None, BF))
    assert not errors, errors


def test_hadamard_kernels_compile_for_sm90(compile_only):
    from graphquant.kernels import hadamard_triton as HT

    errors = compile_only
    for n in (128, 4096, 14336, 172 * 64):
        for rows in (2, HT.FEW_ROWS + 1):  # the few-rows (tiled, row-splitting) plan and the plan itself
            xr = torch.randn(rows, n, dtype=BF)
            _call(errors, f"hadamard {n} rows={rows}", lambda: HT.hadamard_transform_triton(xr))
        x = torch.randn(2, n, dtype=BF)
        if HT.fusable(n, BF, 2):  # the tiled kernel's static-scale epilogue (few rows)
            for fp8 in (False, True):
                _call(errors, f"hadamard_quantize {n} static few rows fp8={fp8}",
                      lambda: HT.hadamard_quantize(x, fp8, static_scale=torch.tensor(0.5)))
        # the tiled kernel's dynamic-scale epilogue (few rows): every factored order here
        if HT._few_rows_tiled(HT.plan(n, 2), 2) or n != 128:
            for fp8 in (False, True):
                _call(errors, f"hadamard_quantize {n} dynamic few rows fp8={fp8}", lambda: HT.hadamard_quantize(x, fp8))
        if HT.fusable(n, BF):
            xp = torch.randn(HT.FEW_ROWS + 1, n, dtype=BF)  # the persistent kernels
            for fp8 in (False, True):
                _call(errors, f"hadamard_quantize {n} fp8={fp8}", lambda: HT.hadamard_quantize(xp, fp8))
                _call(errors, f"hadamard_quantize {n} static fp8={fp8}",
                      lambda: HT.hadamard_quantize(xp, fp8, static_scale=torch.tensor(0.5)))
    assert not errors, errors


def test_fast_codes_kernels_compile_for_sm90(compile_only, monkeypatch):
    """Every quantizing kernel with ``quant_triton.FAST_CODES`` (the FMA quotient and the conversion
    instructions' own rounding, ``tests/test_fast_codes.py``)."""
    from graphquant.kernels import hadamard_triton as HT
    from graphquant.kernels import quant_triton as QT

    monkeypatch.setattr(QT, "FAST_CODES", True)
    assert QT.fast_codes()
    errors = compile_only
    for fp8 in (False, True):
        _call(errors, f"quantize_rows fp8={fp8}", lambda: QT.quantize_rows(torch.randn(3, 1024, dtype=BF), fp8))
        _call(errors, f"quantize_rows static fp8={fp8}",
              lambda: QT.quantize_rows(torch.randn(3, 1024, dtype=BF), fp8, torch.tensor(0.1)))
        _call(errors, f"quantize_rows split fp8={fp8}",
              lambda: QT.quantize_rows(torch.randn(2, 14336, dtype=BF), fp8, split=True))
        # the tiled epilogue, the factored persistent kernel and (fp8 only: the same code for int8) the dense one
        for n, rows in ((14336, 2), (14336, HT.FEW_ROWS + 1)) + (((128, HT.FEW_ROWS + 1),) if fp8 else ()):
            x = torch.randn(rows, n, dtype=BF)
            if HT.fusable(n, BF, rows):
                _call(errors, f"hadamard_quantize {n} rows={rows} fp8={fp8}", lambda: HT.hadamard_quantize(x, fp8))
                _call(errors, f"hadamard_quantize {n} rows={rows} static fp8={fp8}",
                      lambda: HT.hadamard_quantize(x, fp8, static_scale=torch.tensor(0.5)))
    assert not errors, errors


def test_decode_attention_kernels_compile_for_sm90(compile_only):
    from graphquant.kernels import decode_attention_triton as DA

    errors = compile_only
    for hq, hkv, d in ((32, 8, 128), (16, 16, 64), (14, 2, 64)):
        q = torch.randn(2, 1, hq, d, dtype=BF).transpose(1, 2)
        k, v = (torch.randn(2, hkv, 384, d, dtype=BF) for _ in range(2))
        masks = {"none": None, "bool": torch.ones(2, 384, dtype=torch.bool),
                 "additive": torch.zeros(2, 384, dtype=BF)}
        for name, m in masks.items():
            for splits in (1, 6):
                _call(errors, f"decode_attention {hq}/{hkv}x{d} {name} splits={splits}",
                      lambda: DA.decode_attention_triton(q, k, v, m, d ** -0.5, splits=splits))
    assert not errors, errors


def test_every_tuned_decode_entry_names_a_kernel_and_its_options(compile_only):
    """``gemv_tuned.json`` (written on the GPU by ``benchmarks/decode_kernels.py``) picks a kernel and tile
    options per shape; each entry must name a kernel ``decode_mm`` runs, with options that kernel takes, and
    compile for sm_90 through ``decode_mm`` itself (a shrunken N keeps the weights small; K stays)."""
    import inspect

    from graphquant.kernels import quant_triton as QT

    table = QT._tuned("NVIDIA H200")
    assert table, "no tuned entries for the H200"
    kernels = {"gemv": QT.gemv_kernel, "gemv_packed": QT.gemv_packed_kernel, "w4_mma": QT.w4_mma_kernel,
               "wq_mm": QT.wq_mm_kernel, "w8_mma": QT.w8_mma_kernel, "w4_f16mma": QT.w4_f16mma_kernel,
               "w4_i8mma": QT.w4_i8mma_kernel}
    errors = compile_only
    seen = set()
    for (a_kind, w_kind, N, K, m), cfg in sorted(table.items()):
        impl = cfg.get("impl", "gemv")
        assert impl in (*kernels, "tinygemm"), (a_kind, w_kind, N, K, m, impl)
        options = {k for k in cfg if k not in ("impl", "us", "num_warps", "num_stages")}
        if impl in kernels:
            params = set(inspect.signature(kernels[impl].fn).parameters)
            assert options <= params, (impl, options - params)
        if impl == "tinygemm" or (impl, w_kind, a_kind, m, tuple(sorted(cfg.items()))) in seen:
            continue
        seen.add((impl, w_kind, a_kind, m, tuple(sorted(cfg.items()))))
        M = min(m, 16 if a_kind != QT.A_FLOAT else 64)
        kind = {QT.W_INT8: "int8", QT.W_FP8: "fp8", QT.W_INT4: "int4"}[w_kind]
        act = {QT.A_FLOAT: "float", QT.A_INT8: "int8", QT.A_FP8: "fp8"}[a_kind]
        op = {**_activation(act, M, K), **_weight(kind, 256, K)}
        monkey = dict(table)
        monkey[(a_kind, w_kind, 256, K, QT.m_bucket(M))] = cfg  # the entry, for the small N
        QT._tuned.cache_clear()
        try:
            orig = QT._tuned
            QT._tuned = lambda name, _t=monkey: _t
            _call(errors, f"decode_mm {impl} {a_kind}/{w_kind} K={K} M={M} {cfg}",
                  lambda: QT.decode_mm(**{k: v for k, v in op.items() if k != "w_kind"}, w_kind=w_kind,
                                       out_dtype=BF))
        finally:
            QT._tuned = orig
    assert not errors, errors
