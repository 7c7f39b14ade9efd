"""fastlm.integrations.transformers.apply on each supported architecture: logits, loss and every
parameter's gradient against the unpatched model by the 2x rule (fp64 oracle), in float32 and
bfloat16; remove() restores bit-identical outputs; errors; gradient checkpointing, autocast,
torch.compile, Triton kernels under the interpreter."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

import fastlm
import fastlm.integrations.transformers as fi
from tests.integrations.hf_models import ARCHS, batch, build
from tests.integrations.rule import assert_2x

ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3}


def _baseline_attn(arch: str) -> str:
    return "eager" if arch == "gemma2" else "sdpa"  # sdpa refuses Gemma 2's soft-capping


def _run(model, ids, mask, labels):
    """(logits at real tokens (eval), training loss, {name: grad}) of one forward + backward."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[mask.bool()].float()
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits, loss.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_patched_matches_transformers_2x_rule(arch, dtype):
    # transformers' eager attention in float64 turns left-padding rows into NaN (a float64 min
    # mask cast to float32 -inf in its softmax), so Gemma 2 (eager only: soft-capping) is checked
    # on a right-padded batch; the others on a left-padded one with a float64 sdpa oracle.
    # (and a window of 8 > the 7 right pads, so that no padded row is fully masked either).
    ids, mask, labels = batch(padding="right" if arch == "gemma2" else "left")
    kw = {"attn": _baseline_attn(arch), **({"sliding_window": 8} if arch == "gemma2" else {})}
    oracle = build(arch, dtype=torch.float64, **kw)
    plain = build(arch, dtype=dtype, **kw)
    patched = fi.apply(build(arch, dtype=dtype, **kw))
    summary = fi.patched_summary(patched)
    assert summary["attention"] == "fastlm" and summary["patched"]["rms_norm"] >= 5 and summary["patched"]["rope"] == 2
    ref, base, out = (_run(m, ids, mask, labels) for m in (oracle, plain, patched))
    atol = ATOL[dtype]
    assert_2x(out[0], base[0], ref[0], atol=atol * float(ref[0].abs().max()), what=f"{arch} logits")
    assert_2x(out[1], base[1], ref[1], atol=atol, what=f"{arch} loss")
    assert set(out[2]) == set(ref[2]) == set(base[2])
    for name, g in ref[2].items():
        scale = float(g.abs().max()) or 1.0
        assert_2x(out[2][name], base[2][name], g, atol=atol * scale, what=f"{arch} grad {name}")


@pytest.mark.parametrize("arch", ARCHS)
def test_remove_restores_bit_identical_outputs(arch):
    ids, mask, labels = batch(padding="left")
    model = build(arch, attn=_baseline_attn(arch))
    before = _run(model, ids, mask, labels)
    fi.apply(model)
    assert fi.is_patched(model) and model.config._attn_implementation == "fastlm"
    patched = _run(model, ids, mask, labels)
    assert patched[2].keys() == before[2].keys()
    fi.remove(model)
    assert not fi.is_patched(model) and model.config._attn_implementation == _baseline_attn(arch)
    assert not any("forward" in m.__dict__ for m in model.modules())
    after = _run(model, ids, mask, labels)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert all(torch.equal(before[2][n], after[2][n]) for n in before[2])


def test_context_manager_and_other_instances_untouched():
    ids, mask, _ = batch()
    model, other = build("llama", attn="sdpa"), build("llama", attn="sdpa")
    with torch.no_grad():
        expected = other(input_ids=ids, attention_mask=mask).logits
        with fi.patched(model, rope=False) as m:
            assert m is model and fi.is_patched(model) and not fi.is_patched(other)
            assert "rope" not in fi.patched_summary(model)["patched"]
            assert torch.equal(other(input_ids=ids, attention_mask=mask).logits, expected)
        assert not fi.is_patched(model)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)


def test_switches_off_patch_nothing():
    model = build("qwen2", attn="sdpa")
    fi.apply(model, rms_norm=False, rope=False, swiglu=False, cross_entropy=False,
             fused_linear_cross_entropy=False, attention=False)
    assert fi.patched_summary(model) == {"patched": {}, "kept": [], "attention": "sdpa"}
    fi.remove(model)


def test_unsupported_architecture_and_double_apply_are_refused():
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="unsupported model class GPT2LMHeadModel; supported: LlamaForCausalLM"):
        fi.apply(gpt2)
    model = fi.apply(build("llama"))
    with pytest.raises(RuntimeError, match="already patched"):
        fi.apply(model)
    fi.remove(model)
    with pytest.raises(RuntimeError, match="not patched"):
        fi.remove(model)


