"""The cache contract (fastlm.cache): update -> (q, KVView) for the static and the paged cache,
reorder in place over the filled positions only, and speculative decoding over the whole batch
through the plain decode step."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastlm
from fastlm import ops
from fastlm.cache import KVView
from fastlm.decoding import step as step_module
from tests.host_reads import HostReads

CONFIG = fastlm.ModelConfig(arch="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            max_position_embeddings=96)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fastlm.Model(CONFIG).eval()


class CopiedBytes(TorchDispatchMode):
    """Records (op name, output shape, bytes written) of every index_select / copy_ / clone."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("index_select", "copy_", "clone", "index", "gather", "_to_copy"):
            self.ops.append((name, tuple(out.shape), out.numel() * out.element_size()))
        return out


def test_static_update_returns_the_view_attention_reads():
    torch.manual_seed(1)
    cache = fastlm.KVCache(2, 3, 2, 16, 8)
    q, k, v = torch.randn(3, 4, 2, 8), torch.randn(3, 2, 2, 8), torch.randn(3, 2, 2, 8)
    positions = torch.tensor([[0, 1]] * 3)
    q_rot, view = cache.update(1, q, k, v, positions, theta=10000.0, length=2)
    assert isinstance(view, KVView) and view.block_table is None
    assert view.k.shape == (3, 2, 2, 8) and view.lens.tolist() == [2, 2, 2]
    assert view.k.data_ptr() == cache.k[1].data_ptr()  # a view of the buffer, not a copy
    torch.testing.assert_close(q_rot, ops.rope(q, positions, theta=10000.0))
    torch.testing.assert_close(view.k, ops.rope(k, positions, theta=10000.0))
    torch.testing.assert_close(view.v, v)
    assert cache.k[0].abs().sum() == 0  # other layers untouched
    _, whole = cache.update(0, q, k, v, positions)  # length None: the whole buffer (a static shape)
    assert whole.k.shape == (3, 2, 16, 8)


def test_paged_update_returns_pages_and_block_table(model):
    cache = model.new_cache(2, 40, paged=True, block_size=4)
    positions = cache.positions(6)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    q_rot, view = cache.update(0, q, k, v, positions, theta=10000.0)
    assert view.k.data_ptr() == cache.k[0].data_ptr() and view.block_table is cache.block_table
    assert view.lens.tolist() == [6, 6]
    # the pages in sequence order: (B, max_blocks, Hkv, block_size, D) -> (B, Hkv, max_blocks·block_size, D)
    gathered = view.k[view.block_table.long().clamp(min=0)].permute(0, 2, 1, 3, 4).flatten(2, 3)
    torch.testing.assert_close(gathered[:, :, :6], ops.rope(k, positions, theta=10000.0))
    torch.testing.assert_close(q_rot, ops.rope(q, positions, theta=10000.0))


@torch.no_grad()
def test_static_and_paged_give_the_same_logits(model):
    """One attend path over either view: prefill then decode steps, static = paged = no cache."""
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    for cache in (model.new_cache(2, 16), model.new_cache(2, 16, paged=True, block_size=4)):
        pieces = [model(ids[:, :5], cache=cache), model(ids[:, 5:8], cache=cache)]
        pieces += [model(ids[:, i:i + 1], cache=cache) for i in range(8, 12)]
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_reorder_touches_only_the_filled_part_in_place(model):
    max_len, filled, b = 64, 5, 4
    cache = model.new_cache(b, max_len)
    model(torch.randint(0, 64, (b, filled)), cache=cache)
    cache.lens[1] = 3  # a shorter row: lens move with the rows
    k_before, v_before, lens_before = cache.k.clone(), cache.v.clone(), cache.lens.clone()
    pointers = (cache.k.data_ptr(), cache.v.data_ptr(), cache.lens.data_ptr())
    index = torch.tensor([2, 2, 0, 1])
    with CopiedBytes() as copied:
        cache.reorder(index)
    assert (cache.k.data_ptr(), cache.v.data_ptr(), cache.lens.data_ptr()) == pointers  # in place
    torch.testing.assert_close(cache.k[:, :, :, :filled], k_before.index_select(1, index)[:, :, :, :filled])
    torch.testing.assert_close(cache.v[:, :, :, :filled], v_before.index_select(1, index)[:, :, :, :filled])
    assert cache.lens.tolist() == lens_before[index].tolist()
    # every copy is of the filled positions: 2 buffers × (gather + write back) + the lens
    filled_bytes = cache.k[:, :, :, :filled].numel() * cache.k.element_size()
    big = [op for op in copied.ops if op[2] > filled_bytes]
    assert not big, big
    total = sum(op[2] for op in copied.ops)
    assert total <= 4 * filled_bytes + 2 * b * 8, copied.ops
    assert 4 * filled_bytes * max_len / filled > 10 * total  # the whole buffers would be 12.8× more


