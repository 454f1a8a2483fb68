"""StaticDecoder: greedy generation with a static KV cache gives model.generate()'s tokens (CPU, fp32)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import graphquant as gq
from graphquant import config as C
from graphquant.models.tiny import tiny_model
from graphquant.static_decode import StaticDecoder


def hf_greedy(model, ids, n):
    """transformers' own greedy generate, EOS stopping off (StaticDecoder never stops early)."""
    model.generation_config.eos_token_id = None
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def prompt(b, length, seed=0):
    return torch.randint(0, 128, (b, length), generator=torch.Generator().manual_seed(seed))


def test_generate_equals_hf_generate_and_repeats(llama):
    ids = prompt(2, 7)
    ref = hf_greedy(llama, ids, 12)
    dec = StaticDecoder(llama, batch_size=2, max_length=24, compile=False)
    got = dec.generate(ids, 12)
    assert got.shape == (2, 19) and got.dtype == torch.long
    assert torch.equal(got, ref)
    # a second prompt of another length in the same cache: the cache is reset by prefill
    ids2 = prompt(2, 4, seed=1)
    assert torch.equal(dec.generate(ids2, 20), hf_greedy(llama, ids2, 20))
    assert torch.equal(dec.generate(ids, 12), ref)
    assert set(dec.last_timing) == {"prefill_ms", "decode_ms", "total_ms"}
    assert dec.last_timing["total_ms"] >= dec.last_timing["prefill_ms"] > 0


def test_step_is_a_function_of_position_and_timing_does_not_disturb(llama):
    ids = prompt(1, 5)
    ref = hf_greedy(llama, ids, 6)
    dec = StaticDecoder(llama, batch_size=1, max_length=16, compile=False)
    first = dec.prefill(ids)
    assert torch.equal(first, ref[:, 5])
    pos = torch.tensor([5])
    a = dec.step(first.view(1, 1), pos).clone()
    b = dec.step(first.view(1, 1), pos).clone()  # same slot again: same answer, counters re-synced
    assert torch.equal(a, b) and torch.equal(a, ref[:, 6])
    assert dec.time_step_ms(3) > 0 and dec.time_prefill_ms(ids, 2) > 0
    assert torch.equal(dec.generate(ids, 6), ref)


def test_other_architecture_and_graphquant_write_back():
    """Generic over transformers causal LMs: Qwen3 (q/k norms), and graphquant's HF write-back with
    QuantLinear modules and online R3 (attention) / R4 (down_proj) rotations of QuaRot, W8A8 dynamic
    per-token, decodes the tokens of its own generate()."""
    qwen = tiny_model("qwen3")
    ids = prompt(2, 6)
    assert torch.equal(StaticDecoder(qwen, 2, 20, compile=False).generate(ids, 10), hf_greedy(qwen, ids, 10))

    model = tiny_model("llama", seed=3)
    cfg = dataclasses.replace(C.preset("w_int8_per_channel_a_int8_per_token"), exclude=["*lm_head"],
                              pre_quant_opt_config=[C.QuaRotConfig()])
    hf = gq.quantize(model, cfg, None, progress=False).to_hf()
    from graphquant.export.qlinear import QuantLinear

    assert any(isinstance(m, QuantLinear) for m in hf.modules())
    assert hf.model.layers[0].mlp.down_proj.input_rotation  # R4 online
    assert torch.equal(StaticDecoder(hf, 2, 20, compile=False).generate(ids, 10), hf_greedy(hf, ids, 10))


def test_compiled_step_equals_hf_generate(llama):
    """torch.compile(fullgraph=True, dynamic=False) decode step on CPU (prefill left eager: compile time)."""
    ids = prompt(1, 6)
    dec = StaticDecoder(llama, batch_size=1, max_length=16, compile=True, compile_prefill=False)
    assert not dec.cuda_graph  # CPU: no CUDA graph even when asked
    assert torch.equal(dec.generate(ids, 8), hf_greedy(llama, ids, 8))


def test_decode_step_under_a_chosen_sdpa_backend(llama):
    """``sdpa=`` restricts the decode step's attention backends (the math kernel here); tokens unchanged,
    compiled as in the benchmark."""
    ids = prompt(1, 6)
    dec = StaticDecoder(llama, batch_size=1, max_length=16, compile=True, compile_prefill=False, sdpa=("MATH",))
    assert torch.equal(dec.generate(ids, 8), hf_greedy(llama, ids, 8))
    with pytest.raises(ValueError, match="choose from"):
        StaticDecoder(llama, batch_size=1, max_length=16, compile=False, sdpa=("warp_speed",))
    # the restriction is real: cuDNN attention alone has no CPU kernel, so the step fails
    dec = StaticDecoder(llama, batch_size=1, max_length=16, compile=False, sdpa=("cudnn_attention",))
    with pytest.raises(RuntimeError):
        dec.generate(ids, 3)


