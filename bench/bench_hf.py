"""fastlm inside a Hugging Face transformers model: one training step, four ways (pytest-benchmark).

    python -m bench.run --device cpu --only bench_hf   # or: python -m bench.bench_hf [--size S] [--gpu] [--layers N]

One group: the same Llama-shaped ``transformers.LlamaForCausalLM`` (random weights, seed 0), one
case per variant, ``transformers`` the peer of every case:

- ``transformers``: the model as transformers builds it (``attn_implementation="sdpa"``);
- ``attn=fastlm``: only ``model.set_attn_implementation("fastlm")``;
- ``apply(model)``: ``fastlm.integrations.transformers.apply(model)`` (RMSNorm, RoPE, SwiGLU,
  attention and the fused linear cross-entropy that never builds the (N, V) logits);
- ``apply(model, attention=False)``: the same with transformers' SDPA attention kept.

One step = forward with ``labels`` (the loss) + backward, gradients freed after each step;
``tokens`` = batch · seq per step (tokens/s in the report). Before timing, every variant's loss
on the batch agrees with transformers' (fp32: |Δ| ≤ 1e-4·loss; ``loss_diff`` on every device).

Sizes (``BENCH_HF_SIZE``, default ``gpu`` on CUDA, ``cpu`` otherwise; ``BENCH_QUICK=1`` keeps
them, as the old quick run did; ``BENCH_HF_LAYERS`` overrides the layer count):
``cpu`` = 2 layers, hidden 256, 4 / 2 KV heads, MLP 704, vocabulary 32k, 2 × 1024 tokens, fp32
(issue target: ``apply(model)`` ≥ 1.0× the speed and ≤ 0.7× the peak memory of transformers);
``gpu`` = Llama-3-8B-shaped layers (hidden 4096, 32 / 8 KV heads, MLP 14336, vocabulary 128256),
4 of them, bf16 weights, 1 × 4096 tokens; ``tiny`` (tests) = 1 layer, hidden 64, 2 × 32 tokens.

Memory: ``peak_mb`` = the step's peak above what was allocated before it (bench.common.peak_mb:
CUDA ``max_memory_allocated``, CPU the torch profiler's allocation records), ``peak_mem_mb`` =
that + the parameters' bytes (live during the whole step), ``peak_mem_vs_transformers`` = its
ratio to the transformers case.

Timing: on CPU the four models live side by side and also run in turns (every variant once per
turn, ``TURNS`` turns, one intra-op thread for all: two threads per process on the shared 2-core
machine made steps 3–10× slower and erratic): ``speed_in_turns`` = median over the turns of
(transformers' time / this variant's time in the same turn), robust to a machine whose speed
drifts between the cases. On CUDA one model is on the device at a time.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.bench_decode import in_turns
from bench.common import peak_mb
from bench.conftest import DEVICE, QUICK

SIZES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, batch=2, seq=32, dtype=torch.float32),
    "cpu": dict(vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, batch=2, seq=1024, dtype=torch.float32),
    "gpu": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                num_attention_heads=32, num_key_value_heads=8, batch=1, seq=4096, dtype=torch.bfloat16),
}
VARIANTS = ("transformers", "attn=fastlm", "apply(model)", "apply(model, attention=False)")
PEER = "transformers"
TURNS = 3 if QUICK else 5
if DEVICE == "cpu":
    torch.set_num_threads(1)  # see the module docstring (timing)


def size_from_env() -> tuple[str, dict]:
    """The size named by ``BENCH_HF_SIZE`` (default ``gpu`` on CUDA, else ``cpu``), with
    ``BENCH_HF_LAYERS`` decoder layers if set; a bad value raises naming the variable."""
    name = os.environ.get("BENCH_HF_SIZE") or ("gpu" if DEVICE == "cuda" else "cpu")
    if name not in SIZES:
        raise ValueError(f"BENCH_HF_SIZE must be one of {', '.join(sorted(SIZES))}, got {name!r}")
    size = dict(SIZES[name])
    layers = os.environ.get("BENCH_HF_LAYERS")
    if layers is not None:
        if not layers.isdigit() or int(layers) < 1:
            raise ValueError(f"BENCH_HF_LAYERS must be an integer >= 1, got {layers!r}")
        size["num_hidden_layers"] = int(layers)
    return name, size


def build_model(size: dict, variant: str, device: str):
    """The Llama model of ``size`` (seed 0: every variant has the same weights), patched per ``variant``."""
    import transformers as T

    import fastlm.integrations.transformers as fi

    cfg = T.LlamaConfig(
        vocab_size=size["vocab_size"], hidden_size=size["hidden_size"], intermediate_size=size["intermediate_size"],
        num_hidden_layers=size["num_hidden_layers"], num_attention_heads=size["num_attention_heads"],
        num_key_value_heads=size["num_key_value_heads"], max_position_embeddings=max(8192, size["seq"]),
        rope_theta=500000.0, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = T.LlamaForCausalLM(cfg).to(size["dtype"])
    model.train()
    if variant == "attn=fastlm":
        fi.register()
        model.set_attn_implementation("fastlm")
    elif variant == "apply(model)":
        fi.apply(model)
    elif variant == "apply(model, attention=False)":
        fi.apply(model, attention=False)
    elif variant != PEER:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return model


def step_fn(model, ids):
    """forward with ``labels=ids`` + backward, gradients set to None; returns the loss."""
    params = list(model.parameters())

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in params:
            p.grad = None
        return loss

    return step


def first_loss(model, ids) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.float().item()


class Group:
    """The size's batch and models. CPU: all four models, the losses and the turns at once; CUDA:
    one model at a time (:meth:`model` drops the previous one)."""

    def __init__(self):
        self.size_name, self.size = size_from_env()
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, self.size["vocab_size"], (self.size["batch"], self.size["seq"]),
                                 generator=g).to(DEVICE)
        self.info = {"size": self.size_name, "layers": self.size["num_hidden_layers"],
                     "hidden": self.size["hidden_size"], "vocab": self.size["vocab_size"], "tokens": self.ids.numel(),
                     "dtype": str(self.size["dtype"]).removeprefix("torch.")}
        self.models: dict = {}
        self.losses: dict[str, float] = {}
        self.peak_mem_mb: dict[str, float] = {}
        self.speed_in_turns: dict[str, float] = {}
        if DEVICE == "cpu":
            import statistics

            self.models = {v: build_model(self.size, v, DEVICE) for v in VARIANTS}
            self.losses = {v: first_loss(m, self.ids) for v, m in self.models.items()}
            steps = {v: step_fn(m, self.ids) for v, m in self.models.items()}
            for step in steps.values():  # warm-up
                step()
            seconds, _ = in_turns(steps, TURNS)
            self.speed_in_turns = {v: statistics.median(p / t for p, t in zip(seconds[PEER], seconds[v]))
                                   for v in VARIANTS}

    def model(self, variant: str):
        if variant not in self.models:
            self.models.clear()
            gc.collect()
            torch.cuda.empty_cache()
            self.models[variant] = build_model(self.size, variant, DEVICE)
            self.losses[variant] = first_loss(self.models[variant], self.ids)
        return self.models[variant]


_GROUP: list[Group] = []


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(measure, variant):
    if not _GROUP:
        _GROUP.append(Group())
    group = _GROUP[0]
    model = group.model(variant)
    if PEER not in group.losses:
        raise RuntimeError("the transformers case runs first (its loss and peak are the reference)")
    diff = abs(group.losses[variant] - group.losses[PEER])
    if group.size["dtype"] == torch.float32:
        assert diff <= 1e-4 * abs(group.losses[PEER]), f"{variant} loss {group.losses[variant]} vs {group.losses[PEER]}"
    step = step_fn(model, group.ids)
    step()  # warm-up before the memory measure (lazy initialisations are not the step's)
    peak = peak_mb(step, DEVICE)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    group.peak_mem_mb[variant] = weights + peak
    info = dict(group.info, loss_diff=float(f"{diff:.3g}"), peak_mb=round(peak, 2),
                peak_mem_mb=round(weights + peak, 1),
                peak_mem_vs_transformers=round(group.peak_mem_mb[variant] / group.peak_mem_mb[PEER], 4))
    if group.speed_in_turns:
        info["speed_in_turns"] = round(group.speed_in_turns[variant], 4)
    measure(step, group=f"train step {group.size_name} {group.size['batch']}x{group.size['seq']}", impl=variant,
            peer=PEER, memory=False, warmup=0, **info)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.bench_hf``: this module through pytest-benchmark, then its report."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_hf", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="model size (default: gpu on CUDA, cpu otherwise)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the size's)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results/<device>)")
    parser.add_argument("--gpu", action="store_true", help="shorthand for --size gpu (needs CUDA; default: off)")
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    if args.gpu:
        if DEVICE != "cuda":
            parser.error("--gpu needs CUDA, and torch.cuda.is_available() is False")
        args.size = "gpu"
    from bench import report

    out = args.out or Path("bench/results") / DEVICE
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **({"BENCH_HF_SIZE": args.size} if args.size else {}),
               **({"BENCH_HF_LAYERS": str(args.layers)} if args.layers else {}))
    json_path = out / "bench_hf.json"
    code = subprocess.call([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                            "--benchmark-only", f"--benchmark-json={json_path}"], env=env)
    if json_path.is_file():
        for path in report.write(json_path):
            print(f"wrote {path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
