"""Hadamard matrices of many orders, a fast transform, and random rotations.

A Hadamard matrix of order n has entries ±1 and H·Hᵀ = n·I; graphquant uses the orthonormal
H/√n. Constructions here:

- Sylvester: orders 2^k (H_{2k} = [[H, H], [H, -H]]).
- Paley I: order q + 1 for a prime power q ≡ 3 (mod 4), from the quadratic character of GF(q).
- Paley II: order 2(q + 1) for a prime power q ≡ 1 (mod 4).
- Kronecker products of the above.
(R. E. A. C. Paley, "On orthogonal matrices", J. Math. Phys. 12 (1933) 311-320.)

Every order n = m·2^k with a constructible base order m is supported, e.g. 11008 = 344·2^5
(Paley I over GF(7^3)), 14336 = 28·2^9, 18944 = 148·2^7 (Paley II, q = 73), 5632 = 44·2^7,
4864 = 76·2^6; 156·2^k and 172·2^k for k ≥ 1 via 312 (Paley I, q = 311) and 344. The bare orders
156 and 172 need a Williamson-type construction, which is not implemented.

``hadamard_transform(x)`` applies H along the last dim without building the n×n matrix when
n = m·2^k: a fast Walsh–Hadamard butterfly along 2^k (O(n log n)) and a dense m×m product.
Convention: H_n = H_m ⊗ H_{2^k} and ``hadamard_transform(x) == x @ hadamard_matrix(n).T``;
``transpose=True`` gives ``x @ hadamard_matrix(n)``.
"""
from __future__ import annotations

import functools
import math

import torch

from .errors import UnsupportedHadamardSize

MAX_BASE_ORDER = 2048  # largest base order m searched for a construction


# --- finite fields ---------------------------------------------------------------------------
def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e for a prime p, else None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    e, r = 0, q
    while r % p == 0:
        r //= p
        e += 1
    return (p, e) if r == 1 else None


