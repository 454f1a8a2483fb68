"""Greedy generation with a static KV cache, compiled and replayed as a CUDA graph.

Works for any transformers causal LM whose cache layers are ``StaticLayer`` s: a plain float
model, a torchao-quantized one, or graphquant's HF write-back (``QuantLinear`` modules). ::

    dec = StaticDecoder(model, batch_size=1, max_length=384)   # compile=True, cuda_graph=True
    ids = dec.generate(prompt_ids, max_new_tokens=256)           # (B, prompt + 256), greedy
    dec.time_step_ms(100)                                        # median ms of one decode step

How it works (the gpt-fast recipe on top of ``transformers.StaticCache``):

- the cache is allocated once, by one eager forward of a dummy token, so its K/V tensors have
  the model's own dtype, device and head counts and a fixed address before anything is compiled;
- ``prefill`` runs the prompt in one forward (``torch.compile(dynamic=False)`` if asked) and
  returns the argmax of the last position;
- a decode step is ``model(ids (B, 1), position_ids, past_key_values=cache)`` -> argmax ids,
  ``torch.compile(fullgraph=True, dynamic=False)`` and, on CUDA, captured once into a
  ``torch.cuda.CUDAGraph`` whose static inputs (token ids, cache position) are overwritten in
  place before each replay.

Position bookkeeping: transformers 5.x static layers count the tokens they hold in a device
tensor ``cumulative_length`` (the write index of ``update`` and the query offset of the causal
mask; both 5.17 and 5.23 work so). The decode step first copies its ``cache_position`` into
every layer's counter, so a step is a pure function of (ids, position) and CUDA-graph warm-up
runs or repeated timing replays cannot shift the cache.

Compile caches: the compiles run under a ``torch.compiler.config.cache_key_tag`` that names the schemas of
graphquant's custom ops (:func:`compile_cache_tag`), so a cached compile made against other schemas (another
graphquant version or checkout on the same machine) is not reused.

Greedy only: no sampling, no early stop at EOS (the benchmark needs fixed lengths), prompts of
equal length (no left padding).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import time
import warnings

import torch

from .timing import back_to_back_ms, graphed, median_ms

__all__ = ["StaticDecoder", "compile_cache_tag"]


def compile_cache_tag() -> str:
    """A tag for torch's compile caches (``torch.compiler.config.cache_key_tag``) that names the schemas of the
    graphquant custom ops registered in this process, after the user's own tag if one is set.

    Inductor's FX-graph cache finds a compiled graph by the traced graph, in which a custom-op call holds only
    the arguments given, while the code it generated calls the op with every argument of the schema it was
    compiled against. An op that gained or lost an argument between two graphquant versions (or checkouts) on the
    same machine then met cached code calling it the old way (on the H200: "expected at most 4 argument(s) but
    received 5", README); with the schemas in the key such an entry is not found."""
    schemas = []
    for name in sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("graphquant::")):
        op, _, overload = name[len("graphquant::"):].partition(".")
        try:
            schemas.append(str(getattr(getattr(torch.ops.graphquant, op), overload or "default")._schema))
        except (AttributeError, RuntimeError):  # a name without a Python-visible schema: its name stands for it
            schemas.append(name)
    digest = hashlib.sha256("\n".join(schemas).encode()).hexdigest()[:16]
    user = getattr(torch.compiler.config, "cache_key_tag", "")
    return f"{user}|graphquant-ops-{digest}" if user else f"graphquant-ops-{digest}"


def _under_cache_tag(fn, tag: str):
    """``fn`` called with ``torch.compiler.config.cache_key_tag = tag`` (as is, where this torch has no such
    setting)."""
    if not hasattr(torch.compiler.config, "cache_key_tag"):
        return fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with torch.compiler.config.patch(cache_key_tag=tag):
            return fn(*args, **kwargs)

    return call


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta":
            return t.device
    raise ValueError("the model has no tensors on a real device; load its weights (e.g. .to('cuda')) first")


