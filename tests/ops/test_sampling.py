"""fastlm.ops.sample (temperature, top-k, top-p, min-p) on every backend.

- reference (CPU): many draws against the filtered distribution for each filter and their
  combinations (cosine >= 0.99, chi-square, every kept token of probability >= 1% drawn, a
  filtered token never drawn), per-row parameters, ties, greedy, log-probabilities, bad inputs,
  deferred checks, opcheck.
- triton (interpreter on CPU, small shapes): the same tokens as the reference for the same
  uniforms (random parameters, ties, masks, several blocks), stratified draws against the
  filtered distribution, and a compile of the kernel for sm_90 (no GPU needed).
- cuda kernel (csrc/sampling_kernels.cuh) compiled as host C++ on the CPU emulation of
  tests/ops/cuda_emulation: the same tokens as the reference.
- GPU (``@pytest.mark.gpu``): the triton and cuda backends on a CUDA device, statistically
  and against the reference, bfloat16/float16 logits, a 128k vocabulary, and no host sync with
  deferred checks.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastlm import ops
from fastlm.ops import sampling as R
from fastlm.ops.backend import kernel_module
from fastlm.ops.sampling import DeferredChecks

REPO = Path(__file__).resolve().parents[2]
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"


# --- helpers ---------------------------------------------------------------------------------


def _row_params(batch, vocab, temperature=1.0, top_k=None, top_p=None, min_p=None, device="cpu"):
    def full(v, dtype, default):
        v = default if v is None else v
        if isinstance(v, torch.Tensor):
            return v.to(device=device, dtype=dtype)
        return torch.full((batch,), v, dtype=dtype, device=device)

    return (full(temperature, torch.float32, 1.0), full(top_k, torch.int64, vocab),
            full(top_p, torch.float32, 1.0), full(min_p, torch.float32, 0.0))


def _op(backend, logits, uniform, *params):
    return torch.ops.fastlm.sample(logits, uniform, *params, backend)


def _stratified(n, device="cpu"):
    """u_i = (i + 1/2) / n: the draws of an inverse CDF then hit every token n·p ± 1 times."""
    return (torch.arange(n, dtype=torch.float64, device=device) + 0.5) / n


def _chi_square_p_value(counts, probs):
    """P-value of Pearson's chi-square over the tokens of positive probability, those expected
    fewer than 5 times pooled into one cell (Wilson–Hilferty approximation of the tail)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    small = (probs > 0) & ~big
    observed = torch.cat([counts[big], counts[small].sum()[None]])
    expected = torch.cat([expected[big], expected[small].sum()[None]])
    cells = expected > 0
    observed, expected = observed[cells], expected[cells]
    dof = int(cells.sum()) - 1
    if dof < 1:
        return 1.0
    stat = ((observed - expected) ** 2 / expected).sum().item()
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _check_distribution(tokens, probs, *, chi_square=True):
    """Draws of one row's distribution ``probs`` (V,): the issue's four statistical checks."""
    probs = probs.double().cpu()
    counts = torch.bincount(tokens.cpu(), minlength=probs.shape[0]).double()
    freq = counts / counts.sum()
    assert (counts[probs == 0] == 0).all(), f"filtered tokens drawn: {(counts * (probs == 0)).nonzero().flatten()}"
    assert (counts[probs >= 0.01] > 0).all(), "a kept token of probability >= 1% was never drawn"
    assert torch.nn.functional.cosine_similarity(freq, probs, dim=0) >= 0.99
    if chi_square:
        assert _chi_square_p_value(counts, probs) > 1e-4


def _logits(vocab=40, seed=0, masked=(3,)):
    torch.manual_seed(seed)
    logits = torch.randn(1, vocab) * 1.5
    for i in masked:
        logits[0, i] = float("-inf")
    return logits


FILTERS = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.0, top_k=7),
    dict(temperature=1.0, top_p=0.7),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=1.2, top_k=12, top_p=0.8),
    dict(temperature=0.9, top_p=0.9, min_p=0.05),
    dict(temperature=1.5, top_k=10, top_p=0.85, min_p=0.15),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_p=0.01),
]
FILTER_IDS = ["-".join(f"{k}{v}" for k, v in f.items()) for f in FILTERS]


# --- the reference: the filtered distribution and its draws ----------------------------------


@pytest.mark.parametrize("kwargs", FILTERS, ids=FILTER_IDS)
def test_reference_draws_follow_the_filtered_distribution(kwargs):
    logits = _logits()
    probs = R.filtered_probs(logits, **kwargs)[0]
    n = 20000
    tokens = ops.sample(logits.expand(n, -1), generator=torch.Generator().manual_seed(0), **kwargs)
    _check_distribution(tokens, probs)


