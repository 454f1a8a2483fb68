"""Observers: exact running ranges, percentile and MSE clipping, error handling."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from graphquant.config import Dtype, QuantizationSpec
from graphquant.errors import CalibrationError, ConfigError
from graphquant.quant.fake_quant import compute_qparams, dynamic_qparams, fake_quantize, quantize_weight
from graphquant.quant.observers import (OBSERVERS, ObserverBase, PerBlockMXObserver, PerChannelMinMaxObserver,
                                        PerGroupMinMaxObserver, PerTensorMinMaxObserver, PerTensorMSEObserver,
                                        PerTensorPercentileObserver, PlaceholderObserver, observer_by_name)

INT8 = QuantizationSpec(Dtype.int8)
UINT8 = QuantizationSpec(Dtype.uint8)


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=20),
                        min_size=1, max_size=5))
def test_per_tensor_minmax_is_exact_over_batches(batches):
    obs = PerTensorMinMaxObserver(UINT8)
    for b in batches:
        obs.observe(torch.tensor(b))
    allv = [v for b in batches for v in b]
    assert float(obs.min_val) == min(allv) and float(obs.max_val) == max(allv)
    assert obs.num_observed == len(batches)
    scale, zp = obs.calculate_qparams()
    ref = compute_qparams(torch.tensor(min(allv)), torch.tensor(max(allv)), UINT8)
    assert torch.equal(scale, ref[0]) and torch.equal(zp, ref[1])


def test_per_channel_and_per_group_minmax():
    torch.manual_seed(0)
    xs = [torch.randn(8, 64) for _ in range(3)]
    allx = torch.stack(xs)
    ch = QuantizationSpec(Dtype.int8, qscheme="per_channel")
    obs = PerChannelMinMaxObserver(ch)
    for x in xs:
        obs.observe(x)
    assert torch.equal(obs.min_val, allx.amin(dim=(0, 2))) and torch.equal(obs.max_val, allx.amax(dim=(0, 2)))
    assert obs.calculate_qparams()[0].shape == (8,)
    grp = QuantizationSpec(Dtype.uint4, qscheme="per_group", group_size=16)
    obs = PerGroupMinMaxObserver(grp)
    for x in xs:
        obs.observe(x)
    g = allx.reshape(3, 8, 4, 16)
    assert torch.equal(obs.min_val, g.amin(dim=(0, 3))) and torch.equal(obs.max_val, g.amax(dim=(0, 3)))
    # one batch == quantize_weight's qparams
    one = PerGroupMinMaxObserver(grp)
    one.observe(xs[0])
    qw = quantize_weight(xs[0], grp)
    s, z = one.calculate_qparams()
    assert torch.equal(s, qw.scale) and torch.equal(z, qw.zero_point)


def test_per_block_mx_observer_matches_dynamic():
    x = torch.randn(4, 96)
    spec = QuantizationSpec(Dtype.mx, mx_element_dtype="fp4")
    obs = PerBlockMXObserver(spec)
    obs.observe(x)
    s, z = obs.calculate_qparams()
    ds, dz = dynamic_qparams(x, spec)
    assert s.shape == (4, 3) and torch.equal(s, ds) and torch.equal(z, dz)


def test_shape_change_is_an_error():
    obs = PerChannelMinMaxObserver(QuantizationSpec(Dtype.int8, qscheme="per_channel"))
    obs.observe(torch.randn(4, 8))
    with pytest.raises(CalibrationError, match="shape changed"):
        obs.observe(torch.randn(5, 8))


@pytest.mark.parametrize("cls", [PerTensorMinMaxObserver, PerTensorPercentileObserver, PerTensorMSEObserver,
                                 PlaceholderObserver])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises(cls, bad):
    spec = INT8 if cls is not PlaceholderObserver else QuantizationSpec(Dtype.int8, qscheme="per_token")
    obs = cls(spec)
    x = torch.randn(10)
    x[3] = bad
    with pytest.raises(CalibrationError, match="non-finite"):
        obs.observe(x)
    assert obs.num_observed == 0


def test_no_data_and_bad_input():
    for cls in (PerTensorMinMaxObserver, PerTensorPercentileObserver, PerTensorMSEObserver):
        with pytest.raises(CalibrationError, match="no data observed"):
            cls(INT8).calculate_qparams()
    obs = PerTensorMinMaxObserver(INT8)
    with pytest.raises(CalibrationError, match="floating-point"):
        obs.observe(torch.arange(4))
    with pytest.raises(CalibrationError, match="empty"):
        obs.observe(torch.empty(0))
    with pytest.raises(CalibrationError, match="expects a tensor"):
        obs.observe([1.0, 2.0])


def test_placeholder():
    spec = QuantizationSpec(Dtype.int8, qscheme="per_token")
    assert spec.observer_cls is PlaceholderObserver
    obs = PlaceholderObserver(spec)
    s, z = obs.calculate_qparams()
    assert float(s) == 1.0 and int(z) == 0
    x = torch.randn(3)
    assert obs(x) is x and obs.num_observed == 1


def test_registry():
    assert observer_by_name("PerTensorMSEObserver") is PerTensorMSEObserver
    with pytest.raises(ConfigError, match="PerTensorMinMaxObserver"):
        observer_by_name("MinMax")

    class MyObserver(PerTensorMinMaxObserver):
        pass

    assert OBSERVERS["MyObserver"] is MyObserver
    spec = QuantizationSpec(Dtype.int8, observer_cls=MyObserver)
    assert spec.to_dict()["observer_cls"] == "MyObserver"
    assert QuantizationSpec.from_dict(spec.to_dict()) == spec
    assert issubclass(MyObserver, ObserverBase)


def _heavy_tailed(n=20000, seed=0):
    """Student-t samples with 3 degrees of freedom (seeded)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g)
    chi2 = torch.randn(n, 3, generator=g).pow(2).sum(1)
    return z / (chi2 / 3).sqrt()