def test_fused_loss_skips_logits_and_matches_num_items_in_batch():
    """Training forward with labels returns no logits (no (N, V) tensor) and divides the summed
    loss by num_items_in_batch as transformers' ForCausalLMLoss does (gradient accumulation)."""
    ids, mask, labels = batch(padding="right")
    plain, patched = build("llama", attn="sdpa"), fi.apply(build("llama", attn="sdpa"))
    plain.train(), patched.train()
    n = torch.tensor(50)
    a = plain(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    b = patched(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    assert b.logits is None and a.logits is not None
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    patched.eval()  # eval with labels: logits kept, loss through fastlm.ops.cross_entropy
    with torch.no_grad():
        c = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert c.logits is not None
    torch.testing.assert_close(c.loss, plain.eval()(input_ids=ids, attention_mask=mask, labels=labels).loss,
                               rtol=1e-5, atol=1e-6)


def test_gemma2_final_softcap_keeps_logits_loss():
    # right padding: with left padding the last pad position predicts the first real token from a
    # query that sees no key, where each attention implementation gives its own arbitrary value
    ids, mask, labels = batch(padding="right")
    plain = build("gemma2", attn="eager", final_logit_softcapping=3.0)
    patched = fi.apply(build("gemma2", attn="eager", final_logit_softcapping=3.0))
    assert any("final_logit_softcapping" in k for k in fi.patched_summary(patched)["kept"])
    plain.train(), patched.train()
    a = plain(input_ids=ids, attention_mask=mask, labels=labels)
    b = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert b.logits is not None
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)


def test_scaled_rope_keeps_transformers_rotation():
    model = build("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    ids, mask, _ = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        fi.apply(model)
        kept = fi.patched_summary(model)["kept"]
        got = model(input_ids=ids, attention_mask=mask).logits
    assert "rope" not in fi.patched_summary(model)["patched"] and any("RoPE" in k for k in kept)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def _train_grads(model, ids, mask, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_same_grads():
    ids, mask, labels = batch()
    model = fi.apply(build("qwen3", attn="sdpa"))
    loss, grads = _train_grads(model, ids, mask, labels)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ckpt, grads_ckpt = _train_grads(model, ids, mask, labels)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-6, atol=1e-7)


def test_bf16_autocast_2x_rule():
    ids, mask, labels = batch()
    oracle = build("mistral", attn="sdpa", dtype=torch.float64)
    plain, patched = build("mistral", attn="sdpa"), fi.apply(build("mistral", attn="sdpa"))
    ref = _train_grads(oracle, ids, mask, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = _train_grads(plain, ids, mask, labels)
        out = _train_grads(patched, ids, mask, labels)
    assert_2x(out[0], base[0], ref[0], atol=1e-3, what="autocast loss")
    for n, g in ref[1].items():
        assert_2x(out[1][n], base[1][n], g, atol=1e-3 * float(g.abs().max()), what=f"autocast grad {n}")


@pytest.mark.slow
def test_torch_compile_of_patched_model():
    ids, mask, labels = batch(padding=None)
    model = fi.apply(build("llama", attn="sdpa"))
    eager = _train_grads(model, ids, None, labels)
    compiled = torch.compile(model)
    got = _train_grads(compiled, ids, None, labels)
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-6)
    for n in eager[1]:
        torch.testing.assert_close(got[1][n.removeprefix("_orig_mod.")] if n in got[1] else got[1]["_orig_mod." + n],
                                   eager[1][n], rtol=1e-4, atol=1e-6)


def test_triton_kernels_under_interpreter_through_hf_path():
    """Llama patched end to end with every op forced to the Triton backend (interpreter on CPU)."""
    ids, mask, labels = batch(batch_size=2, length=7)
    oracle = build("llama", attn="sdpa", dtype=torch.float64)
    plain = build("llama", attn="sdpa")
    patched = fi.apply(build("llama", attn="sdpa"))
    ref, base = _run(oracle, ids, mask, labels), _run(plain, ids, mask, labels)
    with fastlm.use_backend("triton"):
        out = _run(patched, ids, mask, labels)
    assert_2x(out[0], base[0], ref[0], atol=1e-5, what="triton logits")
    assert_2x(out[1], base[1], ref[1], atol=1e-5, what="triton loss")
    for n, g in ref[2].items():
        assert_2x(out[2][n], base[2][n], g, atol=1e-5 * float(g.abs().max()), what=f"triton grad {n}")


def test_deepcopy_of_patched_model_is_independent():
    model = fi.apply(build("llama", attn="sdpa"))
    clone = copy.deepcopy(model)
    fi.remove(model)
    assert fi.is_patched(clone) and clone.config._attn_implementation == "fastlm"
