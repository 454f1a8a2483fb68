"""Hadamard matrices, fast Hadamard transforms and random rotations.

A Hadamard matrix of order ``n`` is an ``n×n`` matrix of ±1 with ``H Hᵀ = n I``. graphquant
uses the *orthonormal* version ``H / √n`` as a rotation: offline (R1, R2: folded into weights)
and online (R3, R4: a ``graphquant::hadamard_transform`` node in the graph).

Orders and factorization
    Every supported order is written ``n = m · 2^k`` where ``m`` is a *base order* with a known
    construction and ``2^k`` is a Sylvester factor. :func:`factorize` picks the smallest such
    ``m`` (the largest power of two), because the fast transform costs ``O(n·(m + log n))``.

Convention (used everywhere: the dense matrix, the torch transform, the Triton kernel)
    ``H_n = H_m ⊗ H_{2^k}`` (Kronecker product, the base order outside), scaled by ``1/√n``.
    Index ``i`` of a vector of length ``n`` is ``i = a·2^k + b`` with ``a < m``, ``b < 2^k``,
    i.e. the vector viewed as an ``(m, 2^k)`` row-major matrix ``X`` is transformed to
    ``H_m · X · H_{2^k}ᵀ`` (``H_{2^k}`` is symmetric). Row vectors are transformed on the right:

    * ``hadamard_transform(x) == x @ hadamard_matrix(n).T``
    * ``hadamard_transform(x, transpose=True) == x @ hadamard_matrix(n)`` (the inverse).

    Sylvester matrices are symmetric, Paley, Williamson and Goethals–Seidel matrices are not,
    so ``transpose`` matters whenever ``m > 1``.

Constructions of the base orders (each a small function below)
    * Sylvester: ``H_{2^k} = H_2^{⊗k}`` (natural, not sequency, order).
    * Paley I: order ``q + 1`` for a prime power ``q ≡ 3 (mod 4)``.
    * Paley II: order ``2(q + 1)`` for a prime power ``q ≡ 1 (mod 4)``.
      Both use the quadratic character of the finite field GF(q), implemented here for prime
      powers (e.g. 28 = 27 + 1, 52 = 2·(25 + 1)).
    * Williamson array (symmetric circulant blocks) and Goethals–Seidel array (circulant
      blocks): orders ``4·t`` from four ±1 sequences of length ``t`` — 92, 116, 156, 172.
    * Kronecker products of constructible orders.

Offline rotations may use any orthogonal matrix: :func:`random_orthogonal_matrix` exists for
the sizes no Hadamard matrix is known for.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import numpy as np
import torch

from .errors import UnsupportedHadamardSize

__all__ = ["hadamard_matrix", "is_supported", "factorize", "supported_base_orders", "hadamard_transform",
           "hadamard_transform_op", "random_hadamard_matrix", "random_orthogonal_matrix", "rotation_matrix",
           "sylvester_matrix", "paley_i_matrix", "paley_ii_matrix", "williamson_array", "goethals_seidel_array",
           "construction_of"]

# Base orders whose ±1 matrix is kept in the cache (an int8 matrix of order 2048 is 4 MiB).
_MAX_CACHED_ORDER = 2048


# ---------------------------------------------------------------------------------------------
# Integer helpers and finite fields
# ---------------------------------------------------------------------------------------------
def _smallest_prime_factor(n: int) -> int:
    if n % 2 == 0:
        return 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return f
        f += 2
    return n


def prime_power(q: int) -> Optional[Tuple[int, int]]:
    """``(p, e)`` with ``q = p^e`` for a prime ``p``, or ``None`` when ``q`` is not a prime power."""
    if q < 2:
        return None
    p = _smallest_prime_factor(q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _primitive_element_powers(p: int, e: int) -> np.ndarray:
    """Powers ``g^0, g^1, …, g^(q-2)`` of a primitive element ``g`` of GF(p^e).

    Elements are coded as integers ``Σ c_i p^i`` (the coefficients of a polynomial over GF(p)
    reduced modulo a monic polynomial ``f`` of degree ``e``). ``g = x`` and ``f`` is the first
    primitive polynomial found in lexicographic order: if ``x`` has multiplicative order
    ``p^e - 1`` in ``GF(p)[x]/(f)``, that ring has ``p^e - 1`` units, so ``f`` is irreducible and
    the ring is the field.
    """
    q = p ** e
    weights = p ** np.arange(e)
    for code in range(1, q):  # the low coefficients c_0..c_{e-1} of f = x^e + Σ c_i x^i, c_0 ≠ 0
        low = [(code // p ** i) % p for i in range(e)]
        if low[0] == 0:
            continue
        state = [1] + [0] * (e - 1)  # the polynomial 1
        powers = np.empty(q - 1, dtype=np.int64)
        primitive = True
        for t in range(q - 1):
            powers[t] = int(np.dot(state, weights))
            if t > 0 and powers[t] == 1:
                primitive = False
                break
            top = state[-1]  # multiply by x, then reduce x^e = -Σ c_i x^i
            state = [0] + state[:-1]
            state = [(s - top * c) % p for s, c in zip(state, low)]
        if primitive and state == [1] + [0] * (e - 1):
            return powers
    raise AssertionError(f"no primitive polynomial of degree {e} over GF({p})")  # pragma: no cover


def quadratic_character(q: int) -> np.ndarray:
    """``χ`` of GF(q) as an int array indexed by the element code: 0 at 0, +1 on squares, -1 else."""
    p, e = prime_power(q) or (None, None)
    if p is None or p == 2:
        raise ValueError(f"quadratic_character needs an odd prime power, got {q}")
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    if e == 1:
        chi[(np.arange(1, p, dtype=np.int64) ** 2) % p] = 1
    else:
        chi[_primitive_element_powers(p, e)[0::2]] = 1  # even powers of a generator are the squares
    return chi


def _field_differences(q: int) -> np.ndarray:
    """``D[i, j]`` = code of ``a_i - a_j`` in GF(q), ``a_i`` the element coded ``i``."""
    p, e = prime_power(q)
    codes = np.arange(q, dtype=np.int64)
    if e == 1:
        return (codes[:, None] - codes[None, :]) % p
    digits = (codes[:, None] // p ** np.arange(e)) % p  # (q, e) coefficient vectors
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return diff @ (p ** np.arange(e))


def jacobsthal_matrix(q: int) -> np.ndarray:
    """The ``q×q`` Jacobsthal matrix ``Q[i, j] = χ(a_i - a_j)`` of GF(q), ``q`` an odd prime power."""
    return quadratic_character(q)[_field_differences(q)]


# ---------------------------------------------------------------------------------------------
# Constructions (all return ±1 matrices as int64 numpy arrays)
# ---------------------------------------------------------------------------------------------
def sylvester_matrix(k: int) -> np.ndarray:
    """Sylvester's ``H_{2^k} = H_2 ⊗ … ⊗ H_2`` with ``H_2 = [[1, 1], [1, -1]]``; symmetric.

    Entry ``(i, j)`` is ``(-1)^popcount(i & j)``.
    """
    idx = np.arange(1 << k, dtype=np.int64)
    bits = idx[:, None] & idx[None, :]
    parity = np.zeros_like(bits)
    for b in range(k):
        parity ^= (bits >> b) & 1
    return 1 - 2 * parity


def paley_i_matrix(q: int) -> np.ndarray:
    """Paley's first construction: order ``q + 1`` for a prime power ``q ≡ 3 (mod 4)``.

    ``Q`` (Jacobsthal) is skew-symmetric, ``S = [[0, 1ᵀ], [-1, Q]]`` is skew with
    ``S Sᵀ = q I``, and ``H = I + S`` (R. E. A. C. Paley, "On orthogonal matrices",
    J. Math. Phys. 12 (1933) 311–320).
    """
    if prime_power(q) is None or q % 4 != 3:
        raise ValueError(f"Paley I needs a prime power q ≡ 3 (mod 4), got {q}")
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal_matrix(q)
    return np.eye(q + 1, dtype=np.int64) + s


def paley_ii_matrix(q: int) -> np.ndarray:
    """Paley's second construction: order ``2(q + 1)`` for a prime power ``q ≡ 1 (mod 4)``.

    ``Q`` is symmetric, ``C = [[0, 1ᵀ], [1, Q]]`` is a symmetric conference matrix
    (``C Cᵀ = q I``) and ``H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]`` (Paley 1933).
    """
    if prime_power(q) is None or q % 4 != 1:
        raise ValueError(f"Paley II needs a prime power q ≡ 1 (mod 4), got {q}")
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = jacobsthal_matrix(q)
    return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(q + 1, dtype=np.int64),
                                                            np.array([[1, -1], [-1, -1]]))


def circulant(first_row) -> np.ndarray:
    """The circulant matrix ``M[i, j] = a[(j - i) mod t]`` of a sequence ``a``."""
    a = np.asarray(first_row, dtype=np.int64)
    t = len(a)
    return a[(np.arange(t)[None, :] - np.arange(t)[:, None]) % t]


def williamson_array(a, b, c, d) -> np.ndarray:
    """Williamson's array: order ``4t`` from symmetric circulant ±1 matrices of order ``t``.

    With ``A² + B² + C² + D² = 4t I`` (the four blocks commute and are symmetric),
    ``[[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]`` is Hadamard
    (J. Williamson, "Hadamard's determinant theorem and the sum of four squares",
    Duke Math. J. 11 (1944) 65–81).
    """
    A, B, C, D = (circulant(s) for s in (a, b, c, d))
    return np.block([[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]])


def goethals_seidel_array(a, b, c, d) -> np.ndarray:
    """The Goethals–Seidel array: order ``4t`` from circulant (not necessarily symmetric) blocks.

    With ``A Aᵀ + B Bᵀ + C Cᵀ + D Dᵀ = 4t I`` and ``R`` the back-diagonal permutation,
    ``[[A, BR, CR, DR], [-BR, A, DᵀR, -CᵀR], [-CR, -DᵀR, A, BᵀR], [-DR, CᵀR, -BᵀR, A]]``
    is Hadamard (J. M. Goethals and J. J. Seidel, "A skew Hadamard matrix of order 36",
    J. Austral. Math. Soc. 11 (1970) 343–344).
    """
    A, B, C, D = (circulant(s) for s in (a, b, c, d))
    R = np.eye(len(a), dtype=np.int64)[::-1]
    return np.block([[A, B @ R, C @ R, D @ R],
                     [-B @ R, A, D.T @ R, -C.T @ R],
                     [-C @ R, -D.T @ R, A, B.T @ R],
                     [-D @ R, C.T @ R, -B.T @ R, A]])


def _signs(s: str) -> list:
    return [1 if ch == "+" else -1 for ch in s]


# Four ±1 sequences of length t whose periodic autocorrelations sum to 0 at every nonzero shift
# (equivalently Σ |DFT|² = 4t at every frequency). Williamson matrices of these orders are
# classical (t = 23: Baumert, Golomb & Hall 1962; t = 29: Baumert 1966; t = 43: Williamson 1944;
# t = 39: D. Ž. Đoković, "Williamson matrices of order 4n for n = 33, 35, 39", Discrete Math.
# 115 (1993) 267–271). The sequences below were not copied from those papers or any table: they
# were found by our own exhaustive search over sequences that are constant on the orbits of a
# multiplier group G ≤ Z_t^* acting on Z_t (a standard way to shrink the search; 2^(#orbits)
# candidates per sequence, meet-in-the-middle on the power spectra), and are checked by the tests.
#   t = 23, 29: G = {±1} (symmetric sequences) → Williamson array.
#   t = 43:     G = {±1, ±6, ±36} (symmetric)   → Williamson array.
#   t = 39:     G = {1, 5, 8, 25} (not symmetric) → Goethals–Seidel array.
_WILLIAMSON_SEQUENCES = {
    23: ("+++++-++---++---++-++++", "+-+++--++-+--+-++--+++-",
         "+-+--+++++----+++++--+-", "+--++-+-+------+-+-++--"),
    29: ("+++++++---+-++--++-+---++++++", "++-+++---+--+-++-+--+---+++-+",
         "++++---+++-+--++--+-+++---+++", "+-+-++---+--+-++-+--+---++-+-"),
    43: ("+++++-++----+-++--++-++-++--++-+----++-++++", "+++---++--+-+-+-++--------++-+-+-+--++---++",
         "++-+-++++-+--+--+++--++--+++--+--+-++++-+-+", "+-++-----++++-+-+++-++++-+++-+-++++-----++-"),
}
_GOETHALS_SEIDEL_SEQUENCES = {
    39: ("++++++++++++---+++-++-+-++----+-++-++--", "++++++-++-++---+++-++-+-++------+--++--",
         "+-+++-----++-+-++---+-+++-+-++--+---++-", "+-+---+--++++---+-+--+-+---++++--+---+-"),
}


# ---------------------------------------------------------------------------------------------
# Which base orders can be built, and how
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def construction_of(m: int) -> Optional[tuple]:
    """How order ``m`` is built: ``("sylvester", k)``, ``("paley_i", q)``, ``("paley_ii", q)``,
    ``("williamson", t)``, ``("goethals_seidel", t)``, ``("kronecker", a, b)``, or ``None``."""
    if m < 1:
        return None
    if m & (m - 1) == 0:
        return ("sylvester", m.bit_length() - 1)
    if m % 4:
        return None  # Hadamard matrices exist only for orders 1, 2 and multiples of 4
    q = m - 1
    if q % 4 == 3 and prime_power(q):
        return ("paley_i", q)
    q = m // 2 - 1
    if q % 4 == 1 and prime_power(q):
        return ("paley_ii", q)
    if m // 4 in _WILLIAMSON_SEQUENCES:
        return ("williamson", m // 4)
    if m // 4 in _GOETHALS_SEIDEL_SEQUENCES:
        return ("goethals_seidel", m // 4)
    for a in range(4, math.isqrt(m) + 1, 4):  # products of two orders that are multiples of 4
        if m % a == 0 and (m // a) % 4 == 0 and construction_of(a) and construction_of(m // a):
            return ("kronecker", a, m // a)
    return None


def _build_base(m: int) -> np.ndarray:
    how = construction_of(m)
    if how is None:
        raise UnsupportedHadamardSize(_unsupported_message(m))
    kind = how[0]
    if kind == "sylvester":
        return sylvester_matrix(how[1])
    if kind == "paley_i":
        return paley_i_matrix(how[1])
    if kind == "paley_ii":
        return paley_ii_matrix(how[1])
    if kind == "williamson":
        return williamson_array(*map(_signs, _WILLIAMSON_SEQUENCES[how[1]]))
    if kind == "goethals_seidel":
        return goethals_seidel_array(*map(_signs, _GOETHALS_SEIDEL_SEQUENCES[how[1]]))
    return np.kron(_base_pm1(how[1]), _base_pm1(how[2])).astype(np.int64)


@functools.lru_cache(maxsize=32)
def _cached_base(m: int) -> np.ndarray:
    h = _build_base(m).astype(np.int8)
    h.setflags(write=False)
    return h


def _base_pm1(m: int) -> np.ndarray:
    """The ±1 (unnormalized) base matrix of order ``m``, int8; cached for small orders."""
    return _cached_base(m) if m <= _MAX_CACHED_ORDER else _build_base(m).astype(np.int8)


def base_matrix(m: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The ±1 (not normalized) base matrix ``H_m`` as a tensor (a fresh copy)."""
    return torch.from_numpy(_base_pm1(m).astype(np.float64)).to(dtype=dtype, device=device)


def factorize(n: int) -> Tuple[int, int]:
    """``(m, k)`` with ``n = m · 2^k`` and ``m`` the smallest base order with a construction.

    ``m == 1`` means pure Sylvester. Raises :class:`UnsupportedHadamardSize` (with the nearest
    supported orders) when no construction is known.
    """
    result = _factorize(_as_order(n))
    if result is None:
        raise UnsupportedHadamardSize(_unsupported_message(int(n)))
    return result


@functools.lru_cache(maxsize=4096)
def _factorize(n: int) -> Optional[Tuple[int, int]]:
    if n < 1:
        return None
    twos = (n & -n).bit_length() - 1
    odd = n >> twos
    for i in range(twos + 1):  # smallest m = odd · 2^i first
        m = odd << i
        if construction_of(m):
            return m, twos - i
    return None


def is_supported(n: int) -> bool:
    """Whether a Hadamard matrix of order ``n`` can be built here."""
    try:
        return _factorize(_as_order(n)) is not None
    except (TypeError, ValueError):
        return False


def supported_base_orders(limit: int = 256) -> list:
    """The base orders ``m ≤ limit`` that :func:`factorize` can return (``m = 1`` is Sylvester).

    Orders such as 4 or 40 are supported too, but factorize to a smaller base
    (``4 = 1·2^2``, ``40 = 20·2``), so they are not listed.
    """
    return [m for m in range(1, int(limit) + 1) if _factorize(m) == (m, 0)]


def _as_order(n) -> int:
    if isinstance(n, bool) or int(n) != n:
        raise TypeError(f"a Hadamard order must be an integer, got {n!r}")
    return int(n)


def _describe(n: int) -> str:
    m, k = _factorize(n)
    return f"{n} = {m}·2^{k}"


def _nearest_supported(n: int, direction: int, max_steps: int = 100_000) -> Optional[int]:
    cand = n + direction
    for _ in range(max_steps):
        if cand < 1:
            return None
        if _factorize(cand) is not None:
            return cand
        cand += direction
    return None  # pragma: no cover


def _prime_factors(n: int) -> str:
    out, rest = [], n
    while rest > 1:
        p = _smallest_prime_factor(rest)
        out.append(p)
        rest //= p
    return "·".join(map(str, out)) or str(n)


def _unsupported_message(n: int) -> str:
    below, above = _nearest_supported(n, -1) if n > 1 else None, _nearest_supported(n, +1)
    near = ", ".join(f"{_describe(c)} ({side})" for c, side in ((below, "below"), (above, "above")) if c)
    why = ("Hadamard matrices exist only for orders 1, 2 and multiples of 4" if n > 2 and n % 4
           else "no construction of its base order is known here (Sylvester, Paley I/II, Williamson, "
                "Goethals–Seidel, Kronecker products)")
    return (f"no Hadamard matrix of order {n} (= {_prime_factors(n)}): {why}; nearest supported orders: "
            f"{near or 'none'}\n"
            f"Offline rotations (R1, R2) can use random_orthogonal_matrix({n}) instead "
            f"(rotation_matrix({n}, kind='random')); online rotations need a supported order.")


# ---------------------------------------------------------------------------------------------
# Dense matrices
# ---------------------------------------------------------------------------------------------
def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The orthonormal Hadamard matrix ``H_n = (H_m ⊗ H_{2^k}) / √n`` (``H Hᵀ = I``).

    Built in float64, then cast. This is a dense ``n×n`` matrix: to *apply* it to activations use
    :func:`hadamard_transform`, which never builds it.
    """
    m, k = factorize(n)
    h = torch.from_numpy(np.kron(_base_pm1(m).astype(np.float64), sylvester_matrix(k).astype(np.float64)))
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def random_hadamard_matrix(n: int, seed: int = 0, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``H_n · diag(s)`` with seeded random signs ``s ∈ {±1}^n``: orthonormal, reproducible."""
    signs = torch.randint(0, 2, (n,), generator=_generator(seed)).to(torch.float64) * 2 - 1
    return (hadamard_matrix(n, dtype=torch.float64) * signs[None, :]).to(dtype=dtype, device=device)


def random_orthogonal_matrix(n: int, seed: int = 0, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """A seeded Haar-random orthogonal matrix of any order (QR of a Gaussian, signs fixed)."""
    n = _as_order(n)
    if n < 1:
        raise ValueError(f"order must be positive, got {n}")
    g = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r))[None, :]  # makes the factorization unique → Haar measure
    return q.to(dtype=dtype, device=device)


