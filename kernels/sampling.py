"""Fused sampling in Triton: temperature, top-k, top-p, min-p and the draw, without sorting.

One program per row of logits x (V,). The semantics are fastlm.ops.sampling_reference's:
tokens are ordered by logit descending, ties by lower index, and every filter keeps a prefix
of that order. A prefix is written (t, c) on the monotone integer key of the logits,

    key(x) = bits(x)            if x >= +0            (int32 view of the float32 bits)
             bits(x) ^ 0x7FFFFFFF  otherwise           so x < y  <=>  key(x) < key(y),

    prefix(t, c) = { i : key_i > t }  ∪  { i : key_i = t and i < c },

so that the c cut keeps the tied tokens of lower index first. Prefixes are nested, and the
intersection of two is the one with the larger (t, −c), lexicographically.

Passes over the row (each one streams the V logits; nothing is sorted or written back):

1. **Statistics**: max, first argmax, min over the finite logits, counts of NaN / +inf /
   finite values, hence the row status (0 = valid; the ``STATUS_*`` bits otherwise).
2. **Top-k** (k < #finite): the largest key t with cnt(key >= t) >= k, by a 16-way search on
   [lo, hi) with the invariant cnt(key >= lo) >= k > cnt(key >= hi): each pass counts the
   elements above 16 pivots lo + j·(hi − lo)/16 and keeps the sub-interval that holds the k-th.
   It stops when cnt(key >= lo) = k exactly (prefix (lo − 1, 0)) or when hi = lo + 1 (t = lo,
   and the cut c is the index of the (k − cnt(key > t))-th tied token: one more pass).
   32-bit keys: at most 9 search passes (the span shrinks 16-fold per pass), usually fewer.
3. **Top-p** (P < 1), over the top-k prefix with w_i = exp2((x_i − max x)·log2(e)/T): the
   same search on masses M(t) = Σ_{kept, key_i >= t} w_i with M(lo) >= P·Z > M(hi), where
   Z = M(lowest) is the total kept mass. It stops when [lo, hi) holds one kept token (prefix
   (lo − 1, 0)) or hi = lo + 1: then n of the tied tokens of weight w_t are kept, the smallest
   n with M(hi) + n·w_t >= P·Z, i.e. those whose mass before them is below P·Z.
4. **Draw**: with the final prefix and min-p (w_i >= m), the kept weights' block sums; the
   target u·W (W = Σ kept w) picks a block by their prefix sums, and an in-block cumulative sum
   picks the token: the first index whose cumulative kept weight exceeds u·W (inverse CDF in
   index order, one uniform per row; never a token of weight 0). log p = (x − max x)/T − ln W.

Greedy rows (T = 0) take the argmax after pass 1; invalid rows return token 0, log p NaN.
Everything is deterministic (fixed reduction order, no atomics). This module imports nothing
of fastlm: the launcher takes and returns torch tensors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

NUM_PIVOTS = 16  # search arity: 4 bits of the 32-bit key per pass
MAX_BLOCK = 1024  # logits per block of a pass
MAX_BLOCKS = 4096  # blocks per row (their sums are held in registers for the draw)
LOG2E = tl.constexpr(1.4426950408889634)
# The smallest normal float32 (2^-126): the temperature clamp. A subnormal constant would be typed
# float64 by Triton <= 3.6 (and the GPU's division flushes subnormal divisors to zero).
FP32_TINY = tl.constexpr(1.1754943508222875e-38)

# Row status bits (the same as fastlm.ops.sampling_reference.STATUS_*).
_NAN = tl.constexpr(1)
_POS_INF = tl.constexpr(2)
_NO_FINITE = tl.constexpr(4)
_BAD_TEMPERATURE = tl.constexpr(8)
_BAD_TOP_K = tl.constexpr(16)
_BAD_TOP_P = tl.constexpr(32)
_BAD_MIN_P = tl.constexpr(64)


@triton.jit
def _order_key(x):
    """int32 key, monotone in the float32 value x (-inf lowest; NaN keys are never used)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _key_value(key):
    """The float32 whose order key is ``key`` (inverse of _order_key)."""
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _nth_tie(row_ptr, V, t, n, BLOCK: tl.constexpr):
    """Index of the n-th (0-based) finite token with key == t in index order (V if none): the
    cut that keeps the n tied tokens of lowest index."""
    NEG_INF: tl.constexpr = float("-inf")
    offs = tl.arange(0, BLOCK)
    seen = tl.zeros([], tl.int32)
    found = tl.full([], V, tl.int32)
    for block in range(0, tl.cdiv(V, BLOCK)):
        idx = block * BLOCK + offs
        x = tl.load(row_ptr + idx, mask=idx < V, other=NEG_INF).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # _order_key, inlined
        tie = ((x > NEG_INF) & (key == t)).to(tl.int32)
        inclusive = seen + tl.cumsum(tie, 0)
        found = tl.minimum(found, tl.min(tl.where((tie > 0) & (inclusive == n + 1), idx, V)))
        seen += tl.sum(tie)
    return found