def _mse(x, spec, scale, zp):
    return float(((fake_quantize(x, scale, zp, spec) - x) ** 2).mean())


@pytest.mark.parametrize("spec", [INT8, UINT8, QuantizationSpec(Dtype.int4), QuantizationSpec(Dtype.fp8_e4m3)])
def test_mse_observer_beats_minmax_on_heavy_tails(spec):
    x = _heavy_tailed()
    mse_obs, mm_obs = PerTensorMSEObserver(spec), PerTensorMinMaxObserver(spec)
    for chunk in x.split(5000):
        mse_obs.observe(chunk)
        mm_obs.observe(chunk)
    assert mse_obs.sample.values.numel() == x.numel()  # under the sample cap: the sample is all data
    e_mse = _mse(x, spec, *mse_obs.calculate_qparams())
    e_mm = _mse(x, spec, *mm_obs.calculate_qparams())
    assert e_mse <= e_mm
    if spec.is_integer_format:  # clipping the t-distribution's tail pays off for integers
        assert e_mse < e_mm and mse_obs.best_ratio < 1.0
    # and it is the best ratio on a fine grid, to within the search's resolution
    fine = min(mse_obs.mse(r / 200) for r in range(1, 201))
    assert e_mse <= fine * 1.02


def test_mse_observer_sample_is_bounded():
    obs = PerTensorMSEObserver(INT8, sample_size=1000)
    for _ in range(5):
        obs.observe(torch.randn(3000))
    assert obs.sample.values.numel() == 1000
    assert obs.calculate_qparams()[0] > 0


def test_percentile_clips_outliers():
    x = torch.randn(100000, generator=torch.Generator().manual_seed(1))
    x[:5] = torch.tensor([500.0, -400.0, 300.0, 250.0, -350.0])
    obs = PerTensorPercentileObserver(INT8, percentile=99.9)
    for chunk in x.split(7000):
        obs.observe(chunk)
    lo, hi = obs.clip_range()
    exact = float(torch.quantile(x.abs().double(), 0.999))
    assert abs(float(hi) - exact) <= 2 * obs.hist_range / obs.bins
    assert float(hi) < 10 and float(lo) == -float(hi)
    assert float(obs.max_val) == 500.0  # true extremes are kept
    scale, _ = obs.calculate_qparams()
    assert float(scale) == pytest.approx(float(hi) / 127)


def test_percentile_asymmetric_and_rebinning():
    """Two tails for asymmetric specs; a growing range re-bins exactly (counts preserved)."""
    g = torch.Generator().manual_seed(2)
    batches = [torch.rand(5000, generator=g) * s - 0.2 * s for s in (1.0, 3.0, 40.0)]
    obs = PerTensorPercentileObserver(UINT8, percentile=99.0)
    for b in batches:
        obs.observe(b)
    assert int(obs.hist.sum()) == obs.count == 15000
    allx = torch.cat(batches).double()
    lo, hi = obs.clip_range()
    w = obs.hist_range / obs.bins
    assert abs(float(hi) - float(torch.quantile(allx, 0.99))) <= 2 * w
    assert abs(float(lo) - float(torch.quantile(allx, 0.01))) <= 2 * w
    full = PerTensorPercentileObserver(UINT8, percentile=100.0)
    for b in batches:
        full.observe(b)
    assert full.clip_range()[1] == full.max_val and full.clip_range()[0] == full.min_val


def test_observer_accepts_op_string():
    obs = PerTensorMinMaxObserver("int8:per_tensor:sym:static:float:half_even")
    obs.observe(torch.tensor([-2.0, 1.0]))
    assert float(obs.calculate_qparams()[0]) == pytest.approx(2 / 127)
