"""``gptq``: GPTQ (Frantar et al., 2022) on the graph, layer by layer.

For a Linear ``y = x Wᵀ`` GPTQ minimises the layer-output error ``‖X Wᵀ − X Qᵀ‖²`` over the
calibration inputs, with ``Q`` on the weight spec's grid. With ``H = 2 X Xᵀ / n`` (the Hessian of
that error, ``X`` the inputs as columns) it quantizes one input column ``j`` at a time and moves
the rounding error onto the columns not yet quantized:

    e = (w_j − q_j) / [U]_jj ,      W[:, k] −= e · U[j, k]   for every later column k

where ``U`` is the upper Cholesky factor of ``H⁻¹`` (after damping), so ``[U]_jj² `` and
``U[j, :]`` are the diagonal and row of the inverse Hessian of the columns still free, without
the per-column rank-one downdates of the original OBQ derivation. Updates are applied lazily in
blocks of ``block_size`` columns (the result is the same; the long update is one matmul).

* **act-order** (``desc_act``): columns are processed in decreasing ``diag(H)`` (the most
  active input channels first, while most columns can still absorb their error).
* **groups**: the grid of a group is the spec's min/max grid of that group's weights, computed
  from the original weights (``static_groups=True``) or from the error-updated weights at the
  moment the first column of the group is reached (``static_groups=False``). Groups are always
  the spec's contiguous ``group_size`` input columns — what the stored per-group scales mean —
  also under act-order (the permuted-group variant cannot be stored in the per-group layout).
* **exact hand-over to ``insert_qdq``**: ``insert_qdq`` re-derives min/max qparams from the
  weight GPTQ writes back, so GPTQ writes the dequantized (on-grid) weights *and* makes every
  group reach the ends of its grid: when the element that defined a group's range is
  quantized and no earlier column of the group has reached that end yet, it takes the end
  code (``qmin`` / ``qmax``; at most about half a step from its rounding, absorbed by the error
  feedback like any rounding error). The written group then spans exactly the grid's range,
  and round-to-nearest of the written weights gives back GPTQ's scale and zero point (up to
  float32 rounding of the scale) and its codes, code for code (checked for every Linear and
  logged as ``codes_changed_by_rtn``; tests/test_algorithms.py checks it too). The chosen
  qparams are also kept in ``ctx.stats["weight_qparams"][fqn]``. The constraint costs little:
  on gq-llama-20m's first two layers +0.9 % mean layer-output error for uint4 g128, +0.6 % for
  int4 g32, +0.04 % per channel (``gptq_quantize(..., reach_grid_ends=False)`` drops it, for an
  ``insert_qdq`` that would take the stored qparams).

Calibration runs **layer by layer** (:class:`LayerwiseRunner`): the inputs of a decoder layer are
cached once per calibration batch, each layer's sub-graph is run from that cache, and only the
Hessians (``in × in``) are accumulated, never the activations. With ``true_sequential`` the
Linears of a layer are quantized in the order they read their inputs (q/k/v, then o, then
gate/up, then down: Linears that read the same tensor form one step), each step seeing the
already-quantized earlier ones. The quantized layer's outputs are the next layer's inputs.

Minimum calibration data: a Hessian ``X Xᵀ`` of ``n`` tokens has rank ≤ n, so at least
``in_features`` tokens are needed for it to be non-singular; fewer raises ``CalibrationError``
naming the minimum (GPTQ is normally run with ≥ 100× that). Channels that are zero on every
token make ``H`` singular: their diagonal is set to 1 (their damping is raised; they get plain
rounding and pass no error on) with a warning; a Hessian that still fails Cholesky gets its
damping multiplied by 10 (with a warning) until it factors.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch

from ..config import QSchemeType, QuantizationSpec, ScaleType
from ..errors import CalibrationError, ConfigError, PassError
from ..layerwise import Block, LayerwiseRunner, block_key  # noqa: F401  (re-exported: the runner used to live here)
from ..patterns.base import AnalysisContext, LinearSite
from ..quant.fake_quant import compute_qparams, quantize_weight
from . import weights as W
from .manager import PassContext, register_pass

__all__ = ["gptq_quantize", "GPTQResult", "HessianAccumulator", "LayerwiseRunner", "Block",
           "check_weight_spec", "quantization_targets", "algo_config", "min_calibration_tokens",
           "grid_roundtrip_error", "codes_changed_by_rtn", "relative_output_error"]

INT_WEIGHT_DTYPES = ("int8", "uint8", "int4", "uint4", "int2")


# =========================================================================== specs and targets
def check_weight_spec(spec: QuantizationSpec, algo: str, fqn: str = "",
                      qschemes=("per_tensor", "per_channel", "per_group")) -> None:
    """Raise ConfigError unless ``spec`` is a static integer weight spec with a qscheme in
    ``qschemes`` on the Linear's natural axes; the message lists what ``algo`` supports."""
    supported = (f"{algo} supports static integer weights ({', '.join(INT_WEIGHT_DTYPES)}) "
                 f"{'/'.join(qschemes)}" + (" (per_channel over output channels, per_group along input "
                                            "channels)" if "per_group" in qschemes else ""))
    where = f" at {fqn}" if fqn else ""
    if spec.is_cast or spec.is_mx or not spec.is_integer_format:
        raise ConfigError(f"{algo} cannot quantize weights as {spec.to_op_str()!r}{where}: {supported}. "
                          "Use an integer weight scheme (e.g. preset 'w_uint4_per_group_asym') or drop the "
                          "algorithm for this scheme")
    if spec.is_dynamic or spec.qscheme.value not in qschemes:
        raise ConfigError(f"{algo} cannot quantize weights as {spec.to_op_str()!r}{where}: {supported}")
    if spec.qscheme == QSchemeType.per_channel and spec.ch_axis not in (0, -2):
        raise ConfigError(f"{algo}: per_channel weights must be per output channel (ch_axis=0){where}, got "
                          f"ch_axis={spec.ch_axis}; {supported}")
    if spec.qscheme == QSchemeType.per_group and spec.ch_axis not in (1, -1):
        raise ConfigError(f"{algo}: per_group weights must group input channels (ch_axis=-1){where}, got "
                          f"ch_axis={spec.ch_axis}; {supported}")


