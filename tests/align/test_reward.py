"""RewardModel: head on the last non-padding token, files transformers reads and writes with the
same scores (Llama, Qwen2, GPT-2), two-class form, LoRA merge on save, the pairwise loss."""

import pytest
import torch
import transformers

from fastlm.align import RewardModel, load_reward_model, pairwise_loss
from fastlm.align.reward import sequence_classification_name
from fastlm.config import ModelConfig
from fastlm.io.checkpoint import load_config
from fastlm.model import Model
from fastlm.peft import LoraConfig, LoraModel

VOCAB, PAD = 61, 0
HF_CONFIGS = {
    "llama": ("LlamaConfig", dict(rope_theta=50000.0)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1e6)),  # q/k/v biases
    "gpt2": ("GPT2Config", dict()),
}
CASES = [("llama", 1), ("llama", 2), ("qwen2", 1), ("gpt2", 2)]


def _hf_config(arch: str, num_labels: int):
    cls, extra = HF_CONFIGS[arch]
    if arch == "gpt2":
        values = dict(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    else:
        values = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config = getattr(transformers, cls)(**values, **extra, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                                        num_labels=num_labels)
    config._attn_implementation = "eager"
    return config


def _perturb(module):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.1 if p.dim() == 1 else 0.05))
    return module.eval()


def _batch():
    """Right-padded rows (pad id 0), one without padding; ids avoid the pad id inside rows."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (4, 11), generator=gen)
    lens = torch.tensor([11, 5, 8, 1])
    mask = (torch.arange(11) < lens[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.mark.parametrize("arch,num_labels", CASES)
def test_transformers_checkpoint_loads_with_same_scores(tmp_path, arch, num_labels):
    torch.manual_seed(0)
    hf = _perturb(transformers.AutoModelForSequenceClassification.from_config(_hf_config(arch, num_labels)))
    hf.save_pretrained(tmp_path)
    rm = load_reward_model(tmp_path)
    ids, mask = _batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits  # (B, num_labels)
        ours_mask = rm.logits(ids, mask)
        ours_pad = rm.logits(ids)  # transformers' rule: last token that is not pad_token_id
    assert rm.num_labels == num_labels and rm.pad_token_id == PAD
    torch.testing.assert_close(ours_mask, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_pad, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rm(ids, mask), expected[:, -1], rtol=1e-4, atol=1e-5)  # reward: positive logit


@pytest.mark.parametrize("arch,num_labels", CASES)
def test_saved_reward_model_scores_the_same_in_transformers(tmp_path, arch, num_labels):
    torch.manual_seed(0)
    hf_causal = transformers.AutoModelForCausalLM.from_config(_hf_config(arch, 1))
    hf_causal.save_pretrained(tmp_path / "lm")
    config: ModelConfig = load_config(tmp_path / "lm")
    rm = RewardModel.from_pretrained(tmp_path / "lm", num_labels=num_labels, dtype=torch.float32)
    _perturb(rm)
    rm.save_pretrained(tmp_path / "rm")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", attn_implementation="eager")
    assert type(hf).__name__ == sequence_classification_name(config.arch)
    assert hf.config.num_labels == num_labels and hf.config.pad_token_id == PAD
    ids, mask = _batch()
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        torch.testing.assert_close(rm.logits(ids, mask), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rm(ids), expected[:, -1], rtol=1e-4, atol=1e-5)
    back = load_reward_model(tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask), rm(ids, mask), rtol=0, atol=0)


def _tiny(**overrides) -> Model:
    torch.manual_seed(0)
    config = ModelConfig(arch="llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=PAD, **overrides)
    return Model(config)


def test_lora_reward_model_saves_merged(tmp_path):
    lora = LoraModel(_tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    rm = RewardModel(lora)
    _perturb(rm)  # moves the LoRA B matrices off zero too
    ids, mask = _batch()
    rm.save_pretrained(tmp_path)
    with torch.no_grad():
        before = rm(ids, mask)
        with lora.disable_adapter():
            base = rm(ids, mask)
        assert (before - base).abs().max() > 1e-3  # the adapter matters
        torch.testing.assert_close(load_reward_model(tmp_path)(ids, mask), before, rtol=1e-5, atol=1e-5)
    assert lora.merged_adapter is None  # saving left the model unmerged
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert "head.weight" in trainable and any("lora_A" in n for n in trainable)
    assert not any(n.endswith("qkv_proj.base.weight") for n in trainable)
    assert any(n.endswith("qkv_proj.base.weight") for n, _ in rm.named_parameters())  # the frozen base exists


def test_score_texts_matches_forward():
    from fastlm.data import ByteTokenizer

    tok = ByteTokenizer()
    model = Model(ModelConfig(arch="llama", vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=4,
                              intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id))
    rm = RewardModel(model)
    scores = rm.score(["Q1:", "Q22:", "Q3:"], ["01234567\n", "8\n", "13579135\n"], tok, batch_size=2)
    one = [rm.score([p], [c], tok)[0] for p, c in (("Q1:", "01234567\n"), ("Q22:", "8\n"), ("Q3:", "13579135\n"))]
    assert scores == pytest.approx(one, abs=1e-5)
    ids = [tok.bos_token_id] + tok.encode("Q22:8\n") + [tok.eos_token_id]
    with torch.no_grad():
        assert rm(torch.tensor([ids])).item() == pytest.approx(scores[1], abs=1e-5)
    with pytest.raises(ValueError, match="3 prompts but 2 completions"):
        rm.score(["a", "b", "c"], ["x", "y"], tok)


def test_pairwise_loss_and_bad_inputs(tmp_path):
    c, r = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])
    expected = torch.log1p(torch.exp(-(c - r - 0.25)))
    torch.testing.assert_close(pairwise_loss(c, r, 0.25), expected)
    with pytest.raises(ValueError, match="num_labels must be 1"):
        RewardModel(_tiny(), num_labels=3)
    rm = RewardModel(_tiny())
    ids, mask = _batch()
    with pytest.raises(ValueError, match="right padding"):
        rm(ids, mask.flip(-1))
    with pytest.raises(TypeError, match="fastlm Model"):
        RewardModel(torch.nn.Linear(2, 2))
    _tiny().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a sequence-classification"):
        load_reward_model(tmp_path)
