"""Quantization configuration, mirroring AMD Quark's documented config (field names included).

Three levels, as in Quark:

* :class:`QuantizationSpec` — how one tensor is quantized (dtype, granularity, observer, ...).
* :class:`QuantizationConfig` — the specs of a module's ``input_tensors``, ``output_tensors``,
  ``weight`` and ``bias``.
* :class:`Config` — the model: a global config, per-layer-type and per-layer overrides,
  ``exclude`` globs, pre-quantization rewrites and algorithms, and the KV-cache spec.

Everything validates at construction and raises :class:`~graphquant.errors.ConfigError` with a
message that names the field and the fix. Specs fill their defaults in ``__post_init__``, so two
specs that quantize the same way compare equal, and ``Config.from_json(c.to_json()) == c``.

Scheme presets (``preset(name)``, ``list_presets()``) cover the W8A8 table of the rotation /
SmoothQuant reference and Quark's ``--quant_scheme`` names; ``with_kv_cache`` adds a KV-cache
spec like Quark's ``--kv_cache_dtype``.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable, Mapping

from .errors import ConfigError

__all__ = [
    "Dtype", "QSchemeType", "ScaleType", "RoundType", "QuantizationMode",
    "QuantizationSpec", "QuantizationConfig", "Config",
    "AlgoConfig", "SmoothQuantConfig", "AutoSmoothQuantConfig", "RotationConfig", "QuaRotConfig",
    "AWQConfig", "GPTQConfig", "SinkTokenConfig", "preset", "list_presets", "with_kv_cache",
]


# =========================================================================== enums
class _StrEnum(str, Enum):
    def __str__(self) -> str:
        return self.value

    @classmethod
    def coerce(cls, value, field_name: str):
        """``value`` as a member (accepts the member or its string value)."""
        if value is None or isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"{field_name}={value!r} is not a {cls.__name__}; choose one of "
                              f"{[m.value for m in cls]}") from None


class Dtype(_StrEnum):
    """Quantized data types (Quark's ``Dtype``). ``mx`` takes its element type from
    ``QuantizationSpec.mx_element_dtype``."""

    int8 = "int8"
    uint8 = "uint8"
    int4 = "int4"
    uint4 = "uint4"
    int2 = "int2"
    bfloat16 = "bfloat16"
    float16 = "float16"
    fp8_e4m3 = "fp8_e4m3"
    fp8_e5m2 = "fp8_e5m2"
    fp6_e3m2 = "fp6_e3m2"
    fp6_e2m3 = "fp6_e2m3"
    fp4 = "fp4"
    mx = "mx"


class QSchemeType(_StrEnum):
    """Granularity of the scale: one per tensor, per channel, per group, or (dynamic) per token."""

    per_tensor = "per_tensor"
    per_channel = "per_channel"
    per_group = "per_group"
    per_token = "per_token"


class ScaleType(_StrEnum):
    """``float`` scales, or ``pof2``: scales rounded *up* to a power of two."""

    float = "float"
    pof2 = "pof2"


class RoundType(_StrEnum):
    """``half_even`` (IEEE, default), ``round`` (half away from zero), ``floor``."""

    round = "round"
    floor = "floor"
    half_even = "half_even"


class QuantizationMode(_StrEnum):
    eager_mode = "eager_mode"
    fx_graph_mode = "fx_graph_mode"


INT_DTYPES = frozenset({Dtype.int8, Dtype.uint8, Dtype.int4, Dtype.uint4, Dtype.int2})
SIGNED_INT_DTYPES = frozenset({Dtype.int8, Dtype.int4, Dtype.int2})
FLOAT_DTYPES = frozenset({Dtype.fp8_e4m3, Dtype.fp8_e5m2, Dtype.fp6_e3m2, Dtype.fp6_e2m3, Dtype.fp4})
CAST_DTYPES = frozenset({Dtype.bfloat16, Dtype.float16})
MX_ELEMENT_DTYPES = frozenset({Dtype.fp8_e4m3, Dtype.fp8_e5m2, Dtype.fp6_e3m2, Dtype.fp6_e2m3,
                               Dtype.fp4, Dtype.int8})
_BITS = {Dtype.int8: 8, Dtype.uint8: 8, Dtype.int4: 4, Dtype.uint4: 4, Dtype.int2: 2,
         Dtype.bfloat16: 16, Dtype.float16: 16, Dtype.fp8_e4m3: 8, Dtype.fp8_e5m2: 8,
         Dtype.fp6_e3m2: 6, Dtype.fp6_e2m3: 6, Dtype.fp4: 4}
MX_DEFAULT_BLOCK = 32  # OCP MX v1.0 block size


def _observers():
    # Deferred: graphquant.quant.observers imports this module.
    from .quant import observers
    return observers


# =========================================================================== QuantizationSpec
@dataclass(frozen=True)
class QuantizationSpec:
    """How one tensor is quantized (Quark's ``QuantizationSpec``), validated and with defaults.

    Defaults filled when a field is ``None``:

    ========================  ==================================================================
    ``qscheme``               ``per_tensor`` (``per_group`` for ``Dtype.mx``)
    ``is_dynamic``            ``True`` for ``per_token``, else ``False``
    ``symmetric``             ``True``, except ``False`` for ``uint8``/``uint4``
    ``scale_type``            ``float`` (``pof2`` for ``Dtype.mx``: E8M0 scales)
    ``round_method``          ``half_even``
    ``ch_axis``               ``per_channel``: 0 (a Linear weight's output channels);
                              ``per_group``/MX: -1, the axis the groups run along (Quark's
                              ``ch_axis=1`` for a 2-D weight is the same axis)
    ``group_size``            MX: 32 (OCP MX v1.0); ``per_group`` requires it
    ``mx_element_dtype``      MX: ``fp8_e4m3``
    ``observer_cls``          dynamic / ``per_token`` / bf16 / fp16: ``PlaceholderObserver``;
                              ``per_tensor``: ``PerTensorMinMaxObserver``; ``per_channel``:
                              ``PerChannelMinMaxObserver``; ``per_group``:
                              ``PerGroupMinMaxObserver``; MX: ``PerBlockMXObserver``
    ========================  ==================================================================

    ``bfloat16``/``float16`` specs are plain casts: leave every field but ``dtype`` unset.
    ``observer_cls`` may be given as a class or its name.

    For per-channel *activations* set ``ch_axis=-1`` (the hidden dimension).
    """

    dtype: Dtype
    observer_cls: Any = None
    qscheme: QSchemeType | None = None
    is_dynamic: bool | None = None
    symmetric: bool | None = None
    scale_type: ScaleType | None = None
    round_method: RoundType | None = None
    ch_axis: int | None = None
    group_size: int | None = None
    mx_element_dtype: Dtype | None = None

    # ------------------------------------------------------------------ construction
    def __post_init__(self):
        for name, value in _fill_spec_fields(self).items():
            object.__setattr__(self, name, value)

    def evolve(self, **changes) -> "QuantizationSpec":
        """A copy with ``changes``; the other fields that hold their *default* are re-derived.

        ``dataclasses.replace`` would keep e.g. the default observer of the old qscheme;
        ``spec.evolve(qscheme="per_group", group_size=64)`` picks the per-group one.
        """
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        kwargs = dict(current)
        for name in current:
            if name == "dtype" or name in changes:
                continue
            default = _fill_spec_fields(self, raw=dict(current, **{name: None}), validate=False)[name]
            if default == current[name]:
                kwargs[name] = None
        kwargs.update(changes)
        return QuantizationSpec(**kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def is_cast(self) -> bool:
        """bfloat16/float16: a plain dtype cast, no scale."""
        return self.dtype in CAST_DTYPES

    @property
    def is_mx(self) -> bool:
        return self.dtype == Dtype.mx

    @property
    def is_integer_format(self) -> bool:
        """int8/uint8/int4/uint4/int2 (not MX)."""
        return self.dtype in INT_DTYPES

    @property
    def is_float_format(self) -> bool:
        """Quantized values are floating point: fp8/fp6/fp4, bf16/fp16, MX with a float element."""
        if self.is_mx:
            return self.mx_element_dtype != Dtype.int8
        return self.dtype in FLOAT_DTYPES or self.dtype in CAST_DTYPES

    @property
    def bits(self) -> int:
        """Bits per element (MX: the element, without the shared 8-bit scale)."""
        return _BITS[self.mx_element_dtype if self.is_mx else self.dtype]

    @property
    def qmin(self) -> int | None:
        """Lowest integer code (integer dtypes only, else None); see ``quant.formats``."""
        return self._range()[0] if self.is_integer_format else None

    @property
    def qmax(self) -> int | None:
        """Highest integer code (integer dtypes only, else None)."""
        return self._range()[1] if self.is_integer_format else None

    def _range(self) -> tuple[int, int]:
        from .quant.formats import int_range
        return int_range(self.dtype.value, bool(self.symmetric))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "observer_cls" and v is not None:
                v = v.__name__
            elif isinstance(v, Enum):
                v = v.value
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantizationSpec":
        if not isinstance(d, Mapping):
            raise ConfigError(f"a QuantizationSpec must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown QuantizationSpec field(s) {unknown}; known: {sorted(known)}")
        if "dtype" not in d:
            raise ConfigError("a QuantizationSpec needs 'dtype'")
        return cls(**d)

    def to_op_str(self) -> str:
        """Compact, stable encoding of the *numerics* (the observer is not part of it).

        ``"<dtype>:<qscheme>:<sym|asym>:<static|dynamic>:<scale_type>:<round_method>"``
        followed by ``":axis=<int>"`` (per_channel, per_group, MX), ``":group=<int>"``
        (per_group, MX) and ``":elem=<dtype>"`` (MX) when they apply. Casts are just the dtype:
        ``"bfloat16"``. Example: ``"int8:per_channel:sym:static:float:half_even:axis=0"``.
        """
        if self.is_cast:
            return self.dtype.value
        parts = [self.dtype.value, self.qscheme.value, "sym" if self.symmetric else "asym",
                 "dynamic" if self.is_dynamic else "static", self.scale_type.value,
                 self.round_method.value]
        if self.ch_axis is not None:
            parts.append(f"axis={self.ch_axis}")
        if self.group_size is not None:
            parts.append(f"group={self.group_size}")
        if self.mx_element_dtype is not None:
            parts.append(f"elem={self.mx_element_dtype.value}")
        return ":".join(parts)

    @staticmethod
    def from_op_str(s: str) -> "QuantizationSpec":
        """Inverse of :meth:`to_op_str` (cached; the observer is the default one)."""
        return _parse_op_str(s)


@functools.lru_cache(maxsize=1024)
def _parse_op_str(s: str) -> QuantizationSpec:
    parts = s.split(":")
    if len(parts) == 1:
        return QuantizationSpec(dtype=parts[0])
    if len(parts) < 6:
        raise ConfigError(f"bad spec string {s!r}: expected 'dtype:qscheme:sym|asym:static|dynamic:"
                          f"scale_type:round_method[:axis=N][:group=N][:elem=DTYPE]'")
    dtype, qscheme, sym, dyn, scale_type, round_method = parts[:6]
    if sym not in ("sym", "asym") or dyn not in ("static", "dynamic"):
        raise ConfigError(f"bad spec string {s!r}: field 3 must be sym|asym and field 4 static|dynamic")
    extra: dict[str, Any] = {}
    keys = {"axis": ("ch_axis", int), "group": ("group_size", int), "elem": ("mx_element_dtype", str)}
    for p in parts[6:]:
        k, _, v = p.partition("=")
        if k not in keys or not v:
            raise ConfigError(f"bad spec string {s!r}: unknown part {p!r} (allowed: axis=, group=, elem=)")
        name, conv = keys[k]
        try:
            extra[name] = conv(v)
        except ValueError:
            raise ConfigError(f"bad spec string {s!r}: {k}= needs an integer, got {v!r}") from None
    return QuantizationSpec(dtype=dtype, qscheme=qscheme, symmetric=sym == "sym",
                            is_dynamic=dyn == "dynamic", scale_type=scale_type,
                            round_method=round_method, **extra)


def _fill_spec_fields(spec: QuantizationSpec, raw: dict | None = None, validate: bool = True) -> dict:
    """Validated field values with defaults filled in (see the QuantizationSpec docstring)."""
    v = dict(raw) if raw is not None else {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    dtype = Dtype.coerce(v["dtype"], "dtype")
    if dtype is None:
        raise ConfigError("QuantizationSpec needs a dtype, e.g. Dtype.int8")
    v["dtype"] = dtype
    v["qscheme"] = QSchemeType.coerce(v["qscheme"], "qscheme")
    v["scale_type"] = ScaleType.coerce(v["scale_type"], "scale_type")
    v["round_method"] = RoundType.coerce(v["round_method"], "round_method")
    v["mx_element_dtype"] = Dtype.coerce(v["mx_element_dtype"], "mx_element_dtype")
    for name in ("is_dynamic", "symmetric"):
        if v[name] is not None and not isinstance(v[name], bool):
            raise ConfigError(f"{name} must be True, False or None, got {v[name]!r}")
    for name in ("ch_axis", "group_size"):
        if v[name] is not None and (isinstance(v[name], bool) or not isinstance(v[name], int)):
            raise ConfigError(f"{name} must be an int or None, got {v[name]!r}")

    what = f"QuantizationSpec(dtype={dtype.value})"
    if dtype in CAST_DTYPES:
        if validate:
            given = [n for n in ("qscheme", "is_dynamic", "symmetric", "scale_type", "round_method",
                                 "ch_axis", "group_size", "mx_element_dtype") if v[n] is not None]
            if given:
                raise ConfigError(f"{what} is a plain cast and takes no {', '.join(given)}: "
                                  f"leave {'them' if len(given) > 1 else 'it'} unset")
        v["observer_cls"] = _resolve_observer(v["observer_cls"], "PlaceholderObserver", what, validate)
        if validate:
            _check_observer(v, what)
        return v

    is_mx = dtype == Dtype.mx
    if v["qscheme"] is None:
        v["qscheme"] = QSchemeType.per_group if is_mx else QSchemeType.per_tensor
    qs = v["qscheme"]
    if v["is_dynamic"] is None:
        v["is_dynamic"] = qs == QSchemeType.per_token
    if v["symmetric"] is None:
        v["symmetric"] = dtype not in (Dtype.uint8, Dtype.uint4)
    if v["scale_type"] is None:
        v["scale_type"] = ScaleType.pof2 if is_mx else ScaleType.float
    if v["round_method"] is None:
        v["round_method"] = RoundType.half_even
    if v["ch_axis"] is None:
        if qs == QSchemeType.per_channel:
            v["ch_axis"] = 0
        elif qs == QSchemeType.per_group:
            v["ch_axis"] = -1
    if is_mx:
        if v["group_size"] is None:
            v["group_size"] = MX_DEFAULT_BLOCK
        if v["mx_element_dtype"] is None:
            v["mx_element_dtype"] = Dtype.fp8_e4m3
    default_obs = ("PlaceholderObserver" if v["is_dynamic"] or qs == QSchemeType.per_token else
                   "PerBlockMXObserver" if is_mx else
                   {QSchemeType.per_tensor: "PerTensorMinMaxObserver",
                    QSchemeType.per_channel: "PerChannelMinMaxObserver",
                    QSchemeType.per_group: "PerGroupMinMaxObserver"}[qs])
    v["observer_cls"] = _resolve_observer(v["observer_cls"], default_obs, what, validate)
    if not validate:
        return v

    if is_mx:
        if qs != QSchemeType.per_group:
            raise ConfigError(f"{what}: MX formats are block-wise; use qscheme=per_group (or leave it "
                              f"unset), not {qs.value}")
        if v["mx_element_dtype"] not in MX_ELEMENT_DTYPES:
            raise ConfigError(f"{what}: mx_element_dtype={v['mx_element_dtype'].value} is not an MX "
                              f"element type; choose one of {sorted(d.value for d in MX_ELEMENT_DTYPES)}")
        if v["scale_type"] != ScaleType.pof2:
            raise ConfigError(f"{what}: MX scales are E8M0 powers of two; leave scale_type unset "
                              f"or use ScaleType.pof2")
        if not v["symmetric"]:
            raise ConfigError(f"{what}: MX formats are symmetric; leave symmetric unset or True")
    elif v["mx_element_dtype"] is not None:
        raise ConfigError(f"{what}: mx_element_dtype only applies to dtype=Dtype.mx; remove it")
    if dtype in FLOAT_DTYPES and not v["symmetric"]:
        raise ConfigError(f"{what}: floating-point formats are symmetric (no zero point); "
                          f"set symmetric=True or leave it unset")
    if qs == QSchemeType.per_token and not v["is_dynamic"]:
        raise ConfigError(f"{what}: per_token scales are computed at run time; set is_dynamic=True "
                          f"(or leave it unset)")
    if qs == QSchemeType.per_group:
        if v["group_size"] is None:
            raise ConfigError(f"{what}: qscheme=per_group needs group_size, e.g. group_size=128")
        if v["group_size"] <= 0:
            raise ConfigError(f"{what}: group_size must be a positive integer, got {v['group_size']}")
    elif v["group_size"] is not None:
        raise ConfigError(f"{what}: group_size={v['group_size']} only applies to qscheme=per_group; "
                          f"remove it or set qscheme=per_group")
    if v["ch_axis"] is not None and qs not in (QSchemeType.per_channel, QSchemeType.per_group):
        raise ConfigError(f"{what}: ch_axis only applies to per_channel and per_group, not "
                          f"{qs.value}; remove it")
    _check_observer(v, what)
    return v


def _resolve_observer(obs, default_name: str, what: str, validate: bool):
    observers = _observers()
    if obs is None:
        return observers.observer_by_name(default_name)
    if isinstance(obs, str):
        return observers.observer_by_name(obs)  # raises ConfigError listing the known names
    if validate and not (isinstance(obs, type) and issubclass(obs, observers.ObserverBase)):
        raise ConfigError(f"{what}: observer_cls must be an observer class (a subclass of "
                          f"graphquant.quant.observers.ObserverBase) or its name, got {obs!r}")
    return obs


def _check_observer(v: dict, what: str) -> None:
    obs = v["observer_cls"]
    ok, hint = obs.accepts(v)
    if not ok:
        raise ConfigError(f"{what}, qscheme={getattr(v['qscheme'], 'value', None)}, "
                          f"is_dynamic={v['is_dynamic']}: observer {obs.__name__} does not fit; {hint}")


# =========================================================================== QuantizationConfig
@dataclass(frozen=True)
class QuantizationConfig:
    """The specs of one module's tensors (Quark's ``QuantizationConfig``); ``None`` = not quantized.

    ``output_tensors`` on ``k_proj``/``v_proj`` is how Quark spells KV-cache quantization.
    Weights are quantized once, offline: a weight spec must be static and not per_token.
    """

    input_tensors: QuantizationSpec | None = None
    output_tensors: QuantizationSpec | None = None
    weight: QuantizationSpec | None = None
    bias: QuantizationSpec | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            s = getattr(self, f.name)
            if isinstance(s, Mapping):
                s = QuantizationSpec.from_dict(s)
                object.__setattr__(self, f.name, s)
            if s is not None and not isinstance(s, QuantizationSpec):
                raise ConfigError(f"QuantizationConfig.{f.name} must be a QuantizationSpec or None, "
                                  f"got {type(s).__name__}")
        for name in ("weight", "bias"):
            s = getattr(self, name)
            if s is not None and not s.is_cast:
                if s.qscheme == QSchemeType.per_token:
                    raise ConfigError(f"QuantizationConfig.{name}: per_token is for activations; use "
                                      f"per_channel (or per_tensor/per_group) for {name}s")
                if s.is_dynamic:
                    raise ConfigError(f"QuantizationConfig.{name}: {name}s are quantized once, offline; "
                                      f"set is_dynamic=False")

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

    def to_dict(self) -> dict:
        return {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to_dict())
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantizationConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"a QuantizationConfig must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown QuantizationConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: None if x is None else QuantizationSpec.from_dict(x) for k, x in d.items()})


# =========================================================================== algorithm configs
_ALGO_REGISTRY: dict[str, type] = {}


@dataclass(frozen=True)
class AlgoConfig:
    """Base of pre-quantization rewrites and quantization algorithms; ``name`` discriminates JSON.

    Layer lists (``scaling_layers``, ``model_decoder_layers``, ...) are optional overrides
    accepted for Quark compatibility: by default the graph finds the layers. Subclasses declare
    ``name: str = "<their name>"`` as their *last* field; it registers them for JSON.
    """

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        default = cls.__dict__.get("name", None)
        if isinstance(default, str) and default:
            _ALGO_REGISTRY[default] = cls

    def __post_init__(self):
        expected = type(self).__dict__.get("name")
        if isinstance(expected, str) and expected and self.name != expected:
            raise ConfigError(f"{type(self).__name__}.name must be {expected!r} (it selects the "
                              f"algorithm), got {self.name!r}")
        for f in dataclasses.fields(self):
            _check_field_type(type(self).__name__, f.name, f.type, getattr(self, f.name))
        self._validate()

    def _validate(self) -> None:
        pass

    def to_dict(self) -> dict:
        return {f.name: _to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @staticmethod
    def from_dict(d: Mapping) -> "AlgoConfig":
        if not isinstance(d, Mapping) or "name" not in d:
            raise ConfigError(f"an algorithm config must be a JSON object with a 'name' "
                              f"(one of {sorted(_ALGO_REGISTRY)}), got {d!r}")
        cls = _ALGO_REGISTRY.get(d["name"])
        if cls is None:
            raise ConfigError(f"unknown algorithm {d['name']!r}; known: {sorted(_ALGO_REGISTRY)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# JSON has real booleans and numbers: the string "false" is not False (it is truthy), "0.5" is not
# 0.5. Every algorithm-config field is checked against its annotation before any use.
_FIELD_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def _check_field_type(owner: str, name: str, annotation, value) -> None:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [t.strip() for t in text.split("|")]
    if value is None and "None" in parts:
        return
    for t in parts:
        allowed = _FIELD_TYPES.get(t)
        if allowed is None:
            if t in ("list", "tuple") and isinstance(value, (list, tuple)):
                return
            continue
        if isinstance(value, bool) and t != "bool":
            continue  # True is an int to Python, not to a config
        if isinstance(value, allowed):
            return
    wanted = " or ".join("true/false" if t == "bool" else "a number" if t == "float" else
                         "an integer" if t == "int" else "a string" if t == "str" else
                         "null" if t == "None" else "a list" for t in parts)
    how = "write it without quotes" if isinstance(value, str) else "e.g."
    raise ConfigError(f"{owner}.{name} must be {wanted}, got {value!r} ({type(value).__name__}); "
                      f"{how}: {name}={_example(parts)}")


def _example(parts: list[str]) -> str:
    return {"bool": "false", "int": "1", "float": "0.5", "str": "'...'"}.get(parts[0], "[...]")


def _to_jsonable(v):
    if isinstance(v, tuple):
        return [_to_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_to_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _to_jsonable(x) for k, x in v.items()}
    return v


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _set(obj, name, value):
    object.__setattr__(obj, name, value)


def _opt_list(obj, name):
    v = getattr(obj, name)
    if v is not None:
        _check(isinstance(v, (list, tuple)), f"{type(obj).__name__}.{name} must be a list or None")
        _set(obj, name, list(v))


@dataclass(frozen=True)
class SmoothQuantConfig(AlgoConfig):
    """SmoothQuant: per-channel scales ``s = max|X|^alpha / max|W|^(1-alpha)`` moved from
    activations into weights (norm→linear groups; ``fc_fc=True`` also linear→linear pairs)."""

    alpha: float = 0.5
    scale_clamp_min: float = 1e-3
    fc_fc: bool = False
    scaling_layers: list | None = None
    model_decoder_layers: str | None = None
    embedding_layers: list | None = None
    name: str = "smoothquant"

    def _validate(self):
        _check(0.0 <= self.alpha <= 1.0, f"SmoothQuantConfig.alpha must be in [0, 1], got {self.alpha}")
        _check(self.scale_clamp_min > 0, f"SmoothQuantConfig.scale_clamp_min must be > 0, got "
                                         f"{self.scale_clamp_min}")
        _opt_list(self, "scaling_layers")
        _opt_list(self, "embedding_layers")


def _default_alphas() -> tuple:
    return tuple(round(0.05 * i, 2) for i in range(21))


@dataclass(frozen=True)
class AutoSmoothQuantConfig(AlgoConfig):
    """SmoothQuant with ``alpha`` chosen per site from ``alphas`` by output MSE."""

    alphas: tuple = field(default_factory=_default_alphas)
    scale_clamp_min: float = 1e-3
    fc_fc: bool = False
    name: str = "autosmoothquant"

    def _validate(self):
        _check(isinstance(self.alphas, (list, tuple)) and len(self.alphas) > 0,
               "AutoSmoothQuantConfig.alphas must be a non-empty list of values in [0, 1]")
        _check(all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in self.alphas),
               f"AutoSmoothQuantConfig.alphas must be numbers, got {list(self.alphas)!r}")
        _set(self, "alphas", tuple(float(a) for a in self.alphas))
        _check(all(0.0 <= a <= 1.0 for a in self.alphas),
               f"AutoSmoothQuantConfig.alphas must lie in [0, 1], got {self.alphas}")
        _check(self.scale_clamp_min > 0, "AutoSmoothQuantConfig.scale_clamp_min must be > 0")


@dataclass(frozen=True)
class RotationConfig(AlgoConfig):
    """Quark's "Rotation": R1 only (residual stream), offline. ``random`` uses a seeded random
    orthogonal (Hadamard times random signs) matrix instead of the plain Hadamard."""

    random: bool = False
    seed: int = 0
    name: str = "rotation"


@dataclass(frozen=True)
class QuaRotConfig(AlgoConfig):
    """QuaRot rotations R1 (residual), R2 (per head V/O), R3 (Q/K after RoPE, online), R4
    (down_proj input, online). ``online_had=False`` turns R3 and R4 off, as Quark's
    ``"online-had": false``. ``on_unsupported_size``: a size without a Hadamard matrix is
    skipped (reported) or an error."""

    r1: bool = True
    r2: bool = True
    r3: bool = True
    r4: bool = True
    random: bool = False
    seed: int = 0
    online_had: bool = True
    on_unsupported_size: str = "skip"
    name: str = "quarot"

    def _validate(self):
        _check(self.on_unsupported_size in ("skip", "error"),
               f"QuaRotConfig.on_unsupported_size must be 'skip' or 'error', got {self.on_unsupported_size!r}")
        _check(any((self.r1, self.r2, self.r3, self.r4)),
               "QuaRotConfig: every rotation is off (r1..r4 all False); enable at least one")

    @property
    def rotations(self) -> tuple[str, ...]:
        """The rotations that will be applied, e.g. ``("R1", "R2")`` when ``online_had=False``."""
        on = {"R1": self.r1, "R2": self.r2, "R3": self.r3 and self.online_had,
              "R4": self.r4 and self.online_had}
        return tuple(k for k, x in on.items() if x)


@dataclass(frozen=True)
class AWQConfig(AlgoConfig):
    """AWQ: per-channel scales searched on a grid of ``grid`` points, for weight-only quantization
    (group size and dtype come from the weight spec)."""

    grid: int = 20
    scaling_layers: list | None = None
    model_decoder_layers: str | None = None
    embedding_layers: list | None = None
    name: str = "awq"

    def _validate(self):
        _check(isinstance(self.grid, int) and self.grid >= 1, f"AWQConfig.grid must be an int >= 1, "
                                                               f"got {self.grid!r}")
        _opt_list(self, "scaling_layers")
        _opt_list(self, "embedding_layers")


@dataclass(frozen=True)
class GPTQConfig(AlgoConfig):
    """GPTQ: column-wise weight quantization with Hessian-based error compensation."""

    damp_percent: float = 0.01
    desc_act: bool = True
    static_groups: bool = True
    true_sequential: bool = True
    block_size: int = 128
    inside_layer_modules: list | None = None
    model_decoder_layers: str | None = None
    embedding_layers: list | None = None
    name: str = "gptq"

    def _validate(self):
        _check(0.0 < self.damp_percent <= 1.0, f"GPTQConfig.damp_percent must be in (0, 1], got "
                                               f"{self.damp_percent}")
        _check(isinstance(self.block_size, int) and self.block_size >= 1,
               f"GPTQConfig.block_size must be an int >= 1, got {self.block_size!r}")
        _opt_list(self, "inside_layer_modules")
        _opt_list(self, "embedding_layers")


@dataclass(frozen=True)
class SinkTokenConfig(AlgoConfig):
    """Keep the first ``num_tokens`` positions of each sequence (the attention sink, where pretrained LLMs put
    massive activations) out of *static* activation scales: they are calibrated without those tokens, and at
    run time those tokens are quantized per token, dynamically (``mode="dynamic"``), or stay in float
    (``mode="float"``). ``float_weights``: the first tokens also go through the float weights of the K/V
    projections (``"kv"``: their KV cache in full precision) or of every Linear (``"all"``); this keeps float
    copies of those weights. PrefixQuant-style; see ``graphquant.passes.sink_tokens``."""

    num_tokens: int = 1
    mode: str = "dynamic"
    float_weights: str = "none"
    name: str = "sink_tokens"

    def _validate(self):
        _check(self.float_weights in ("none", "kv", "all"),
               f"SinkTokenConfig.float_weights must be 'none', 'kv' or 'all', got {self.float_weights!r}")
        _check(isinstance(self.num_tokens, int) and not isinstance(self.num_tokens, bool) and self.num_tokens >= 1,
               f"SinkTokenConfig.num_tokens must be an int >= 1, got {self.num_tokens!r}")
        _check(self.mode in ("dynamic", "float"),
               f"SinkTokenConfig.mode must be 'dynamic' or 'float', got {self.mode!r}")


PRE_QUANT_OPT_CONFIGS = (SmoothQuantConfig, RotationConfig, QuaRotConfig)
ALGO_CONFIGS = (AWQConfig, GPTQConfig, AutoSmoothQuantConfig, SmoothQuantConfig, SinkTokenConfig)


# =========================================================================== Config
@dataclass
class Config:
    """The model's quantization config (Quark's ``Config``) plus graphquant's KV-cache spec.

    Which ``QuantizationConfig`` a module gets — :meth:`resolve` — first match wins:

    1. ``exclude``: an fnmatch glob (case-sensitive, whole FQN, e.g. ``"*lm_head"``,
       ``"*layers.0.mlp.down_proj"``) matching the module FQN → not quantized.
    2. ``layer_quant_config``: globs on the module FQN. When several match, the most specific
       wins: an exact (wildcard-free) pattern first, then the pattern with the most literal
       (non-wildcard) characters, then the one listed first.
    3. ``layer_type_quant_config``: keys are module classes (``torch.nn.Linear``) or class
       names (``"Linear"`` or ``"torch.nn.modules.linear.Linear"``), compared by class name.
    4. ``global_quant_config``.

    The chosen entry *replaces* the global one (no field-wise merging, as in Quark).

    KV cache: ``kv_cache_quant_config`` is a spec applied to the attention K (after RoPE) and V
    tensors. Quark's spelling, ``layer_quant_config={"*k_proj": QuantizationConfig(...,
    output_tensors=spec), "*v_proj": ...}``, is honoured too by the graph passes (they map
    ``output_tensors`` of k_proj/v_proj onto the same sites).

    ``algo_config`` is ``None`` or a list (a single config is wrapped) of AWQ / GPTQ /
    AutoSmoothQuant / SmoothQuant configs; ``pre_quant_opt_config`` a list of SmoothQuant /
    Rotation / QuaRot configs, applied in order. ``quant_mode``: graphquant always works on the
    exported graph; the field is kept for Quark compatibility. ``log_severity_level`` (Quark's
    convention: 0 debug, 1 info (default), 2 warning, 3 error, 4 fatal) sets the level of the
    ``"graphquant"`` logger when ``quantize`` runs (see ``graphquant.log``).
    """

    global_quant_config: QuantizationConfig
    layer_type_quant_config: dict = field(default_factory=dict)
    layer_quant_config: dict = field(default_factory=dict)
    exclude: list = field(default_factory=list)
    algo_config: Any = None
    pre_quant_opt_config: list = field(default_factory=list)
    quant_mode: QuantizationMode = QuantizationMode.fx_graph_mode
    kv_cache_quant_config: QuantizationSpec | None = None
    log_severity_level: int = 1

    def __post_init__(self):
        g = self.global_quant_config
        if isinstance(g, Mapping):
            g = QuantizationConfig.from_dict(g)
        if g is None:
            g = QuantizationConfig()
        _check(isinstance(g, QuantizationConfig), f"Config.global_quant_config must be a "
                                                  f"QuantizationConfig, got {type(g).__name__}")
        self.global_quant_config = g

        _check(isinstance(self.layer_type_quant_config, Mapping) or self.layer_type_quant_config is None,
               "Config.layer_type_quant_config must be a dict {module class or class name: QuantizationConfig}")
        ltq = {}
        for k, v in (self.layer_type_quant_config or {}).items():
            _check(isinstance(k, (type, str)), f"Config.layer_type_quant_config key {k!r} must be a "
                                               f"module class (e.g. torch.nn.Linear) or a class name")
            _check(isinstance(v, QuantizationConfig), f"Config.layer_type_quant_config[{_type_key_name(k)}] "
                                                      f"must be a QuantizationConfig, got {type(v).__name__}")
            ltq[k] = v
        self.layer_type_quant_config = ltq

        _check(isinstance(self.layer_quant_config, Mapping) or self.layer_quant_config is None,
               "Config.layer_quant_config must be a dict {FQN glob: QuantizationConfig}")
        lq = {}
        for k, v in (self.layer_quant_config or {}).items():
            _check(isinstance(k, str), f"Config.layer_quant_config keys are FQN globs (str), got {k!r}")
            _check(isinstance(v, QuantizationConfig), f"Config.layer_quant_config[{k!r}] must be a "
                                                      f"QuantizationConfig, got {type(v).__name__}")
            lq[k] = v
        self.layer_quant_config = lq

        ex = self.exclude
        if ex is None:
            ex = []
        elif isinstance(ex, str):
            ex = [ex]
        _check(isinstance(ex, (list, tuple)) and all(isinstance(e, str) for e in ex),
               f"Config.exclude must be a list of FQN globs such as ['*lm_head'], got {self.exclude!r}")
        self.exclude = list(ex)

        self.algo_config = _algo_list(self.algo_config, "algo_config", ALGO_CONFIGS,
                                      "pre_quant_opt_config") or None
        self.pre_quant_opt_config = _algo_list(self.pre_quant_opt_config, "pre_quant_opt_config",
                                               PRE_QUANT_OPT_CONFIGS, "algo_config")
        self.quant_mode = QuantizationMode.coerce(self.quant_mode, "quant_mode")
        _check(self.quant_mode is not None, "Config.quant_mode must be a QuantizationMode")
        kv = self.kv_cache_quant_config
        if isinstance(kv, Mapping):
            kv = QuantizationSpec.from_dict(kv)
        _check(kv is None or isinstance(kv, QuantizationSpec),
               f"Config.kv_cache_quant_config must be a QuantizationSpec or None, got {type(kv).__name__}")
        self.kv_cache_quant_config = kv
        _check(isinstance(self.log_severity_level, int) and not isinstance(self.log_severity_level, bool),
               f"Config.log_severity_level must be an int, got {self.log_severity_level!r}")

    # ------------------------------------------------------------------ resolution
    def is_excluded(self, fqn: str) -> bool:
        return any(fnmatch.fnmatchcase(fqn, pat) for pat in self.exclude)

    def resolve(self, fqn: str, module_type: str | type) -> QuantizationConfig | None:
        """The ``QuantizationConfig`` of module ``fqn`` of class ``module_type`` (a class or its
        name), by the precedence in the class docstring; ``None`` when the module is excluded or
        its config quantizes nothing."""
        if self.is_excluded(fqn):
            return None
        cfg = self._layer_match(fqn)
        if cfg is None:
            cfg = self._type_match(module_type)
        if cfg is None:
            cfg = self.global_quant_config
        return None if cfg.is_empty else cfg

    def _layer_match(self, fqn: str) -> QuantizationConfig | None:
        best, best_key = None, None
        for i, (pat, cfg) in enumerate(self.layer_quant_config.items()):
            if fnmatch.fnmatchcase(fqn, pat):
                key = (pat == fqn, _literal_chars(pat), -i)
                if best_key is None or key > best_key:
                    best, best_key = cfg, key
        return best

    def _type_match(self, module_type) -> QuantizationConfig | None:
        name = module_type.__name__ if isinstance(module_type, type) else str(module_type).rsplit(".", 1)[-1]
        for k, cfg in self.layer_type_quant_config.items():
            if _type_key_name(k).rsplit(".", 1)[-1] == name:
                return cfg
        return None

    def unmatched_exclude(self, fqns: Iterable[str]) -> list[str]:
        """The ``exclude`` globs that match none of ``fqns`` (for a warning)."""
        fqns = list(fqns)
        return [p for p in self.exclude if not any(fnmatch.fnmatchcase(f, p) for f in fqns)]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {
            "global_quant_config": self.global_quant_config.to_dict(),
            "layer_type_quant_config": [
                {("type" if isinstance(k, type) else "name"): _type_key_name(k), "config": v.to_dict()}
                for k, v in self.layer_type_quant_config.items()],
            "layer_quant_config": {k: v.to_dict() for k, v in self.layer_quant_config.items()},
            "exclude": list(self.exclude),
            "algo_config": None if self.algo_config is None else [a.to_dict() for a in self.algo_config],
            "pre_quant_opt_config": [a.to_dict() for a in self.pre_quant_opt_config],
            "quant_mode": self.quant_mode.value,
            "kv_cache_quant_config": None if self.kv_cache_quant_config is None
            else self.kv_cache_quant_config.to_dict(),
            "log_severity_level": self.log_severity_level,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "Config":
        if not isinstance(d, Mapping):
            raise ConfigError(f"a Config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown Config field(s) {unknown}; known: {sorted(known)}")
        if "global_quant_config" not in d:
            raise ConfigError("a Config needs 'global_quant_config'")
        kw = dict(d)
        kw["global_quant_config"] = QuantizationConfig.from_dict(d["global_quant_config"] or {})
        ltq = {}
        for item in d.get("layer_type_quant_config") or []:
            if not isinstance(item, Mapping) or "config" not in item or not ({"type", "name"} & set(item)):
                raise ConfigError(f"layer_type_quant_config entries are {{'type' or 'name': ..., "
                                  f"'config': {{...}}}}, got {item!r}")
            key = _module_type(item["type"]) if "type" in item else item["name"]
            ltq[key] = QuantizationConfig.from_dict(item["config"])
        kw["layer_type_quant_config"] = ltq
        kw["layer_quant_config"] = {k: QuantizationConfig.from_dict(v)
                                    for k, v in (d.get("layer_quant_config") or {}).items()}
        if d.get("algo_config") is not None:
            algos = d["algo_config"]
            kw["algo_config"] = [AlgoConfig.from_dict(a) for a in
                                 (algos if isinstance(algos, list) else [algos])]
        kw["pre_quant_opt_config"] = [AlgoConfig.from_dict(a) for a in d.get("pre_quant_opt_config") or []]
        if d.get("kv_cache_quant_config") is not None:
            kw["kv_cache_quant_config"] = QuantizationSpec.from_dict(d["kv_cache_quant_config"])
        return cls(**kw)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, s: str) -> "Config":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ConfigError(f"Config JSON does not parse: {e}") from None
        return cls.from_dict(d)


def _algo_list(v, field_name: str, allowed: tuple, other_field: str) -> list:
    if v is None:
        return []
    items = [AlgoConfig.from_dict(a) if isinstance(a, Mapping) else a
             for a in (list(v) if isinstance(v, (list, tuple)) else [v])]
    for a in items:
        _check(isinstance(a, AlgoConfig), f"Config.{field_name} entries must be algorithm configs "
                                          f"(e.g. SmoothQuantConfig()), got {type(a).__name__}")
        if type(a) in PRE_QUANT_OPT_CONFIGS + ALGO_CONFIGS and not isinstance(a, allowed):
            raise ConfigError(f"{type(a).__name__} goes in Config.{other_field}, not Config.{field_name}")
    return items


def _literal_chars(pattern: str) -> int:
    """Characters of an fnmatch pattern that match themselves (``*``, ``?`` and ``[...]`` excluded)."""
    n, i = 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c in "*?":
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2)
            if j < 0:
                n, i = n + 1, i + 1
            else:
                i = j + 1
        else:
            n, i = n + 1, i + 1
    return n


def _type_key_name(k) -> str:
    return f"{k.__module__}.{k.__qualname__}" if isinstance(k, type) else k


def _module_type(qualified) -> type | str:
    """The module class a config's ``"type"`` names, from a fixed table: ``torch.nn`` module classes
    (``"torch.nn.Linear"``, ``"torch.nn.modules.linear.Linear"`` or ``"Linear"``). Any other name is kept
    as a class *name* (matched by name, as a ``"name"`` entry is). Nothing is ever imported from a
    config string: a config file must not run code."""
    if not isinstance(qualified, str) or not qualified:
        raise ConfigError(f"layer_type_quant_config 'type' must be a class name such as 'torch.nn.Linear', "
                          f"got {qualified!r}")
    import torch.nn

    short = qualified.rsplit(".", 1)[-1]
    cls = getattr(torch.nn, short, None)
    from_torch = qualified == short or qualified.startswith("torch.nn.")
    if from_torch and isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        return cls
    return qualified


# =========================================================================== presets
def _spec(dtype, qscheme="per_tensor", **kw) -> QuantizationSpec:
    return QuantizationSpec(dtype=dtype, qscheme=qscheme, **kw)


def _int8_tensor(dynamic=False):
    return _spec(Dtype.int8, "per_tensor", symmetric=True, is_dynamic=dynamic)


def _int8_channel():
    return _spec(Dtype.int8, "per_channel", symmetric=True, ch_axis=0)


def _int8_token():
    return _spec(Dtype.int8, "per_token", symmetric=True, is_dynamic=True)


#: what presets leave in float: the output head, as Quark's CLI does by default
PRESET_EXCLUDE = ("*lm_head",)


def _w8a8(weight, act, kv=None) -> Config:
    return Config(global_quant_config=QuantizationConfig(input_tensors=act, weight=weight),
                  kv_cache_quant_config=kv, exclude=list(PRESET_EXCLUDE))


def _fp8_tensor(dynamic=False):
    return _spec(Dtype.fp8_e4m3, "per_tensor", is_dynamic=dynamic)


def _mx(elem, dynamic=False):
    return _spec(Dtype.mx, "per_group", mx_element_dtype=elem, group_size=32, is_dynamic=dynamic)


_PRESETS: dict[str, tuple[str, Any]] = {
    # --- the W8A8 table (reference 000). No suffix = static activations.
    "w_int8_per_tensor_a_int8_per_tensor": (
        "W int8 per-tensor sym; A int8 per-tensor sym static",
        lambda: _w8a8(_int8_tensor(), _int8_tensor())),
    "w_int8_per_channel_a_int8_per_tensor": (
        "W int8 per-channel sym; A int8 per-tensor sym static",
        lambda: _w8a8(_int8_channel(), _int8_tensor())),
    "w_int8_per_channel_a_int8_per_tensor_dynamic": (
        "W int8 per-channel sym; A int8 per-tensor sym dynamic",
        lambda: _w8a8(_int8_channel(), _int8_tensor(dynamic=True))),
    "w_int8_per_channel_a_int8_per_token": (
        "W int8 per-channel sym; A int8 per-token sym dynamic",
        lambda: _w8a8(_int8_channel(), _int8_token())),
    "w_int8_per_tensor_a_int8_per_tensor_kv_cache_int8_per_tensor": (
        "W int8 per-tensor; A int8 per-tensor static; KV int8 per-tensor static",
        lambda: _w8a8(_int8_tensor(), _int8_tensor(), _int8_tensor())),
    "w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor": (
        "W int8 per-channel; A int8 per-tensor static; KV int8 per-tensor static",
        lambda: _w8a8(_int8_channel(), _int8_tensor(), _int8_tensor())),
    "w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor_dynamic": (
        "W int8 per-channel; A int8 per-tensor dynamic; KV int8 per-tensor dynamic",
        lambda: _w8a8(_int8_channel(), _int8_tensor(dynamic=True), _int8_tensor(dynamic=True))),
    "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token": (
        "W int8 per-channel; A int8 per-token dynamic; KV int8 per-token dynamic",
        lambda: _w8a8(_int8_channel(), _int8_token(), _int8_token())),
    # --- Quark's --quant_scheme names
    "w_int8_per_tensor": (
        "W int8 per-tensor sym, weight-only",
        lambda: _w8a8(_int8_tensor(), None)),
    "w_int8_a_int8_per_tensor_sym": (
        "W int8 per-tensor sym; A int8 per-tensor sym static",
        lambda: _w8a8(_int8_tensor(), _int8_tensor())),
    "w_fp8_a_fp8": (
        "W fp8_e4m3 per-tensor; A fp8_e4m3 per-tensor static",
        lambda: _w8a8(_fp8_tensor(), _fp8_tensor())),
    "w_fp8_a_fp8_per_token": (
        "W fp8_e4m3 per-channel; A fp8_e4m3 per-token dynamic",
        lambda: _w8a8(_spec(Dtype.fp8_e4m3, "per_channel", ch_axis=0),
                      _spec(Dtype.fp8_e4m3, "per_token", is_dynamic=True))),
    "w_uint4_per_group_asym": (
        "W uint4 per-group asym, group 128, weight-only",
        lambda: _w8a8(_spec(Dtype.uint4, "per_group", symmetric=False, group_size=128), None)),
    "w_int4_per_group_sym": (
        "W int4 per-group sym, group 128, weight-only",
        lambda: _w8a8(_spec(Dtype.int4, "per_group", symmetric=True, group_size=128), None)),
    "w_int4_per_channel_sym": (
        "W int4 per-channel sym, weight-only",
        lambda: _w8a8(_spec(Dtype.int4, "per_channel", symmetric=True, ch_axis=0), None)),
    "w_mxfp8_a_mxfp8": (
        "W MX fp8_e4m3 (32-blocks, E8M0 scales); A MX fp8_e4m3 dynamic",
        lambda: _w8a8(_mx(Dtype.fp8_e4m3), _mx(Dtype.fp8_e4m3, dynamic=True))),
    "w_mxfp4_a_mxfp4": (
        "W MX fp4 e2m1 (32-blocks, E8M0 scales); A MX fp4 dynamic",
        lambda: _w8a8(_mx(Dtype.fp4), _mx(Dtype.fp4, dynamic=True))),
    "w_int4_a_int8_per_token": (
        "W int4 per-channel sym; A int8 per-token dynamic",
        lambda: _w8a8(_spec(Dtype.int4, "per_channel", symmetric=True, ch_axis=0), _int8_token())),
    "w_int4_a_int4_per_token": (
        "W int4 per-channel sym; A int4 per-token sym dynamic",
        lambda: _w8a8(_spec(Dtype.int4, "per_channel", symmetric=True, ch_axis=0),
                      _spec(Dtype.int4, "per_token", symmetric=True, is_dynamic=True))),
}


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description, in a stable order."""
    return {k: d for k, (d, _) in _PRESETS.items()}


