"""Alignment and distillation losses (pytest-benchmark): fastlm's fused losses
(fastlm.ops.linear_preference_loss / linear_logprobs / linear_distillation_loss) vs the unfused
PyTorch path (full (N, V) logits, log_softmax in float32; the peer) and TRL's helpers on those
logits (``selective_log_softmax``, ``entropy_from_logits``, ``GKDTrainer.generalized_jsd_loss``)
where TRL is installed: time and peak memory of one forward + backward (d hidden, d weight).

    python -m bench.run --device cpu --only bench_align_losses   # or: pytest bench/bench_align_losses.py --benchmark-only

One group per (loss, V), one case per implementation (``impl``):
  dpo   sequence log-probs (Σ over a completion mask per sequence of T tokens) of policy
        chosen/rejected halves, DPO sigmoid loss against constant reference log-probs, β = 0.1;
        ``fused``: linear_preference_loss (loss and gradients in the forward, chunked by pairs:
        one pair = 2·T rows per chunk on CPU), ``fused-logprobs``: linear_logprobs (token
        log-probs, the backward recomputes the logits) then the loss in PyTorch
  grpo  token log-probs and entropy: −mean(exp(logp − logp.detach())·A) − 0.01·mean(H)
  kd    distillation: forward-KL at T = 2 (α = 0.5 with the hard-label CE); the teacher has
        H_t = 2·H and is constant; ``trl`` is TRL's GKD loss, the generalized JSD at β = 0.5
        (TRL has no T²·forward-KL + CE mix): a different loss, so it has no ``max_abs_diff``
Hidden (N, H), head weight (V, H), N = B·T tokens (``tokens`` = N per call: the report's tokens/s).

Recorded in ``extra_info`` (bench/conftest.py's ``measure`` fixture): ``peak_mb`` —
bench.common.peak_mb, the memory allocated during one call above what existed before it (inputs
excluded, the gradients it returns included): on CPU the peak of the running sum of the
allocations and frees torch's profiler records (``profile_memory=True``), on CUDA
``torch.cuda.max_memory_allocated``; ``mem_vs_unfused`` = this peak / the unfused case's peak in
the same run (the unfused case runs first in its group); ``max_abs_diff`` — checked before
timing, the largest difference of the loss and both gradients (d hidden, d weight) from the
unfused path's on the same inputs; in float32 (CPU) each must be within ``TOLERANCE`` (1e-4) ×
the unfused value's largest magnitude or the case fails (bfloat16: recorded only). The speed ratio to the unfused path is the report's ``vs_peer``
(the unfused median / this median, bench/report.py).

Sizes: CPU float32, N = 1024, H = 256, V = 32000 and 128256 (fused chunk: 128 rows; TRL rows at
V = 32000 only: its per-row log-softmax at V = 128256 takes minutes on this CPU); quick
(``BENCH_QUICK=1``): N = 256, H = 64, V = 4096, chunk 32. CUDA bfloat16, N = 8192, H = 2048,
V = 32000 and 128256 (quick: V = 4096), the triton backend with its default chunks. The Triton
interpreter is not a speed measurement, so CPU rows run the reference backend (chunked plain
PyTorch). CPU threads: ``BENCH_THREADS`` (bench/conftest.py).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import pytest
import torch

import fastlm
from bench.conftest import DEVICE, QUICK, OneAtATime
from fastlm import ops

GPU = DEVICE == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float32
DTYPE_NAME = str(DTYPE).removeprefix("torch.")
N, H = (8192, 2048) if GPU else (256, 64) if QUICK else (1024, 256)
T = 128  # tokens per sequence (dpo: N / T sequences, half chosen, half rejected)
VOCABS = (4096,) if QUICK else (32000, 128256)
CHUNK = None if GPU else 32 if QUICK else 128
PAIR_CHUNK = None if GPU else 1  # linear_preference_loss: pairs per chunk (CPU: 2·T = 256 rows)
TRL_MAX_VOCAB = 10**9 if GPU else 32000  # on CPU TRL's per-row log-softmax at V = 128k takes minutes
BACKEND = "triton" if GPU else "reference"
LOSSES = ("dpo", "grpo", "kd")
PEER = "unfused"
TOLERANCE = 1e-4  # float32: max |Δ| of loss and gradients vs unfused, relative to the unfused value's max |·|


@functools.cache
def _trl() -> tuple | None:
    """TRL's (selective_log_softmax, entropy_from_logits, generalized_jsd_loss or None), or None."""
    try:
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():  # "trl.experimental is unstable": known; only its GKD loss is used
            warnings.filterwarnings("ignore", message=".*trl.experimental")
            from trl.experimental.gkd import GKDTrainer
        jsd = GKDTrainer.generalized_jsd_loss
    except ImportError:
        jsd = None
    return selective_log_softmax, entropy_from_logits, jsd


