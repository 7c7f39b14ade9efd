"""Soft-prompt tuning: shapes, frozen base, padding, per-row prompts, generate, save/load, errors."""

import pytest
import torch

from fastlm.config import ModelConfig
from fastlm.generate import generate
from fastlm.model import Model
from fastlm.peft import PromptTuningConfig, PromptTuningModel, get_peft_model


def tiny(arch="llama", **overrides):
    config = dict(arch=arch, vocab_size=67, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                  max_position_embeddings=40)
    config.update(overrides)
    torch.manual_seed(0)
    return Model(ModelConfig(**config)).eval()


def ids(b=3, t=7, seed=1):
    return torch.randint(0, 67, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@torch.no_grad()
def test_prompt_is_prepended_and_sliced_off(arch):
    model = tiny(arch)
    pt = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=4, init="random"))
    assert isinstance(pt, PromptTuningModel)
    assert pt.get_nb_trainable_parameters() == (4 * 32, model.num_parameters() + 4 * 32)
    x = ids()
    embeds = torch.cat([pt.prompts["default"][None].expand(3, -1, -1), model.embed(x)], dim=1)
    expected = model(None, inputs_embeds=embeds)[:, 4:]
    torch.testing.assert_close(pt(x), expected)
    assert pt(x, return_hidden=True).shape == (3, 7, 32)
    assert pt.config.max_position_embeddings == 36 and model.config.max_position_embeddings == 40


@torch.no_grad()
def test_right_padding_matches_unpadded_rows():
    pt = PromptTuningModel(tiny(), PromptTuningConfig(num_virtual_tokens=3))
    x = ids(2, 6)
    lens = torch.tensor([6, 4])
    padded = pt(x, key_lens=lens)
    torch.testing.assert_close(padded[1, :4], pt(x[1:, :4])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[0], pt(x[:1])[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_generate_greedy_equals_uncached_argmax_loop():
    pt = PromptTuningModel(tiny(), PromptTuningConfig(num_virtual_tokens=5, init="random"))
    prompt = ids(2, 4)
    out = generate(pt, prompt, max_new_tokens=6)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, pt(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    with pytest.raises(ValueError, match="exceeds the model's context of 35"):
        generate(pt, prompt, max_new_tokens=32)


@torch.no_grad()
def test_swap_and_per_row_prompts():
    pt = PromptTuningModel(tiny(), PromptTuningConfig(num_virtual_tokens=3, init="random"), "a")
    pt.add_adapter("b", PromptTuningConfig(num_virtual_tokens=3, init="token_ids", init_token_ids=[5, 6]))
    torch.testing.assert_close(pt.prompts["b"], pt.model.embed.weight[[5, 6, 5]])
    x = ids(2)
    mixed = pt(x, adapter_names=["b", "a"])
    pt.set_adapter("b")
    torch.testing.assert_close(mixed[:1], pt(x[:1]), atol=1e-5, rtol=1e-5)
    pt.set_adapter("a")
    torch.testing.assert_close(mixed[1:], pt(x[1:]), atol=1e-5, rtol=1e-5)
    with pt.use_adapters(["b", "a"]):
        both = generate(pt, x, max_new_tokens=4)
    pt.set_adapter("b")
    assert torch.equal(both[:1], generate(pt, x[:1], max_new_tokens=4))
    torch.testing.assert_close(pt(x, adapter_names=["__base__"] * 2), pt.model(x))


def test_only_the_prompt_trains():
    pt = PromptTuningModel(tiny(), PromptTuningConfig(num_virtual_tokens=2))
    pt.train()
    pt(ids()).square().mean().backward()
    assert [n for n, p in pt.named_parameters() if p.grad is not None] == ["prompts.default"]


def test_save_load_round_trip_and_errors(tmp_path):
    pt = PromptTuningModel(tiny(), PromptTuningConfig(num_virtual_tokens=3, init="random"))
    pt.save_adapter(tmp_path)
    other = PromptTuningModel(tiny())
    other.load_adapter(tmp_path, "task")
    assert other.get_nb_trainable_parameters()[0] == 0
    with torch.no_grad():
        torch.testing.assert_close(other(ids()), pt(ids()))
    with pytest.raises(ValueError, match="token_dim=32, this model's hidden size is 48.*different base"):
        PromptTuningModel(tiny(hidden_size=48, intermediate_size=64)).load_adapter(tmp_path)
    with pytest.raises(ValueError, match="unknown prompt adapter 'x'; this model has: 'task'"):
        other.set_adapter("x")
    pt.add_adapter("long", PromptTuningConfig(num_virtual_tokens=5))
    with pytest.raises(ValueError, match="one length"):
        pt(ids(2), adapter_names=["default", "long"])
    with pytest.raises(ValueError, match="'__base__' rows cannot be mixed"):
        pt(ids(2), adapter_names=["default", "__base__"])
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pt.add_adapter("bad", PromptTuningConfig(num_virtual_tokens=2, init="token_ids", init_token_ids=[999]))


def test_from_pretrained_picks_the_adapter_kind(tmp_path):
    from fastlm.peft import LoraConfig, LoraModel, from_pretrained

    PromptTuningModel(tiny(), PromptTuningConfig(num_virtual_tokens=2)).save_adapter(tmp_path / "prompt")
    LoraModel(tiny(), LoraConfig(r=2)).save_adapter(tmp_path / "lora")
    assert isinstance(from_pretrained(tiny(), tmp_path / "prompt"), PromptTuningModel)
    lora = from_pretrained(tiny(), tmp_path / "lora", "task", is_trainable=True)
    assert isinstance(lora, LoraModel) and lora.active_adapter == "task" and lora.get_nb_trainable_parameters()[0] > 0