def algo_config(ctx: PassContext, name: str, default_cls):
    """The algorithm config called ``name`` in ``ctx.config.algo_config`` (else ``default_cls()``)."""
    algos = getattr(ctx.config, "algo_config", None) or []
    if not isinstance(algos, (list, tuple)):
        algos = [algos]
    for a in algos:
        if getattr(a, "name", None) == name:
            return a
    return default_cls()


def quantization_targets(ctx: PassContext, algo: str, qschemes=("per_tensor", "per_channel", "per_group")
                         ) -> list[tuple[LinearSite, QuantizationSpec]]:
    """The Linears of the current graph whose weights the config quantizes, with their weight
    spec, in graph order. Excluded Linears and bf16/fp16 casts are left out; any other spec the
    algorithm cannot handle is a ConfigError (checked for every Linear before anything changes)."""
    config = ctx.config
    if config is None:
        return []
    out = []
    for lin in AnalysisContext(ctx.captured).linears.values():
        qc = config.resolve(lin.fqn, "Linear")
        spec = qc.weight if qc is not None else None
        if spec is None or spec.is_cast:
            continue
        check_weight_spec(spec, algo, lin.fqn, qschemes)
        out.append((lin, spec))
    return out


def min_calibration_tokens(linears: Iterable[LinearSite]) -> tuple[int, str]:
    """(tokens, fqn): the fewest calibration tokens for which every Hessian can have full rank."""
    best = max(linears, key=lambda lin: lin.in_features)
    return best.in_features, best.fqn