ROTATION_KINDS = ("hadamard", "random_hadamard", "random")


def rotation_matrix(n: int, kind: str = "hadamard", seed: int = 0, dtype: torch.dtype = torch.float32,
                    device=None) -> torch.Tensor:
    """An orthonormal rotation of order ``n`` for the offline passes.

    ``kind``: ``"hadamard"`` (deterministic), ``"random_hadamard"`` (H·diag(±1), seeded) or
    ``"random"`` (Haar orthogonal, any ``n``). Hadamard kinds raise
    :class:`UnsupportedHadamardSize` for orders without a construction.
    """
    if kind == "hadamard":
        return hadamard_matrix(n, dtype=dtype, device=device)
    if kind == "random_hadamard":
        return random_hadamard_matrix(n, seed=seed, dtype=dtype, device=device)
    if kind == "random":
        return random_orthogonal_matrix(n, seed=seed, dtype=dtype, device=device)
    raise ValueError(f"unknown rotation kind {kind!r}; expected one of {ROTATION_KINDS}")


# ---------------------------------------------------------------------------------------------
# Fast transform (torch, any device)
# ---------------------------------------------------------------------------------------------
# The 2^k factor is applied in radix-2^r butterfly stages: H_{2^k} = H_{2^r1} ⊗ H_{2^r2} ⊗ …,
# each stage a batched product with a small Sylvester matrix along one axis. r = 1 is the
# classic butterfly; a few bits per stage trade a little arithmetic for far fewer passes over
# memory. Total cost O(n · (m + 2^R · k / R)) = O(n log n) for a fixed radix R.
_RADIX_BITS = 5


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64:
        return torch.float64
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    raise TypeError(f"hadamard_transform needs a floating-point tensor (float64/32/16, bfloat16), got {dtype}")