@torch.no_grad()
def test_reorder_then_decode_equals_decoding_the_reordered_prompts(model):
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(4))
    index = torch.tensor([1, 1, 0])
    cache, fresh = model.new_cache(3, 32), model.new_cache(3, 32)
    model(ids, cache=cache)
    cache.reorder(index)
    model(ids[index], cache=fresh)
    token = torch.tensor([[3], [4], [5]])
    torch.testing.assert_close(model(token, cache=cache), model(token, cache=fresh), atol=1e-6, rtol=0)


@torch.no_grad()
def test_paged_reorder_permutes_block_tables(model):
    """Paged reorder = static reorder on the logits that follow; full blocks are shared, only the
    partly filled block of a sequence kept twice is copied; freeing returns every block."""
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(6))
    index = torch.tensor([1, 1, 0])
    static, paged = model.new_cache(3, 24), model.new_cache(3, 24, paged=True, block_size=4)
    for cache in (static, paged):
        model(ids, cache=cache)  # 6 positions: one full block and one partly filled per sequence
    free_before = len(paged.free_blocks)
    with CopiedBytes() as copied:
        paged.reorder(index)
        static.reorder(index)
    assert paged.seq_blocks[0][0] == paged.seq_blocks[1][0]  # the full block of sequence 1, shared
    assert paged.seq_blocks[0][1] != paged.seq_blocks[1][1]  # its partly filled block, copied once
    assert len(paged.free_blocks) == free_before + 2 - 1  # sequence 2's blocks freed, one copy taken
    page_bytes = paged.k[:, 0].numel() * paged.k.element_size()  # one block of every layer
    assert sum(op[2] for op in copied.ops if op[1][:2] == (2, 1)) <= 4 * page_bytes  # k and v: read + write
    for _ in range(4):
        token = torch.randint(0, 64, (3, 1))
        torch.testing.assert_close(model(token, cache=paged), model(token, cache=static), atol=1e-5, rtol=1e-5)
    for seq in range(3):
        paged.free(seq)
    assert paged.blocks_in_use == 0 and len(paged.free_blocks) == paged.k.shape[1] - 1


def _copy(model):
    clone = fastlm.Model(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def test_speculative_verifies_the_whole_batch_per_round(model, monkeypatch):
    """A draft equal to the target has every proposal accepted: n / (γ + 1) rounds for the whole
    batch (a loop over rows would take B times as many), one host read each; the draft runs
    through the plain decode step (DecodeStep → decode_logits)."""
    calls = []
    original = step_module.decode_logits

    def counting(*args, **kwargs):
        calls.append(args[2].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(step_module, "decode_logits", counting)
    ids = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(5))
    n, gamma = 16, 3
    with HostReads() as reads:
        got = fastlm.generate(model, ids, max_new_tokens=n, draft_model=_copy(model), num_draft_tokens=gamma)
    rounds = [w for w in reads.where if "speculative.py" in w]
    assert len(rounds) == math.ceil(n / (gamma + 1)), reads.where
    assert all(shape == (4,) for shape in calls)  # batched draft steps, all rows at once
    assert len(calls) == len(rounds) * (gamma + 1)
    assert torch.equal(got, fastlm.generate(model, ids, max_new_tokens=n))


def test_speculative_batch_rows_equal_each_row_alone(model):
    """Rows accept different numbers of proposals and stop at eos at different rounds."""
    torch.manual_seed(7)
    draft = fastlm.Model(fastlm.ModelConfig(arch="llama", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                                            max_position_embeddings=96)).eval()
    ids = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(8))
    one = fastlm.generate(model, ids[:, :1], max_new_tokens=9, draft_model=draft, num_draft_tokens=2)
    assert torch.equal(one, fastlm.generate(model, ids[:, :1], max_new_tokens=9))  # one-token prompts: no prefill
    plain = fastlm.generate(model, ids, max_new_tokens=20)
    eos = int(plain[1, 9])  # row 1 stops early (others wherever they meet it)
    for kwargs in (dict(), dict(eos_token_id=eos, pad_token_id=63)):
        batch = fastlm.generate(model, ids, max_new_tokens=20, draft_model=draft, num_draft_tokens=4, **kwargs)
        assert torch.equal(batch, fastlm.generate(model, ids, max_new_tokens=20, **kwargs))
        for row in range(3 if kwargs else 0):
            alone = fastlm.generate(model, ids[row:row + 1], max_new_tokens=20, draft_model=draft,
                                    num_draft_tokens=4, **kwargs)
            width = alone.shape[1]
            assert torch.equal(batch[row, :width], alone[0]) and (batch[row, width:] == 63).all()