# =========================================================================== Hessian
class HessianAccumulator:
    """Accumulates ``H = 2 X Xᵀ / n`` of a Linear's inputs (float64), one batch at a time."""

    def __init__(self, in_features: int, device=None, name: str = ""):
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0
        self.name = name

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: input has {x.shape[-1]} features, expected {self.in_features}")
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError(f"non-finite activations (NaN/Inf) at the input of {self.name or 'a Linear'} "
                                   "during GPTQ calibration; check the model in float and the calibration inputs")
        x = x.to(device=self.sum.device, dtype=torch.float64)
        self.sum.addmm_(x.T, x)
        self.n += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if self.n == 0:
            raise CalibrationError(f"no calibration tokens reached {self.name or 'the Linear'}")
        return self.sum * (2.0 / self.n)


# =========================================================================== GPTQ core
@dataclass
class GPTQResult:
    """``weight``: the quantized weight, dequantized (float64, on the spec's grid), ``scale`` /
    ``zero_point``: its qparams (qparam shape of the spec), ``damp``: the absolute damping used,
    ``dead``: input channels with zero Hessian diagonal, ``perm``: the column order."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    damp: float
    dead: int
    perm: torch.Tensor
    warnings: list = field(default_factory=list)


class _Grid:
    """Per-row (per_channel / per_group) or per-tensor qparams of a weight, computed group by
    group, and the bookkeeping that makes the written weight span exactly its grid.

    Round-to-nearest with min/max qparams (``insert_qdq``) gives back GPTQ's scale and zero
    point iff, in every group, the quantized values reach the grid's ends: the top code and,
    unless the zero point sits at an end, the bottom code (symmetric grids: either end, which
    are ± the same value). Each group remembers the element(s) that defined its range; when
    such an element is quantized and its end of the grid has not been reached yet by an
    earlier column, it gets the end code instead of its rounded value (at most half a step
    away when the qparams are computed from these values; the error feedback absorbs the
    difference like any rounding error). Power-of-two symmetric scales only need a top code
    above half the range (any such code gives back the same scale): the element keeps its
    rounded code, which always is. Asymmetric power-of-two grids are not forced (the caller's
    round-trip check reports when they do not come back).

    Quantizing a column is the arithmetic of ``fake_quant.fake_quantize`` in float32, written
    out so the per-column loop stays cheap: ``q = clamp(round(w / s) + z, qmin, qmax)``,
    ``(q − z) · s``. Storage is per group, one row of ``rows`` values (contiguous per column).
    """

    def __init__(self, spec: QuantizationSpec, rows: int, cols: int, device, reach_ends: bool = True):
        from ..quant import formats as F
        from ..quant.fake_quant import _uses_zero_point

        self.spec = spec
        self.rows, self.cols = rows, cols
        qs = spec.qscheme
        self.per_tensor = qs == QSchemeType.per_tensor
        self.gs = spec.group_size if qs == QSchemeType.per_group else cols
        self.n_groups = -(-cols // self.gs)  # a shorter last group when gs does not divide cols
        shape = (self.n_groups, rows)
        f32 = dict(dtype=torch.float32, device=device)
        self.scale = torch.zeros(shape, **f32)
        self.zf = torch.zeros(shape, **f32)  # zero point as float
        self.top = torch.zeros(shape, **f32)  # dequantized value of the top code
        self.bottom = torch.zeros(shape, **f32)
        self.hit_top = torch.ones(shape, dtype=torch.bool, device=device)  # end reached (or not needed)
        self.hit_bottom = torch.ones(shape, dtype=torch.bool, device=device)
        # forced elements: per group and row the column (-1: none) and value; "a" is the top end
        # (the either end for symmetric grids), "b" the bottom end
        self.col_a = torch.full(shape, -1, dtype=torch.long, device=device)
        self.col_b = torch.full(shape, -1, dtype=torch.long, device=device)
        self.val_a = torch.zeros(shape, **f32)
        self.val_b = torch.zeros(shape, **f32)
        self.ready = [False] * self.n_groups
        self.qmin, self.qmax = spec.qmin, spec.qmax
        self.half = (self.qmax - self.qmin) // 2
        self.pof2 = spec.scale_type == ScaleType.pof2
        self.symmetric = bool(spec.symmetric)
        self.uses_zp = _uses_zero_point(spec)
        self.round = F.round_fn(spec.round_method)
        self.reach_ends = reach_ends

    def group_of(self, col: int) -> int:
        return col // self.gs

    def group_cols(self, g: int) -> range:
        return range(g * self.gs, min((g + 1) * self.gs, self.cols))

    def _deq(self, codes: torch.Tensor, g: int) -> torch.Tensor:
        z = self.zf[g]
        return (codes - z) * self.scale[g] if self.uses_zp else codes * self.scale[g]

    def _quant(self, w32: torch.Tensor, g: int) -> torch.Tensor:
        """Codes (float32) of ``w32`` on group ``g``'s grid, as ``fake_quant._codes``."""
        q = self.round(w32 / self.scale[g])
        if self.uses_zp:
            q = q + self.zf[g]
        return q.clamp(self.qmin, self.qmax)

    def compute(self, g: int, values: torch.Tensor) -> None:
        """qparams of group ``g`` from its current ``values`` (rows × group columns)."""
        v = values.to(torch.float32)
        R, dev = self.rows, v.device
        if self.per_tensor:  # one range; its extreme elements sit in one row each
            lo, hi = torch.aminmax(v)
            scale, zp = compute_qparams(lo, hi, self.spec)
            scale, zp = scale.expand(R), zp.expand(R)
            flat = v.flatten()
            picks = {}
            for name, i in (("hi", torch.argmax(flat)), ("lo", torch.argmin(flat)), ("abs", torch.argmax(flat.abs()))):
                i = int(i)
                col = torch.full((R,), -1, dtype=torch.long, device=dev)
                col[i // v.shape[1]] = i % v.shape[1]
                picks[name] = (col, flat[i].expand(R))
        else:
            lo_v, lo_c = v.min(dim=1)
            hi_v, hi_c = v.max(dim=1)
            abs_c = v.abs().argmax(dim=1)
            abs_v = v.gather(1, abs_c[:, None])[:, 0]
            scale, zp = compute_qparams(lo_v, hi_v, self.spec)
            picks = {"hi": (hi_c, hi_v), "lo": (lo_c, lo_v), "abs": (abs_c, abs_v)}
        self.scale[g], self.zf[g] = scale, zp.to(torch.float32)
        zf = self.zf[g]
        self.top[g] = self._deq(torch.full_like(zf, float(self.qmax)), g)
        self.bottom[g] = self._deq(torch.full_like(zf, float(self.qmin)), g)
        self.ready[g] = True
        base = g * self.gs
        none = torch.zeros(R, dtype=torch.bool, device=dev)
        if self.symmetric:
            col, val = picks["abs"]
            need = (val != 0) & (col >= 0)
            if self.pof2:  # any code at least as far from zero as this one gives back the scale
                codes = self._quant(val, g)
                k = (codes - zf).abs()
                self.top[g] = self._deq(zf + k, g)
                self.bottom[g] = self._deq(zf - k, g)
            else:
                codes = torch.where(val >= 0, zf + self.half, zf - self.half)
            self.col_a[g] = torch.where(need, col + base, -1)
            self.val_a[g] = self._deq(codes, g)
            self.hit_top[g] = ~need
            self.hit_bottom[g] = ~need
        elif not self.pof2:
            col, val = picks["hi"]
            need = (val > 0) & (zf < self.qmax) & (col >= 0)
            self.col_a[g] = torch.where(need, col + base, -1)
            self.val_a[g] = self.top[g]
            self.hit_top[g] = ~need
            col, val = picks["lo"]
            need = (val < 0) & (zf > self.qmin) & (col >= 0)
            self.col_b[g] = torch.where(need, col + base, -1)
            self.val_b[g] = self.bottom[g]
            self.hit_bottom[g] = ~need
        else:
            self.hit_top[g], self.hit_bottom[g] = ~none, ~none
        if not self.reach_ends:
            self.col_a[g], self.col_b[g] = -1, -1
        if self.per_tensor:  # one flag for the whole tensor
            self.hit_top[g] = self.hit_top[g].all()
            self.hit_bottom[g] = self.hit_bottom[g].all()

    def quantize_column(self, col: int, w: torch.Tensor) -> torch.Tensor:
        """Column ``col`` (``w``, float64) on its group's grid: float32 values, as float64."""
        g = self.group_of(col)
        q = self._deq(self._quant(w.to(torch.float32), g), g)
        if self.symmetric:
            reached = self.hit_top[g] | self.hit_bottom[g]
            q = torch.where((self.col_a[g] == col) & ~reached, self.val_a[g], q)
        else:
            q = torch.where((self.col_a[g] == col) & ~self.hit_top[g], self.val_a[g], q)
            q = torch.where((self.col_b[g] == col) & ~self.hit_bottom[g], self.val_b[g], q)
        if self.symmetric and self.pof2:
            up, down = q >= self.top[g], q <= self.bottom[g]
        else:
            up, down = q == self.top[g], q == self.bottom[g]
        if self.per_tensor:
            up, down = up.any().expand_as(up), down.any().expand_as(down)
        self.hit_top[g] |= up
        self.hit_bottom[g] |= down
        return q.to(torch.float64)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """scale / zero_point in the spec's qparam shape."""
        scale, zp = self.scale.T.contiguous(), self.zf.T.to(torch.int32).contiguous()
        if self.per_tensor:
            return scale[0, 0].clone(), zp[0, 0].clone()
        if self.spec.qscheme == QSchemeType.per_channel:
            return scale[:, 0].clone(), zp[:, 0].clone()
        return scale, zp


def _inverse_hessian_factor(H: torch.Tensor, damp: float, name: str, notes: list) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp·I)⁻¹; on failure, damping ×10 with a warning."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, damp
        msg = (f"GPTQ: the Hessian of {name or 'a Linear'} is not positive definite with damping {damp:.3g}; "
               f"damping raised to {damp * 10:.3g}")
        warnings.warn("graphquant: " + msg, stacklevel=4)
        notes.append(msg)
        damp *= 10
    raise PassError(f"GPTQ: the Hessian of {name or 'a Linear'} stays singular even with damping {damp:.3g}; "
                    "check the calibration data (constant or degenerate inputs)")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantizationSpec, *, block_size: int = 128,
                  damp_percent: float = 0.01, act_order: bool = True, static_groups: bool = True,
                  name: str = "", num_samples: int | None = None, reach_grid_ends: bool = True) -> GPTQResult:
    """Quantize ``weight`` (out × in) with GPTQ for inputs whose Hessian is ``hessian``
    (``2 X Xᵀ / n``, in × in). Returns the dequantized on-grid weight and its qparams.

    ``num_samples``: the number of tokens behind ``hessian``; fewer than ``in_features`` is a
    ``CalibrationError`` (the Hessian cannot have full rank). ``reach_grid_ends=False`` drops
    the constraint that lets min/max round-to-nearest of the result find the same grid (for a
    consumer that takes the returned qparams instead).
    """
    check_weight_spec(spec, "GPTQ", name)
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"GPTQ{(' ' + name) if name else ''}: weight {tuple(weight.shape)} and Hessian "
                         f"{tuple(hessian.shape)} do not match")
    rows, cols = weight.shape
    if num_samples is not None and num_samples < cols:
        raise CalibrationError(f"GPTQ needs at least {cols} calibration tokens for {name or 'this Linear'} "
                               f"(in_features={cols}: fewer tokens give a singular Hessian), got {num_samples}; "
                               "pass more or longer calibration batches")
    if not bool(torch.isfinite(hessian).all()):
        raise CalibrationError(f"GPTQ: the Hessian of {name or 'a Linear'} has NaN/Inf entries")
    notes: list[str] = []
    Wt = weight.detach().to(torch.float64)  # not written to
    H = hessian.detach().to(device=Wt.device, dtype=torch.float64).clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    n_dead = int(dead.sum())
    if n_dead:
        msg = (f"GPTQ: singular Hessian for {name or 'a Linear'}: {n_dead} of {cols} input channels are zero on "
               "every calibration token; their damping is raised (Hessian diagonal set to 1: plain rounding, no "
               "error feedback through them)")
        warnings.warn("graphquant: " + msg, stacklevel=3)
        notes.append(msg)
        idx = torch.nonzero(dead).flatten()
        H[idx, :] = 0
        H[:, idx] = 0
        H[idx, idx] = 1.0
    damp = float(damp_percent * torch.diagonal(H).mean())

    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else \
        torch.arange(cols, device=Wt.device)
    invperm = torch.argsort(perm)
    Hp = H[perm][:, perm]
    del H
    U, damp = _inverse_hessian_factor(Hp, damp, name, notes)
    del Hp

    grid = _Grid(spec, rows, cols, Wt.device, reach_ends=reach_grid_ends)
    if static_groups:
        for g in range(grid.n_groups):
            grid.compute(g, Wt[:, g * grid.gs:(g + 1) * grid.gs])
    WT = Wt[:, perm].T.contiguous()  # one row per input column, in processing order
    del Wt
    QT = torch.zeros_like(WT)
    with _single_thread(WT.device, rows * min(block_size, cols)):
        _gptq_columns(grid, WT, QT, U, perm.tolist(), invperm, block_size)
    scale, zp = grid.qparams()
    return GPTQResult(QT.T[:, invperm].contiguous(), scale, zp, damp, n_dead, perm, notes)