def _polymod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); polynomials as coefficient lists, lowest degree first, f monic."""
    a = a[:]
    d = len(f) - 1
    while len(a) - 1 >= d:
        c = a[-1] % p
        if c:
            shift = len(a) - 1 - d
            for i, fc in enumerate(f):
                a[shift + i] = (a[shift + i] - c * fc) % p
        a.pop()
    return [x % p for x in a] + [0] * (d - len(a))


def _irreducible(p: int, e: int) -> list[int]:
    """A monic irreducible polynomial of degree e over GF(p) (found by trial division)."""
    if e == 1:
        return [0, 1]

    def polys(deg):
        for idx in range(p ** deg):
            coeffs = [(idx // p ** i) % p for i in range(deg)]
            yield coeffs + [1]

    for f in polys(e):
        if f[0] == 0:
            continue
        if all(any(_polymod(f, g, p)) for d in range(1, e // 2 + 1) for g in polys(d)):
            return f
    raise RuntimeError(f"no irreducible polynomial of degree {e} over GF({p})")  # pragma: no cover


@functools.lru_cache(maxsize=None)
def _quadratic_character(q: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """χ(x) for every element of GF(q) (elements indexed 0..q-1, index 0 = zero), and the table
    of differences index(a - b)."""
    p, e = _prime_power(q)
    f = _irreducible(p, e)
    elems = [[(i // p ** k) % p for k in range(e)] for i in range(q)]

    def index(v):
        return sum((c % p) * p ** k for k, c in enumerate(v))

    def mul(a, b):
        prod = [0] * (2 * e - 1)
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                prod[i + j] += x * y
        return _polymod(prod, f, p)

    squares = {index(mul(v, v)) for v in elems[1:]}
    chi = tuple(0 if i == 0 else (1 if i in squares else -1) for i in range(q))
    diff = tuple(tuple(index([(x - y) % p for x, y in zip(elems[i], elems[j])]) for j in range(q)) for i in range(q))
    return chi, diff


def _jacobsthal(q: int) -> torch.Tensor:
    chi, diff = _quadratic_character(q)
    return torch.tensor([[chi[diff[i][j]] for j in range(q)] for i in range(q)], dtype=torch.float64)


def paley1(q: int) -> torch.Tensor:
    """Paley I: a ±1 Hadamard matrix of order q + 1, q ≡ 3 (mod 4) a prime power."""
    Q = _jacobsthal(q)
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + torch.eye(n, dtype=torch.float64)


def paley2(q: int) -> torch.Tensor:
    """Paley II: a ±1 Hadamard matrix of order 2(q + 1), q ≡ 1 (mod 4) a prime power."""
    Q = _jacobsthal(q)
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = 1
    S[1:, 1:] = Q
    A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(S, A) + torch.kron(torch.eye(n, dtype=torch.float64), B)


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's ±1 Hadamard matrix of order n = 2^k."""
    if n < 1 or n & (n - 1):
        raise UnsupportedHadamardSize(f"Sylvester construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# --- which base orders are constructible -------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _constructions() -> dict[int, tuple]:
    """base order m -> recipe: ("sylvester",) | ("paley1", q) | ("paley2", q) | ("kron", a, b)."""
    table: dict[int, tuple] = {1: ("sylvester",), 2: ("sylvester",)}
    for q in range(3, MAX_BASE_ORDER):
        if _prime_power(q) is None:
            continue
        if q % 4 == 3 and q + 1 <= MAX_BASE_ORDER:
            table.setdefault(q + 1, ("paley1", q))
        if q % 4 == 1 and 2 * (q + 1) <= MAX_BASE_ORDER:
            table.setdefault(2 * (q + 1), ("paley2", q))
    base = sorted(table)
    for a in base:
        for b in base:
            if a > 1 and b > 1 and a * b <= MAX_BASE_ORDER:
                table.setdefault(a * b, ("kron", a, b))
    return table


def supported_base_orders() -> list[int]:
    """Base orders m (not multiples of 8 unless needed) with a construction here, ascending."""
    return sorted(_constructions())


@functools.lru_cache(maxsize=64)
def _base_pm1(m: int) -> torch.Tensor:
    """The ±1 matrix of base order m (float64, CPU); small and cached."""
    recipe = _constructions()[m]
    kind = recipe[0]
    if kind == "sylvester":
        return sylvester(m)
    if kind == "paley1":
        return paley1(recipe[1])
    if kind == "paley2":
        return paley2(recipe[1])
    return torch.kron(_base_pm1(recipe[1]), _base_pm1(recipe[2]))


def _try_factorize(n: int) -> tuple[int, int] | None:
    if n < 1:
        return None
    table = _constructions()
    k = (n & -n).bit_length() - 1
    for kk in range(k, -1, -1):
        if (n >> kk) in table:
            return n >> kk, kk
    return None


def factorize(n: int) -> tuple[int, int]:
    """(m, k) with n = m·2^k and m constructible, taking the largest k (smallest m)."""
    mk = _try_factorize(int(n))
    if mk is None:
        raise UnsupportedHadamardSize(_unsupported_message(int(n)))
    return mk


def is_supported(n: int) -> bool:
    return _try_factorize(int(n)) is not None


def _unsupported_message(n: int) -> str:
    below = next((s for s in range(n - 1, 0, -1) if is_supported(s)), None) if n > 1 else None
    above = next(s for s in range(max(n + 1, 1), 4 * n + 8) if is_supported(s))
    fmt = lambda s: f"{s} = {factorize(s)[0]}·2^{factorize(s)[1]}"  # noqa: E731
    near = ", ".join(fmt(s) for s in (below, above) if s)
    return (f"no Hadamard matrix of order {n} can be built here: n must be m·2^k with m a constructible base order "
            f"(Sylvester, Paley I/II, Kronecker products; m ≤ {MAX_BASE_ORDER}). Nearest supported sizes: {near}. "
            "Offline rotations can use random_orthogonal_matrix(n) instead.")


# --- dense matrices -----------------------------------------------------------------------------
def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The orthonormal Hadamard matrix of order n (H·Hᵀ = I), as H_m ⊗ H_{2^k} / √n."""
    m, k = factorize(n)
    h = torch.kron(_base_pm1(m), sylvester(1 << k)) / math.sqrt(n)
    return h.to(dtype=dtype, device=device)


def random_hadamard_matrix(n: int, seed: int = 0, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """H·diag(±1) with seeded random signs: orthonormal, and a different rotation per seed."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
    return (hadamard_matrix(n, torch.float64) * signs[None, :]).to(dtype=dtype, device=device)


def random_orthogonal_matrix(n: int, seed: int = 0, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """A seeded random orthogonal matrix of any order (QR of a Gaussian matrix, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return q.to(dtype=dtype, device=device)


def rotation_matrix(n: int, kind: str = "hadamard", seed: int = 0, dtype: torch.dtype = torch.float32,
                    device=None) -> torch.Tensor:
    """An orthogonal n×n matrix for offline rotations: ``hadamard``, ``random_hadamard`` or ``random``."""
    if kind == "hadamard":
        return hadamard_matrix(n, dtype, device)
    if kind == "random_hadamard":
        return random_hadamard_matrix(n, seed, dtype, device)
    if kind == "random":
        return random_orthogonal_matrix(n, seed, dtype, device)
    raise ValueError(f"unknown rotation kind {kind!r}; use 'hadamard', 'random_hadamard' or 'random'")


# --- fast transform -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _base_on(m: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return _base_pm1(m).to(dtype=dtype, device=device)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform (Sylvester order) along the last dim (a power of two)."""
    p = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < p:
        x = x.reshape(*lead, p // (2 * h), 2, h)
        a, b = x[..., 0, :], x[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(*lead, p)


def hadamard_transform(x: torch.Tensor, n: int | None = None, transpose: bool = False) -> torch.Tensor:
    """``x @ hadamard_matrix(n).T`` (or ``x @ hadamard_matrix(n)`` with ``transpose``) along the last
    dim, in O(n log n) for the 2^k factor and a dense m×m product for the base order."""
    n = x.shape[-1] if n is None else int(n)
    if x.shape[-1] != n:
        raise ValueError(f"hadamard_transform: last dim {x.shape[-1]} != n {n}")
    m, k = factorize(n)
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    y = x.to(compute).reshape(*x.shape[:-1], m, 1 << k)
    y = _fwht(y)
    if m > 1:
        hm = _base_on(m, compute, str(y.device))
        y = torch.matmul(hm.T if transpose else hm, y)  # rows mixed by H_m (Hᵀ for the transpose)
    y = y.reshape(x.shape) * (1.0 / math.sqrt(n))
    return y.to(x.dtype)


# --- the custom op (export / compile friendly) ------------------------------------------------------
@torch.library.custom_op("graphquant::hadamard_transform", mutates_args=())
def _hadamard_op(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    if x.is_cuda:
        try:
            from .kernels import hadamard_triton

            return hadamard_triton.hadamard_transform(x, transpose)
        except ImportError:
            pass
    return hadamard_transform(x.contiguous(), transpose=transpose)


@_hadamard_op.register_fake
def _(x, transpose=False):
    return torch.empty_like(x)


def hadamard_transform_op(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``torch.ops.graphquant.hadamard_transform``: the transform as a graph node."""
    return torch.ops.graphquant.hadamard_transform(x, transpose)
