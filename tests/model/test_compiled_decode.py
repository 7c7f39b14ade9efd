"""The decode step (fastlm.decoding.step) and generate(compile=True): compiled = eager."""

import pytest
import torch

import fastlm
from fastlm import Model, ModelConfig
from fastlm.decoding.step import DecodeStep, release_caches, reusable_cache

CONFIG = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Model(CONFIG).eval()


def test_eager_step_equals_the_model_forward(model):
    """DecodeStep (no host bookkeeping inside) gives the logits of model(token, cache=...)."""
    prompt = torch.randint(0, 64, (2, 5))
    caches = [model.new_cache(2, 16) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(prompt, cache=cache)
        step = DecodeStep(model, caches[0])
        token = torch.tensor([3, 7])
        for _ in range(4):
            got = step(token)
            want = model(token[:, None], cache=caches[1])[:, -1].float()
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
            assert torch.equal(caches[0].lens, caches[1].lens) and caches[0].filled == caches[1].filled
            token = got.argmax(-1)


def test_step_errors(model):
    cache = model.new_cache(1, 6)
    with pytest.raises(RuntimeError, match="prefill"):
        DecodeStep(model, cache)(torch.tensor([1]))
    with pytest.raises(TypeError, match="static KVCache"):
        DecodeStep(model, model.new_cache(1, 6, paged=True))
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 6)), cache=cache)
        with pytest.raises(ValueError, match="full"):
            DecodeStep(model, cache)(torch.tensor([1]))


def test_reusable_cache_is_kept_and_reset(model):
    a = reusable_cache(model, 2, 10, min_len=16)
    assert a.max_len == 16
    a.advance(3)
    b = reusable_cache(model, 2, 16, min_len=16)  # the same power-of-two bucket
    assert a is b and b.filled == 0 and int(b.lens.sum()) == 0
    assert reusable_cache(model, 2, 17, min_len=16).max_len == 32
    assert reusable_cache(model, 2, 40, min_len=16).max_len == 64  # capped by the context of 64
    release_caches(model)
    assert reusable_cache(model, 2, 10, min_len=16) is not a


def test_compiled_generate_equals_eager(model):
    """One compiled graph (fullgraph) serves greedy, sampling and ragged prompts of one batch size."""
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    eager = fastlm.generate(model, prompts, max_new_tokens=7)
    compiled = fastlm.generate(model, prompts, max_new_tokens=7, compile=True)
    assert all(torch.equal(x, y) for x, y in zip(eager, compiled))
    kwargs = dict(max_new_tokens=7, do_sample=True, top_k=10, seed=3)
    eager = fastlm.generate(model, prompts, **kwargs)
    compiled = fastlm.generate(model, prompts, compile=True, **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(eager, compiled))
    streamed = list(fastlm.generate_stream(model, torch.tensor([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]]),
                                           max_new_tokens=3, compile=True))
    assert len(streamed) == 3 and streamed[0].shape == (2,)


def test_greedy_picked_inside_the_step_finishes_at_eos(model):
    """Greedy steps pick tokens, pad finished rows and flag eos inside the (compiled) step; the
    result equals the paged cache's loop, which picks them step by step outside."""
    prompt = torch.tensor([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]])
    free = fastlm.generate(model, prompt, max_new_tokens=8)[:, 5:]
    eos = int(free[0, 2])  # row 0 stops at its third token; row 1 wherever (or never) it meets it
    kwargs = dict(max_new_tokens=8, eos_token_id=eos, pad_token_id=63)
    paged = fastlm.generate(model, prompt, cache_implementation="paged", **kwargs)
    eager = fastlm.generate(model, prompt, **kwargs)
    compiled = fastlm.generate(model, prompt, compile=True, **kwargs)
    assert torch.equal(eager, paged) and torch.equal(compiled, paged)
    assert int(paged[0, 7]) == eos and (paged[0, 8:] == 63).all()


