"""Observers: accumulate statistics of a tensor over calibration batches and turn them into qparams.

Interface (every observer)::

    obs = ObserverCls(spec)           # a QuantizationSpec or its op string
    obs.observe(x)                    # accumulate; CalibrationError if x has NaN/Inf
    scale, zero_point = obs.calculate_qparams()   # CalibrationError before any observe()
    obs.min_val, obs.max_val          # running range in the qparam shape (None before data)
    obs.num_observed                  # number of observe() calls

``scale``/``zero_point`` have the qparam shape of ``graphquant.quant.fake_quant`` (per_tensor
``()``, per_channel ``(C,)``, per_group/MX the tensor shape with the group axis divided by the
group size). Per-group/MX observers need every observed tensor to have the same shape (they are
meant for weights; dynamic activations need no observer). Memory is bounded for every observer.

A spec names its observer by class; custom observers subclass :class:`ObserverBase` and are
registered by class name (so configs naming them round-trip through JSON).
"""
from __future__ import annotations

import torch

from ..config import Dtype, QSchemeType, QuantizationSpec
from ..errors import CalibrationError, ConfigError
from .fake_quant import as_spec, compute_qparams, fake_quantize, minmax

__all__ = [
    "ObserverBase", "PlaceholderObserver", "PerTensorMinMaxObserver", "PerChannelMinMaxObserver",
    "PerGroupMinMaxObserver", "PerBlockMXObserver", "PerTensorPercentileObserver",
    "PerTensorMSEObserver", "observer_by_name", "OBSERVERS",
]

#: Observer classes by name (filled by ``ObserverBase.__init_subclass__``).
OBSERVERS: dict[str, type] = {}


def observer_by_name(name: str) -> type:
    """The registered observer class called ``name``; ConfigError listing the known ones."""
    try:
        return OBSERVERS[name]
    except KeyError:
        raise ConfigError(f"unknown observer {name!r}; known observers: {sorted(OBSERVERS)}") from None


class ObserverBase:
    """Base observer: finite-checks and counts batches, keeps a running min/max.

    Subclasses set ``qschemes`` (the qschemes they can observe) and ``mx`` (True: MX specs
    only; False: non-MX only; None: either), and implement ``_observe`` / ``_range``.
    """

    qschemes: tuple[str, ...] = ()
    mx: bool | None = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        OBSERVERS[cls.__name__] = cls

    def __init__(self, spec: QuantizationSpec | str):
        self.spec = as_spec(spec)
        self.reset()

    def reset(self) -> None:
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.num_observed = 0

    # ------------------------------------------------------------------ spec compatibility
    @classmethod
    def accepts(cls, v: dict) -> tuple[bool, str]:
        """Whether specs with field values ``v`` (dtype, qscheme, is_dynamic, ...) fit this
        observer, and a hint naming the fix when they do not."""
        if v["dtype"] in (Dtype.bfloat16, Dtype.float16):
            return False, "bfloat16/float16 casts have nothing to observe: use PlaceholderObserver"
        is_mx = v["dtype"] == Dtype.mx
        if cls.mx is True and not is_mx:
            return False, "it observes MX blocks: use it with dtype=Dtype.mx"
        if cls.mx is False and is_mx:
            return False, "MX specs use PerBlockMXObserver (or leave observer_cls unset)"
        if v["qscheme"] not in cls.qschemes:
            return False, (f"it observes {'/'.join(cls.qschemes)} ranges; leave observer_cls unset to "
                           f"get the default for {v['qscheme'].value}")
        return True, ""

    # ------------------------------------------------------------------ observing
    def observe(self, x: torch.Tensor) -> None:
        """Accumulate statistics of ``x``. Raises CalibrationError when ``x`` has NaN/Inf."""
        if not isinstance(x, torch.Tensor):
            raise CalibrationError(f"{type(self).__name__}.observe expects a tensor, got {type(x).__name__}")
        x = x.detach()
        if not x.is_floating_point():
            raise CalibrationError(f"{type(self).__name__}.observe expects a floating-point tensor, "
                                   f"got {x.dtype}")
        if x.numel() == 0:
            raise CalibrationError(f"{type(self).__name__}.observe got an empty tensor of shape "
                                   f"{tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
            raise CalibrationError(f"non-finite values in calibration data: {n_nan} NaN and {n_inf} Inf "
                                   f"in a tensor of shape {tuple(x.shape)}; check the model in float "
                                   f"and the calibration inputs")
        self._observe(x.to(torch.float32))
        self.num_observed += 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Observe ``x`` and return it unchanged (usable as a forward hook body)."""
        self.observe(x)
        return x

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = minmax(x, self.spec)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
            return
        if lo.shape != self.min_val.shape:
            raise CalibrationError(f"{type(self).__name__}: the observed tensor's qparam shape changed "
                                   f"from {tuple(self.min_val.shape)} to {tuple(lo.shape)} (tensor shape "
                                   f"{tuple(x.shape)}); per-channel/per-group statistics need tensors of "
                                   f"one shape — use a dynamic spec for activations")
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) from what was observed."""
        if self.num_observed == 0:
            raise CalibrationError(f"no data observed by {type(self).__name__} (spec "
                                   f"{self.spec.to_op_str()!r}): run calibration batches through the "
                                   f"model before computing qparams")
        lo, hi = self._range()
        return compute_qparams(lo, hi, self.spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.to_op_str()!r}, num_observed={self.num_observed})"


