"""Decoding strategies: transformers parity (greedy, repetition penalty, beam search), ragged
batches, stop conditions, streaming, contrastive search, reproducibility, bad input."""

import pytest
import torch

import fastlm
from fastlm.data import ByteTokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)  # peakier distributions: beams and eos matter within a few steps
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    return hf, fastlm.from_pretrained(path)


def _prompt(seed, b=2, t=5):
    return torch.randint(3, 61, (b, t), generator=torch.Generator().manual_seed(seed))


def _hf(hf, prompt, **kwargs):
    return hf.generate(prompt, attention_mask=torch.ones_like(prompt), pad_token_id=0, **kwargs)


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping", [(2, 1.0, False), (4, 1.0, True),
                                                                     (3, 0.5, "never"), (4, 2.0, False)])
@pytest.mark.parametrize("eos", [None, 7])
def test_beam_search_matches_transformers(pair, num_beams, length_penalty, early_stopping, eos):
    hf, ours = pair
    for seed in range(3):
        prompt = _prompt(seed)
        kwargs = dict(max_new_tokens=12, num_beams=num_beams, length_penalty=length_penalty,
                      early_stopping=early_stopping, eos_token_id=eos, do_sample=False)
        expected = _hf(hf, prompt, **kwargs)
        assert torch.equal(fastlm.generate(ours, prompt, pad_token_id=0, **kwargs), expected)


@pytest.mark.parametrize("eos", [None, 7])
def test_greedy_and_repetition_penalty_match_transformers(pair, eos):
    hf, ours = pair
    prompt = _prompt(5, b=3)
    for penalty in (1.0, 1.3):
        kwargs = dict(max_new_tokens=20, repetition_penalty=penalty, eos_token_id=eos, do_sample=False)
        assert torch.equal(fastlm.generate(ours, prompt, pad_token_id=0, **kwargs), _hf(hf, prompt, **kwargs))


def test_ragged_batch_equals_each_prompt_alone(pair):
    _, ours = pair
    prompts = [[5, 9, 11], [17, 3, 8, 21, 30, 4, 9], [40]]
    for kwargs in (dict(), dict(eos_token_id=7), dict(num_beams=3)):
        batch = fastlm.generate(ours, prompts, max_new_tokens=10, **kwargs)
        for prompt, out in zip(prompts, batch):
            alone = fastlm.generate(ours, torch.tensor([prompt]), max_new_tokens=10, **kwargs)[0]
            if "eos_token_id" in kwargs and (alone[len(prompt):] == 7).any():
                alone = alone[: len(prompt) + int((alone[len(prompt):] == 7).nonzero()[0]) + 1]
            assert torch.equal(out, alone)


def test_sampling_reproducible_with_seed_and_generator(pair):
    _, ours = pair
    prompt = [[5, 6, 7], [8, 9]]
    a = fastlm.generate(ours, prompt, max_new_tokens=12, do_sample=True, top_p=0.9, seed=3)
    b = fastlm.generate(ours, prompt, max_new_tokens=12, do_sample=True, top_p=0.9,
                        generator=torch.Generator().manual_seed(3))
    c = fastlm.generate(ours, prompt, max_new_tokens=12, do_sample=True, top_p=0.9, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))


def test_streaming_yields_the_same_tokens(pair):
    _, ours = pair
    prompt = _prompt(9)
    seen = []
    out = fastlm.generate(ours, prompt, max_new_tokens=8, streamer=seen.append)
    assert torch.equal(torch.stack(seen, dim=1), out[:, 5:])
    streamed = list(fastlm.generate_stream(ours, prompt, max_new_tokens=8))
    assert torch.equal(torch.stack(streamed, dim=1), out[:, 5:])


def test_stop_strings_end_generation(pair):
    _, ours = pair
    tok = ByteTokenizer()
    model = fastlm.Model(fastlm.ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=2))
    prompt = torch.tensor([tok.encode("ab")])
    full = fastlm.generate(model, prompt, max_new_tokens=12)
    text = tok.decode(full[0, 2:].tolist(), skip_special_tokens=True)
    stop = text[3:5]  # a two-character string that appears in the greedy continuation
    out = fastlm.generate(model, prompt, max_new_tokens=12, stop_strings=[stop], tokenizer=tok)
    assert stop in tok.decode(out[0, 2:].tolist(), skip_special_tokens=True) and out.shape[1] < full.shape[1]
    assert torch.equal(out[0], full[0, : out.shape[1]])