@pytest.mark.parametrize("kwargs,message", [
    ({"num_beams": 2}, "compile work with greedy and sampling"),
    ({"cache_implementation": "paged"}, "static cache"),
])
def test_compile_refuses_other_strategies(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastlm.generate(model, torch.tensor([[1, 2]]), max_new_tokens=2, compile=True, **kwargs)


@pytest.mark.gpu
def test_compiled_generate_on_gpu_equals_eager():
    """On CUDA the step replays as a CUDA graph (reduce-overhead) through the Triton kernels
    (float32: inductor's fused elementwise code may round differently from eager in bf16)."""
    torch.manual_seed(0)
    model = Model(ModelConfig(arch="llama", vocab_size=512, hidden_size=256, num_layers=2, num_heads=8,
                              num_kv_heads=2, max_position_embeddings=512)).to("cuda").eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
    eager = fastlm.generate(model, prompts, max_new_tokens=24)
    for _ in range(2):  # the second call replays the captured graph
        compiled = fastlm.generate(model, prompts, max_new_tokens=24, compile=True)
        assert all(torch.equal(x, y) for x, y in zip(eager, compiled))


def test_triton_kernels_give_the_reference_tokens(model):
    """Prefill and decode through the Triton kernels (rope_append_kv, attention over the cache
    slice, decode attention; the interpreter on CPU) = the reference backend's tokens."""
    pytest.importorskip("triton")
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    reference = fastlm.generate(model, prompts, max_new_tokens=5)
    with fastlm.use_backend("triton"):
        kernels = fastlm.generate(model, prompts, max_new_tokens=5)
    assert all(torch.equal(x, y) for x, y in zip(reference, kernels))


def test_many_batch_sizes_and_lengths_in_one_process(model, monkeypatch, recwarn):
    """12 (batch size, cache length) buckets in one process: no FailOnRecompileLimitHit (each
    bucket compiles its own code object, so dynamo's per-code recompile limit — lowered to 1
    here to show it: the old shared code object failed at the second bucket — is never reached);
    past MAX_COMPILED (2 here, to keep CPU compile time down) the step runs eagerly, with one
    warning, and every result equals eager decoding."""
    from fastlm.decoding import step

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    monkeypatch.setattr(step, "MAX_COMPILED", 2)
    monkeypatch.setattr(step, "_COMPILED", type(step._COMPILED)())
    monkeypatch.setattr(step, "_FULL_WARNED", [False])
    shapes = [(b, n) for b in (1, 2, 3, 5, 6, 7) for n in (3, 70)]  # 6 batch buckets (lengths cap at 64)
    assert len(shapes) == 12
    g = torch.Generator().manual_seed(0)
    for b, n in shapes:
        prompt = torch.randint(0, 64, (b, 4 if n < 60 else 1), generator=g)
        new = min(n, CONFIG.max_position_embeddings - prompt.shape[1])
        eager = fastlm.generate(model, prompt, max_new_tokens=new)
        assert torch.equal(fastlm.generate(model, prompt, max_new_tokens=new, compile=True), eager), (b, n)
    assert len(step._COMPILED) == 2
    warned = [w for w in recwarn if "compile=True" in str(w.message)]
    assert len(warned) == 1 and "decode eagerly" in str(warned[0].message)


PROMPT = torch.tensor([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]])


def _compiled_then_changed(model):
    """Decode PROMPT compiled (= eager), scale a weight the step reads in place, decode again
    (compiled = eager, other tokens): the bucket key and the step object before the change."""
    from fastlm.decoding import step

    before = fastlm.generate(model, PROMPT, max_new_tokens=6, compile=True)
    assert torch.equal(before, fastlm.generate(model, PROMPT, max_new_tokens=6))
    (key, (_, first)), = step._COMPILED.items()
    with torch.no_grad():  # in place: the same tensor, a new version
        model.layers[0].mlp.gate_up_proj.weight.mul_(-8.0)
    after = fastlm.generate(model, PROMPT, max_new_tokens=6, compile=True)
    assert torch.equal(after, fastlm.generate(model, PROMPT, max_new_tokens=6))
    assert not torch.equal(after[:, 5:], before[:, 5:])  # (other weights, other tokens)
    return key, first


def test_compiled_step_sees_weights_changed_after_compiling(monkeypatch):
    """On CPU the compiled step freezes the weights into its graph; a weight changed in place
    afterwards (as an optimizer step or load_state_dict does) or a replaced parameter gives a
    fresh step: the tokens follow the new weights, as eager decoding does, never the old ones."""
    from fastlm.decoding import step

    monkeypatch.setattr(step, "_COMPILED", type(step._COMPILED)())
    torch.manual_seed(1)
    model = Model(CONFIG).eval()
    key, first = _compiled_then_changed(model)
    assert len(step._COMPILED) == 1 and step._COMPILED[key][1] is not first  # replaced, not kept beside
    layer = model.layers[0].mlp.down_proj  # a new tensor object in place of the old one
    layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))
    replaced = fastlm.generate(model, PROMPT, max_new_tokens=6, compile=True)
    assert torch.equal(replaced, fastlm.generate(model, PROMPT, max_new_tokens=6))
    release_caches(model)
    assert not step._COMPILED


