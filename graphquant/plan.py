"""Plan: which pass acts at which site, decided once from the pattern report and the configs.

``make_plan(report, pre_quant_opt_config)`` turns configs such as ``SmoothQuantConfig`` or
``QuaRotConfig`` (or their names: "smoothquant", "rotation", "quarot") into per-pass site lists.
Sites a transform cannot act on are skipped with the report's reason in ``plan.notes``;
``on_unsupported_size="error"`` turns a skipped online rotation into an error.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .patterns.base import Pattern


@dataclass
class SmoothPlan:
    alpha: float
    scale_clamp_min: float
    sites: list[Pattern]
    auto: bool = False
    alphas: tuple = ()


@dataclass
class RotationPlan:
    kind: str  # "hadamard" | "random_hadamard" | "random"
    seed: int
    sites: list[Pattern]


@dataclass
class Plan:
    smooth: SmoothPlan | None = None
    fuse_norms: list[Pattern] = field(default_factory=list)  # norm_linear sites whose norm is folded
    convert_layernorm: bool = False
    r1: RotationPlan | None = None
    r2: RotationPlan | None = None
    r3: RotationPlan | None = None  # online, inserted by the online-rotation passes
    r4: RotationPlan | None = None
    notes: list[str] = field(default_factory=list)
    configs: list[Any] = field(default_factory=list)

    def passes(self) -> list[str]:
        names = []
        if self.smooth is not None:
            names.append("smooth")
        if self.fuse_norms:
            names.append("fuse_norms")
        if self.r1 is not None:
            names.append("rotate_residual")
        if self.r2 is not None:
            names.append("rotate_attention_vo")
        if self.r4 is not None:
            names.append("online_r4")
        if self.r3 is not None:
            names.append("online_r3")
        return names

    def describe(self) -> list[str]:
        out = []
        if self.smooth:
            out.append(f"smooth ({'auto' if self.smooth.auto else f'alpha={self.smooth.alpha}'}): "
                       f"{len(self.smooth.sites)} sites")
        if self.fuse_norms:
            out.append(f"fuse_norms: {len(self.fuse_norms)} norms"
                       + (" (LayerNorm -> RMSNorm)" if self.convert_layernorm else ""))
        for name in ("r1", "r2", "r3", "r4"):
            r = getattr(self, name)
            if r is not None:
                out.append(f"{name.upper()} ({r.kind}): {len(r.sites)} sites")
        return out + [f"note: {n}" for n in self.notes]


_BY_NAME = {"smoothquant": "SmoothQuantConfig", "smooth": "SmoothQuantConfig",
            "autosmoothquant": "AutoSmoothQuantConfig", "rotation": "RotationConfig", "quarot": "QuaRotConfig"}


def normalize_pre_quant_configs(configs) -> list:
    from . import config as cfgmod

    if configs is None:
        return []
    if not isinstance(configs, (list, tuple)):
        configs = [configs]
    out = []
    for c in configs:
        if isinstance(c, str):
            key = c.lower().replace("-", "").replace("_", "")
            if key not in _BY_NAME:
                raise ConfigError(f"unknown pre-quantization optimization {c!r}; choose from "
                                  f"{sorted(set(_BY_NAME) - {'smooth'})} or pass a config object")
            c = getattr(cfgmod, _BY_NAME[key])()
        if type(c).__name__ not in set(_BY_NAME.values()):
            raise ConfigError(f"{type(c).__name__} is not a pre-quantization optimization config; use SmoothQuantConfig, "
                              "AutoSmoothQuantConfig, RotationConfig or QuaRotConfig")
        out.append(c)
    return out


def _rotation_kind(cfg) -> str:
    return "random_hadamard" if getattr(cfg, "random", False) else "hadamard"


def make_plan(report, pre_quant_opt_config=None, exclude: list[str] | None = None) -> Plan:
    configs = normalize_pre_quant_configs(pre_quant_opt_config)
    plan = Plan(configs=configs)
    for cfg in configs:
        kind = type(cfg).__name__
        if kind in ("SmoothQuantConfig", "AutoSmoothQuantConfig"):
            _plan_smooth(plan, report, cfg, auto=(kind == "AutoSmoothQuantConfig"), exclude=exclude or [])
        elif kind == "RotationConfig":
            _plan_r1(plan, report, cfg)
        elif kind == "QuaRotConfig":
            if cfg.r1:
                _plan_r1(plan, report, cfg)
            if cfg.r2:
                _plan_head_rotation(plan, report, cfg, "r2", "attention_vo", "R2")
            if cfg.r4:
                _plan_online(plan, report, cfg, "r4", "linear_linear", "R4")
            if cfg.r3:
                _plan_online(plan, report, cfg, "r3", "attention_qk", "R3")
    return plan


def _plan_smooth(plan: Plan, report, cfg, auto: bool, exclude: list[str]) -> None:
    import fnmatch

    fc_fc = bool(getattr(cfg, "fc_fc", False))
    wanted = getattr(cfg, "scaling_layers", None)
    sites = []
    for p in report.patterns:
        if p.kind not in ("norm_linear", "attention_vo", "linear_linear"):
            continue
        if p.kind == "linear_linear" and not fc_fc:
            continue
        consumers = p.modules[1:] if p.kind != "linear_linear" else [p.details["consumer"]]
        if p.kind == "attention_vo":
            consumers = [p.details["o_proj"]]
        if wanted:
            if not any(any(fnmatch.fnmatch(m, w) or m.endswith(w) for w in wanted) for m in consumers):
                continue
        if "smooth" not in p.applies:
            plan.notes.append(f"smooth skipped at {p.modules[0]}: {p.blocked.get('smooth', 'not applicable')}")
            continue
        rs = report.residual_stream
        if p.kind == "norm_linear" and rs is not None and rs.details.get("lm_head") in consumers:
            plan.notes.append("smooth skipped at the final norm -> lm_head (graphquant does not smooth into "
                              "lm_head; presets and the CLI leave lm_head unquantized)")
            continue
        if exclude and all(any(fnmatch.fnmatch(c, e) for e in exclude) for c in consumers):
            plan.notes.append(f"smooth skipped at {p.modules[0]}: all consumers are excluded from quantization")
            continue
        sites.append(p)
    plan.smooth = SmoothPlan(alpha=float(getattr(cfg, "alpha", 0.5)),
                             scale_clamp_min=float(getattr(cfg, "scale_clamp_min", 1e-3)), sites=sites, auto=auto,
                             alphas=tuple(getattr(cfg, "alphas", ()) or ()))


def _plan_r1(plan: Plan, report, cfg) -> None:
    rs = report.residual_stream
    if rs is None:
        plan.notes.append("R1 skipped: no residual stream found")
        return
    if "R1" not in rs.applies:
        plan.notes.append(f"R1 skipped: {rs.blocked.get('R1')}")
        warnings.warn(f"graphquant: R1 rotation cannot apply to this model: {rs.blocked.get('R1')}", stacklevel=3)
        return
    kind = _rotation_kind(cfg)
    if not rs.details["hadamard"]["supported"]:
        plan.notes.append(f"R1: hidden size {rs.details['hidden_size']} has no Hadamard construction; "
                          "using a seeded random orthogonal matrix")
        kind = "random"
    plan.r1 = RotationPlan(kind, int(getattr(cfg, "seed", 0)), [rs])
    plan.fuse_norms = [p for p in report.of_kind("norm_linear") if "R1" in p.applies]
    plan.convert_layernorm = bool(rs.details.get("layernorm_needs_conversion"))


def _plan_head_rotation(plan: Plan, report, cfg, attr: str, kind: str, transform: str) -> None:
    policy = getattr(cfg, "on_unsupported_size", "skip")
    sites = []
    for p in report.of_kind(kind):
        had = p.details.get("hadamard") or {}
        if transform in p.applies and had.get("supported", True) is False:
            msg = f"{transform} skipped at {p.modules[0]}: head_dim {p.details.get('head_dim')}: {had.get('reason')}"
            if policy == "error":
                raise ConfigError(msg.splitlines()[0] + " (QuaRotConfig(on_unsupported_size='skip') skips such "
                                  "sites with a note)")
            plan.notes.append(msg.splitlines()[0])
            warnings.warn("graphquant: " + msg.splitlines()[0], stacklevel=3)
        elif transform in p.applies:
            sites.append(p)
        else:
            plan.notes.append(f"{transform} skipped at {p.modules[0]}: {p.blocked.get(transform, 'not applicable')}")
    if sites:
        setattr(plan, attr, RotationPlan(_rotation_kind(cfg), int(getattr(cfg, "seed", 0)), sites))


def _plan_online(plan: Plan, report, cfg, attr: str, kind: str, transform: str) -> None:
    policy = getattr(cfg, "on_unsupported_size", "skip")
    sites = []
    for p in report.of_kind(kind):
        if transform in p.applies:
            sites.append(p)
            continue
        reason = p.blocked.get(transform, "not applicable")
        msg = f"{transform} skipped at {p.modules[-1]}: {reason}"
        if policy == "error":
            raise ConfigError(msg + " (QuaRotConfig(on_unsupported_size='skip') skips such sites with a note)")
        plan.notes.append(msg)
        warnings.warn("graphquant: " + msg, stacklevel=3)
    if sites:
        setattr(plan, attr, RotationPlan("hadamard", int(getattr(cfg, "seed", 0)), sites))