def preset(name: str, group_size: int | None = None, pre_quant_opt_config=None) -> Config:
    """A fresh :class:`Config` for scheme ``name`` (see :func:`list_presets`).

    Presets quantize every Linear except the output head: ``exclude=["*lm_head"]``, as Quark's CLI
    does by default. To quantize ``lm_head`` too: ``dataclasses.replace(cfg, exclude=[])``.
    ``group_size`` replaces a per-group weight scheme's group size; ``pre_quant_opt_config`` (a list
    such as ``[QuaRotConfig()]``) sets the rewrites that run before quantization.
    """
    entry = _PRESETS.get(name)
    if entry is None:
        close = difflib.get_close_matches(str(name), list(_PRESETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown quantization scheme {name!r}.{hint} Known schemes: "
                          f"{', '.join(_PRESETS)}")
    cfg = entry[1]()
    if group_size:
        g = cfg.global_quant_config
        if g.weight is None or g.weight.qscheme != QSchemeType.per_group:
            raise ConfigError(f"group_size={group_size}: scheme {name!r} has no per-group weights")
        cfg = dataclasses.replace(cfg, global_quant_config=dataclasses.replace(
            g, weight=dataclasses.replace(g.weight, group_size=int(group_size))))
    if pre_quant_opt_config is not None:
        cfg = dataclasses.replace(cfg, pre_quant_opt_config=list(pre_quant_opt_config))
    return cfg


def with_kv_cache(config: Config, dtype: str | Dtype | None, qscheme: str | QSchemeType = "per_tensor",
                  is_dynamic: bool | None = None) -> Config:
    """A copy of ``config`` whose KV cache (K after RoPE, V) is quantized — Quark's
    ``--kv_cache_dtype``. ``dtype``: ``"int8"`` (symmetric) or ``"fp8"``/``"fp8_e4m3"``;
    ``None`` removes KV-cache quantization. ``qscheme``: ``per_tensor`` (static unless
    ``is_dynamic=True``) or ``per_token`` (dynamic)."""
    if dtype is None:
        return dataclasses.replace(config, kv_cache_quant_config=None)
    d = {"int8": Dtype.int8, "fp8": Dtype.fp8_e4m3, "fp8_e4m3": Dtype.fp8_e4m3}.get(getattr(dtype, "value", dtype))
    if d is None:
        raise ConfigError(f"kv cache dtype {dtype!r} is not supported; use 'int8' or 'fp8'")
    qs = QSchemeType.coerce(qscheme, "qscheme")
    if qs not in (QSchemeType.per_tensor, QSchemeType.per_token):
        raise ConfigError(f"kv cache qscheme must be per_tensor or per_token, got {qs.value}")
    spec = QuantizationSpec(dtype=d, qscheme=qs, is_dynamic=is_dynamic)
    return dataclasses.replace(config, kv_cache_quant_config=spec)


_OBSERVER_NAMES = ("ObserverBase", "PlaceholderObserver", "PerTensorMinMaxObserver",
                   "PerChannelMinMaxObserver", "PerGroupMinMaxObserver", "PerBlockMXObserver",
                   "PerTensorPercentileObserver", "PerTensorMSEObserver")


def __getattr__(name: str):
    """Observer classes are importable from here too (``from graphquant.config import
    PerTensorMinMaxObserver``), as Quark users expect next to the config classes."""
    if name in _OBSERVER_NAMES:
        return getattr(_observers(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
