"""The model on its own: cached decoding, padding, dtypes and input errors."""

import pytest
import torch

from fastlm import KVCache, Model, ModelConfig

CONFIGS = {
    "llama-gqa": ModelConfig(arch="llama", vocab_size=97, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2,
                             intermediate_size=80, max_position_embeddings=64),
    "llama-bias-untied": ModelConfig(arch="llama", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                                     attention_bias=True, mlp_bias=True, head_dim=12, max_position_embeddings=64),
    "gpt2": ModelConfig(arch="gpt2", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                        max_position_embeddings=64, tie_word_embeddings=True),
}


@pytest.fixture(params=list(CONFIGS))
def model(request):
    torch.manual_seed(0)
    return Model(CONFIGS[request.param]).eval()


def test_logits_shape_and_tied_head(model):
    ids = torch.randint(0, 97, (3, 11))
    assert model(ids).shape == (3, 11, 97)
    assert (model.lm_head.weight is model.embed.weight) == model.config.tie_word_embeddings


@torch.no_grad()
def test_cached_decoding_equals_full_forward(model):
    ids = torch.randint(0, 97, (2, 20))
    full = model(ids)
    cache = model.new_cache(2, 32)
    pieces = [model(ids[:, :7], cache=cache), model(ids[:, 7:8], cache=cache), model(ids[:, 8:11], cache=cache)]
    pieces += [model(ids[:, i : i + 1], cache=cache) for i in range(11, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.filled == 20 and cache.lens.tolist() == [20, 20]


@torch.no_grad()
def test_right_padding_with_key_lens_equals_each_row_alone(model):
    ids = torch.randint(0, 97, (3, 9))
    lens = torch.tensor([9, 4, 1])
    padded = model(ids, key_lens=lens)
    for row, n in enumerate(lens.tolist()):
        alone = model(ids[row : row + 1, :n])
        torch.testing.assert_close(padded[row : row + 1, :n], alone, atol=1e-5, rtol=1e-5)


def test_bf16_forward_and_backward(model):
    model = model.to(torch.bfloat16).train()
    ids = torch.randint(0, 97, (2, 6))
    logits = model(ids)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "ids,error,message",
    [
        (torch.zeros(5, dtype=torch.int64), ValueError, r"shape \(B, T\)"),
        (torch.zeros(1, 5), TypeError, "integer input_ids"),
        (torch.zeros(1, 0, dtype=torch.int64), ValueError, "empty"),
        (torch.zeros(1, 65, dtype=torch.int64), ValueError, "longer than the model's context of 64"),
        (torch.tensor([[1, 97]]), ValueError, r"token ids must be in \[0, 97\)"),
        (torch.tensor([[-1, 3]]), ValueError, r"token ids must be in \[0, 97\)"),
        (torch.zeros(1, 3, dtype=torch.int64, device="meta"), ValueError, "on meta but the model is on cpu"),
    ],
)
def test_bad_input_is_explained(ids, error, message):
    model = Model(CONFIGS["gpt2"])
    with pytest.raises(error, match=message):
        model(ids)


def test_cache_errors():
    model = Model(CONFIGS["llama-gqa"])
    cache = model.new_cache(2, 8)
    with pytest.raises(ValueError, match="cache holds 2 sequences"):
        model(torch.zeros(3, 2, dtype=torch.int64), cache=cache)
    model(torch.zeros(2, 6, dtype=torch.int64), cache=cache)
    with pytest.raises(ValueError, match="3 new tokens do not fit: 6 of 8"):
        model(torch.zeros(2, 3, dtype=torch.int64), cache=cache)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        model.new_cache(1, 65)
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        KVCache(1, 1, 1, 0, 8)
    cache.reset()
    assert cache.filled == 0 and cache.lens.tolist() == [0, 0]


@torch.no_grad()
def test_packed_documents_equal_each_document_alone(model):
    """cu_seqlens: no attention across documents, positions restart in each one."""
    from fastlm.train.data import document_boundaries

    ids = torch.randint(1, 97, (2, 12))
    ids[0, 4] = ids[0, 9] = ids[1, 6] = 0  # separators end documents (after them a new one starts)
    layout = document_boundaries(ids, separator=0)
    packed = model(ids, **layout)
    offsets = layout["cu_seqlens"].tolist()
    flat_ids, flat_out = ids.flatten(), packed.flatten(0, 1)
    for start, end in zip(offsets[:-1], offsets[1:]):
        alone = model(flat_ids[start:end][None])[0]
        torch.testing.assert_close(flat_out[start:end], alone, atol=1e-5, rtol=1e-5)


def test_bidirectional_attention_sees_later_tokens(model):
    ids = torch.randint(0, 97, (1, 6))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % 97
    with torch.no_grad():
        causal = model(ids)[0, 0], model(changed)[0, 0]
        both = model(ids, causal=False)[0, 0], model(changed, causal=False)[0, 0]
    torch.testing.assert_close(*causal)
    assert not torch.allclose(*both)


def test_torch_compile_fullgraph(model):
    ids = torch.randint(0, 97, (2, 9))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_inputs_embeds_replace_the_token_embeddings(model):
    ids = torch.randint(0, 97, (2, 7))
    embeds = model.embed(ids)
    torch.testing.assert_close(model(None, inputs_embeds=embeds), model(ids))
    with pytest.raises(ValueError, match="inputs_embeds of shape"):
        model(None, inputs_embeds=embeds[..., :-1])
