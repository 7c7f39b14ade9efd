"""A synthetic preference task with a known oracle, for the alignment tests and demos.

The task is small enough for a byte-level tokenizer and a tiny fastlm model:

- a **prompt** is ``"Q<k>:"`` with ``k`` in ``0..99`` (e.g. ``"Q17:"``);
- a **fluent completion** is exactly 8 ASCII digits followed by ``"\\n"`` (e.g. ``"20481736\\n"``);
- the **oracle reward** of a completion is the fraction of its 8 digits that are even
  (``0, 1/8, ..., 1``), and 0 for a completion that is not fluent.

The prompt carries no information about the answer: an SFT model trained on uniform random
digits (:func:`sft_rows`) scores 0.5 on average, and alignment (reward model + DPO/PPO/GRPO)
should push it towards all-even digits while keeping the format. Rankings and pairs are drawn
from the oracle with label noise, so a learned reward model has something to denoise.

Every generator is deterministic in its ``seed`` (a private :class:`random.Random`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

__all__ = [
    "COMPLETION_DIGITS",
    "oracle_reward",
    "oracle_rewards",
    "is_fluent",
    "prompts",
    "random_completion",
    "sft_rows",
    "ranking_rows",
    "pair_rows",
    "summarize",
]

#: Number of digits in a fluent completion.
COMPLETION_DIGITS = 8
_FLUENT = re.compile(r"[0-9]{%d}\n" % COMPLETION_DIGITS)
_EVEN = "02468"
_ODD = "13579"


def is_fluent(completion: str) -> bool:
    """True when ``completion`` is exactly 8 ASCII digits then ``"\\n"`` (nothing before or after)."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    return _FLUENT.fullmatch(completion) is not None


def oracle_reward(completion: str) -> float:
    """Fraction of even digits among the 8 digits of a fluent completion; 0.0 when not fluent.

    ``oracle_reward("02461357\\n") == 0.5``; ``oracle_reward("0246\\n") == 0.0``.
    """
    if not is_fluent(completion):
        return 0.0
    return sum(ch in _EVEN for ch in completion[:COMPLETION_DIGITS]) / COMPLETION_DIGITS


def oracle_rewards(completions: Sequence[str]) -> list[float]:
    """:func:`oracle_reward` of each completion."""
    return [oracle_reward(c) for c in completions]


def summarize(completions: Sequence[str]) -> dict:
    """``{"mean_reward", "fluency", "n"}``: mean oracle reward and fraction of fluent completions."""
    n = len(completions)
    if n == 0:
        raise ValueError("summarize needs at least one completion, got none")
    return {"mean_reward": sum(oracle_rewards(completions)) / n,
            "fluency": sum(is_fluent(c) for c in completions) / n, "n": n}


def _check_count(name: str, value: int, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_prob(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _prompt(rng: random.Random) -> str:
    return f"Q{rng.randrange(100)}:"


def prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts ``"Q<k>:"`` with ``k`` uniform in ``0..99``."""
    _check_count("n", n)
    rng = random.Random(seed)
    return [_prompt(rng) for _ in range(n)]


def random_completion(rng: random.Random, p_even: float = 0.5) -> str:
    """A fluent completion whose digits are each even with probability ``p_even`` (each digit
    uniform within its parity class)."""
    _check_prob("p_even", p_even)
    digits = [rng.choice(_EVEN if rng.random() < p_even else _ODD) for _ in range(COMPLETION_DIGITS)]
    return "".join(digits) + "\n"


def _malformed_completion(rng: random.Random) -> str:
    """A completion that is not fluent: too short, too long, or with a letter in it."""
    kind = rng.randrange(3)
    digits = "".join(rng.choice("0123456789") for _ in range(COMPLETION_DIGITS))
    if kind == 0:
        return digits[: rng.randrange(1, COMPLETION_DIGITS)] + "\n"
    if kind == 1:
        return digits + rng.choice("0123456789") * rng.randrange(1, 4) + "\n"
    i = rng.randrange(COMPLETION_DIGITS)
    return digits[:i] + rng.choice("abcxyz") + digits[i + 1:] + "\n"


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` SFT rows ``{"prompt", "completion"}``: fluent completions of uniform random digits
    (mean oracle reward 0.5), the format fastlm's ``finetune`` reads."""
    _check_count("n", n)
    rng = random.Random(seed)
    return [{"prompt": _prompt(rng), "completion": random_completion(rng, 0.5)} for _ in range(n)]


def _noisy_scores(rng: random.Random, completions: list[str], noise: float) -> list[float]:
    """Oracle rewards, each replaced with probability ``noise`` by a random reward (a multiple of
    1/8, so ties stay possible): the label noise of the rankings and pairs."""
    return [rng.randrange(COMPLETION_DIGITS + 1) / COMPLETION_DIGITS if rng.random() < noise else oracle_reward(c)
            for c in completions]


def _competition_ranks(scores: list[float]) -> list[int]:
    """Rank 1 = highest score; equal scores share the lowest rank of their group ("1224")."""
    return [1 + sum(t > s for t in scores) for s in scores]


def _completions(rng: random.Random, k: int, malformed: float) -> list[str]:
    # Each completion draws its own even-digit probability, so rewards spread over 0..1.
    return [_malformed_completion(rng) if rng.random() < malformed else random_completion(rng, rng.random())
            for _ in range(k)]


def ranking_rows(n: int, k: int = 4, noise: float = 0.1, seed: int = 0, *, malformed: float = 0.0) -> list[dict]:
    """``n`` ranking rows ``{"prompt", "completions", "ranking"}`` with ``k`` completions each.

    ``ranking[i]`` is the rank of ``completions[i]`` (1 = most preferred) by the oracle reward,
    where each completion's reward is replaced with probability ``noise`` by a random one (label
    noise); equal rewards tie (standard competition ranking, ``[1, 2, 2, 4]``). Each
    completion is malformed (not fluent, oracle reward 0) with probability ``malformed``.
    """
    _check_count("n", n)
    _check_count("k", k, 2)
    _check_prob("noise", noise)
    _check_prob("malformed", malformed)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = _prompt(rng)
        completions = _completions(rng, k, malformed)
        rows.append({"prompt": prompt, "completions": completions,
                     "ranking": _competition_ranks(_noisy_scores(rng, completions, noise))})
    return rows


def pair_rows(n: int, noise: float = 0.1, seed: int = 0, *, malformed: float = 0.0) -> list[dict]:
    """``n`` rows in TRL's preference form ``{"prompt", "chosen", "rejected"}``.

    Two completions per prompt with different oracle rewards; ``chosen`` is the one with the
    higher reward, swapped with probability ``noise`` (label noise).
    """
    _check_count("n", n)
    _check_prob("noise", noise)
    _check_prob("malformed", malformed)
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        prompt = _prompt(rng)
        a, b = _completions(rng, 2, malformed)
        ra, rb = oracle_reward(a), oracle_reward(b)
        if ra == rb:
            continue
        chosen, rejected = (a, b) if ra > rb else (b, a)
        if rng.random() < noise:
            chosen, rejected = rejected, chosen
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows
