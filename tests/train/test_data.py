"""Batch sources: packing, document boundaries, masked-LM corruption, SFT loss masking."""

import pytest
import torch

from fastlm import Model, ModelConfig, ops
from fastlm.data import ByteTokenizer
from fastlm.train.data import (
    IGNORE_INDEX,
    PackedSource,
    SFTSource,
    document_boundaries,
    encode_example,
    global_rows,
    rank_share,
)


def test_packed_rows_are_shifted_windows_covering_each_epoch():
    tokens = torch.arange(1000)
    source = PackedSource(tokens, seq_len=10, batch_size=9, seed=3)
    seen = []
    for i in range(11):  # 99 rows per epoch, 9 per batch: 11 batches = one epoch
        batch = source.batch(i)
        assert torch.equal(batch["labels"], batch["input_ids"] + 1)
        assert (batch["input_ids"][:, 0] % 10 == 0).all()
        seen += (batch["input_ids"][:, 0] // 10).tolist()
    assert sorted(seen) == list(range(99))
    assert torch.equal(source.batch(4)["input_ids"], source.batch(4)["input_ids"])  # deterministic


def test_ranks_split_the_global_batch():
    source = PackedSource(torch.arange(500), seq_len=7, batch_size=4, seed=0)
    whole = source.batch(5)["input_ids"]
    parts = [source.batch(5, rank, 2)["input_ids"] for rank in range(2)]
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(ValueError, match="does not split evenly over 3"):
        rank_share(global_rows(0, 4, 10, 0), 0, 3)


def test_document_boundaries():
    ids = torch.tensor([[5, 0, 6, 7], [8, 9, 0, 0]])
    out = document_boundaries(ids, separator=0)
    assert out["cu_seqlens"].tolist() == [0, 2, 4, 7, 8] and out["max_seqlen"] == 3
    assert out["cu_seqlens"].dtype == torch.int32


def test_masked_lm_batches():
    tokens = torch.randint(3, 50, (5000,))
    source = PackedSource(tokens, seq_len=64, batch_size=8, mlm_mask_id=2, vocab_size=50)
    batch = source.batch(0)
    chosen = batch["labels"] != IGNORE_INDEX
    assert batch["causal"] is False
    assert 0.10 < chosen.float().mean() < 0.20
    masked = batch["input_ids"] == 2
    assert (masked <= chosen).all() and 0.7 < masked.sum() / chosen.sum() < 0.9
    original = source._rows(global_rows(0, 8, source.num_rows, 0))[:, :-1]
    assert torch.equal(batch["labels"][chosen], original[chosen])
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])


def test_sft_loss_is_on_completion_tokens_only():
    tok = ByteTokenizer()
    examples = [encode_example(tok, "2+2=", "4", "plain", 64), encode_example(tok, "hello ", "world", "alpaca", 64)]
    ids, targets = examples[0]
    assert ids == tok.encode("2+2=", add_bos=True) + tok.encode("4", add_eos=True)
    assert targets == [IGNORE_INDEX] * 5 + tok.encode("4", add_eos=True)
    source = SFTSource(examples, batch_size=2, pad_id=tok.pad_token_id, seed=0)
    batch = source.batch(0)
    # The loss the trainer takes equals a manual computation over completion tokens only.
    torch.manual_seed(0)
    model = Model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=2))
    logits = model(batch["input_ids"], key_lens=batch["key_lens"])
    loss = ops.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    manual, count = 0.0, 0
    for row in range(2):
        ids, targets = examples[global_rows(0, 2, 2, 0)[row]]
        alone = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
        for t, target in enumerate(targets[1:]):
            if target != IGNORE_INDEX:
                manual -= alone[t, target].item()
                count += 1
    assert count == 2 + 6  # "4" + eos, "world" + eos
    assert loss.item() == pytest.approx(manual / count, abs=1e-5)


def test_sft_truncates_and_rejects_bad_templates():
    tok = ByteTokenizer()
    ids, targets = encode_example(tok, "a" * 10, "b" * 10, "plain", 8)
    assert len(ids) == len(targets) == 9
    with pytest.raises(ValueError, match="unknown prompt template 'llama9'"):
        encode_example(tok, "a", "b", "llama9", 8)


def test_packed_source_errors():
    with pytest.raises(ValueError, match="do not fill one sequence of 11"):
        PackedSource(torch.arange(5), seq_len=10, batch_size=1)
    with pytest.raises(ValueError, match="document_masking needs the separator"):
        PackedSource(torch.arange(50), seq_len=10, batch_size=1, document_masking=True)
