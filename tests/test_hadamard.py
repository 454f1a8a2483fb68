"""graphquant.hadamard: constructions, factorization, the fast transform and the custom op (CPU)."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphquant import UnsupportedHadamardSize
from graphquant import hadamard as H

REQUIRED_BASES = [1, 4, 12, 20, 28, 36, 40, 44, 52, 60, 76, 108, 140, 148, 156, 172]
MODEL_SIZES = {11008: (172, 6), 14336: (28, 9), 18944: (148, 7), 5632: (44, 7), 4864: (76, 6),
               4096: (1, 12), 128: (1, 7), 9984: (156, 6), 13824: (108, 7)}


def _eye(n):
    return torch.eye(n, dtype=torch.float64)


def _hadamard_rows(n: int, rows) -> torch.Tensor:
    """Rows of the orthonormal H_n from the definition H[a·2^k+b, c·2^k+d] = H_m[a,c]·(-1)^popcount(b&d),
    computed entry by entry: independent of the transform's reshapes."""
    m, k = H.factorize(n)
    hm = H.base_matrix(m, torch.float64)
    j = torch.arange(n)
    c, d = j // (1 << k), j % (1 << k)
    out = []
    for i in rows:
        a, b = divmod(int(i), 1 << k)
        parity = torch.zeros(n, dtype=torch.int64)
        for bit in range(k):
            parity ^= ((b & d) >> bit) & 1
        out.append(hm[a, c] * (1 - 2 * parity).to(torch.float64))
    return torch.stack(out) / math.sqrt(n)


# ---------------------------------------------------------------------------------------------
# Constructions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", REQUIRED_BASES)
def test_required_orders_orthonormal(m):
    h = H.hadamard_matrix(m, dtype=torch.float64)
    assert torch.allclose(h @ h.T, _eye(m), atol=1e-10, rtol=0)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(m)), atol=1e-15, rtol=0)
    for k in range(1, 11):  # every m·2^k is supported and factorizes to a base no larger than m
        mm, kk = H.factorize(m << k)
        assert mm << kk == m << k and mm <= max(m, 1)


def test_every_listed_base_order_is_exactly_hadamard():
    bases = H.supported_base_orders(256)
    for m in [12, 20, 28, 36, 44, 52, 60, 76, 92, 108, 116, 140, 148, 156, 172]:
        assert m in bases
    for m in bases:
        b = torch.from_numpy(H._base_pm1(m).astype(np.float64))  # integers: float64 products are exact
        assert set(b.unique().tolist()) <= {-1.0, 1.0}
        assert torch.equal(b @ b.T, m * _eye(m)), m


@pytest.mark.parametrize("q", [3, 7, 11, 19, 23, 27, 31, 43, 47, 59, 67, 71, 79, 83, 103, 107, 127, 131, 139, 243])
def test_paley_i(q):
    h = H.paley_i_matrix(q)
    assert np.array_equal(h @ h.T, (q + 1) * np.eye(q + 1, dtype=np.int64))
    s = h - np.eye(q + 1, dtype=np.int64)
    assert np.array_equal(s, -s.T)  # skew-Hadamard: not symmetric, so the transpose matters


@pytest.mark.parametrize("q", [5, 9, 13, 17, 25, 29, 37, 41, 49, 73, 81, 121, 125])
def test_paley_ii(q):
    h = H.paley_ii_matrix(q)
    assert np.array_equal(h @ h.T, 2 * (q + 1) * np.eye(2 * (q + 1), dtype=np.int64))


@pytest.mark.parametrize("q", [9, 25, 27, 49, 81, 121, 125, 243, 343])
def test_finite_field_character(q):
    chi = H.quadratic_character(q)
    assert chi[0] == 0 and (chi[1:] == 1).sum() == (q - 1) // 2  # half the nonzero elements are squares
    p, _ = H.prime_power(q)
    jac = H.jacobsthal_matrix(q)  # Q Qᵀ = qI - J and row sums 0 hold only for a genuine field
    assert np.array_equal(jac @ jac.T, q * np.eye(q, dtype=np.int64) - np.ones((q, q), dtype=np.int64))
    assert p in (3, 5, 7, 11)


