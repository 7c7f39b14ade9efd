"""The paged KV cache: the paged decode op against the static one, block bookkeeping, and
generation through it giving the same tokens as through the static cache."""

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.ops.paged import gather_pages


def test_paged_decode_attention_equals_contiguous():
    torch.manual_seed(0)
    b, h, hkv, d, bs, tq = 3, 4, 2, 16, 4, 2
    pages_k, pages_v = torch.randn(10, hkv, bs, d), torch.randn(10, hkv, bs, d)
    table = torch.tensor([[3, 7, 1], [2, -1, -1], [9, 4, 5]], dtype=torch.int32)
    lens = torch.tensor([11, 3, 12])
    q = torch.randn(b, h, tq, d)
    out = ops.decode_attention_paged(q, pages_k, pages_v, table, lens)
    k, v = gather_pages(pages_k, table), gather_pages(pages_v, table)
    torch.testing.assert_close(out, ops.decode_attention(q, k, v, lens))
    assert torch.equal(k[0, :, 4:8], pages_k[7])  # positions 4..7 of sequence 0 live in block 7
    torch.library.opcheck(torch.ops.fastlm.decode_attention_paged.default,
                          (q, pages_k, pages_v, table, lens, None, None, None, "reference"))
    with pytest.raises(ValueError, match="one row per sequence"):
        ops.decode_attention_paged(q, pages_k, pages_v, table[:2], lens)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fastlm.Model(fastlm.ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                           max_position_embeddings=96)).eval()


def test_paged_generation_equals_static(model):
    prompts = [[5, 9, 11], [17, 3, 8, 21, 30, 4, 9, 1, 2, 3, 4, 5, 6], [40]]
    for kwargs in (dict(), dict(do_sample=True, top_k=10, seed=1), dict(eos_token_id=7)):
        static = fastlm.generate(model, prompts, max_new_tokens=20, **kwargs)
        paged = fastlm.generate(model, prompts, max_new_tokens=20, cache_implementation="paged", **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(static, paged))


def test_blocks_are_allocated_as_sequences_grow_and_freed(model):
    cache = model.new_cache(2, 40, paged=True, block_size=4, num_blocks=7)
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 6)), cache=cache)  # 6 positions: 2 blocks per sequence
        assert cache.blocks_in_use == 4 and len(cache.free_blocks) == 2
        for _ in range(2):
            model(torch.randint(0, 50, (2, 1)), cache=cache)  # positions 6, 7: still within 2 blocks
        assert cache.blocks_in_use == 4
        cache.free(1)
        assert len(cache.free_blocks) == 4 and (cache.block_table[1] == -1).all()
        model(torch.randint(0, 50, (2, 1)), cache=cache)  # position 8: sequence 0 takes a third block
        assert cache.seq_blocks[0][2] in range(1, 7) and cache.blocks_in_use == 3
        for _ in range(4):
            model(torch.randint(0, 50, (2, 1)), cache=cache)
        with pytest.raises(RuntimeError, match="out of blocks"):
            for _ in range(12):
                model(torch.randint(0, 50, (2, 1)), cache=cache)