@functools.lru_cache(maxsize=64)
def _sylvester_tensor(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(sylvester_matrix(k).astype(np.float64)).to(dtype=dtype, device=device)


def _base_tensor(m: int, transpose: bool, scale: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    h = torch.from_numpy(_base_pm1(m).astype(np.float64))
    return ((h.T if transpose else h) * scale).to(dtype=dtype, device=device)


def _apply_along(y: torch.Tensor, mat: torch.Tensor, pre: int, d: int, post: int) -> torch.Tensor:
    """``y`` viewed as ``(pre, d, post)``; multiply every ``d``-vector along the middle axis by ``mat``."""
    if post == 1:
        return (y.reshape(pre, d) @ mat.T).reshape(-1)
    return torch.matmul(mat, y.reshape(pre, d, post)).reshape(-1)


def hadamard_transform(x: torch.Tensor, n: Optional[int] = None, *, transpose: bool = False,
                       inverse: bool = False) -> torch.Tensor:
    """Apply the orthonormal ``H_n`` along the last dimension without building it.

    ``hadamard_transform(x) == x @ hadamard_matrix(n).T`` and
    ``hadamard_transform(x, transpose=True) == x @ hadamard_matrix(n)``; ``inverse=True`` is the
    same as ``transpose=True`` (``H`` is orthogonal). ``n`` defaults to ``x.shape[-1]``; a smaller
    ``n`` dividing it applies ``H_n`` to each consecutive block of ``n`` (block-diagonal
    ``I ⊗ H_n``, e.g. one head at a time). Half-precision inputs are computed in float32 and
    returned in their dtype; the result is always a new tensor.
    """
    d = x.shape[-1]
    n = d if n is None else _as_order(n)
    if n < 1 or d % n:
        raise ValueError(f"the last dimension ({d}) must be a positive multiple of n ({n})")
    m, k = factorize(n)
    flip = bool(transpose or inverse)
    cdtype = _compute_dtype(x.dtype)
    if x.numel() == 0:
        return x.clone()
    y = x.to(cdtype).contiguous().reshape(-1)  # a copy whenever the dtype changes
    rows = y.numel() // n
    scale = 1.0 / math.sqrt(n)
    if m > 1:
        y = _apply_along(y, _base_tensor(m, flip, scale, cdtype, x.device), rows, m, 1 << k)
    remaining = k
    while remaining > 0:  # Sylvester stages, most significant bits first
        r = min(_RADIX_BITS, remaining)
        remaining -= r
        y = _apply_along(y, _sylvester_tensor(r, cdtype, x.device), rows * m * (1 << (k - remaining - r)),
                         1 << r, 1 << remaining)
    if m == 1:
        y = y * scale
    out = y.reshape(x.shape).to(x.dtype)
    return out.clone() if out.data_ptr() == x.data_ptr() else out


# ---------------------------------------------------------------------------------------------
# The graph op: graphquant::hadamard_transform(Tensor x, bool transpose=False) -> Tensor
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("graphquant::hadamard_transform", mutates_args=())
def _hadamard_transform_op(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Orthonormal Hadamard transform along the last dim (torch implementation, any device)."""
    return hadamard_transform(x, transpose=transpose)


@_hadamard_transform_op.register_fake
def _hadamard_transform_fake(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    _compute_dtype(x.dtype)
    n = x.shape[-1]
    if isinstance(n, int):
        factorize(n)  # fail at trace time, with the nearest supported sizes, not at run time
    return x.new_empty(x.shape)


@_hadamard_transform_op.register_kernel("cuda")
def _hadamard_transform_cuda(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    triton_impl = _triton_transform()
    if triton_impl is not None and triton_impl.supports(x):
        return triton_impl.hadamard_transform_triton(x, transpose=transpose)
    return hadamard_transform(x, transpose=transpose)


def _hadamard_transform_backward(ctx, grad: torch.Tensor):
    # y = x Hᵀ  ⇒  dL/dx = g H = transform(g, transpose=True), and vice versa
    return torch.ops.graphquant.hadamard_transform(grad, not ctx.transpose), None


def _hadamard_transform_setup(ctx, inputs, output) -> None:
    ctx.transpose = inputs[1]


_hadamard_transform_op.register_autograd(_hadamard_transform_backward, setup_context=_hadamard_transform_setup)


@functools.lru_cache(maxsize=1)
def _triton_transform():
    """The Triton module, imported on first CUDA use only; ``None`` when Triton is missing."""
    try:
        from .kernels import hadamard_triton
    except ImportError:
        return None
    return hadamard_triton


def hadamard_transform_op(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Call the ``graphquant::hadamard_transform`` op (a single node in exported graphs)."""
    return torch.ops.graphquant.hadamard_transform(x, transpose)
