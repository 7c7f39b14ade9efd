"""fastlm.align.logprobs: token and sequence log-probs of a tiny fastlm model against the
model's own logits (log_softmax of model(input_ids)), with right, left and no padding, tied
embeddings, a soft-capped head, temperature, entropy and gradients."""

import pytest
import torch

from fastlm.align.logprobs import sequence_logprobs, token_logprobs
from fastlm.config import ModelConfig
from fastlm.model import Model


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=37, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48)
    cfg.update(overrides)
    model = Model(ModelConfig(**cfg)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def explicit(model, ids, temperature=1.0):
    """log p(ids[:, j+1] | ids[:, :j+1]) and entropies from the full logits of the unpadded sequence."""
    logp = torch.log_softmax(model(ids) / temperature, -1)[:, :-1]
    lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return lp, -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"final_softcap": 3.0}],
                         ids=["untied", "tied", "softcap"])
def test_token_logprobs_match_full_logits(overrides):
    model = tiny(**overrides)
    ids = torch.randint(0, 37, (3, 9))
    lp, ent = token_logprobs(model, ids, temperature=0.8, return_entropy=True)
    lp_ref, ent_ref = explicit(model, ids, 0.8)
    assert lp.shape == (3, 8)
    torch.testing.assert_close(lp, lp_ref.to(lp.dtype), rtol=0, atol=1e-10)
    torch.testing.assert_close(ent, ent_ref.to(ent.dtype), rtol=0, atol=1e-10)
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(lp.sum() + 0.3 * ent.sum(), params)
    want = torch.autograd.grad(lp_ref.sum() + 0.3 * ent_ref.sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_padding_left_right_and_both_equal_unpadded_rows():
    model = tiny(1)
    rows = [torch.randint(0, 37, (n,)) for n in (7, 4, 5, 1)]
    t = 9
    # (offset of the run of tokens) per row: left-, right-, both-padded, and a 1-token row
    offsets = [2, 0, 1, 3]
    ids = torch.full((4, t), 5, dtype=torch.int64)  # pad id 5: its value must not matter
    mask = torch.zeros(4, t, dtype=torch.int64)
    for b, (row, off) in enumerate(zip(rows, offsets)):
        ids[b, off:off + len(row)] = row
        mask[b, off:off + len(row)] = 1
    lp, ent = token_logprobs(model, ids, attention_mask=mask, return_entropy=True)
    assert lp.shape == (4, t - 1)
    for b, (row, off) in enumerate(zip(rows, offsets)):
        if len(row) > 1:
            ref, ref_ent = explicit(model, row[None])
            torch.testing.assert_close(lp[b, off:off + len(row) - 1], ref[0], rtol=0, atol=1e-10)
            torch.testing.assert_close(ent[b, off:off + len(row) - 1], ref_ent[0], rtol=0, atol=1e-10)
        outside = torch.ones(t - 1, dtype=torch.bool)
        outside[off:off + len(row) - 1] = False
        assert torch.all(lp[b, outside] == 0) and torch.all(ent[b, outside] == 0)


def test_sequence_logprobs_sum_and_mean_over_completion():
    model = tiny(2)
    ids = torch.randint(0, 37, (2, 8))
    loss_mask = torch.zeros(2, 8, dtype=torch.int64)
    loss_mask[0, 5:] = 1
    loss_mask[1, 3:7] = 1
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 7] = 0  # right padding inside loss_mask's reach is not counted
    loss_mask[1, 7] = 1
    total = sequence_logprobs(model, ids, loss_mask, attention_mask=mask)
    mean = sequence_logprobs(model, ids, loss_mask, attention_mask=mask, average=True)
    lp0, _ = explicit(model, ids[:1])
    lp1, _ = explicit(model, ids[1:, :7])
    want = torch.stack([lp0[0, 4:].sum(), lp1[0, 2:].sum()])
    torch.testing.assert_close(total, want.to(total.dtype), rtol=0, atol=1e-10)
    torch.testing.assert_close(mean, (want / torch.tensor([3.0, 4.0], dtype=want.dtype)).to(mean.dtype),
                               rtol=0, atol=1e-10)


def test_bad_inputs_are_refused():
    model = tiny()
    ids = torch.randint(0, 37, (2, 6))
    with pytest.raises(ValueError, match="contiguous"):
        token_logprobs(model, ids, attention_mask=torch.tensor([[1, 0, 1, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="attention_mask must have"):
        token_logprobs(model, ids, attention_mask=torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="T >= 2"):
        token_logprobs(model, ids[:, :1])
    with pytest.raises(TypeError, match="int64"):
        token_logprobs(model, ids.int())
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_logprobs(model, ids, torch.ones(2, 3))
    with pytest.raises(TypeError, match="fastlm Model"):
        token_logprobs(torch.nn.Linear(2, 2), ids)
