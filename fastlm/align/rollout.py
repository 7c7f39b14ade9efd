"""Rollouts for online RL: sample completions with the policy, score them, and gather the log-probs.

One rollout (:func:`rollout`) of B prompts:

1. **Generate** through :func:`fastlm.generate` — batched, sampling with a ``torch.Generator``
   (reproducible from a seed), the static (or paged) KV cache, optionally the compiled decode
   step (``compile=True``; a LoRA policy has its adapter merged into the base for the rollout and
   unmerged after — exact — since the compiled step runs a plain model), stopping at the stop
   token ids (the tokenizer's eos and any others) or at ``max_new_tokens``. The policy runs with
   its current weights, LoRA active.
2. **Pad** the sequences (prompt + completion, the stop token included) on the right into
   ``input_ids`` (B, T); ``attention_mask`` (B, T) marks tokens; ``target_mask`` (B, T−1) marks
   the next-token targets that are completion tokens (token-level arrays are (B, T−1), aligned
   with ``input_ids[:, 1:]``).
3. **Reward**: a :class:`RewardSource` — a reward model (``RewardModel.score(prompts, completions,
   tokenizer)``) or a Python function ``reward_fn(prompts, completions) -> list[float]`` — scores
   the decoded completion texts (special tokens dropped).
4. **Log-probs**: the policy's (and, for PPO, its values) through :func:`policy_forward` — one
   forward to the final hidden states, then the fused chunked :func:`fastlm.ops.linear_logprobs`
   — and the frozen reference's through :func:`fastlm.align.logprobs.token_logprobs`. With LoRA
   the reference is the same model with its adapters disabled (no second copy of the weights).

The decoded texts and rewards are the one device→host transfer of a rollout (the reward function
needs strings).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fastlm import ops
from fastlm.generate import generate

IGNORE = -100


# ---- rewards -----------------------------------------------------------------------------------


def load_reward_fn(spec: str) -> Callable[[list[str], list[str]], list[float]]:
    """Import ``"package.module:function"`` (a callable ``reward_fn(prompts, completions) -> list[float]``)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"reward function {spec!r}: expected 'module:function' (e.g. "
                         "'fastlm.align.synthetic:oracle_reward_fn')")
    module_name, name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r} ({err})") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: module {module_name!r} has no callable {name!r}")
    return fn


class RewardSource:
    """Scores (prompts, completions) -> float32 (B,) rewards on ``device``, from a reward function
    or a reward model (anything with ``score(prompts, completions, tokenizer)``). The scores are
    checked: one finite number per completion."""

    def __init__(self, *, reward_fn: Callable | None = None, reward_model=None, tokenizer=None) -> None:
        if (reward_fn is None) == (reward_model is None):
            raise ValueError("RewardSource: give exactly one of reward_fn and reward_model")
        if reward_model is not None and tokenizer is None:
            raise ValueError("RewardSource: a reward_model needs the tokenizer")
        self.reward_fn, self.reward_model, self.tokenizer = reward_fn, reward_model, tokenizer

    @property
    def name(self) -> str:
        if self.reward_fn is not None:
            return f"{getattr(self.reward_fn, '__module__', '?')}:{getattr(self.reward_fn, '__name__', '?')}"
        return type(self.reward_model).__name__

    def __call__(self, prompts: list[str], completions: list[str], device: torch.device) -> torch.Tensor:
        if self.reward_fn is not None:
            scores = self.reward_fn(list(prompts), list(completions))
        else:
            with torch.no_grad():
                scores = self.reward_model.score(list(prompts), list(completions), self.tokenizer)
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().float().cpu().flatten().tolist()
        try:
            scores = [float(s) for s in scores]
        except (TypeError, ValueError) as err:
            raise TypeError(f"reward {self.name}: expected a list of floats, got {type(scores).__name__} ({err})") from err
        if len(scores) != len(completions):
            raise ValueError(f"reward {self.name}: returned {len(scores)} scores for {len(completions)} completions")
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise ValueError(f"reward {self.name}: non-finite score {scores[bad[0]]} for completion {bad[0]} "
                             f"({completions[bad[0]]!r})")
        return torch.tensor(scores, dtype=torch.float32, device=device)