def test_prime_power_and_bad_paley_arguments():
    assert H.prime_power(27) == (3, 3) and H.prime_power(25) == (5, 2) and H.prime_power(97) == (97, 1)
    assert H.prime_power(1) is None and H.prime_power(12) is None and H.prime_power(77) is None
    with pytest.raises(ValueError):
        H.paley_i_matrix(13)  # 13 ≡ 1 (mod 4)
    with pytest.raises(ValueError):
        H.paley_ii_matrix(35)  # not a prime power


@pytest.mark.parametrize("t", sorted(H._WILLIAMSON_SEQUENCES))
def test_williamson_sequences(t):
    seqs = [np.array(H._signs(s)) for s in H._WILLIAMSON_SEQUENCES[t]]
    for s in seqs:
        assert len(s) == t and np.array_equal(s[1:], s[1:][::-1])  # symmetric
    psd = sum(np.abs(np.fft.fft(s)) ** 2 for s in seqs)
    assert np.allclose(psd, 4 * t)
    h = H.williamson_array(*seqs)
    assert np.array_equal(h @ h.T, 4 * t * np.eye(4 * t, dtype=np.int64))


def test_goethals_seidel_sequences():
    for t, rows in H._GOETHALS_SEIDEL_SEQUENCES.items():
        seqs = [np.array(H._signs(s)) for s in rows]
        assert np.allclose(sum(np.abs(np.fft.fft(s)) ** 2 for s in seqs), 4 * t)
        for s in seqs:  # constant on the orbits of the multiplier group {1, 5, 8, 25} (documented)
            for g in (5, 8, 25):
                assert all(s[(i * g) % t] == s[i] for i in range(t))
        h = H.goethals_seidel_array(*seqs)
        assert np.array_equal(h @ h.T, 4 * t * np.eye(4 * t, dtype=np.int64))
    assert H.construction_of(156) == ("goethals_seidel", 39) and H.construction_of(172) == ("williamson", 43)


def test_kronecker_and_sylvester():
    assert H.construction_of(48 * 48)[0] in ("kronecker", "paley_i", "paley_ii")
    s = H.sylvester_matrix(4)
    assert np.array_equal(s, s.T) and np.array_equal(s @ s, 16 * np.eye(16, dtype=np.int64))
    assert np.array_equal(H.sylvester_matrix(3), np.kron(H.sylvester_matrix(1), H.sylvester_matrix(2)))


# ---------------------------------------------------------------------------------------------
# Factorization and errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,expected", sorted(MODEL_SIZES.items()))
def test_factorize_model_sizes(n, expected):
    assert H.factorize(n) == expected and H.is_supported(n)


def test_factorize_prefers_smallest_base():
    assert H.factorize(1) == (1, 0) and H.factorize(2) == (1, 1) and H.factorize(40) == (20, 1)
    assert H.factorize(312) == (156, 1)  # not Paley I's 312 = 311 + 1
    assert H.supported_base_orders(64) == [1, 12, 20, 28, 36, 44, 52, 60]


@pytest.mark.parametrize("n,below,above", [(154, "152 = 76·2^1", "156 = 156·2^0"), (15, "12 = 12·2^0", "16 = 1·2^4"),
                                           (188, "184 = 92·2^1", "192 = 12·2^4")])
def test_unsupported_sizes_name_alternatives(n, below, above):
    assert not H.is_supported(n)
    with pytest.raises(UnsupportedHadamardSize) as e:
        H.factorize(n)
    msg = str(e.value)
    assert below in msg.splitlines()[0] and above in msg.splitlines()[0]
    assert "random_orthogonal_matrix" in msg
    for fn in (H.hadamard_matrix, lambda n: H.hadamard_transform(torch.zeros(2, n)),
               lambda n: H.rotation_matrix(n, "random_hadamard")):
        with pytest.raises(UnsupportedHadamardSize):
            fn(n)
    assert H.rotation_matrix(n, "random").shape == (n, n)


def test_is_supported_rejects_non_orders():
    assert not H.is_supported(0) and not H.is_supported(-4) and not H.is_supported(2.5)
    with pytest.raises(TypeError):
        H.factorize(2.5)