class _single_thread:
    """On CPU, run the column loop on one thread when its operations are small (one column, one
    block of ``size`` elements below 2^20), where thread hand-offs cost more than they save,
    badly so on a loaded machine."""

    def __init__(self, device, size: int = 0):
        self.active = torch.device(device).type == "cpu" and size < (1 << 20)

    def __enter__(self):
        if self.active:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.saved)
        return False


def _gptq_columns(grid: _Grid, WT, QT, U, perm_l, invperm, block_size: int) -> None:
    """The GPTQ column loop. ``WT``: the weight transposed and permuted (row ``k`` = input
    column ``perm[k]``), updated in place; ``QT``: the quantized result, same layout."""
    cols = WT.shape[0]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = WT[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = perm_l[i1 + i]
            g = grid.group_of(c)
            if not grid.ready[g]:
                grid.compute(g, _current_group(grid, g, invperm, WT, W1, Err1, U, i1, i2, i))
            w = W1[i]
            q = grid.quantize_column(c, w)
            QT[i1 + i] = q
            err = (w - q) / U1[i, i]
            W1[i + 1:] -= U1[i, i + 1:, None] * err[None, :]
            Err1[i] = err
        if i2 < cols:
            WT[i2:] -= U[i1:i2, i2:].T @ Err1


def _current_group(grid: _Grid, g: int, invperm, WT, W1, Err1, U, i1: int, i2: int, i: int) -> torch.Tensor:
    """The error-updated values (rows × group columns) of group ``g`` when its first column
    (processing position ``i1 + i``) is reached: columns inside the current block are up to
    date in ``W1``; later ones still miss this block's pending update
    ``Σ_{j<i} U[i1+j, p] · Err1[j]``."""
    pos = invperm[g * grid.gs:(g + 1) * grid.gs]
    out = torch.empty(pos.numel(), WT.shape[1], dtype=WT.dtype, device=WT.device)
    inb = pos < i2
    if bool(inb.any()):
        out[inb] = W1[pos[inb] - i1]
    if bool((~inb).any()):
        p = pos[~inb]
        out[~inb] = WT[p] - U[i1:i1 + i][:, p].T @ Err1[:i]
    return out.T


def grid_roundtrip_error(weight: torch.Tensor, spec: QuantizationSpec) -> float:
    """Largest change, in units of the local quantization step, when round-to-nearest with
    min/max qparams (what ``insert_qdq`` does) is applied to ``weight``: 0 (up to float32
    rounding) when ``weight`` is already on its own min/max grid."""
    w = weight.detach().to(torch.float32)
    qw = quantize_weight(w, spec)
    diff = (qw.dequantize() - w).abs()
    step = qw.scale
    if spec.qscheme == QSchemeType.per_group:
        step = step[:, torch.arange(w.shape[1], device=step.device) // spec.group_size]
    elif spec.qscheme == QSchemeType.per_channel:
        step = step[:, None]
    return float((diff / step).max()) if diff.numel() else 0.0


def codes_changed_by_rtn(stored: torch.Tensor, quantized: torch.Tensor, scale: torch.Tensor,
                         zero_point: torch.Tensor, spec: QuantizationSpec) -> int:
    """How many codes ``insert_qdq``'s round-to-nearest (min/max qparams of the ``stored``
    weight) gives differently from GPTQ's (``quantized`` on the grid ``scale``/``zero_point``)."""
    from ..quant.fake_quant import quantize

    rtn = quantize_weight(stored.detach().to(torch.float32), spec).qdata.to(torch.int32)
    mine = quantize(quantized.to(torch.float32), scale.to(quantized.device), zero_point.to(quantized.device),
                    spec).to(torch.int32)
    return int((rtn != mine.to(rtn.device)).sum())


def relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``‖X(W − Q)ᵀ‖² / ‖X Wᵀ‖²`` computed from the Hessian ``2 X Xᵀ / n``."""
    weight, quantized = weight.detach(), quantized.detach()
    H = hessian.detach().to(torch.float32)
    D = (weight.to(torch.float64) - quantized.to(torch.float64)).to(torch.float32)
    Wf = weight.to(torch.float32)
    num = float(((D @ H) * D).sum())
    den = float(((Wf @ H) * Wf).sum())
    return num / den if den > 0 else 0.0


# =========================================================================== the pass
def _steps(block: Block, true_sequential: bool) -> list[list[LinearSite]]:
    """Linears of a block in quantization steps: those reading the same tensor form one step,
    in the order the graph reads them; without ``true_sequential``, one step."""
    if not true_sequential:
        return [list(block.linears)]
    by_input: dict = {}
    for lin in block.linears:
        by_input.setdefault(lin.node.args[0], []).append(lin)
    order = {n: i for i, n in enumerate(block.start.graph.nodes)}
    return [by_input[k] for k in sorted(by_input, key=lambda n: order.get(n, -1))]


def _stacks(lins: list[tuple[LinearSite, QuantizationSpec]]) -> list[list[tuple[LinearSite, QuantizationSpec]]]:
    """Linears that read one tensor and share a row-wise spec are quantized as one stacked
    weight (GPTQ treats rows independently, and they share the Hessian)."""
    out, by_spec = [], {}
    for lin, spec in lins:
        if spec.qscheme == QSchemeType.per_tensor:
            out.append([(lin, spec)])
        else:
            by_spec.setdefault(spec.to_op_str(), []).append((lin, spec))
    return list(by_spec.values()) + out


@register_pass("gptq", stage="algorithms", _builtin=True)
def gptq(ctx: PassContext) -> None:
    from ..config import GPTQConfig

    cfg = algo_config(ctx, "gptq", GPTQConfig)
    targets = quantization_targets(ctx, "GPTQ")
    if not targets:
        ctx.record(action="skip", reason="no Linear has an integer weight spec to quantize")
        return
    for name in ("inside_layer_modules", "model_decoder_layers", "embedding_layers"):
        if getattr(cfg, name, None):
            ctx.record(action="note", reason=f"GPTQConfig.{name} is not needed: the layers and the order of their "
                                             "Linears come from the graph; ignored")
    runner = LayerwiseRunner(ctx.captured, ctx.calib_data, [lin for lin, _ in targets],
                             progress=ctx.stats.get("progress", True), desc="GPTQ")
    layer = GPTQLayer(ctx, cfg, targets)
    for block in runner.iterate():
        layer.quantize_block(runner, block)


class GPTQLayer:
    """GPTQ of one block at a time: the Hessians of the block's Linears from the runner's cache,
    then their weights, step by step (``true_sequential``). The in-memory pass runs it for every
    block; the streamed pipeline (:mod:`graphquant.stream`) for each block while it is resident."""

    def __init__(self, ctx: PassContext, cfg, targets: list[tuple[LinearSite, QuantizationSpec]]):
        self.ctx, self.cfg = ctx, cfg
        self.spec_of = {lin.node: spec for lin, spec in targets}
        self.site_of = {lin.node: lin for lin, _ in targets}  # the targets' sites win over the runner's copies
        self.need, self.need_at = min_calibration_tokens([lin for lin, _ in targets])
        self.qparams = ctx.stats.setdefault("weight_qparams", {})
        self.checked_tokens = False

    def quantize_block(self, runner: LayerwiseRunner, block: Block) -> None:
        ctx, cfg = self.ctx, self.cfg
        for step in _steps(block, cfg.true_sequential):
            step = [self.site_of[lin.node] for lin in step if lin.node in self.spec_of]
            if not step:
                continue
            inputs = {}
            for lin in step:
                inputs.setdefault(lin.node.args[0], []).append(lin)
            accs = {f"h{i}": HessianAccumulator(lins[0].in_features, device=ctx.captured.param(lins[0].weight).device,
                                                name=lins[0].fqn)
                    for i, (node, lins) in enumerate(inputs.items())}
            taps = {f"h{i}": node for i, node in enumerate(inputs)}
            runner.run(block, taps, lambda k, x: accs[k].add(x))
            if not self.checked_tokens:
                n = next(iter(accs.values())).n
                if n < self.need:
                    raise CalibrationError(
                        f"GPTQ needs at least {self.need} calibration tokens (the largest in_features, {self.need_at}: "
                        f"with fewer tokens its Hessian is singular), got {n}; pass more or longer calibration batches "
                        "(e.g. --num_calib_data 128 --seq_len 512)")
                self.checked_tokens = True
            for key, (node, lins) in zip(accs, inputs.items()):
                H = accs[key].hessian
                for stack in _stacks([(lin, self.spec_of[lin.node]) for lin in lins]):
                    _quantize_stack(ctx, cfg, stack, H, accs[key].n, self.qparams)


def _quantize_stack(ctx: PassContext, cfg, stack, H: torch.Tensor, n: int, qparams: dict) -> None:
    spec = stack[0][1]
    targets = [W.own_weight(ctx, lin) for lin, _ in stack]
    weight = torch.cat([ctx.captured.param(t).detach() for t in targets], dim=0).to(torch.float64)
    names = "+".join(lin.fqn for lin, _ in stack)
    res = gptq_quantize(weight, H.to(weight.device), spec, block_size=cfg.block_size, damp_percent=cfg.damp_percent,
                        act_order=cfg.desc_act, static_groups=cfg.static_groups, name=names, num_samples=n)
    row = 0
    for (lin, _), t in zip(stack, targets):
        r = ctx.captured.param(t).shape[0]
        w, q = weight[row:row + r], res.weight[row:row + r]
        W.write(ctx, t, q)
        if spec.qscheme == QSchemeType.per_tensor:
            sc, zp = res.scale, res.zero_point
        else:
            sc, zp = res.scale[row:row + r], res.zero_point[row:row + r]
        changed = codes_changed_by_rtn(ctx.captured.param(t), q, sc, zp, spec)
        if changed:
            warnings.warn(f"graphquant: round-to-nearest of the GPTQ weights of {lin.fqn} (as stored, "
                          f"{ctx.captured.param(t).dtype}) changes {changed} of {q.numel()} codes; insert_qdq will "
                          "re-round them", stacklevel=2)
        qparams[lin.fqn] = {"scale": sc.cpu(), "zero_point": zp.cpu(), "spec": spec.to_op_str()}
        rtn = quantize_weight(w.to(torch.float32), spec).dequantize().to(torch.float64)
        err = relative_output_error(w, q, H)
        err_rtn = relative_output_error(w, rtn, H)
        ctx.record(action="gptq", module=lin.fqn, spec=spec.to_op_str(), shape=list(w.shape), tokens=n,
                   damp=res.damp, dead_channels=res.dead, act_order=cfg.desc_act, static_groups=cfg.static_groups,
                   output_error=err, output_error_rtn=err_rtn, codes_changed_by_rtn=changed,
                   **({"notes": res.warnings} if res.warnings else {}))
        row += r