# ---- generation -------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    """How rollouts sample: transformers' names. ``stop_token_ids``: ids that end a completion
    besides the tokenizer's eos (kept in the completion, as the eos is)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop_token_ids: tuple[int, ...] = ()
    compile: bool = False
    cache_implementation: str = "static"

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(int(i) for i in self.stop_token_ids)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"GenerationSettings.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"GenerationSettings.temperature must be > 0 (rollouts sample), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"GenerationSettings.top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationSettings.top_p must be in (0, 1] or None, got {self.top_p}")
        if self.cache_implementation not in ("static", "paged"):
            raise ValueError(f"GenerationSettings.cache_implementation must be static or paged, "
                             f"got {self.cache_implementation!r}")


def stop_ids(tokenizer, settings: GenerationSettings) -> list[int]:
    """The tokenizer's eos (when it has one) and the settings' extra stop ids, without repeats."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    return ids + [i for i in settings.stop_token_ids if i not in ids]


def encode_prompts(tokenizer, prompts: Sequence[str | list[dict]], *, max_len: int) -> list[list[int]]:
    """Token ids of each prompt as fastlm's SFT encodes it: a plain prompt as text (bos first when
    the tokenizer has one), a chat (a list of ``{"role", "content"}`` messages, TRL's
    conversational prompt) through the tokenizer's chat template with the generation prompt. A
    prompt longer than ``max_len`` tokens is refused, naming it."""
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, list) and prompt:
            if tokenizer.chat_template is None:
                raise ValueError(f"prompt {i} is a chat (messages) but the tokenizer has no chat template; "
                                 'give {"prompt": "<text>"} rows or a tokenizer with one')
            ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
        elif isinstance(prompt, str) and prompt:
            ids = tokenizer.encode(prompt, add_bos=tokenizer.bos_token_id is not None)
        else:
            raise ValueError(f"prompt {i}: expected a non-empty string or list of messages, got {prompt!r}")
        if len(ids) > max_len:
            raise ValueError(f"prompt {i} ({str(prompt)[:40]!r}...) has {len(ids)} tokens; at most {max_len} fit "
                             "before the completion (the model's context minus max_new_tokens)")
        rows.append(ids)
    return rows


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@contextlib.contextmanager
def _plain_model_for_compile(policy: nn.Module):
    """The plain fastlm.Model to decode with: the policy itself, or for a LoRA policy its base with
    the active adapter merged in for the block (unmerged after)."""
    from fastlm.peft import LoraModel

    if not isinstance(policy, LoraModel):
        yield policy
        return
    policy.merge_adapter()
    try:
        yield policy.model
    finally:
        policy.unmerge_adapter()


@dataclass
class Sequences:
    """Padded prompt + completion rows of one rollout (see the module docstring)."""

    input_ids: torch.Tensor  # (B, T) int64, right-padded with pad_id
    attention_mask: torch.Tensor  # (B, T) int64
    target_mask: torch.Tensor  # (B, T-1) float32: 1 where the target input_ids[:, j+1] is a completion token
    prompt_lens: list[int]
    lengths: list[int]  # prompt + completion tokens per row
    completions: list[str] = field(default_factory=list)


def sample_completions(policy: nn.Module, tokenizer, prompt_ids: list[list[int]], settings: GenerationSettings, *,
                       generator: torch.Generator) -> Sequences:
    """Sample one completion per prompt (repeat prompts for several), pad the batch on the right."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = stop_ids(tokenizer, settings)
    with _eval_mode(policy), contextlib.ExitStack() as stack:
        model = stack.enter_context(_plain_model_for_compile(policy)) if settings.compile else policy
        rows = generate(model, prompt_ids, max_new_tokens=settings.max_new_tokens, do_sample=True,
                        temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                        repetition_penalty=1.0, eos_token_id=stops or None, pad_token_id=pad, generator=generator,
                        cache_implementation=settings.cache_implementation, compile=settings.compile)
    rows = [r.cpu() for r in rows]
    prompt_lens = [len(p) for p in prompt_ids]
    lengths = [len(r) for r in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    cols = torch.arange(width)
    lens, starts = torch.tensor(lengths), torch.tensor(prompt_lens)
    attention = (cols[None] < lens[:, None]).long()
    target = ((cols[None, 1:] >= starts[:, None]) & (cols[None, 1:] < lens[:, None])).float()
    completions = [tokenizer.decode(r[p:].tolist(), skip_special_tokens=True) for r, p in zip(rows, prompt_lens)]
    device = policy.device
    return Sequences(ids.to(device), attention.to(device), target.to(device), prompt_lens, lengths, completions)


# ---- log-probs ----------------------------------------------------------------------------------


def head_weight(model: nn.Module) -> torch.Tensor:
    """The LM head's weight of a fastlm Model (or a PEFT/DDP wrapper of one); refuses heads the
    fused log-prob op cannot apply (LoRA on lm_head, a bias). A final logit soft-cap is applied
    by the op (:func:`head_softcap`)."""
    base = model
    for _ in range(4):
        if hasattr(base, "lm_head") and hasattr(base, "config") and not hasattr(base, "module"):
            break
        base = getattr(base, "module", None) or getattr(base, "model", None) or base
    head = base.lm_head
    if type(head) is not nn.Linear or head.bias is not None:
        raise ValueError(f"RL training scores tokens with the fused linear log-prob op, which needs a plain "
                         f"bias-free lm_head; got {type(head).__name__} (drop lm_head from the LoRA targets)")
    return head.weight


def head_softcap(model: nn.Module) -> float | None:
    """The final logit soft-cap c of a fastlm Model (or a PEFT/DDP wrapper), None without one."""
    base = model
    for _ in range(4):
        if hasattr(base, "config") and hasattr(base.config, "final_softcap"):
            return base.config.final_softcap
        base = getattr(base, "module", None) or getattr(base, "model", None) or base
    return None


def policy_logprobs(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor,
                    *, temperature: float = 1.0, return_entropy: bool = True, softcap: float | None = None):
    """From final hidden states (B, T, H): log π(input_ids[:, j+1] | ...) at logits/temperature,
    (B, T−1) float32, 0 where ``target_mask`` is 0, and the entropy of each of those next-token
    distributions (0 elsewhere) — through the fused chunked ``ops.linear_logprobs`` (no (N, V) logits;
    ``softcap``: the model's final logit soft-cap, see :func:`head_softcap`)."""
    b, t, h = hidden.shape
    targets = torch.where(target_mask.bool(), input_ids[:, 1:], IGNORE).reshape(-1)
    if weight.dtype != hidden.dtype and not torch.is_autocast_enabled(hidden.device.type):
        weight = weight.to(hidden.dtype)
    out = ops.linear_logprobs(hidden[:, :-1].reshape(-1, h), weight, targets, temperature=float(temperature),
                              ignore_index=IGNORE, return_entropy=return_entropy, softcap=softcap,
                              validate=False)  # sampled ids, in range: no host-reading check
    if not return_entropy:
        return out.reshape(b, t - 1)
    logps, entropy = out
    return logps.reshape(b, t - 1), entropy.reshape(b, t - 1) * target_mask


@torch.no_grad()
def reference_logprobs(policy: nn.Module, reference: nn.Module | None, seqs: Sequences, *,
                       temperature: float = 1.0) -> torch.Tensor:
    """log π_ref of the completion tokens (B, T−1), 0 elsewhere: through ``reference`` (a frozen
    copy), or — ``reference`` None — the LoRA ``policy`` with its adapters disabled."""
    from fastlm.align.logprobs import token_logprobs
    from fastlm.peft import LoraModel

    if reference is None:
        if not isinstance(policy, LoraModel):
            raise ValueError("a reference model is needed unless the policy is a LoraModel (whose reference is "
                             "the base with its adapters disabled)")
        context, model = policy.disable_adapter(), policy
    else:
        context, model = contextlib.nullcontext(), reference
    with _eval_mode(model), context:
        lp = token_logprobs(model, seqs.input_ids, attention_mask=seqs.attention_mask, temperature=temperature,
                            validate=False)
    return lp * seqs.target_mask


def rollout_generator(seed: int, rollout_index: int, rank: int, device: torch.device) -> torch.Generator:
    """The sampling generator of one rollout on one process: a pure function of (seed, rollout,
    rank), so a resumed run samples the same completions without saving any RNG state."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + rollout_index) * 4_099 + rank)


class Timer:
    """Wall-clock seconds of a block (synchronizing CUDA first: rollout timing is per rollout, not per token)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
