"""attn_implementation="fastlm": logits and greedy generation against transformers' own
attention (sdpa; eager for Gemma 2's soft-capping), ragged left-padded batches through the KV
cache, sliding windows shorter than the sequence, and the errors."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import fastlm.integrations.transformers as fi
from fastlm.integrations.transformers.attention import fastlm_mask
from tests.integrations.hf_models import ARCHS, PAD, batch, build


def _baseline(arch: str) -> str:
    return "eager" if arch == "gemma2" else "sdpa"


@pytest.mark.parametrize("padding", ["left", "right", None])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_attention(arch, padding):
    ids, mask, _ = batch(padding=padding)
    model = build(arch, attn=_baseline(arch)).eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("fastlm")
        got = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_token_for_token_ragged_left_padded(arch):
    """Prompts of 11, 4 and 9 tokens (left-padded), 12 new tokens: the windows of 6 are
    shorter than the sequences, so decoding runs through sliding windows in the KV cache."""
    ids, mask, _ = batch(padding="left")
    model = build(arch, attn=_baseline(arch)).eval()
    args = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    expected = model.generate(ids, **args)
    model.set_attn_implementation("fastlm")
    got = model.generate(ids, **args)
    assert torch.equal(got, expected), (got[:, ids.shape[1]:], expected[:, ids.shape[1]:])


def test_from_pretrained_with_fastlm_attention(tmp_path):
    model = build("qwen2", attn="sdpa")
    model.save_pretrained(tmp_path)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fastlm")
    assert loaded.config._attn_implementation == "fastlm"
    ids, mask, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                                   model.eval()(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                                   rtol=1e-5, atol=2e-5)


def test_mask_function_never_builds_a_square_mask():
    """transformers' mask creation under "fastlm" gives the 2D padding mask (or None), not (T, T)."""
    from transformers.masking_utils import create_causal_mask

    model = build("llama", attn="fastlm")
    ids, mask, _ = batch()
    embeds = model.model.embed_tokens(ids)
    built = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=mask, cache=None)
    assert built.shape == mask.shape and built.dtype == torch.bool and torch.equal(built, mask.bool())
    assert create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None, cache=None) is None
    full = torch.ones_like(mask)  # no padding in a prefill: the dense path
    assert create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=full, cache=None) is None


def test_dropout_in_training_is_refused():
    model = build("llama", attn="fastlm", attention_dropout=0.1)
    ids, mask, labels = batch()
    model.train()
    with pytest.raises(NotImplementedError, match="no attention dropout.*attention_dropout=0.0"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    model.eval()  # no dropout in eval: runs
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)


def test_packed_sequences_are_refused():
    """position_ids restarting inside a row (packed sequences, no attention_mask) need a block
    mask that fastlm's attention cannot express: a clear error, not cross-sequence attention."""
    model = build("llama", attn="fastlm").eval()
    ids = torch.randint(3, 90, (1, 8))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(input_ids=ids, position_ids=positions, use_cache=False)


def test_mask_with_holes_is_refused():
    model = build("llama", attn="fastlm").eval()
    ids, mask, _ = batch(padding=None)
    mask[0, 4] = 0
    with pytest.raises(RuntimeError, match="one contiguous span"):
        model(input_ids=ids, attention_mask=mask)


def test_output_attentions_refused_and_static_cache_needs_mask():
    model = build("llama", attn="fastlm").eval()
    ids, _, _ = batch(padding=None)
    with pytest.raises(NotImplementedError, match="attention weights"):
        model(input_ids=ids, output_attentions=True)
    with pytest.raises(NotImplementedError, match="StaticCache"):
        fastlm_mask(batch_size=1, q_length=3, kv_length=16, q_offset=torch.tensor(2), kv_offset=0)


def test_bad_mask_type_is_refused():
    from fastlm.integrations.transformers.attention import fastlm_attention_forward

    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(TypeError, match="bool mask built by its own mask function"):
        fastlm_attention_forward(torch.nn.Module(), q, q, q, torch.zeros(1, 1, 3, 3))


def test_registered_names():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    fi.register()
    assert AttentionInterface._global_mapping["fastlm"] is fi.fastlm_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["fastlm"] is fi.fastlm_mask