def _sdpa_backends(names):
    """``torch.nn.attention.SDPBackend`` members for their names (case-insensitive), or None."""
    if names is None:
        return None
    from torch.nn.attention import SDPBackend

    known = {n.lower(): getattr(SDPBackend, n) for n in dir(SDPBackend) if n.isupper() and n != "ERROR"}
    names = [names] if isinstance(names, str) else list(names)
    bad = [n for n in names if str(n).lower() not in known]
    if bad or not names:
        raise ValueError(f"unknown SDPA backend(s) {bad or names}; choose from {', '.join(sorted(known))}")
    return [known[str(n).lower()] for n in names]


class StaticDecoder:
    """Greedy generator with a static KV cache for ``batch_size`` sequences of up to ``max_length`` tokens.

    ``compile``: ``torch.compile`` the decode step (``fullgraph=True, dynamic=False``) and, unless
    ``compile_prefill=False``, the prefill (``dynamic=False``, one compile per prompt shape).
    ``cuda_graph``: capture the decode step into a CUDA graph (CUDA only; ignored on CPU).
    ``sdpa``: the ``scaled_dot_product_attention`` backends the decode step may use (names of
    ``torch.nn.attention.SDPBackend``, e.g. ``("efficient_attention", "math")``); default: torch's choice.
    Prefill keeps torch's choice. ``compile_options``: Inductor options for the decode step's compile
    (``torch.compile(options=...)``, e.g. ``{"split_reductions": False}``); the prefill compiles with the defaults.
    Without them a model readied by ``graphquant.generation.prepare`` gets the ones its report names
    (``decode_compile_options``, from ``generation.DECODE_COMPILE_OPTIONS``: Inductor's ``combo_kernels``); where
    this torch rejects those or fails to compile the step with them, the step compiles with Inductor's defaults
    (a warning says so).
    """

    def __init__(self, model, batch_size: int, max_length: int, compile: bool = True, cuda_graph: bool = True,
                 compile_prefill: bool | None = None, sdpa: tuple[str, ...] | None = None,
                 compile_options: dict | None = None):
        from transformers import StaticCache

        if batch_size < 1 or max_length < 2:
            raise ValueError(f"StaticDecoder needs batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}")
        self._sdpa = _sdpa_backends(sdpa)
        self.model = model.eval()
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.device = _model_device(model)
        self.compile = bool(compile)
        self.cuda_graph = bool(cuda_graph) and self.device.type == "cuda"
        params = inspect.signature(model.forward).parameters
        self._logits_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # keyword arguments that transformers 5.17 and 5.23 both take (config, max_cache_len); the
        # others are what 4.x needed and 5.x swallows in **kwargs
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_length, max_batch_size=self.batch_size,
                                 device=self.device, dtype=dtype)
        self._initialize_cache()
        self._ids = torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._out = None
        self._graph = None
        self._step_fn = self._forward_step
        self._prefill_fn = self._forward_prefill
        self.cache_tag = None
        from_prepare = compile_options is None
        if from_prepare:
            from .generation import PREPARED_ATTR

            compile_options = (model.__dict__.get(PREPARED_ATTR) or {}).get("decode_compile_options")
        self.decode_compile_options = dict(compile_options or {})
        if self.compile:  # the eager forward above registered every graphquant op the model calls
            self.cache_tag = compile_cache_tag()
            self._step_fn = self._compiled_step(fallback=from_prepare)
            if compile_prefill is None or compile_prefill:
                self._prefill_fn = _under_cache_tag(torch.compile(self._forward_prefill, dynamic=False),
                                                    self.cache_tag)
        self.last_timing: dict = {}

    def _compiled_step(self, fallback: bool):
        """The decode step compiled with ``decode_compile_options``. With ``fallback`` (the options came from
        ``prepare``'s report, not from the caller) a torch that rejects them, or whose first compile with them
        fails, gets the step compiled with Inductor's defaults instead, with one warning."""
        def build(options):
            return _under_cache_tag(torch.compile(self._forward_step, fullgraph=True, dynamic=False,
                                                  options=dict(options) if options else None), self.cache_tag)

        if not (fallback and self.decode_compile_options):
            return build(self.decode_compile_options)
        try:
            compiled = build(self.decode_compile_options)
        except RuntimeError as e:  # an option this torch does not know
            return self._without_options(build, e)

        def first_call(*args):
            try:
                out = compiled(*args)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                self._step_fn = self._without_options(build, e)
                return self._step_fn(*args)
            self._step_fn = compiled
            return out

        return first_call

    def _without_options(self, build, error: Exception):
        cause = getattr(error, "inner_exception", None) or error  # BackendCompilerFailed wraps the compiler's error
        first = (str(cause).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"graphquant: the decode step did not compile with the options prepare() chose "
                      f"({self.decode_compile_options}): {type(cause).__name__}: {first}; "
                      "compiling it with Inductor's defaults", stacklevel=3)
        self.decode_compile_options = {}
        return build({})

    # ---------------------------------------------------------------- cache
    def _initialize_cache(self) -> None:
        """One eager forward of a dummy token allocates every layer's K/V tensors (lazily sized by
        transformers from the real key/value states) before anything is compiled or captured."""
        dummy = torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            self.model(input_ids=dummy, past_key_values=self.cache, use_cache=True, **self._logits_kw)
        self._counters = [layer.cumulative_length for layer in self.cache.layers
                          if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]
        ready = all(getattr(layer, "is_initialized", False) for layer in self.cache.layers)
        if len(self._counters) != len(self.cache.layers) or not ready:
            raise ValueError(f"{type(self.model).__name__}: StaticDecoder needs transformers static cache layers "
                             "with a tensor position counter (transformers >= 5.17); "
                             "use model.generate() for this model")
        self._set_position(0)

    def _set_position(self, pos) -> None:
        for c in self._counters:
            c.copy_(pos) if isinstance(pos, torch.Tensor) else c.fill_(pos)

    # ---------------------------------------------------------------- the two forwards
    def _forward_prefill(self, input_ids):
        for c in self._counters:
            c.zero_()
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, **self._logits_kw)
        return out.logits[:, -1, :].argmax(dim=-1)

    def _forward_step(self, token_ids, cache_position):
        for c in self._counters:
            c.copy_(cache_position[0])
        with self._attention_backends():
            out = self.model(input_ids=token_ids, position_ids=cache_position.view(1, 1),
                             past_key_values=self.cache, use_cache=True, **self._logits_kw)
        return out.logits[:, -1, :].argmax(dim=-1)

    def _attention_backends(self):
        if self._sdpa is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self._sdpa)

    # ---------------------------------------------------------------- public steps
    def _check_batch(self, ids: torch.Tensor, what: str) -> None:
        if ids.dim() != 2 or ids.shape[0] != self.batch_size:
            raise ValueError(f"{what}: expected token ids of shape ({self.batch_size}, n) for this StaticDecoder's "
                             f"batch_size={self.batch_size}, got {tuple(ids.shape)}; "
                             "build a StaticDecoder per batch size")

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt (B, L) through the model, filling cache positions 0..L-1; returns the
        greedy next token ids (B,)."""
        self._check_batch(input_ids, "prefill")
        if input_ids.shape[1] >= self.max_length:
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens leaves no room in max_length={self.max_length}; "
                             "build the StaticDecoder with a larger max_length")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("StaticDecoder runs equal-length prompts only (attention_mask all ones); "
                             "group prompts by length or use model.generate() for padded batches")
        from .decode_attention import empty_cache_prefill

        with empty_cache_prefill():  # positions 0..L-1 of an emptied cache, no padding (see its docstring)
            return self._prefill_fn(input_ids.to(self.device))

    def _capture(self) -> None:
        """Warm up (compiles) on a side stream, then capture one step into a CUDA graph on that same stream
        (:func:`graphquant.timing.graphed`)."""
        def step():
            self._out = self._step_fn(self._ids, self._pos)

        _, self._graph = graphed(step, reps=1, warmup=3)

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """One decode step: ``token_ids`` (B, 1) at position ``cache_position`` (1,) -> next ids (B,).
        With a CUDA graph the result is the graph's output buffer: copy it before the next step."""
        self._check_batch(token_ids, "step")
        if token_ids.shape[1] != 1 or cache_position.numel() != 1:
            raise ValueError(f"step takes token_ids (B, 1) and cache_position (1,), got {tuple(token_ids.shape)} and "
                             f"{tuple(cache_position.shape)}")
        if not self.cuda_graph:
            return self._step_fn(token_ids, cache_position.view(1))
        self._ids.copy_(token_ids)
        self._pos.copy_(cache_position.view(1))
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy: the prompt (B, L) followed by ``max_new_tokens`` new tokens, (B, L + max_new_tokens).
        Equals ``model.generate(input_ids, max_new_tokens=n, do_sample=False)`` without EOS stopping.
        ``self.last_timing`` holds prefill / decode / total ms of this call (CUDA events on CUDA)."""
        self._check_batch(input_ids, "generate")
        b, length = input_ids.shape
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if length + max_new_tokens > self.max_length:
            raise ValueError(f"prompt {length} + max_new_tokens {max_new_tokens} = {length + max_new_tokens} exceeds "
                             f"max_length={self.max_length}; build the StaticDecoder with a larger max_length")
        input_ids = input_ids.to(self.device)
        out = torch.empty(b, length + max_new_tokens, dtype=torch.long, device=self.device)
        out[:, :length] = input_ids
        marks = [self._mark()]
        nxt = self.prefill(input_ids)
        out[:, length] = nxt
        marks.append(self._mark())
        pos = torch.full((1,), length, dtype=torch.long, device=self.device)
        for i in range(1, max_new_tokens):
            nxt = self.step(nxt.view(b, 1), pos)
            out[:, length + i] = nxt
            pos.add_(1)
        marks.append(self._mark())
        self.last_timing = self._elapsed(marks)
        return out

    # ---------------------------------------------------------------- timing
    def _mark(self):
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _elapsed(self, marks) -> dict:
        if self.device.type == "cuda":
            marks[-1].synchronize()
            ms = [marks[0].elapsed_time(m) for m in marks[1:]]
        else:
            ms = [(m - marks[0]) * 1e3 for m in marks[1:]]
        return {"prefill_ms": ms[0], "decode_ms": ms[1] - ms[0], "total_ms": ms[1]}

    def _median_ms(self, fn, iters: int, warmup: int = 2) -> float:
        return median_ms(fn, iters, self.device.type, warmup)

    @torch.no_grad()
    def time_step_ms(self, iters: int = 50, position: int | None = None, replays: int = 1) -> float:
        """Median ms of one decode step at cache ``position`` (default: half of ``max_length``): with a
        CUDA graph, the replay alone (CUDA events). The cache slot at ``position`` is overwritten.
        ``replays`` > 1 (CUDA graph only): each timed sample is that many replays queued back to back, as
        :meth:`generate` queues its steps (it never waits for the GPU), so the graph's launch latency is paid once
        per sample instead of once per step (:func:`graphquant.timing.back_to_back_ms`)."""
        position = self.max_length // 2 if position is None else int(position)
        if not 0 <= position < self.max_length:
            raise ValueError(f"position {position} is outside the cache (max_length={self.max_length})")
        if int(replays) < 1:
            raise ValueError(f"replays must be >= 1, got {replays}")
        ids = torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.device)
        pos = torch.full((1,), position, dtype=torch.long, device=self.device)
        self.step(ids, pos)  # fills the graph's input buffers (and captures it on first use)
        if self._graph is not None:  # the replay alone, no input copies
            return back_to_back_ms(self._graph.replay, iters, int(replays), self.device.type)
        return self._median_ms(lambda: self.step(ids, pos), iters)

    @torch.no_grad()
    def time_prefill_ms(self, input_ids: torch.Tensor, iters: int = 10) -> float:
        """Median ms of ``prefill(input_ids)`` (compiled if ``compile``)."""
        self._check_batch(input_ids, "time_prefill_ms")
        input_ids = input_ids.to(self.device)
        return self._median_ms(lambda: self.prefill(input_ids), iters)
