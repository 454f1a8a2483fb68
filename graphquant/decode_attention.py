"""Decode attention: one new query token per sequence over a KV cache, as a transformers attention backend.

HF's ``sdpa`` backend under ``torch.compile`` with a static cache copies K and V once per query
group (``repeat_kv``: four copies of the cache for Llama-3's 32/8 heads) and then runs a
prefill-shaped SDPA kernel on one query row; on the H200 that is 14 us of a 170 us bf16
Llama-3-8B decode layer (``benchmarks/results/decode_profile.json``). ``graphquant::decode_attention``
reads each KV head once for its whole query group, splits the cache over the GPU (flash-decoding,
``kernels/decode_attention_triton.py``) and skips cache blocks the mask drops (the empty tail of a
static cache).

::

    graphquant.decode_attention.use(model)      # model.set_attn_implementation("graphquant_decode")
    StaticDecoder(model, 1, 384).generate(ids, 256)

The backend takes the decode calls it can (one query position, CUDA, 16-bit floats, head sizes
16-256, a mask of one row per sequence or none, no dropout / softcap / attention sinks / position
bias) and hands everything else (prefill, CPU, other cases) to transformers' own ``sdpa`` function
unchanged, but for one case of prefill: inside :func:`empty_cache_prefill` (``StaticDecoder.prefill``
enters it: equal-length prompts written from cache position 0) a causal model's prompt attends to its own
keys only, ``sdpa(q, k[:L], v[:L], is_causal=True)``, instead of to every slot of the static cache through
a mask (8 x 2048 prompts of Llama-3-8B shapes, 2056 slots: 1.85 ms of a 12.7 ms compiled bf16 layer on the
H200, ``results/prefill_profile.json``; with the cut, fp8 static prefill went from 1.49x to 1.74x the stock
bf16 layer, ``results/generate_gpu_fp8_causal_prefill.json``). transformers makes the same cut
where it can see that the cache is empty, which it cannot under ``torch.compile``. The backend asks
transformers for the same masks as ``sdpa``, and runs graphquant's online attention work (QuaRot's R3,
KV-cache quantizers) first where a module carries it, so it also replaces ``graphquant_sdpa``. On CPU the
op runs a float reference (:func:`decode_attention_reference`), which the tests compare the kernel with.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .export.attention import ONLINE_ATTR, PREFIX

__all__ = ["NAME", "decode_attention", "decode_attention_reference", "attention_forward", "empty_cache_prefill",
           "register", "use", "use_if_sdpa"]

#: the attention implementation name registered with transformers
NAME = "graphquant_decode"
#: devices whose decode calls the op takes (elsewhere sdpa runs; the tests add "cpu" to run the reference)
DEVICES = ("cuda",)


def decode_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """fp32 reference: ``query`` (B, H_q, 1, D), ``key``/``value`` (B, H_kv, S, D), ``mask`` None, (B, S) bool
    (True: attend) or (B, S) additive -> (B, 1, H_q, D). A sequence whose positions are all masked gets zeros."""
    B, HQ, _, D = query.shape
    HKV = key.shape[1]
    q = query.float().reshape(B, HKV, HQ // HKV, D)
    s = torch.einsum("bhgd,bhsd->bhgs", q, key.float()) * scale
    if mask is not None:
        m = mask[:, None, None, :]
        s = s.masked_fill(~m, float("-inf")) if mask.dtype == torch.bool else s + m.float()
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    o = torch.einsum("bhgs,bhsd->bhgd", p, value.float())
    return o.reshape(B, 1, HQ, D).to(query.dtype)


@torch.library.custom_op("graphquant::decode_attention", mutates_args=())
def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: float) -> torch.Tensor:
    """See :func:`decode_attention_reference` for the contract (the Triton kernel on CUDA)."""
    return decode_attention_reference(query, key, value, mask, scale)


@decode_attention.register_fake
def _decode_attention_fake(query, key, value, mask, scale):
    B, HQ, _, D = query.shape
    return query.new_empty(B, 1, HQ, D)


@decode_attention.register_kernel("cuda")
def _decode_attention_cuda(query, key, value, mask, scale):
    kern = _triton()
    if kern is not None and kern.supports(query, key):
        return kern.decode_attention_triton(query, key, value, mask, scale)
    return decode_attention_reference(query, key, value, mask, scale)


_KERNELS: dict = {}


def _triton():
    """The Triton module, imported on first CUDA use only; ``None`` when Triton is missing. (A plain dict, not
    ``lru_cache``: dynamo traces this call inside compiled decode steps.)"""
    if "module" not in _KERNELS:
        try:
            from .kernels import decode_attention_triton as module
        except ImportError:
            module = None
        _KERNELS["module"] = module
    return _KERNELS["module"]


def _decode_mask(attention_mask, query, key):
    """The (B, S) view of a (B|1, 1, 1, S) mask, ``None`` for no mask, or ``False`` when the mask has another form."""
    if attention_mask is None:
        return None
    m = attention_mask
    if (m.dim() != 4 or m.shape[1] != 1 or m.shape[2] != 1 or m.shape[-1] != key.shape[2]
            or m.shape[0] not in (1, query.shape[0])):
        return False
    if m.dtype != torch.bool and not m.is_floating_point():
        return False
    return m[:, 0, 0, :].expand(query.shape[0], key.shape[2])


#: attention keyword arguments that change the scores beyond mask and scale: calls carrying one stay sdpa's
SCORE_MODIFIERS = ("softcap", "s_aux", "sinks", "position_bias")


def _takes(query, key, value, dropout, kwargs) -> bool:
    if query.shape[2] != 1 or query.device.type not in DEVICES or dropout or key.shape[-1] != value.shape[-1]:
        return False
    if any(kwargs.get(k) is not None for k in SCORE_MODIFIERS + ("cache",)):
        return False
    if kwargs.get("output_attentions") or value.dtype != query.dtype or query.shape[1] % key.shape[1]:
        return False
    if query.is_cuda:
        kern = _triton()
        return kern is not None and kern.supports(query, key)
    return True


_EMPTY_CACHE_PREFILL = [False]


@contextlib.contextmanager
def empty_cache_prefill():
    """Calls inside see prompts written from cache position 0 with no padding: :func:`attention_forward` may then
    give a prompt of L tokens the first L keys and ``is_causal`` in place of the cache-long mask. For callers that
    know it (``StaticDecoder.prefill``); under ``torch.compile`` the flag is read while tracing."""
    before = _EMPTY_CACHE_PREFILL[0]
    _EMPTY_CACHE_PREFILL[0] = True
    try:
        yield
    finally:
        _EMPTY_CACHE_PREFILL[0] = before


def _causal_prefill(module, query, key, dropout, kwargs) -> bool:
    """A prompt attending causally to the keys written before it from position 0: no sliding window, soft cap,
    sinks or position bias (their masks are not just causal), a module that says it is causal."""
    if not _EMPTY_CACHE_PREFILL[0] or not 1 < query.shape[2] <= key.shape[2] or dropout:
        return False
    if not getattr(module, "is_causal", True) or getattr(module, "sliding_window", None) is not None:
        return False
    return not any(kwargs.get(k) is not None for k in SCORE_MODIFIERS + ("sliding_window",))


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """A transformers attention function: decode calls go to ``graphquant::decode_attention``, the rest to sdpa.
    A module's graphquant online work (R3, KV-cache quantizers: ``export.attention``) runs first, as in
    ``graphquant_sdpa``."""
    online = getattr(module, ONLINE_ATTR, None)
    if online is not None:
        query, key, value = online.apply(query, key, value)
    if _takes(query, key, value, dropout, kwargs):
        mask = _decode_mask(attention_mask, query, key)
        if mask is not False:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return torch.ops.graphquant.decode_attention(query, key, value, mask, float(scale)), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _causal_prefill(module, query, key, dropout, kwargs):
        L = query.shape[2]
        return sdpa_attention_forward(module, query, key[:, :, :L], value[:, :, :L], None, dropout=dropout,
                                      scaling=scaling, is_causal=True, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register() -> str:
    """Register the backend (and sdpa's mask builder under its name) with transformers; returns :data:`NAME`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use(model):
    """Switch a transformers model to this backend (in place); returns the model."""
    register()
    model.set_attn_implementation(NAME)
    return model


def use_if_sdpa(model):
    """:func:`use` where the model runs transformers' ``sdpa`` or graphquant's ``graphquant_sdpa`` (both of which
    this backend serves); another choice (eager, flash attention, this backend already) is left as it is.
    Returns the model."""
    if getattr(model.config, "_attn_implementation", None) in ("sdpa", PREFIX + "sdpa"):
        use(model)
    return model
