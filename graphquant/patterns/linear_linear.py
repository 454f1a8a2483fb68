"""``linear_linear``: a Linear whose input is computed from other Linears' outputs by
channel-wise ops only (e.g. ``down_proj(act(gate_proj(x)) * up_proj(x))``, ``fc2(relu(fc1(x)))``).

Each consumer gets one record. A producer's path is *smoothable* when every op on it commutes
with a positive per-channel scale: multiplication by another branch, ReLU (positively
homogeneous), casts and eval dropout. The consumer's input is the R4 site (an online Hadamard
there, folded into the consumer's weight, is always valid).
"""
from __future__ import annotations

from torch import fx

from .sizes import hadamard_info
from .base import AnalysisContext, Pattern, layer_index
from .matcher import aten, is_call, is_transparent, shape_of

# elementwise ops that act channel by channel
ACTIVATIONS = {aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
               aten.gelu_.default if hasattr(aten, "gelu_") else aten.gelu.default, aten.relu_.default,
               aten.silu_.default}
POS_HOMOGENEOUS = {aten.relu.default, aten.relu_.default}
ELEMENTWISE_MUL = {aten.mul.Tensor}


def _trace_producers(ctx: AnalysisContext, start, path_ops: list, producers: list, visited: set, channel_slice=None):
    """Walk up from ``start`` through channel-wise ops; collect (linear, ops on path, slice)."""
    node = start
    if not isinstance(node, fx.Node) or node in visited:
        return True
    visited.add(node)
    lin = ctx.linear(node)
    if lin is not None:
        producers.append((lin, list(path_ops), channel_slice))
        return True
    if is_transparent(node):
        return _trace_producers(ctx, node.args[0], path_ops, producers, visited, channel_slice)
    if is_call(node, ACTIVATIONS):
        return _trace_producers(ctx, node.args[0], path_ops + [node], producers, visited, channel_slice)
    if is_call(node, ELEMENTWISE_MUL) and all(isinstance(a, fx.Node) for a in node.args[:2]):
        sa, sb = shape_of(node.args[0]), shape_of(node.args[1])
        if sa is None or sb is None or len(sa) != len(sb) or str(sa[-1]) != str(sb[-1]):
            return False
        return all(_trace_producers(ctx, a, path_ops + [node], producers, visited, channel_slice) for a in node.args[:2])
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem":
        chunk = node.args[0]
        if is_call(chunk, (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default)):
            src_shape = shape_of(chunk.args[0])
            dim = chunk.args[2] if len(chunk.args) > 2 else 0
            if src_shape and dim % len(src_shape) == len(src_shape) - 1:
                visited.add(chunk)
                width = shape_of(node)[-1]
                start_ch = int(node.args[1]) * int(width)
                return _trace_producers(ctx, chunk.args[0], path_ops + [node], producers, visited,
                                        (start_ch, start_ch + int(width)))
        return False
    if is_call(node, aten.slice.Tensor):
        src_shape = shape_of(node.args[0])
        if src_shape and node.args[1] % len(src_shape) == len(src_shape) - 1:
            start_ch = int(node.args[2])
            end = node.args[3] if len(node.args) > 3 else None
            end_ch = min(int(end), int(src_shape[-1])) if isinstance(end, int) else int(src_shape[-1])
            return _trace_producers(ctx, node.args[0], path_ops + [node], producers, visited, (start_ch, end_ch))
        return False
    return False


def _smoothable(path_ops: list) -> tuple[bool, str]:
    for op in path_ops:
        if is_call(op, ACTIVATIONS) and not is_call(op, POS_HOMOGENEOUS):
            return False, f"{op.target.__name__.split('.')[0]} is not positively homogeneous"
    return True, ""


def linear_linear(ctx: AnalysisContext) -> list[Pattern]:
    out = []
    for node, consumer in ctx.linears.items():
        producers: list = []
        visited: set = set()
        src = node.args[0]
        if not _trace_producers(ctx, src, [], producers, visited) or not producers:
            continue
        if all(p[0].node is node for p in producers):
            continue
        # producers' outputs must not escape to other consumers: scaling them would change those
        inner = visited | {p[0].node for p in producers}
        escapes = [u for n in inner for u in n.users if u not in inner and u is not node
                   and not (u.op == "call_function" and u.target == aten._assert_tensor_metadata.default)]
        paths = []
        smooth_ok = None
        for lin, ops, sl in producers:
            ok, why = _smoothable(ops)
            paths.append({"producer": lin.fqn, "smoothable": ok, "reason": why, "channel_slice": sl,
                          "ops": [str(o.target).replace("aten.", "") for o in ops]})
            if ok and smooth_ok is None:
                smooth_ok = (lin, sl)
        size = consumer.in_features
        p = Pattern("linear_linear", [p_["producer"] for p_ in paths] + [consumer.fqn], applies=["smooth", "R4"],
                    layer=layer_index(consumer.fqn),
                    details={"consumer": consumer.fqn, "intermediate_size": size, "paths": paths,
                             "smooth_producer": smooth_ok[0].fqn if smooth_ok else None,
                             "smooth_slice": smooth_ok[1] if smooth_ok else None,
                             "hadamard": hadamard_info(size)},
                    nodes={"consumer": consumer, "producers": [x[0] for x in producers],
                           "smooth_producer": smooth_ok[0] if smooth_ok else None})
        if smooth_ok is None:
            p.block("smooth", "; ".join(f"{x['producer']}: {x['reason']}" for x in paths))
        elif escapes:
            p.block("smooth", f"an intermediate value is also read by {sorted({str(u.target) for u in escapes})}")
        if not p.details["hadamard"]["supported"]:
            p.block("R4", f"no Hadamard matrix of order {size} is constructible here "
                          f"({p.details['hadamard']['reason']})")
        out.append(p)
    return out
