"""Number formats, fake-quantization math, observers and the ``graphquant::`` quantization ops.

* :mod:`.formats` — integer ranges, fp8/fp6/fp4 grids, MX block scales, rounding (exact).
* :mod:`.fake_quant` — qparams, quantize / dequantize / fake-quantize, dynamic variants,
  offline weight quantization.
* :mod:`.observers` — calibration statistics → qparams.
* :mod:`.ops` — ``torch.library`` custom ops (importing this package registers them).
"""
from . import formats
from .fake_quant import (QuantizedWeight, compute_qparams, dequantize, dynamic_fake_quantize,
                         dynamic_qparams, dynamic_quantize, fake_quantize, minmax, qparam_shape,
                         quantize, quantize_weight, storage_dtype)
from .observers import (OBSERVERS, ObserverBase, PerBlockMXObserver, PerChannelMinMaxObserver,
                        PerGroupMinMaxObserver, PerTensorMinMaxObserver, PerTensorMSEObserver,
                        PerTensorPercentileObserver, PlaceholderObserver, observer_by_name)
from . import ops

__all__ = [
    "formats", "ops", "QuantizedWeight", "compute_qparams", "quantize", "dequantize", "fake_quantize",
    "dynamic_qparams", "dynamic_quantize", "dynamic_fake_quantize", "minmax", "qparam_shape",
    "quantize_weight", "storage_dtype", "OBSERVERS", "ObserverBase", "PlaceholderObserver",
    "PerTensorMinMaxObserver", "PerChannelMinMaxObserver", "PerGroupMinMaxObserver",
    "PerBlockMXObserver", "PerTensorPercentileObserver", "PerTensorMSEObserver", "observer_by_name",
]
