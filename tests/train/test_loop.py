import math

import pytest
import torch

from fastlm import Model, ModelConfig
from fastlm.eval import evaluate_loss, perplexity
from fastlm.train import TrainConfig, lr_at, random_windows, train


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(55, config) == pytest.approx(0.55)
    assert lr_at(99, config) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, config) >= lr_at(s + 1, config) for s in range(10, 99))


def test_random_windows_are_shifted_targets():
    tokens = torch.arange(100)
    x, y = random_windows(tokens, 4, 10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 10) and torch.equal(y, x + 1)
    with pytest.raises(ValueError, match="at least seq_len \\+ 1 = 11"):
        random_windows(torch.arange(10), 1, 10, torch.Generator())


def test_loss_falls_on_a_learnable_stream():
    """A repeating pattern is learned quickly: validation perplexity drops far below uniform."""
    torch.manual_seed(0)
    pattern = torch.randint(0, 32, (23,))
    tokens = pattern.repeat(200)
    model = Model(ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=64))
    before = perplexity(model, tokens[:500], seq_len=32)
    result = train(model, tokens, TrainConfig(steps=60, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=5),
                   val_tokens=tokens[:500], progress=False)
    assert len(result.losses) == 60 and result.losses[-1] < result.losses[0] / 2
    assert before > 20 and result.val_perplexity < 2.0
    assert math.isclose(result.val_perplexity, math.exp(evaluate_loss(model, tokens[:500], seq_len=32, max_batches=8)))


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", -1), ("lr", 0.0), ("min_lr_ratio", 2.0)])
def test_train_config_validation(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_seq_len_beyond_context_is_refused():
    model = Model(ModelConfig(vocab_size=8, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16))
    with pytest.raises(ValueError, match="seq_len 32 exceeds the model's context of 16"):
        train(model, torch.arange(100) % 8, TrainConfig(seq_len=32, steps=1), progress=False)