def test_models_over_the_freeze_limit_compile_unfrozen(monkeypatch):
    """Over CPU_FREEZE_MAX_BYTES of weights the CPU step compiles without freezing: it reads the
    weights in place, so after an in-place change the same compiled step (no recompilation)
    gives the new weights' tokens."""
    from fastlm.decoding import step

    monkeypatch.setattr(step, "_COMPILED", type(step._COMPILED)())
    monkeypatch.setattr(step, "CPU_FREEZE_MAX_BYTES", 0)
    torch.manual_seed(2)
    key, first = _compiled_then_changed(Model(CONFIG).eval())
    assert key[-1] is False  # compiled unfrozen
    assert step._COMPILED[key][1] is first  # the same step, reading the changed weights


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("batch, onednn", [(1, False), (3, True)])
def test_frozen_steps_of_several_rows_pack_their_weights_for_onednn(monkeypatch, batch, onednn):
    """The frozen CPU step of a batch of several rows packs its linear weights for oneDNN's GEMM:
    inductor's prepack pass asks our stand-in for torch.ops.mkldnn which library to pack for
    (so a torch whose pass no longer asks fails here), the stand-in is gone after compiling, and
    the tokens are eager decoding's; a batch of one keeps MKL's packing. (With fastlm's own CPU
    GEMM switched off: where it runs, the step's linears go to it instead, see below.)"""
    from torch._inductor.fx_passes import mkldnn_fusion

    from fastlm.decoding import cpu_gemm, step

    monkeypatch.setenv(cpu_gemm.ENV_VAR, "0")
    monkeypatch.setattr(step, "_COMPILED", type(step._COMPILED)())
    asked = []
    monkeypatch.setattr(step._OneDnnPacks, "_is_mkldnn_acl_supported", staticmethod(lambda: asked.append(1) or True))
    torch.manual_seed(3)
    model = Model(CONFIG).eval()
    prompt = torch.randint(0, 64, (batch, 5), generator=torch.Generator().manual_seed(5))
    compiled = fastlm.generate(model, prompt, max_new_tokens=6, compile=True)
    assert bool(asked) == onednn
    assert mkldnn_fusion.mkldnn is torch.ops.mkldnn
    assert torch.equal(compiled, fastlm.generate(model, prompt, max_new_tokens=6))
    release_caches(model)


@pytest.mark.parametrize("batch", [1, 3])
def test_frozen_steps_run_their_linears_over_fastlms_cpu_gemm(monkeypatch, batch):
    """Where fastlm's skinny GEMM runs, the frozen CPU step of several rows routes every linear
    of the step (q/k/v, o, gate/up, down, head) to it through its post-grad pass, over panels
    packed from the frozen weights, and inductor packs nothing itself; a batch of one keeps
    inductor's own GEMMs (no pass). The tokens are eager decoding's."""
    from fastlm.decoding import cpu_gemm, step

    if not cpu_gemm.available():
        pytest.skip(f"fastlm's CPU GEMM: {cpu_gemm.status()[1]}")
    monkeypatch.setattr(step, "_COMPILED", type(step._COMPILED)())
    routed = []
    real = cpu_gemm.route_frozen_linears
    monkeypatch.setattr(cpu_gemm, "route_frozen_linears", lambda graph: routed.append(real(graph)) or routed[-1])
    torch.manual_seed(3)
    model = Model(CONFIG).eval()
    prompt = torch.randint(0, 64, (batch, 5), generator=torch.Generator().manual_seed(5))
    compiled = fastlm.generate(model, prompt, max_new_tokens=6, compile=True)
    assert routed == ([4 * CONFIG.num_layers + 1] if batch > 1 else [])
    assert torch.equal(compiled, fastlm.generate(model, prompt, max_new_tokens=6))
    release_caches(model)


def test_compiled_step_sees_a_fused_optimizer_step(monkeypatch):
    """A fused AdamW step bumps no version counter; the optimizer post-step hook behind
    weights_version counts it, so the frozen step of the old weights is not reused: the tokens
    are those of a fresh copy of the stepped model decoded over its plain weights."""
    import copy

    from fastlm.decoding import packed, step

    monkeypatch.setattr(step, "_COMPILED", type(step._COMPILED)())
    torch.manual_seed(4)
    model = Model(CONFIG).eval()
    before = fastlm.generate(model, PROMPT, max_new_tokens=6, compile=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    versions = [p._version for p in model.parameters()]
    optimizer.step()
    assert [p._version for p in model.parameters()] == versions  # what the hook is there for
    after = fastlm.generate(model, PROMPT, max_new_tokens=6, compile=True)
    monkeypatch.setattr(packed, "PACK_MAX_BYTES", 0)
    assert torch.equal(after, fastlm.generate(copy.deepcopy(model), PROMPT, max_new_tokens=6))
    assert not torch.equal(after[:, 5:], before[:, 5:])
    release_caches(model)