# ---------------------------------------------------------------------------------------------
# Fast transform
# ---------------------------------------------------------------------------------------------
def _supported_up_to(limit):
    return [n for n in range(1, limit + 1) if H.is_supported(n)]


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from(_supported_up_to(1200)), lead=st.lists(st.integers(1, 3), max_size=2),
       transpose=st.booleans(), seed=st.integers(0, 2**16))
def test_transform_matches_dense(n, lead, transpose, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, generator=g, dtype=torch.float64)
    h = H.hadamard_matrix(n, dtype=torch.float64)
    y = H.hadamard_transform(x, transpose=transpose)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.allclose(y, x @ (h if transpose else h.T), atol=1e-12, rtol=0)
    assert torch.allclose(H.hadamard_transform(y, inverse=not transpose), x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("m", REQUIRED_BASES)
def test_large_orders_via_random_vectors(m):
    """All m·2^k ≤ 20000: isometry, inverse, and agreement with rows of H built from the definition."""
    g = torch.Generator().manual_seed(m)
    n = m
    while n <= 20000:
        x = torch.randn(4, n, generator=g, dtype=torch.float64)
        y = H.hadamard_transform(x)
        assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
        assert torch.allclose(H.hadamard_transform(y, transpose=True), x, atol=1e-10)
        rows = torch.randint(0, n, (3,), generator=g)
        assert torch.allclose(y[:, rows], x @ _hadamard_rows(n, rows).T, atol=1e-10)
        n *= 2


@pytest.mark.parametrize("n", [11008, 14336, 18944])
def test_model_sizes_float32(n):
    x = torch.randn(2, n, dtype=torch.float32)
    y = H.hadamard_transform(x)
    rows = torch.tensor([0, 1, n // 3, n - 1])
    ref = x.double() @ _hadamard_rows(n, rows).T
    assert torch.allclose(y[:, rows].double(), ref, atol=1e-5)
    assert torch.allclose(H.hadamard_transform(y, transpose=True), x, atol=1e-5)


@pytest.mark.parametrize("m", REQUIRED_BASES)
def test_dense_orthonormal_up_to_512(m):
    n = max(m, 1)
    while n <= 512:
        h = H.hadamard_matrix(n, dtype=torch.float64)
        assert torch.allclose(h @ h.T, _eye(n), atol=1e-10, rtol=0), n
        n *= 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_transform_low_precision_computes_in_float32(dtype):
    x = torch.randn(5, 172 * 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = H.hadamard_transform(x)
    ref = (x.double() @ H.hadamard_matrix(172 * 4, torch.float64).T).to(dtype)
    assert y.dtype == dtype
    if dtype == torch.float32:
        assert torch.allclose(y, ref, atol=1e-5, rtol=0)
    else:  # one rounding of the float32 result: at most one unit in the last place off the exact one,
        # plus the float32 accumulation error, which matters where the output cancels to near zero
        ulp = torch.finfo(dtype).eps * ref.float().abs().clamp_min(torch.finfo(dtype).tiny)
        f32_err = 64 * torch.finfo(torch.float32).eps * ref.float().abs().max()
        assert ((y.float() - ref.float()).abs() <= ulp + f32_err).all()


def test_transform_blocks_and_errors():
    x = torch.randn(3, 4 * 12, dtype=torch.float64)
    y = H.hadamard_transform(x, n=12)  # block-diagonal: each head of 12 on its own
    ref = (x.reshape(3, 4, 12) @ H.hadamard_matrix(12, torch.float64).T).reshape(3, 48)
    assert torch.allclose(y, ref, atol=1e-12)
    with pytest.raises(ValueError):
        H.hadamard_transform(x, n=36)
    with pytest.raises(TypeError):
        H.hadamard_transform(torch.ones(2, 4, dtype=torch.int32))
    e = torch.empty(0, 12)
    assert H.hadamard_transform(e).shape == (0, 12)
    one = torch.randn(3, 1)
    out = H.hadamard_transform(one)
    assert torch.equal(out, one) and out.data_ptr() != one.data_ptr()


def test_transform_non_contiguous_input():
    x = torch.randn(28, 6, dtype=torch.float64).T  # (6, 28), last dim strided
    assert torch.allclose(H.hadamard_transform(x), x @ H.hadamard_matrix(28, torch.float64).T, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Random rotations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 96, 154])
def test_random_orthogonal(n):
    q = H.random_orthogonal_matrix(n, seed=3, dtype=torch.float64)
    assert torch.allclose(q @ q.T, _eye(n), atol=1e-10)
    assert torch.equal(q, H.random_orthogonal_matrix(n, seed=3, dtype=torch.float64))
    if n > 1:
        assert not torch.allclose(q, H.random_orthogonal_matrix(n, seed=4, dtype=torch.float64))


def test_random_hadamard():
    r = H.random_hadamard_matrix(172, seed=1, dtype=torch.float64)
    assert torch.allclose(r @ r.T, _eye(172), atol=1e-10)
    signs = (r / H.hadamard_matrix(172, torch.float64))[0].round()
    assert set(signs.tolist()) == {-1.0, 1.0}
    assert torch.allclose(r, H.hadamard_matrix(172, torch.float64) * signs, atol=0)
    assert torch.equal(r, H.random_hadamard_matrix(172, seed=1, dtype=torch.float64))
    assert not torch.equal(r, H.random_hadamard_matrix(172, seed=2, dtype=torch.float64))


def test_rotation_matrix_kinds():
    assert torch.equal(H.rotation_matrix(12), H.hadamard_matrix(12))
    assert torch.equal(H.rotation_matrix(12, "random_hadamard", seed=5), H.random_hadamard_matrix(12, seed=5))
    assert H.rotation_matrix(10, "random", dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="unknown rotation kind"):
        H.rotation_matrix(12, "givens")


# ---------------------------------------------------------------------------------------------
# The custom op
# ---------------------------------------------------------------------------------------------
class _Rotate(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = torch.nn.Linear(n, n)

    def forward(self, x):
        return self.lin(H.hadamard_transform_op(x, True)) + H.hadamard_transform_op(x)


def test_op_numerics_and_opcheck():
    x = torch.randn(3, 4, 28)
    for tr in (False, True):
        assert torch.allclose(torch.ops.graphquant.hadamard_transform(x, tr), H.hadamard_transform(x, transpose=tr))
    torch.library.opcheck(torch.ops.graphquant.hadamard_transform.default, (torch.randn(2, 12, dtype=torch.float64), True))
    torch.library.opcheck(torch.ops.graphquant.hadamard_transform.default, (torch.randn(3, 16), False))


def test_op_autograd():
    x = torch.randn(2, 20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: H.hadamard_transform_op(t, False), (x,))
    assert torch.autograd.gradcheck(lambda t: H.hadamard_transform_op(t, True), (x,))


def test_op_in_torch_export():
    model = _Rotate(44).eval()
    x = torch.randn(2, 5, 44)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.graphquant.hadamard_transform.default) == 2
    x2 = torch.randn(7, 5, 44)
    assert torch.allclose(ep.module()(x2), model(x2), atol=1e-6)


def test_op_fake_rejects_unsupported_size_at_trace_time():
    with pytest.raises(UnsupportedHadamardSize):
        torch.export.export(_Rotate(154), (torch.randn(2, 154),))


def test_op_under_torch_compile():
    fn = torch.compile(lambda t: H.hadamard_transform_op(t * 2.0, False) + 1.0, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 36)
    assert torch.allclose(fn(x), H.hadamard_transform(x * 2.0) + 1.0, atol=1e-6)


def test_import_does_not_import_triton():
    code = "import sys, graphquant, graphquant.hadamard, graphquant.kernels; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_triton_plans_when_triton_is_installed():
    ht = pytest.importorskip("graphquant.kernels.hadamard_triton", exc_type=ImportError)
    for n in (64, 128, 4096, 14336, 18944, 172 * 64, 11008, 172 * 8, 24):
        p = ht.plan(n)
        assert p is not None and p.n == n
        if p.kind == "factored":
            assert p.M0 * p.D1 * p.D2 == n and p.BM * p.D1 * p.D2 <= ht.TILE_MAX
            assert p.D2 >= 16 and (p.D1 == 1 or p.D1 >= 16)
    assert ht.plan(154) is None