def test_bench_sort_baseline_samples_the_same_distribution():
    """bench/bench_sampling.py's PyTorch baseline is a faithful top-k/top-p sampler (no ties here)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench.bench_sampling import torch_sort_sample

    logits = _logits()
    tokens = torch_sort_sample(logits.expand(20000, -1), 0.8, 7, 0.8, torch.Generator().manual_seed(0))
    _check_distribution(tokens, R.filtered_probs(logits, temperature=0.8, top_k=7, top_p=0.8)[0])


def test_filtered_probs_formulas():
    p0 = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = torch.log(p0)[None]
    # min-p keeps p >= m·max p: 0.4·0.3 = 0.12 keeps 0.4, 0.3, 0.15
    torch.testing.assert_close(R.filtered_probs(logits, min_p=0.3)[0], torch.tensor([0, 0.4, 0, 0.3, 0.15]) / 0.85)
    # top-p then min-p: top-p keeps 0.4, 0.3, 0.15 (0.7 < 0.8); min-p 0.5 then drops 0.15
    torch.testing.assert_close(R.filtered_probs(logits, top_p=0.8, min_p=0.5)[0], torch.tensor([0, 0.4, 0, 0.3, 0]) / 0.7)
    # top-k, then top-p on the renormalized distribution: 0.4/0.85 < 0.5 <= 0.7/0.85
    torch.testing.assert_close(R.filtered_probs(logits, top_k=3, top_p=0.5)[0], torch.tensor([0, 0.4, 0, 0.3, 0]) / 0.7)
    # temperature: p ∝ p0^(1/T); temperature 0 is one-hot at the maximum
    torch.testing.assert_close(R.filtered_probs(logits, temperature=0.5)[0], p0**2 / (p0**2).sum())
    assert torch.equal(R.filtered_probs(logits, temperature=0.0)[0], torch.tensor([0.0, 1, 0, 0, 0]))


def test_top_k_ties_keep_exactly_k_lowest_indices_first():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, 2.0, -1.0, 2.0]])
    probs = R.filtered_probs(logits, top_k=3)[0]
    assert (probs > 0).nonzero().flatten().tolist() == [1, 3, 4]  # five tie at 2.0: the lowest indices
    probs = R.filtered_probs(logits, top_k=6)[0]  # all five ties and the next value
    assert (probs > 0).nonzero().flatten().tolist() == [1, 2, 3, 4, 5, 7]
    tokens = ops.sample(logits.expand(3000, -1), top_k=3, generator=torch.Generator().manual_seed(1))
    assert set(tokens.tolist()) == {1, 3, 4}


def test_top_p_ties_keep_the_lowest_indices_first():
    # Four tokens of probability 0.2 tie after 0.2: top-p 0.5 needs 3 tokens -> 0, then ties 1, 2.
    logits = torch.log(torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2]]))
    assert (R.filtered_probs(logits, top_p=0.5)[0] > 0).nonzero().flatten().tolist() == [0, 1, 2]


def test_greedy_is_the_first_argmax_with_logprob_zero():
    logits = torch.randn(6, 50)
    logits[2, 7] = logits[2, 30] = logits[2].max() + 1  # a tie at the maximum: the first index
    tokens, logprobs = ops.sample(logits, temperature=0.0, return_logprobs=True)
    assert torch.equal(tokens, logits.argmax(-1)) and tokens[2] == 7
    assert torch.equal(logprobs, torch.zeros(6))
    assert torch.equal(ops.sample(logits, top_k=1), logits.argmax(-1))


def test_logprobs_are_those_of_the_filtered_distribution():
    logits = torch.randn(8, 30) * 2
    kwargs = dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.02)
    tokens, logprobs = ops.sample(logits, generator=torch.Generator().manual_seed(0), return_logprobs=True, **kwargs)
    probs = R.filtered_probs(logits, **kwargs)
    torch.testing.assert_close(logprobs, probs.gather(-1, tokens[:, None]).squeeze(-1).log())


def test_per_row_parameters():
    settings = [dict(temperature=0.0), dict(temperature=1.0, top_k=5), dict(temperature=0.7, top_p=0.8),
                dict(temperature=1.3, min_p=0.2), dict(temperature=1.0, top_k=9, top_p=0.9, min_p=0.05)]
    logits = _logits(vocab=30)
    n = 6000
    per_row = {"temperature": [], "top_k": [], "top_p": [], "min_p": []}
    for s in settings:
        for name, default in (("temperature", 1.0), ("top_k", 30), ("top_p", 1.0), ("min_p", 0.0)):
            per_row[name] += [s.get(name, default)] * n
    tensors = {name: torch.tensor(v) for name, v in per_row.items()}
    tokens = ops.sample(logits.expand(n * len(settings), -1), generator=torch.Generator().manual_seed(0), **tensors)
    for i, s in enumerate(settings):
        _check_distribution(tokens[i * n:(i + 1) * n], R.filtered_probs(logits, **s)[0])


def test_same_seed_same_tokens():
    logits = torch.randn(16, 100)
    a = ops.sample(logits, generator=torch.Generator().manual_seed(3), top_p=0.9, min_p=0.01)
    b = ops.sample(logits, generator=torch.Generator().manual_seed(3), top_p=0.9, min_p=0.01)
    c = ops.sample(logits, generator=torch.Generator().manual_seed(4), top_p=0.9, min_p=0.01)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.dtype == torch.int64


def test_opcheck_reference():
    logits = torch.randn(3, 11)
    logits[1, 4] = float("-inf")
    params = _row_params(3, 11, torch.tensor([0.8, 0.0, 1.2]), torch.tensor([5, 11, 2]),
                         torch.tensor([0.9, 1.0, 0.5]), torch.tensor([0.0, 0.1, 0.05]))
    torch.library.opcheck(torch.ops.fastlm.sample.default, (logits, torch.rand(3, dtype=torch.float64), *params, "reference"))


# --- bad inputs and deferred checks ----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-0.1), "temperature must be a number >= 0"),
        (dict(temperature=float("inf")), "temperature must be a number >= 0 and finite"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(top_k=True), "top_k must be an integer >= 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
        (dict(min_p=-0.01), r"min_p must be in \[0, 1\]"),
        (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
        (dict(temperature=torch.tensor([1.0, -1.0])), r"temperature must be a number >= 0 and finite \(row 1\)"),
        (dict(top_k=torch.tensor([0, 3])), r"top_k must be an integer >= 1 \(row 0\)"),
        (dict(top_p=torch.tensor([1.0, 1.01])), r"top_p must be in \(0, 1\] \(row 1\)"),
        (dict(min_p=torch.tensor([2.0, -1.0])), r"min_p must be in \[0, 1\] \(rows 0, 1\)"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.sample(torch.randn(2, 5), **kwargs)


def test_bad_parameter_tensors():
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"top_k must be a scalar or a \(2,\) tensor"):
        ops.sample(logits, top_k=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="top_k must be an integer tensor"):
        ops.sample(logits, top_k=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="top_p must be a floating-point tensor"):
        ops.sample(logits, top_p=torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="check must be True, False or a DeferredChecks"):
        ops.sample(logits, check="later")


def test_bad_logits_raise_at_once():
    logits = torch.randn(3, 5)
    logits[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN .*\(row 1\)"):
        ops.sample(logits)
    logits[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"\+inf"):
        ops.sample(logits)
    logits[1] = float("-inf")
    with pytest.raises(ValueError, match="no finite value"):
        ops.sample(logits)
    with pytest.raises(ValueError, match="non-empty"):
        ops.sample(torch.randn(2, 0))


def test_deferred_checks_raise_once_at_the_end():
    good = torch.randn(4, 9)
    bad = good.clone()
    bad[2, 1] = float("nan")
    checks = DeferredChecks()
    for logits in (good, bad, good):  # a decode loop: no exception, no host sync per call
        tokens = ops.sample(logits, top_k=3, check=checks)
        assert tokens.shape == (4,) and ((tokens >= 0) & (tokens < 9)).all()
    ops.sample(torch.randn(2, 9), check=checks)  # another batch size folds the flags
    with pytest.raises(ValueError, match="NaN"):
        checks.raise_if_any()
    clean = DeferredChecks()
    ops.sample(good, check=clean)
    clean.raise_if_any()
    tokens, logprobs = ops.sample(bad, check=False, return_logprobs=True)  # unchecked: row 2 -> 0, NaN
    assert tokens[2] == 0 and torch.isnan(logprobs[2]) and torch.isfinite(logprobs[[0, 1, 3]]).all()


def test_status_words_name_every_problem():
    logits = torch.zeros(4, 6)
    logits[0, 1] = float("nan")
    logits[1, 2] = float("inf")
    logits[2] = float("-inf")
    params = _row_params(4, 6, torch.tensor([1.0, 1.0, 1.0, -2.0]), torch.tensor([6, 6, 6, 0]),
                         torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 3.0]))
    _, _, status = _op("reference", logits, torch.rand(4, dtype=torch.float64), *params)
    assert status.tolist() == [R.STATUS_NAN, R.STATUS_POS_INF, R.STATUS_NO_FINITE,
                               R.STATUS_BAD_TEMPERATURE | R.STATUS_BAD_TOP_K | R.STATUS_BAD_TOP_P | R.STATUS_BAD_MIN_P]


# --- kernels against the reference -----------------------------------------------------------


def _random_case(batch, vocab, seed, device="cpu"):
    """Logits with ties (every third row quantized), masked tokens, an invalid row of each kind,
    and random per-row parameters including greedy rows and filters turned off."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 2
    logits[::3] = (logits[::3] * 2).round() / 2
    logits[1::5, : vocab // 4] = float("-inf")
    temperature = torch.rand(batch, generator=g) * 2
    temperature[::7] = 0.0
    temperature[3] = 1e-40  # subnormal: sampling that is greedy in effect (1 / T overflows)
    top_k = torch.randint(1, vocab + 10, (batch,), generator=g)
    top_p = torch.rand(batch, generator=g).clamp(min=0.05)
    top_p[::4] = 1.0
    min_p = torch.rand(batch, generator=g) * 0.3
    min_p[::2] = 0.0
    if batch >= 12:
        logits[5, 1], logits[8, 2], logits[11] = float("nan"), float("inf"), float("-inf")
        top_k[9] = 0
    uniform = torch.rand(batch, dtype=torch.float64, generator=g)
    args = (logits, uniform, temperature, top_k, top_p, min_p)
    return tuple(a.to(device) for a in args)


def _assert_matches_reference(out, ref, *, min_agreement=1.0):
    tokens, logprobs, status = (t.cpu() for t in out)
    ref_tokens, ref_logprobs, ref_status = ref
    assert torch.equal(status, ref_status)
    agreement = (tokens == ref_tokens).double().mean().item()
    assert agreement >= min_agreement, f"tokens differ at rows {(tokens != ref_tokens).nonzero().flatten().tolist()}"
    same = (tokens == ref_tokens) & (ref_status == 0)
    torch.testing.assert_close(logprobs[same], ref_logprobs[same], atol=1e-5, rtol=1e-5)
    assert torch.isnan(logprobs[ref_status != 0]).all()


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # T = 1e-40
def test_triton_matches_reference():
    args = _random_case(36, 150, seed=0)
    _assert_matches_reference(_op("triton", *args), R.sample_reference(*args))


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # T = 1e-40
def test_triton_several_blocks_match_reference():
    args = _random_case(8, 300, seed=1)
    out = kernel_module("sampling").sample(*args, block=64)
    _assert_matches_reference(out, R.sample_reference(*args))


def test_triton_stratified_draws_follow_the_filtered_distribution():
    kwargs = FILTERS[7]  # temperature, top-k, top-p and min-p together
    logits = _logits(vocab=24, seed=2)
    n = 100  # stratified: a token of probability >= 1% owns a u-interval holding a draw
    params = _row_params(n, 24, **kwargs)
    tokens, _, _ = _op("triton", logits.expand(n, -1).contiguous(), _stratified(n), *params)
    _check_distribution(tokens, R.filtered_probs(logits, **kwargs)[0], chi_square=False)


def test_triton_public_call_and_opcheck():
    logits = torch.randn(3, 11)
    with ops.use_backend("triton"):
        a = ops.sample(logits, top_k=4, generator=torch.Generator().manual_seed(0))
        b = ops.sample(logits, top_k=4, generator=torch.Generator().manual_seed(0))
        with pytest.raises(ValueError, match="NaN"):
            ops.sample(torch.full((2, 4), float("nan")))
    assert torch.equal(a, b)
    params = _row_params(3, 11, 0.9, 5, 0.8, 0.05)
    torch.library.opcheck(torch.ops.fastlm.sample.default, (logits, torch.rand(3, dtype=torch.float64), *params, "triton"),
                          test_utils=("test_schema", "test_faketensor"))


def test_triton_kernel_compiles_for_sm90():
    """The compiled (not interpreted) path: triton.compile to a cubin for sm_90, without a GPU."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    code = """
import triton
from triton.backends.compiler import GPUTarget
from fastlm.ops.backend import kernel_module
fn = kernel_module("sampling")._sample_kernel
sig = {"LOGITS": "*bf16", "stride_row": "i64", "UNIFORM": "*fp64", "TEMPERATURE": "*fp32", "TOP_K": "*i64",
       "TOP_P": "*fp32", "MIN_P": "*fp32", "TOKENS": "*i64", "LOGPROBS": "*fp32", "STATUS": "*i32", "V": "i32",
       "BLOCK": "constexpr", "NUM_PIVOTS": "constexpr", "BLOCKS_POW2": "constexpr", "MAX_ITERS": "constexpr"}
consts = {"BLOCK": 1024, "NUM_PIVOTS": 16, "BLOCKS_POW2": 128, "MAX_ITERS": 11}
k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
assert "cubin" in k.asm and ".local" not in k.asm["ptx"], "spills"
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def cuda_emulator(tmp_path_factory):
    """csrc/sampling_kernels.cuh built as host C++ on the CPU emulation (64 threads per row)."""
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    exe = tmp_path_factory.mktemp("cuda_emulation") / "sampling"
    cmd = [compiler, "-std=c++17", "-O1", "-Wall", "-Wno-unknown-pragmas", "-DFASTLM_SAMPLING_THREADS=64",
           f"-I{EMULATION}", f"-I{REPO / 'csrc'}", str(EMULATION / "sampling_driver.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


def _run_emulated(exe, logits, uniform, temperature, top_k, top_p, min_p):
    batch, vocab = logits.shape
    blob = b"".join(np.ascontiguousarray(a).tobytes() for a in (
        np.array([batch, vocab], np.int64), logits.numpy().astype(np.float32), uniform.numpy().astype(np.float64),
        temperature.numpy().astype(np.float32), top_k.numpy().astype(np.int64), top_p.numpy().astype(np.float32),
        min_p.numpy().astype(np.float32)))
    src, dst = exe.parent / "in.bin", exe.parent / "out.bin"
    src.write_bytes(blob)
    subprocess.run([str(exe), str(src), str(dst)], check=True, timeout=300)
    out = dst.read_bytes()
    tokens = np.frombuffer(out, np.int64, batch)
    logprobs = np.frombuffer(out, np.float32, batch, 8 * batch)
    status = np.frombuffer(out, np.int32, batch, 12 * batch)
    return tuple(torch.from_numpy(a.copy()) for a in (tokens, logprobs, status))


def test_cuda_kernel_on_cpu_emulation_matches_reference(cuda_emulator):
    args = _random_case(30, 700, seed=3)  # 700 logits: two scan tiles of 64 threads x 8
    _assert_matches_reference(_run_emulated(cuda_emulator, *args), R.sample_reference(*args))


# --- on a GPU --------------------------------------------------------------------------------

GPU_BACKENDS = ("triton", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_matches_reference(backend):
    args = _random_case(256, 3000, seed=4, device="cuda")
    # GPU exp2/sum rounding may move a draw across a CDF boundary in rare rows.
    _assert_matches_reference(_op(backend, *args), R.sample_reference(*(a.cpu() for a in args)), min_agreement=0.98)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kwargs", FILTERS, ids=FILTER_IDS)
def test_gpu_draws_follow_the_filtered_distribution(backend, kwargs):
    logits = _logits(vocab=1000, seed=5, masked=(3, 500)) * 2
    probs = R.filtered_probs(logits, **kwargs)[0]
    n = 50000
    with ops.use_backend(backend):
        tokens = ops.sample(logits.cuda().expand(n, -1), generator=torch.Generator("cuda").manual_seed(0), **kwargs)
    _check_distribution(tokens, probs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_logits(backend, dtype):
    args = list(_random_case(64, 5000, seed=6, device="cuda"))
    args[0] = args[0].to(dtype)
    _assert_matches_reference(_op(backend, *args), R.sample_reference(*(a.cpu() for a in args)), min_agreement=0.98)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_large_vocabulary_and_deferred_checks_do_not_sync(backend):
    logits = torch.randn(64, 128256, device="cuda", dtype=torch.bfloat16)
    top50 = logits.float().topk(50, dim=-1).indices
    checks = DeferredChecks()
    generator = torch.Generator("cuda").manual_seed(0)
    with ops.use_backend(backend):
        ops.sample(logits, top_k=50, top_p=0.9, check=checks, generator=generator)  # warm-up (build/compile)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            tokens = ops.sample(logits, temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, check=checks,
                                generator=generator)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert (tokens[:, None] == top50).any(-1).all()
    checks.raise_if_any()
    a = ops.sample(logits, top_p=0.95, generator=torch.Generator("cuda").manual_seed(1))
    b = ops.sample(logits, top_p=0.95, generator=torch.Generator("cuda").manual_seed(1))
    assert torch.equal(a, b)