def test_errors_say_what_to_do(llama):
    dec = StaticDecoder(llama, batch_size=2, max_length=10, compile=False)
    with pytest.raises(ValueError, match="exceeds max_length=10"):
        dec.generate(prompt(2, 6), 5)
    with pytest.raises(ValueError, match="batch_size=2"):
        dec.generate(prompt(3, 4), 2)
    with pytest.raises(ValueError, match="batch_size=2"):
        dec.step(torch.zeros(1, 1, dtype=torch.long), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"\(B, 1\)"):
        dec.step(torch.zeros(2, 2, dtype=torch.long), torch.tensor([3]))
    with pytest.raises(ValueError, match="attention_mask all ones"):
        dec.prefill(prompt(2, 4), attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate(prompt(2, 4), 0)
    with pytest.raises(ValueError, match="outside the cache"):
        dec.time_step_ms(1, position=10)
    with pytest.raises(ValueError, match="replays must be >= 1"):
        dec.time_step_ms(1, replays=0)
    # an all-ones mask is accepted
    assert dec.prefill(prompt(2, 4), attention_mask=torch.ones(2, 4, dtype=torch.long)).shape == (2,)


def test_compiles_run_under_a_cache_tag_naming_graphquant_op_schemas(llama, monkeypatch):
    """The decode step and the prefill compile with ``torch.compiler.config.cache_key_tag`` naming the schemas of
    graphquant's custom ops (a cached compile against other schemas is then not reused); the user's own tag stays in
    front; an op registered with another schema changes the tag."""
    from graphquant import static_decode as SD

    if not hasattr(torch.compiler.config, "cache_key_tag"):
        pytest.skip("this torch has no compile cache key tag")
    seen = []

    def fake_compile(fn, **kwargs):  # records the tag each compiled call runs under; runs eagerly
        def run(*args):
            seen.append(torch.compiler.config.cache_key_tag)
            return fn(*args)
        return run

    monkeypatch.setattr(SD.torch, "compile", fake_compile)
    ids = prompt(1, 6)
    dec = StaticDecoder(llama, batch_size=1, max_length=16, compile=True)
    assert torch.equal(dec.generate(ids, 4), hf_greedy(llama, ids, 4))
    assert dec.cache_tag.startswith("graphquant-ops-") and seen and set(seen) == {dec.cache_tag}
    assert torch.compiler.config.cache_key_tag == ""  # restored after each call
    with torch.compiler.config.patch(cache_key_tag="mine"):
        assert SD.compile_cache_tag() == "mine|" + dec.cache_tag
    before = SD.compile_cache_tag()

    @torch.library.custom_op("graphquant::_cache_tag_probe", mutates_args=())
    def probe(x: torch.Tensor, k: int) -> torch.Tensor:
        return x.clone()

    assert SD.compile_cache_tag() != before
    assert StaticDecoder(llama, batch_size=1, max_length=16, compile=False).cache_tag is None


def test_prepare_asks_for_combo_kernels_by_default():
    """The decode step of a prepared model compiles with Inductor's ``combo_kernels`` unless told otherwise (measured
    faster for every scheme on the H200, ``generation.DECODE_COMPILE_OPTIONS``); its greedy tokens are unchanged."""
    from graphquant import generation

    hf = gq.quantize(tiny_model("llama", seed=4), C.preset("w_int8_per_channel_a_int8_per_token"), None,
                     progress=False).to_hf()
    generation.prepare(hf)
    assert hf.graphquant_prepared["decode_compile_options"] == {"combo_kernels": True}
    ids = prompt(1, 5)
    combo = StaticDecoder(hf, 1, 16, compile=True, cuda_graph=False)
    plain = StaticDecoder(hf, 1, 16, compile=True, cuda_graph=False, compile_options={})
    assert combo.decode_compile_options == {"combo_kernels": True} and plain.decode_compile_options == {}
    assert torch.equal(combo.generate(ids, 4), plain.generate(ids, 4))


def test_options_prepare_chose_fall_back_to_inductor_defaults_where_they_fail(monkeypatch):
    """A torch that rejects ``prepare``'s decode options (an unknown one here) or whose compile fails with them (a
    compile that raises ``BackendCompilerFailed`` only with options, here) still decodes: the step compiles with
    Inductor's defaults, one warning says so, and the tokens are the eager model's. Options the caller gives are not
    second-guessed: an unknown one raises."""
    from torch._dynamo.exc import BackendCompilerFailed

    from graphquant import generation

    hf = gq.quantize(tiny_model("llama", seed=4), C.preset("w_int8_per_channel_a_int8_per_token"), None,
                     progress=False).to_hf()
    ids = prompt(1, 5)
    monkeypatch.setattr(generation, "DECODE_COMPILE_OPTIONS", {"no_such_inductor_option": True})
    generation.prepare(hf)
    want = StaticDecoder(hf, 1, 16, compile=False).generate(ids, 3)
    with pytest.warns(UserWarning, match="did not compile with the options prepare"):
        dec = StaticDecoder(hf, 1, 16, compile=True, cuda_graph=False)
    assert dec.decode_compile_options == {}
    assert torch.equal(dec.generate(ids, 3), want)
    with pytest.raises(RuntimeError, match="no_such_inductor_option"):
        StaticDecoder(hf, 1, 16, compile=True, cuda_graph=False, compile_options={"no_such_inductor_option": True})

    real = torch.compile

    def failing_with_options(fn, **kw):
        if not kw.get("options"):
            return real(fn, **kw)

        def fail(*args, **kwargs):
            raise BackendCompilerFailed(None, RuntimeError("combo kernels broke"), None)
        return fail

    monkeypatch.setattr(torch, "compile", failing_with_options)
    hf.graphquant_prepared["decode_compile_options"] = {"combo_kernels": True}
    dec = StaticDecoder(hf, 1, 16, compile=True, cuda_graph=False)
    assert dec.decode_compile_options == {"combo_kernels": True}
    with pytest.warns(UserWarning, match="combo kernels broke"):
        got = dec.generate(ids, 3)
    assert torch.equal(got, want) and dec.decode_compile_options == {}


def test_a_prepared_model_brings_its_decode_compile_options(llama, monkeypatch):
    """``generation.DECODE_COMPILE_OPTIONS`` goes into ``prepare``'s report and from there into the decode step's
    ``torch.compile(options=...)`` when the caller names none; the caller's own options (even none, ``{}``) win, a
    model that was not prepared compiles with Inductor's defaults, and the prefill always does."""
    from graphquant import generation

    seen = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append((getattr(fn, "__name__", ""),
                                                                       kw.get("options"))) or real(fn, **kw))
    hf = gq.quantize(tiny_model("llama", seed=4), C.preset("w_int8_per_channel_a_int8_per_token"), None,
                     progress=False).to_hf()
    monkeypatch.setattr(generation, "DECODE_COMPILE_OPTIONS", {"split_reductions": False})
    generation.prepare(hf)
    assert hf.graphquant_prepared["decode_compile_options"] == {"split_reductions": False}
    for model, given, want in ((hf, None, {"split_reductions": False}), (hf, {}, {}), (llama, None, {})):
        seen.clear()
        dec = StaticDecoder(model, 1, 16, compile=True, cuda_graph=False, compile_options=given)
        assert dec.decode_compile_options == want
        assert dict(seen) == {"_forward_step": want or None, "_forward_prefill": None}
    ids = prompt(1, 5)
    assert torch.equal(dec.generate(ids, 3), hf_greedy(llama, ids, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_capture_finds_the_counters_its_warm_up_made(monkeypatch):
    """The step is captured on its warm-up's stream: per-stream state the warm-up made (the split-K tile counters)
    is found by the capture, not allocated (and zero-filled) inside the graph on every replay."""
    from graphquant.kernels import quant_triton as QT
    from graphquant.timing import graphed

    dev = torch.device("cuda")
    monkeypatch.setattr(QT, "_COUNTERS", {})
    dec = StaticDecoder(tiny_model("llama").to(dev), 1, 16, compile=False)
    made = []
    dec._step_fn = lambda ids, pos: (made.append(QT.tile_counters(dev, 8)), ids[:, 0])[1]
    dec._capture()
    assert len(QT._COUNTERS) == 1 and len(made) == 4 and all(m is made[0] for m in made)
    graphed(lambda: made.append(QT.tile_counters(dev, 8)))
    assert len(QT._COUNTERS) == 2 and made[-1] is made[-2]  # graphed(): the same


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_back_to_back_step_timing_on_the_graph():
    """``time_step_ms(replays=k)``: samples of k queued replays, per replay; the step still decodes the same."""
    dev = torch.device("cuda")
    dec = StaticDecoder(tiny_model("llama").to(dev), 1, 16, compile=False)
    ids = torch.randint(0, 100, (1, 4), device=dev)
    first = dec.generate(ids, 4)
    one, many = dec.time_step_ms(10, position=8), dec.time_step_ms(10, position=8, replays=5)
    assert dec._graph is not None and 0 < many and 0 < one
    assert torch.equal(dec.generate(ids, 4), first)