class PlaceholderObserver(ObserverBase):
    """Observes nothing: for dynamic/per_token specs (qparams computed at run time) and bf16/fp16
    casts. ``observe`` only checks finiteness; ``calculate_qparams`` returns scale 1, zero point 0."""

    @classmethod
    def accepts(cls, v: dict) -> tuple[bool, str]:
        if v["dtype"] in (Dtype.bfloat16, Dtype.float16) or v["is_dynamic"] or \
                v["qscheme"] == QSchemeType.per_token:
            return True, ""
        return False, ("a static spec needs an observer to compute its scale; leave observer_cls unset "
                       "for the default, or set is_dynamic=True")

    def _observe(self, x: torch.Tensor) -> None:
        pass

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones((), dtype=torch.float32), torch.zeros((), dtype=torch.int32)


class PerTensorMinMaxObserver(ObserverBase):
    """Running min and max over every observed element."""

    qschemes = ("per_tensor",)


class PerChannelMinMaxObserver(ObserverBase):
    """Running min/max per index of ``spec.ch_axis`` (qparams of shape ``(C,)``)."""

    qschemes = ("per_channel",)


class PerGroupMinMaxObserver(ObserverBase):
    """Running min/max per group of ``group_size`` consecutive elements along ``spec.ch_axis``."""

    qschemes = ("per_group",)


class PerBlockMXObserver(ObserverBase):
    """Running min/max per MX block; qparams are OCP MX E8M0 power-of-two scales."""

    qschemes = ("per_group",)
    mx = True


class PerTensorPercentileObserver(ObserverBase):
    """Clips the range at a percentile of the observed values (default 99.99).

    A histogram of fixed size (``2 * bins`` bins over ``[-R, R]``) holds exact counts; when a
    batch exceeds ``R``, ``R`` doubles as often as needed and bins merge exactly (bin edges of
    the old grid are edges of the new one). The percentile is interpolated inside its bin, so it
    is accurate to ``R / bins``, with ``R < 2 max|x|``. Symmetric specs use the percentile of
    ``|x|``; asymmetric specs the lower ``100 - p`` and upper ``p`` percentiles of ``x``.
    ``min_val``/``max_val`` stay the true extremes; :meth:`clip_range` gives the clipped range.
    """

    qschemes = ("per_tensor",)

    def __init__(self, spec: QuantizationSpec | str, percentile: float = 99.99, bins: int = 2048):
        if not 0.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)
        self.bins = int(bins)
        super().__init__(spec)

    def reset(self) -> None:
        super().reset()
        self.hist: torch.Tensor | None = None  # int64 counts, 2 * bins
        self.hist_range: float = 0.0           # R
        self.count = 0

    def _observe(self, x: torch.Tensor) -> None:
        super()._observe(x)
        flat = x.flatten()
        amax = float(flat.abs().max())
        B = self.bins
        if self.hist is None:
            self.hist = torch.zeros(2 * B, dtype=torch.int64, device=x.device)
            self.hist_range = amax if amax > 0 else 1.0
        elif amax > self.hist_range:
            k = 0
            while self.hist_range * 2.0 ** k < amax:
                k += 1
            f = 2 ** k
            idx = B + torch.div(torch.arange(2 * B, device=x.device) - B, f, rounding_mode="floor")
            self.hist = torch.zeros_like(self.hist).index_add_(0, idx, self.hist)
            self.hist_range *= f
        R = self.hist_range
        w = R / B
        idx = ((flat + R) / w).clamp_(0, 2 * B - 1).to(torch.int64)  # truncation == floor here
        self.hist += torch.bincount(idx, minlength=2 * B)
        self.count += flat.numel()

    def _quantile(self, hist: torch.Tensor, start: float, w: float, q: float) -> float:
        """Value at fraction ``q`` of a histogram whose bin 0 starts at ``start`` (width ``w``)."""
        t = q * float(hist.sum())
        cum = torch.cumsum(hist, 0).to(torch.float64)
        i = int(torch.searchsorted(cum, torch.tensor([t], dtype=torch.float64, device=cum.device)))
        i = min(i, hist.numel() - 1)
        before = float(cum[i - 1]) if i > 0 else 0.0
        c = float(hist[i])
        frac = (t - before) / c if c > 0 else 0.0
        return start + (i + min(max(frac, 0.0), 1.0)) * w

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The percentile-clipped (min, max) used for the qparams."""
        B, R = self.bins, self.hist_range
        w, p = R / B, self.percentile / 100.0
        dev = self.min_val.device
        if self.spec.symmetric:
            folded = self.hist[B:] + self.hist[:B].flip(0)
            amax = min(self._quantile(folded, 0.0, w, p),
                       float(torch.maximum(-self.min_val, self.max_val)))
            return torch.tensor(-amax, device=dev), torch.tensor(amax, device=dev)
        hi = min(self._quantile(self.hist, -R, w, p), float(self.max_val))
        lo = max(self._quantile(self.hist, -R, w, 1.0 - p), float(self.min_val))
        return torch.tensor(lo, device=dev), torch.tensor(hi, device=dev)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clip_range()


class _Reservoir:
    """A uniform sample (without replacement) of at most ``capacity`` values over all batches:
    each value gets a random key and the ``capacity`` smallest keys are kept."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity, self.seed = int(capacity), seed
        self.values: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.gen: torch.Generator | None = None

    def add(self, flat: torch.Tensor) -> None:
        if self.gen is None:
            self.gen = torch.Generator(device=flat.device).manual_seed(self.seed)
            self.values = flat.new_empty(0)
            self.keys = flat.new_empty(0)
        keys = torch.rand(flat.numel(), generator=self.gen, device=flat.device)
        if self.values.numel() >= self.capacity:  # full: only keys below the current max can enter
            keep = keys < self.keys.max()
            flat, keys = flat[keep], keys[keep]
        values = torch.cat([self.values, flat])
        allk = torch.cat([self.keys, keys])
        if values.numel() > self.capacity:
            idx = torch.topk(allk, self.capacity, largest=False).indices
            values, allk = values[idx], allk[idx]
        self.values, self.keys = values, allk


