import pytest
import torch

import fastlm
from fastlm import Model, ModelConfig

CONFIG = ModelConfig(arch="llama", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=40)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Model(CONFIG).eval()


def test_greedy_equals_argmax_of_full_forward(model):
    prompt = torch.randint(0, 50, (2, 4))
    out = fastlm.generate(model, prompt, max_new_tokens=6)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    with torch.no_grad():
        for i in range(4, 10):  # each new token is the argmax given everything before it
            assert torch.equal(out[:, i], model(out[:, :i])[:, -1].argmax(-1))


def test_sampling_is_reproducible_with_a_generator(model):
    prompt = torch.randint(0, 50, (3, 2))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return fastlm.generate(model, prompt, max_new_tokens=12, do_sample=True, top_k=20, top_p=0.95, generator=g)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_eos_finishes_sequences_early(model):
    prompt = torch.randint(0, 50, (1, 3))
    greedy = fastlm.generate(model, prompt, max_new_tokens=8)
    eos = int(greedy[0, 5])  # the third generated token
    out = fastlm.generate(model, prompt, max_new_tokens=8, eos_token_id=eos)
    first = (out[0, 3:] == eos).nonzero()[0].item() + 3
    assert out.shape[1] == first + 1 and torch.equal(out[0, : first + 1], greedy[0, : first + 1])


def test_zero_new_tokens_returns_the_prompt(model):
    prompt = torch.randint(0, 50, (2, 3))
    assert torch.equal(fastlm.generate(model, prompt, max_new_tokens=0), prompt)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.int64)), "prompt is empty"),
        (dict(input_ids=torch.zeros(3, dtype=torch.int64)), r"shape \(B, T\)"),
        (dict(max_new_tokens=38), "exceeds the model's context of 40"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(do_sample=True, temperature=0.0), "needs temperature > 0"),
        (dict(do_sample=True, top_p=2.0), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_arguments(model, kwargs, message):
    kwargs = {"input_ids": torch.zeros(1, 3, dtype=torch.int64), **kwargs}
    with pytest.raises(ValueError, match=message):
        fastlm.generate(model, **kwargs)


def test_nan_logits_are_reported_at_the_end_of_the_loop(model):
    with torch.no_grad():
        model.embed.weight[:] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fastlm.generate(model, torch.zeros(1, 2, dtype=torch.int64), max_new_tokens=3)