@triton.jit
def _threshold_search(
    row_ptr, V, x_max, scale, lo, hi, c_lo, t_k, cut_k, goal, active,
    BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr, MAX_ITERS: tl.constexpr, MASS: tl.constexpr,
):
    """16-way search of the threshold key in [lo, hi) over the top-k prefix (t_k, cut_k).

    Counts (MASS=False, top-k): keeps cnt(key >= lo) >= goal > cnt(key >= hi), goal = k; stops
    when cnt(key >= lo) = k or hi = lo + 1. Masses (MASS=True, top-p): keeps M(lo) >= goal·Z >
    M(hi) with Z = M(lo) of the first pass and goal = P; stops when [lo, hi) holds one token or
    hi = lo + 1. Pivot j of a pass is lo + ⌊j·(hi − lo)/NUM_PIVOTS⌋ (pivot 0 = lo); a pass counts
    (and weighs) only the tokens inside [lo, hi), adding those at or above hi from before.
    Returns (lo, hi, c_lo, c_hi, m_hi, target): counts at lo / hi, mass at hi, target = goal·Z.
    """
    NEG_INF: tl.constexpr = float("-inf")
    offs = tl.arange(0, BLOCK)
    j = tl.arange(0, NUM_PIVOTS).to(tl.int64)
    c_hi = tl.zeros([], tl.int64)
    m_hi = tl.zeros([], tl.float32)
    target = goal.to(tl.float32)
    it = 0
    if MASS:
        go = active & (hi - lo > 1) & (c_lo - c_hi > 1)
    else:
        go = active & (hi - lo > 1) & (c_lo != goal)
    while go & (it < MAX_ITERS):
        span = hi - lo
        piv = (lo + (span * j) // NUM_PIVOTS).to(tl.int32)
        lo32 = lo.to(tl.int32)
        hi32 = hi.to(tl.int32)
        cnt = tl.zeros([NUM_PIVOTS], tl.int32)
        mass = tl.zeros([NUM_PIVOTS], tl.float32)
        for block in range(0, tl.cdiv(V, BLOCK)):
            idx = block * BLOCK + offs
            x = tl.load(row_ptr + idx, mask=idx < V, other=NEG_INF).to(tl.float32)
            bits = x.to(tl.int32, bitcast=True)
            key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # _order_key, inlined
            kept = (x > NEG_INF) & ((key > t_k) | ((key == t_k) & (idx < cut_k)))
            inside = kept & (key >= lo32) & (key < hi32)
            if tl.sum(inside.to(tl.int32)) > 0:  # later passes: most blocks hold none
                above = (key[:, None] >= piv[None, :]) & inside[:, None]
                cnt += tl.sum(above.to(tl.int32), axis=0)
                if MASS:
                    w = tl.exp2((x - x_max) * scale)
                    mass += tl.sum(tl.where(above, w[:, None], 0.0), axis=0)
        cnt_ge = cnt.to(tl.int64) + c_hi
        if MASS:
            mass_ge = mass + m_hi
            if it == 0:  # pivot 0 is the lowest kept key: M(lo) = Z
                target = goal * tl.sum(tl.where(j == 0, mass_ge, 0.0))
            n_ge = tl.sum((mass_ge >= target).to(tl.int32))
        else:
            n_ge = tl.sum((cnt_ge >= goal).to(tl.int32))
        # Pivot 0 satisfies the invariant from the previous pass (max: against mass rounding).
        n_ge = tl.maximum(n_ge, 1)
        has_hi = n_ge < NUM_PIVOTS
        # Both end counts in one reduction: c(lo') in the low 32 bits, c(hi') in the high ones.
        ends = tl.sum(tl.where(j == n_ge - 1, cnt_ge, 0) + tl.where(j == n_ge, cnt_ge << 32, 0))
        if MASS:
            m_hi = tl.where(has_hi, tl.sum(tl.where(j == n_ge, mass_ge, 0.0)), m_hi)
        c_lo = ends & 0xFFFFFFFF
        c_hi = tl.where(has_hi, ends >> 32, c_hi)
        hi = tl.where(has_hi, lo + (span * n_ge) // NUM_PIVOTS, hi)
        lo = lo + (span * (n_ge - 1)) // NUM_PIVOTS
        it += 1
        if MASS:
            go = (hi - lo > 1) & (c_lo - c_hi > 1)
        else:
            go = (hi - lo > 1) & (c_lo != goal)
    return lo, hi, c_lo, c_hi, m_hi, target


@triton.jit
def _sample_kernel(
    LOGITS, stride_row, UNIFORM, TEMPERATURE, TOP_K, TOP_P, MIN_P,
    TOKENS, LOGPROBS, STATUS,
    V,
    BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr, BLOCKS_POW2: tl.constexpr, MAX_ITERS: tl.constexpr,
):
    """One row: statistics, top-k search, top-p search, draw (see the module docstring)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_row
    num_blocks = tl.cdiv(V, BLOCK)
    offs = tl.arange(0, BLOCK)
    NEG_INF: tl.constexpr = float("-inf")
    POS_INF: tl.constexpr = float("inf")

    # ---- pass 1: statistics ------------------------------------------------------------------
    x_max = tl.full([], NEG_INF, tl.float32)
    x_min = tl.full([], POS_INF, tl.float32)
    argmax = tl.zeros([], tl.int32)
    counts = tl.zeros([], tl.int64)  # NaN, +inf and finite counts in 21-bit fields
    for block in range(0, num_blocks):
        idx = block * BLOCK + offs
        x = tl.load(row_ptr + idx, mask=idx < V, other=NEG_INF).to(tl.float32)
        finite = (x > NEG_INF) & (x < POS_INF)
        code = tl.where(x != x, 1, 0) + tl.where(x == POS_INF, 1 << 21, 0) + tl.where(finite, 1 << 42, 0)
        counts += tl.sum(code.to(tl.int64))
        block_max, block_arg = tl.max(tl.where(finite, x, NEG_INF), axis=0, return_indices=True,
                                      return_indices_tie_break_left=True)
        argmax = tl.where(block_max > x_max, block * BLOCK + block_arg, argmax)  # the first max wins
        x_max = tl.maximum(x_max, block_max)
        x_min = tl.minimum(x_min, tl.min(tl.where(finite, x, POS_INF)))
    n_nan = counts & 0x1FFFFF
    n_pos_inf = (counts >> 21) & 0x1FFFFF
    n_finite = counts >> 42

    temperature = tl.load(TEMPERATURE + row).to(tl.float32)
    top_k = tl.load(TOP_K + row).to(tl.int64)
    top_p = tl.load(TOP_P + row).to(tl.float32)
    min_p = tl.load(MIN_P + row).to(tl.float32)
    u = tl.load(UNIFORM + row).to(tl.float32)
    status = tl.where(n_nan > 0, _NAN, 0)
    status |= tl.where(n_pos_inf > 0, _POS_INF, 0)
    status |= tl.where(n_finite == 0, _NO_FINITE, 0)
    status |= tl.where((temperature >= 0) & (temperature < POS_INF), 0, _BAD_TEMPERATURE)
    status |= tl.where(top_k >= 1, 0, _BAD_TOP_K)
    status |= tl.where((top_p > 0) & (top_p <= 1), 0, _BAD_TOP_P)
    status |= tl.where((min_p >= 0) & (min_p <= 1), 0, _BAD_MIN_P)
    valid = status == 0
    sampled = valid & (temperature > 0)
    # w = exp2((x - x_max) * scale); the clamp keeps scale finite (0 · scale = 0) for subnormal
    # temperatures, which are greedy in effect.
    scale = LOG2E / tl.maximum(tl.where(sampled, temperature, 1.0), FP32_TINY)
    key_min = _order_key(x_min).to(tl.int64)
    key_max = _order_key(x_max).to(tl.int64)

    # ---- top-k: the largest t with cnt(key >= t) >= k ----------------------------------------
    top_k_on = sampled & (top_k < n_finite)
    all_finite = (key_min - 1).to(tl.int32)  # the prefix (key_min - 1, 0): every finite token
    lo, hi, c_lo, c_hi, m_hi, target = _threshold_search(
        row_ptr, V, x_max, scale, key_min, key_max + 1, n_finite, all_finite, 0, top_k, top_k_on,
        BLOCK, NUM_PIVOTS, MAX_ITERS, False)
    # Prefix (t_k, cut_k): (lo - 1, 0) = {key >= lo} when exact, else the ties at lo are cut.
    t_k = lo - 1
    cut_k = tl.zeros([], tl.int32)
    if top_k_on & (c_lo != top_k):
        t_k = lo
        cut_k = _nth_tie(row_ptr, V, lo.to(tl.int32), (top_k - c_hi).to(tl.int32), BLOCK)
    t_k32 = t_k.to(tl.int32)

    # ---- top-p: the largest t with M(t) >= P·Z, over the top-k prefix ------------------------
    top_p_on = sampled & (top_p < 1)
    kept_k = tl.where(top_k_on, top_k, n_finite)
    lo, hi, c_lo, c_hi, m_hi, target = _threshold_search(
        row_ptr, V, x_max, scale, t_k, key_max + 1, kept_k, t_k32, cut_k, top_p, top_p_on,
        BLOCK, NUM_PIVOTS, MAX_ITERS, True)
    t_p = lo - 1
    cut_p = tl.zeros([], tl.int32)
    if top_p_on & (c_lo - c_hi > 1):  # hi == lo + 1: several tokens tie at key lo
        # Keep the first n ties: the smallest n with M(hi) + n·w_tie >= P·Z.
        n_ties = (c_lo - c_hi).to(tl.float32)
        w_tie = tl.exp2((_key_value(lo.to(tl.int32)) - x_max) * scale)
        need = tl.minimum(tl.math.ceil((target - m_hi) / w_tie), n_ties)  # (inf when w_tie = 0)
        need = tl.maximum(need, 1.0).to(tl.int32)
        if need < c_lo - c_hi:
            t_p = lo
            cut_p = _nth_tie(row_ptr, V, lo.to(tl.int32), need, BLOCK)
    # The kept prefix is the shorter of the two.
    use_p = (t_p > t_k) | ((t_p == t_k) & (cut_p < cut_k))
    t32 = tl.where(use_p, t_p, t_k).to(tl.int32)
    cut = tl.where(use_p, cut_p, cut_k)

    # ---- draw: inverse CDF in index order over the kept weights ------------------------------
    token = tl.where(valid, argmax, 0)
    logprob = tl.where(valid, 0.0, float("nan"))
    if sampled:
        blocks = tl.arange(0, BLOCKS_POW2)
        sums = tl.zeros([BLOCKS_POW2], tl.float32)
        for block in range(0, num_blocks):
            idx = block * BLOCK + offs
            x = tl.load(row_ptr + idx, mask=idx < V, other=NEG_INF).to(tl.float32)
            bits = x.to(tl.int32, bitcast=True)
            key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # _order_key, inlined
            w = tl.exp2((x - x_max) * scale)
            keep = (x > NEG_INF) & ((key > t32) | ((key == t32) & (idx < cut))) & (w >= min_p)
            sums = tl.where(blocks == block, tl.sum(tl.where(keep, w, 0.0)), sums)
        prefix = tl.cumsum(sums, 0)
        total = tl.max(prefix)
        goal = u * total
        chosen = tl.sum(((prefix <= goal) & (blocks < num_blocks)).to(tl.int32))
        if chosen >= num_blocks:  # u·W rounded up to W: the last block of positive weight
            chosen = tl.max(tl.where(sums > 0, blocks, -1))
        before = tl.sum(tl.where(blocks == chosen - 1, prefix, 0.0))
        idx = chosen * BLOCK + offs
        x = tl.load(row_ptr + idx, mask=idx < V, other=NEG_INF).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # _order_key, inlined
        w = tl.exp2((x - x_max) * scale)
        keep = (x > NEG_INF) & ((key > t32) | ((key == t32) & (idx < cut))) & (w >= min_p)
        w = tl.where(keep, w, 0.0)
        cumulative = before + tl.cumsum(w, 0)
        first = tl.min(tl.where((cumulative > goal) & (w > 0), idx, V))
        if first >= V:  # rounding inside the block: its last token of positive weight
            first = tl.max(tl.where(w > 0, idx, -1))
        x_token = tl.sum(tl.where(idx == first, x, 0.0))
        token = first
        logprob = (x_token - x_max) / temperature - tl.log(total)

    tl.store(TOKENS + row, token.to(tl.int64))
    tl.store(LOGPROBS + row, logprob)
    tl.store(STATUS + row, status)


def _config(vocab: int, block: int | None) -> tuple[int, int, int]:
    """(BLOCK, BLOCKS_POW2, num_warps) for a row of ``vocab`` logits."""
    if block is None:
        block = min(MAX_BLOCK, triton.next_power_of_2(vocab))
        while triton.cdiv(vocab, block) > MAX_BLOCKS:
            block *= 2
    num_blocks = triton.cdiv(vocab, block)
    # 1024-logit blocks on 8 warps spilled on sm_80 (44 B at 128 registers); 16 warps do not, on
    # sm_80 or sm_90 (scripts/compile_kernels.py).
    num_warps = 4 if block <= 512 else 16
    return block, triton.next_power_of_2(num_blocks), num_warps


def sample(
    logits: torch.Tensor,
    uniform: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    *,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, V) float (any float dtype; computed in float32), uniform (B,) in [0, 1),
    temperature / top_p / min_p (B,) float, top_k (B,) int -> tokens (B,) int64, logprobs (B,)
    float32, status (B,) int32. ``block`` overrides the logits per block (a power of 2)."""
    batch, vocab = logits.shape
    if vocab >= 2**31 - 1:
        raise ValueError(f"sampling kernel: vocabulary of {vocab} does not fit int32 indices")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    device = logits.device
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=device)
    status = torch.empty(batch, dtype=torch.int32, device=device)
    if batch == 0:
        return tokens, logprobs, status
    block, blocks_pow2, num_warps = _config(vocab, block)
    max_iters = math.ceil(33 / math.log2(NUM_PIVOTS)) + 2
    _sample_kernel[(batch,)](
        logits, logits.stride(0),
        uniform.to(torch.float64).contiguous(),
        temperature.to(torch.float32).contiguous(),
        top_k.to(torch.int64).contiguous(),
        top_p.to(torch.float32).contiguous(),
        min_p.to(torch.float32).contiguous(),
        tokens, logprobs, status,
        vocab,
        BLOCK=block, NUM_PIVOTS=NUM_PIVOTS, BLOCKS_POW2=blocks_pow2, MAX_ITERS=max_iters,
        num_warps=num_warps,
    )
    return tokens, logprobs, status