def make_inputs(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(DEVICE, DTYPE).requires_grad_()
    weight = (torch.randn(vocab, H, generator=g) / math.sqrt(H)).to(DEVICE, DTYPE).requires_grad_()
    tokens = torch.randint(0, vocab, (N,), generator=g).to(DEVICE)
    mask = torch.zeros(N // T, T, dtype=torch.bool)
    mask[:, T // 4:] = True  # completion = last three quarters of each sequence
    teacher_h = torch.randn(N, 2 * H, generator=g).to(DEVICE, DTYPE)
    teacher_w = (torch.randn(vocab, 2 * H, generator=g) / math.sqrt(2 * H)).to(DEVICE, DTYPE)
    return dict(hidden=hidden, weight=weight, tokens=tokens, mask=mask.to(DEVICE), ref=torch.zeros(N // T // 2,
                device=DEVICE) - 50.0, adv=torch.randn(N, generator=g).to(DEVICE), teacher_h=teacher_h,
                teacher_w=teacher_w)


def _dpo_from_token_logps(logp: torch.Tensor, x: dict) -> torch.Tensor:
    seq = (logp.view(-1, T) * x["mask"]).sum(-1)  # (B,)
    chosen, rejected = seq.view(2, -1)
    margin = 0.1 * ((chosen - x["ref"]) - (rejected - x["ref"]))
    return -torch.nn.functional.logsigmoid(margin).mean()


def _grpo_from(logp: torch.Tensor, ent: torch.Tensor, x: dict) -> torch.Tensor:
    return -(torch.exp(logp - logp.detach()) * x["adv"]).mean() - 0.01 * ent.mean()


def _logits(x: dict) -> torch.Tensor:
    z = x["hidden"] @ x["weight"].T
    return z.float()  # as transformers' Llama does before its loss


def loss_fn(loss: str, path: str, x: dict) -> Callable[[], torch.Tensor]:
    """A closure computing the loss (scalar) by ``path`` in {fused, fused-logprobs, unfused, trl}."""
    tokens = x["tokens"]
    if path == "fused" and loss == "dpo":
        pairs = N // T // 2
        ref = torch.stack((x["ref"], x["ref"]), 1)  # (P, 2) [chosen, rejected]

        def fused_pref():
            with fastlm.use_backend(BACKEND):
                return ops.linear_preference_loss(x["hidden"], x["weight"], tokens.view(-1, T), x["mask"], ref,
                                                  beta=0.1, chunk_size=PAIR_CHUNK, validate=False).loss / pairs
        return fused_pref
    if path in ("fused", "fused-logprobs"):
        def fused():
            with fastlm.use_backend(BACKEND):
                if loss == "kd":
                    return ops.linear_distillation_loss(x["hidden"], x["weight"], x["teacher_h"], x["teacher_w"],
                                                        tokens, temperature=2.0, alpha=0.5, chunk_size=CHUNK)
                out = ops.linear_logprobs(x["hidden"], x["weight"], tokens, return_entropy=loss == "grpo",
                                          chunk_size=CHUNK)
            return _dpo_from_token_logps(out, x) if loss == "dpo" else _grpo_from(*out, x)
        return fused
    if path == "unfused":
        def unfused():
            logp = torch.log_softmax(_logits(x), -1)
            if loss == "kd":
                with torch.no_grad():
                    lt = torch.log_softmax((x["teacher_h"] @ x["teacher_w"].T).float() / 2.0, -1)
                ls = torch.log_softmax(_logits(x) / 2.0, -1)
                kl = (lt.exp() * (lt - ls)).sum(-1)
                ce = -logp.gather(-1, tokens[:, None]).squeeze(-1)
                return (0.5 * 4.0 * kl + 0.5 * ce).mean()
            tok = logp.gather(-1, tokens[:, None]).squeeze(-1)
            if loss == "dpo":
                return _dpo_from_token_logps(tok, x)
            return _grpo_from(tok, -(logp.exp() * logp).sum(-1), x)
        return unfused
    if path != "trl":
        raise ValueError(f"path must be fused, fused-logprobs, unfused or trl, got {path!r}")
    selective, entropy, jsd = _trl()

    def with_trl():
        logits = _logits(x)
        if loss == "kd":
            with torch.no_grad():
                teacher = (x["teacher_h"] @ x["teacher_w"].T).float()
            return jsd(logits[None], teacher[None], beta=0.5, temperature=2.0)
        tok = selective(logits, tokens)
        if loss == "dpo":
            return _dpo_from_token_logps(tok, x)
        return _grpo_from(tok, entropy(logits), x)
    return with_trl


def step(fn: Callable[[], torch.Tensor], x: dict) -> Callable[[], tuple[torch.Tensor, ...]]:
    """One forward + backward: (loss detached, d hidden, d weight) by ``torch.autograd.grad`` (no
    ``.grad`` left behind, so each call allocates its gradients afresh and ``peak_mb`` counts them)."""
    def run():
        loss = fn()
        return (loss.detach(), *torch.autograd.grad(loss, [x["hidden"], x["weight"]]))
    return run


def paths(loss: str) -> list[str]:
    """The implementations of ``loss``, the peer first (its peak is the others' ``mem_vs_unfused`` base)."""
    return [PEER, "fused"] + (["fused-logprobs"] if loss == "dpo" else []) + (["trl"] if _trl() is not None else [])


CASES = [(loss, vocab, path) for vocab in VOCABS for loss in LOSSES for path in paths(loss)
         if not (path == "trl" and (vocab > TRL_MAX_VOCAB or (loss == "kd" and _trl()[2] is None)))]


class Group:
    """One (loss, V): the inputs, each path's step, the unfused loss and gradients (the check's
    oracle, computed once: also the unfused path's warm-up) and the unfused peak once measured."""

    def __init__(self, loss: str, vocab: int):
        self.loss, self.x = loss, make_inputs(vocab)
        self.unfused_peak_mb: float | None = None
        self.want = self.step(PEER)()  # (loss, d hidden, d weight)

    def step(self, path: str) -> Callable[[], tuple[torch.Tensor, ...]]:
        return step(loss_fn(self.loss, path, self.x), self.x)

    def check(self, path: str) -> float:
        """Max |Δ| of ``path``'s loss and gradients from the unfused ones; in float32 each must be
        within TOLERANCE · max |unfused value|."""
        got = self.step(path)()
        diffs = []
        for name, a, b in zip(("loss", "d hidden", "d weight"), got, self.want):
            diff = float((a.float() - b.float()).abs().max())
            scale = float(b.float().abs().max())
            assert math.isfinite(diff), f"{self.loss} {path}: {name} is not finite"
            if DTYPE == torch.float32:
                assert diff <= TOLERANCE * scale, \
                    f"{self.loss} {path}: {name} |Δ| {diff:.3g} from unfused (its max |·| {scale:.3g})"
            diffs.append(diff)
        return max(diffs)


_group = OneAtATime(Group)  # (loss, vocab) -> its Group, one in memory at a time


@pytest.mark.parametrize("loss,vocab,path", CASES, ids=[f"{loss}-V{vocab}-{path}" for loss, vocab, path in CASES])
def test_align_loss(measure, loss, vocab, path):
    group = _group((loss, vocab))
    info = dict(loss=loss, vocab=vocab, n=N, h=H, t=T, tokens=N, dtype=DTYPE_NAME)
    if path.startswith("fused"):
        info["backend"] = BACKEND
        if (loss, path) == ("dpo", "fused"):
            info["pair_chunk"] = PAIR_CHUNK  # pairs per chunk (None: the op's default)
        else:
            info["chunk"] = CHUNK  # rows per chunk (None: the op's default)
    checked = path != PEER and (loss, path) != ("kd", "trl")  # TRL's kd is another loss (JSD)
    if checked:
        info["max_abs_diff"] = float(f"{group.check(path):.3g}")  # also this path's warm-up
    # warm-up: the check's call, or for the peer the Group's oracle call just before
    measure(group.step(path), group=f"{loss} fwd+bwd N{N} H{H} V{vocab} {DTYPE_NAME}", impl=path, peer=PEER,
            warmup=0 if checked or path == PEER else 1, **info)
    peak = measure.benchmark.extra_info.get("peak_mb")
    if path == PEER:
        group.unfused_peak_mb = peak
        measure.benchmark.extra_info["mem_vs_unfused"] = 1.0
    elif peak is not None and group.unfused_peak_mb:
        measure.benchmark.extra_info["mem_vs_unfused"] = round(peak / group.unfused_peak_mb, 4)
