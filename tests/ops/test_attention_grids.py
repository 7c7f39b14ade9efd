"""Launch grids of the attention and decode kernels against CUDA's limits (x < 2^31, y and
z <= 65,535), for large shapes and every block-size config, computed without launching."""

import pytest
import torch

from fastlm.ops.backend import kernel_module

X_LIMIT, YZ_LIMIT = 2**31 - 1, 65535


def within_cuda_limits(grid) -> bool:
    grid = tuple(grid) + (1,) * (3 - len(grid))
    return 1 <= grid[0] <= X_LIMIT and all(1 <= g <= YZ_LIMIT for g in grid[1:])


def _problem(seqs, heads, kv_heads, tq, tk, d=128, varlen=False):
    fwd = kernel_module("attention")
    return fwd.Problem(seqs, heads, kv_heads, d, tq, tk, True, d ** -0.5, varlen=varlen)


SHAPES = [  # (num_seqs, H, Hkv, Tq, Tk): 2,048 sequences x 32 heads (y would be 65,536), a 128k sequence
    (2048, 32, 32, 128, 128),
    (4096, 32, 8, 64, 64),
    (1, 32, 8, 131072, 131072),
    (65536, 64, 8, 16, 16),
]


def _all_configs(tables):
    fwd = kernel_module("attention")
    for arch_table in tables.values():
        for bound in arch_table:
            for cfg in fwd._configs(arch_table, bound):
                yield cfg.kwargs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("varlen", [False, True])
def test_attention_grids_within_cuda_limits(shape, varlen):
    fwd, bwd = kernel_module("attention"), kernel_module("attention_bwd")
    p = _problem(*shape, varlen=varlen)
    fwd_metas = [*_all_configs(fwd._FWD_TABLES), fwd.INTERPRET_FWD]
    for meta in fwd_metas:
        assert within_cuda_limits(fwd.fwd_grid(p, meta)), meta
    for meta in [*_all_configs(bwd._DKDV_TABLES), bwd.INTERPRET_DKDV]:
        for atomic in (False, True):
            assert within_cuda_limits(bwd.bwd_grid("dkdv", p, meta, atomic)), meta
    for meta in [*_all_configs(bwd._DQ_TABLES), bwd.INTERPRET_DQ]:
        assert within_cuda_limits(bwd.bwd_grid("dq", p, meta)), meta
    # Every program of the flattened grid maps to one (tile, sequence-head): the count is exact.
    grid = fwd.fwd_grid(p, {"BLOCK_M": 64})
    assert grid == (-(-shape[3] // 64) * shape[0] * shape[1],)


def test_grid_over_the_x_limit_raises_a_clear_error():
    fwd = kernel_module("attention")
    with pytest.raises(ValueError, match="exceed CUDA's grid limit"):
        fwd.tiles_grid(1 << 30, 64, 16)


@pytest.mark.parametrize("b,hkv,group,tq,splits", [(4096, 8, 4, 1, 64), (8, 8, 4, 1, 64), (2048, 32, 8, 16, 64),
                                                   (65536, 8, 8, 4, 8)])
def test_decode_grids_within_cuda_limits(b, hkv, group, tq, splits):
    dec = kernel_module("decode_attention")
    for dtype in (torch.float16, torch.float32):
        for head_dim in (64, 128, 256):
            cfg = dec.decode_config(head_dim, dtype, group * tq)
            for grid in dec.decode_grids(b, hkv, group, tq, splits, cfg.block_r):
                assert within_cuda_limits(grid), (grid, cfg)


def test_configs_marked_plain_are_left_out_of_window_softcap_kernels():
    """Configs that compile clean for the plain kernel but spill with the window/soft-cap code
    (measured ahead of time for sm_80/sm_90) are not autotuned for those variants (PLAIN), and
    those that spill only in the plain kernel are used only for them (HEAVY)."""
    fwd, bwd = kernel_module("attention"), kernel_module("attention_bwd")
    for tables in (fwd._FWD_TABLES, bwd._DKDV_TABLES, bwd._DQ_TABLES):
        for table in tables.values():
            for bound, entries in table.items():
                plain = [fwd._configs(table, bound), fwd._configs(table, bound, heavy=True)]
                only_plain = sum(fwd.PLAIN in e[4:] for e in entries)
                only_heavy = sum(fwd.HEAVY in e[4:] for e in entries)
                assert len(plain[0]) == len(entries) - only_heavy and len(plain[1]) == len(entries) - only_plain
                assert plain[0], f"no config left for the plain kernels at D <= {bound}"
                assert plain[1], f"no config left for the window/soft-cap kernels at D <= {bound}"
    assert any(fwd.HEAVY in e[4:] for table in bwd._DKDV_TABLES.values() for e in table.get(256, []))
    assert fwd.Problem(1, 1, 1, 64, 1, 1, True, 1.0, False, window=4).heavy
    assert not fwd.Problem(1, 1, 1, 64, 1, 1, True, 1.0, False).heavy