class PerTensorMSEObserver(ObserverBase):
    """Chooses the clipping ratio ``r`` of the observed range (``[r min, r max]``) that minimises
    the quantization MSE on a bounded uniform sample (``sample_size`` values) of everything
    observed. The search is coarse-to-fine: ``num_ratios`` ratios spaced geometrically from 1.0
    down to ``min_ratio``, then ``num_ratios // 5`` evenly spaced between the neighbours of the
    best. ``r = 1`` (the min/max range) is a candidate, so the result is never worse than
    min/max on the sample; ties go to the larger range."""

    qschemes = ("per_tensor",)

    def __init__(self, spec: QuantizationSpec | str, sample_size: int = 1 << 16, num_ratios: int = 100,
                 min_ratio: float = 0.01, seed: int = 0):
        if not 0.0 < min_ratio <= 1.0:
            raise ConfigError(f"min_ratio must be in (0, 1], got {min_ratio}")
        if num_ratios < 2:
            raise ConfigError(f"num_ratios must be >= 2, got {num_ratios}")
        self.sample_size, self.seed = sample_size, seed
        self.ratios = [min_ratio ** (i / (num_ratios - 1)) for i in range(num_ratios)]
        super().__init__(spec)

    def reset(self) -> None:
        super().reset()
        self.sample = _Reservoir(self.sample_size, self.seed)
        self.best_ratio: float | None = None

    def _observe(self, x: torch.Tensor) -> None:
        super()._observe(x)
        self.sample.add(x.flatten())

    def mse(self, ratio: float, values: torch.Tensor | None = None) -> float:
        """Quantization MSE of ``values`` (default: the sample) with the range clipped by ``ratio``."""
        v = self.sample.values if values is None else values.to(torch.float32)
        scale, zp = compute_qparams(self.min_val * ratio, self.max_val * ratio, self.spec)
        return float(((fake_quantize(v, scale, zp, self.spec) - v) ** 2).mean())

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        coarse = self.ratios
        errs = {r: self.mse(r) for r in coarse}
        i = min(range(len(coarse)), key=lambda k: (errs[coarse[k]], k))
        hi, lo = coarse[max(i - 1, 0)], coarse[min(i + 1, len(coarse) - 1)]
        n = max(len(coarse) // 5, 2)
        for k in range(n + 1):
            r = hi - (hi - lo) * k / n
            if r not in errs:
                errs[r] = self.mse(r)
        self.best_ratio = min(errs, key=lambda r: (errs[r], -r))
        return self.min_val * self.best_ratio, self.max_val * self.best_ratio
