"""Training throughput: a fastlm training step vs the same model in transformers (pytest-benchmark).

    python -m bench.run --device cpu --only bench_training   # or: pytest bench/bench_training.py --benchmark-only

One training step = forward, next-token loss, backward, AdamW update (lr 1e-4, ``fused=True``:
the default of fastlm's Trainer and of transformers' Trainer with torch >= 2.8, on CPU and
CUDA), gradients set to None — fp32 on CPU, bf16 autocast over fp32 weights on CUDA. One group
per model (same weights, same batch), one case per implementation:

- ``fastlm``: ``fastlm.Model`` logits (B, T, V) + ``fastlm.ops.cross_entropy``;
- ``fastlm-compiled``: the same through ``torch.compile(model)`` (what ``TrainerConfig(compile=True)``
  does; the first step's compilation is recorded as ``compile_s``, not timed);
- ``fastlm-fused``: the final hidden states (B·T, H) + ``fastlm.ops.fused_linear_cross_entropy``
  with the head weight (V, H), which never builds the (B·T, V) logits (its point: peak memory
  at large vocabularies);
- ``transformers``: ``AutoModelForCausalLM`` loaded from the fastlm model's saved checkpoint
  (identical weights, dropout set to 0 as fastlm has none: GPT-2's config defaults to 0.1),
  logits + ``F.cross_entropy`` in fp32 — the peer of every case.

Shapes: CPU — ``tiny`` (Llama-style) and ``tiny-gpt2`` presets, batch 4 × 64 tokens (quick:
``tiny`` only; one intra-op thread, see below); CUDA — ``gpt2`` (124M) batch 8 × 1024 and ``llama-1b`` batch 2 × 2048 (quick:
``gpt2``).

Work per call: ``tokens`` = batch · seq_len (tokens/s) and ``flops`` = tokens ·
``fastlm.train.trainer.flops_per_token`` (6·N + 12·layers·hidden·seq_len: TFLOP/s); ``mfu`` =
achieved FLOP/s / the GPU's dense bf16 peak, on GPUs whose peak fastlm knows (none on CPU).
Timed in turns as well (bench_decode's scheme): before the cases, every implementation runs one
step per turn, ``TURNS`` turns; ``speedup_in_turns`` = the median over the turns of
(transformers' time / this case's time in the same turn), robust to a shared machine whose speed
drifts between the cases (the table's ``vs_peer`` is the ratio of the cases' medians).
``matmul_ms`` (``fastlm`` and ``transformers``): the step's own matmul calls (``aten.mm``,
``addmm``, ``bmm``; forward and backward), each timed alone on operands of the same layouts
(fastest of 5 back-to-back runs, summed: ``bench.common.matmul_floor_ms``): no step making
those calls is faster, and the peer's time over it bounds the speed-up any work outside the
matmuls could bring (``matmul_calls``: how many).
Correctness first: before any step, the fastlm loss, the fused loss and transformers' loss on
the batch agree (fp32: |Δ| ≤ 1e-4·loss; recorded as ``loss_diff`` on every device).

CPU runs use one intra-op thread (``torch.set_num_threads(1)``, every implementation alike): on
the shared 2-core machine two threads per process made a step 3–10× slower and erratic.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time

import pytest
import torch

import fastlm
from bench.bench_decode import in_turns
from bench.common import matmul_floor_ms
from bench.conftest import DEVICE, QUICK, OneAtATime
from fastlm import ops
from fastlm.train.trainer import flops_per_token, peak_flops

if DEVICE == "cpu":  # one intra-op thread: on the shared 2-core machine two threads per process made
    torch.set_num_threads(1)  # a step 3-10x slower and erratic (spinning workers); every impl runs alike
if DEVICE == "cuda":  # (preset, batch, seq_len)
    SHAPES = [("gpt2", 8, 1024), ("llama-1b", 2, 2048)]
else:
    SHAPES = [("tiny", 4, 64), ("tiny-gpt2", 4, 64)]
SHAPES = SHAPES[:1] if QUICK else SHAPES
IMPLS = ("fastlm", "fastlm-compiled", "fastlm-fused", "transformers")
PEER = "transformers"
TURNS = 3 if QUICK else 7
DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout", "dropout")
LOSSES = {"fastlm": "logits + cross_entropy", "fastlm-compiled": "compiled logits + cross_entropy",
          "fastlm-fused": "fused linear + cross_entropy",
          "transformers": "logits + F.cross_entropy"}


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if DEVICE == "cuda" else contextlib.nullcontext()


class Group:
    """One model and batch: the fastlm model, its transformers copy (same weights), the losses."""

    def __init__(self, preset: str, batch: int, seq_len: int):
        import transformers

        torch.manual_seed(0)
        self.model = fastlm.Model(fastlm.preset(preset)).to(DEVICE).train()
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp)
            config = transformers.AutoConfig.from_pretrained(tmp)
            for name in DROPOUTS:  # fastlm trains without dropout; GPT-2's config defaults to 0.1
                if hasattr(config, name):
                    setattr(config, name, 0.0)
            self.hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, config=config).to(DEVICE).train()
        ids = torch.randint(0, self.model.config.vocab_size, (batch, seq_len + 1), device=DEVICE)
        self.inputs, self.targets = ids[:, :-1], ids[:, 1:].flatten()
        tokens = batch * seq_len
        self.flops_per_token = flops_per_token(self.model, seq_len)
        self.info = {"model": preset, "batch": batch, "seq_len": seq_len,
                     "params_m": round(self.model.num_parameters() / 1e6, 1), "tokens": tokens,
                     "flops": self.flops_per_token * tokens}
        self.compiled_model = torch.compile(self.model)
        self.losses = {"fastlm": self._fastlm_loss, "fastlm-compiled": self._compiled_loss,
                       "fastlm-fused": self._fused_loss, "transformers": self._hf_loss}
        with torch.no_grad(), _autocast():
            first = {name: fn().float().item() for name, fn in self.losses.items()}
        self.loss_diff = {name: abs(value - first[PEER]) for name, value in first.items()}
        if DEVICE == "cpu":  # fp32: the same weights give the same loss
            for name, diff in self.loss_diff.items():
                assert diff <= 1e-4 * abs(first[PEER]), f"{name} loss {first[name]} vs transformers {first[PEER]}"
        steps = {impl: self.step_fn(impl) for impl in IMPLS}
        self.compile_s = 0.0
        for impl, step in steps.items():  # warm-up (the compiled one's first step compiles)
            start = time.perf_counter()
            step()
            if impl == "fastlm-compiled":
                self.compile_s = time.perf_counter() - start
        seconds, _ = in_turns(steps, TURNS)
        self.speedup_in_turns = {impl: statistics.median(p / t for p, t in zip(seconds[PEER], seconds[impl]))
                                 for impl in IMPLS}
        # the floor of a step: its own matmul calls alone (only where they are all aten calls:
        # compiled code calls its own, and a custom op's inner calls are not seen)
        self.matmul = {impl: matmul_floor_ms(steps[impl]) for impl in ("fastlm", PEER)}

    def _fastlm_loss(self):
        return ops.cross_entropy(self.model(self.inputs).flatten(0, 1), self.targets)

    def _compiled_loss(self):
        return ops.cross_entropy(self.compiled_model(self.inputs).flatten(0, 1), self.targets)

    def _fused_loss(self):
        hidden = self.model(self.inputs, return_hidden=True).flatten(0, 1)
        return ops.fused_linear_cross_entropy(hidden, self.model.lm_head.weight.to(hidden.dtype), self.targets)

    def _hf_loss(self):
        logits = self.hf(self.inputs).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), self.targets)

    def step_fn(self, impl: str):
        """One training step of ``impl`` with its own AdamW over its model's parameters."""
        params = (self.hf if impl == PEER else self.model).parameters()
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        forward_loss = self.losses[impl]

        def step():
            with _autocast():
                loss = forward_loss()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step


_group = OneAtATime(Group)  # (shape) -> its Group, one in memory at a time


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[p for p, _, _ in SHAPES])
def test_training_step(measure, shape, impl):
    group = _group(shape)
    measure(group.step_fn(impl), group=f"train step {shape[0]} {shape[1]}x{shape[2]}", impl=impl, peer=PEER,
            loss=LOSSES[impl], loss_diff=float(f"{group.loss_diff[impl]:.3g}"),
            speedup_in_turns=round(group.speedup_in_turns[impl], 4), **group.info,
            **({"matmul_ms": round(group.matmul[impl][0], 2), "matmul_calls": group.matmul[impl][1]}
               if impl in group.matmul else {}),
            **({"compile_s": round(group.compile_s, 2)} if impl == "fastlm-compiled" else {}))
    peak = peak_flops(torch.device(DEVICE))
    if peak is not None:
        achieved = group.info["flops"] / measure.benchmark.stats.stats.median
        measure.benchmark.extra_info["mfu"] = round(achieved / peak, 4)