def test_contrastive_search(pair):
    _, ours = pair
    prompt = _prompt(11)
    greedy = fastlm.generate(ours, prompt, max_new_tokens=10)
    # alpha = 0 is greedy (the most likely candidate wins)
    assert torch.equal(fastlm.generate(ours, prompt, max_new_tokens=10, penalty_alpha=0.0, top_k=4), greedy)
    out = fastlm.generate(ours, prompt, max_new_tokens=10, penalty_alpha=0.6, top_k=4)
    assert out.shape == greedy.shape and torch.equal(out[:, :5], prompt)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(num_beams=0), ValueError, "num_beams must be an integer >= 1"),
        (dict(max_new_tokens=200), ValueError, "exceeds the model's context of 128"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty must be > 0"),
        (dict(num_beams=2, penalty_alpha=0.5, top_k=3), ValueError, "choose one strategy"),
        (dict(penalty_alpha=0.5), ValueError, "contrastive search needs top_k"),
        (dict(stop_strings=["x"]), ValueError, "needs tokenizer="),
        (dict(eos_token_id=99), ValueError, r"eos_token_id must be in \[0, 61\)"),
        (dict(seed=1, generator=torch.Generator()), ValueError, "either generator= or seed="),
        (dict(input_ids=[[1, 2], []]), ValueError, "prompt is empty"),
        (dict(input_ids="hello"), TypeError, "list of token-id lists"),
    ],
)
def test_bad_arguments(pair, kwargs, error, message):
    _, ours = pair
    kwargs = {"input_ids": _prompt(0), "max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=message):
        fastlm.generate(ours, **kwargs)


def _tiny(seed, vocab=61, layers=1, hidden=32):
    torch.manual_seed(seed)
    return fastlm.Model(fastlm.ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=2,
                                           max_position_embeddings=128)).eval()


@pytest.mark.parametrize("num_draft_tokens", [1, 3, 5])
def test_speculative_greedy_equals_target_greedy(pair, num_draft_tokens):
    _, target = pair
    draft = _tiny(1)
    prompt = _prompt(13, b=2)
    for eos in (None, 7):
        expected = fastlm.generate(target, prompt, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
        got = fastlm.generate(target, prompt, max_new_tokens=16, draft_model=draft,
                              num_draft_tokens=num_draft_tokens, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(got, expected)
    # a draft that agrees with the target everywhere: every proposal is accepted
    assert torch.equal(fastlm.generate(target, prompt, max_new_tokens=16, draft_model=_copy(target)),
                       fastlm.generate(target, prompt, max_new_tokens=16))


def _copy(model):
    clone = fastlm.Model(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def test_speculative_sampling_is_distributed_as_the_target():
    """Joint distribution of two sampled tokens, against the target's exact one (chi-square)."""
    vocab = 6
    target, draft = _tiny(2, vocab=vocab, hidden=16), _tiny(3, vocab=vocab, hidden=16)
    with torch.no_grad():
        target.lm_head.weight.mul_(20.0)
        draft.lm_head.weight.mul_(20.0)
    prompt = torch.tensor([[1, 4, 2]])
    with torch.no_grad():
        first = torch.softmax(target(prompt)[0, -1].double(), -1)
        joint = torch.stack([first[a] * torch.softmax(target(torch.cat((prompt, torch.tensor([[a]])), 1))[0, -1].double(), -1)
                             for a in range(vocab)])  # (V, V)
    n = 1500
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    for _ in range(n):
        out = fastlm.generate(target, prompt, max_new_tokens=2, do_sample=True, draft_model=draft,
                              num_draft_tokens=2, generator=generator)[0, 3:]
        counts[out[0], out[1]] += 1
    expected = joint * n
    keep = expected > 5
    chi2 = (((counts - expected) ** 2) / expected.clamp(min=1e-12))[keep].sum().item()
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 4 * (2 * dof) ** 0.5, (chi2, dof)  # ~4 sigma of the chi-square distribution
    assert counts[~keep].sum() <= 0.03 * n
