"""Preference data: rankings and (chosen, rejected) pairs as token batches for the Trainer.

Rows of a jsonl file, one per line, in any of these forms:

- a **ranking**: ``{"prompt": str, "completions": [str, ...], "ranking": [int, ...]}``, where
  ``ranking[i]`` is the rank of ``completions[i]`` (1 = most preferred; ties share a rank, as a
  competition ranking ``[1, 2, 2, 4]`` or a dense one ``[1, 2, 2, 3]``). It gives every
  N-choose-2 pair of completions with different ranks, the preferred one first
  (:func:`ranking_pairs`); tied completions give no pair.
- TRL's **standard** preference form: ``{"prompt": str, "chosen": str, "rejected": str}``.
- TRL's **conversational** form: ``{"prompt": [messages], "chosen": [messages], "rejected":
  [messages]}`` (messages as ``{"role", "content"}``), rendered with the tokenizer's chat
  template; or ``{"chosen": [messages], "rejected": [messages]}`` with the prompt implicit (the
  leading messages the two share). A ranking's prompt and completions may be message lists too.
- an optional ``"margin"`` (number) on a pair row: the reward model's loss margin.

Each (prompt, completion) is encoded as fastlm's SFT examples are (:func:`fastlm.train.data`
``_encode_row``: the template, BOS, the completion and the end-of-sequence token; with the
``"chat"`` template the chat template, learned tokens = assistant turns), at most ``seq_len``
tokens, the completion cut at the end. ``loss_mask`` marks the completion tokens. Assistant turns
inside a conversational prompt count as completion tokens too (they are the same in chosen and
rejected, so they cancel in DPO's sigmoid loss; they do shift IPO/SimPO's per-token averages).

Bad rows — a ranking that is not a valid (ties allowed) ranking of the completions, an empty
completion, a prompt that fills ``seq_len`` (no completion token left), a malformed row — are
reported with ``file:line`` and the reason, and either refused (``on_bad_row="error"``, the
default: ValueError listing them) or skipped with a warning (``"skip"``); :class:`PairReport`
counts what happened, like :class:`fastlm.train.data.EncodeReport` for SFT.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastlm._naming import shown
from fastlm.data import Tokenizer
from fastlm.data.chat import resolve_template
from fastlm.train.data import IGNORE_INDEX, TEMPLATES, _encode_row, global_rows, rank_share

logger = logging.getLogger(__name__)

__all__ = ["BAD_ROW_POLICIES", "PairExample", "PairReport", "PairSource", "PreferenceRow", "encode_completion",
           "encode_pairs", "load_pairs", "parse_preference_row", "ranking_pairs", "read_preference_rows",
           "split_rows"]

#: What to do with a bad row: refuse the file (listing every bad row), or skip the row with a warning.
BAD_ROW_POLICIES = ("error", "skip")


def _ranking_problem(ranking: object, n: int) -> str | None:
    """Why ``ranking`` is not a ranking of ``n`` completions, or None when it is one."""
    if not isinstance(ranking, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking):
        return f"ranking must be a list of integers, got {ranking!r}"
    if len(ranking) != n:
        return f"ranking has {len(ranking)} entries for {n} completions"
    if n and (min(ranking) < 1 or max(ranking) > n):
        return f"ranks must be in 1..{n} (1 = most preferred), got {ranking}"
    ranks = sorted(ranking)
    competition = all(r == 1 + ranks.index(r) for r in ranks)  # "1224": a rank = 1 + number ranked above
    distinct = sorted(set(ranks))
    dense = distinct == list(range(1, len(distinct) + 1))  # "1223"
    if not (competition or dense):
        return (f"ranking {ranking} is not a permutation of 1..{n} nor a ranking with ties (competition "
                "'1 2 2 4' or dense '1 2 2 3')")
    return None


def ranking_pairs(ranking: Sequence[int]) -> list[tuple[int, int]]:
    """All (chosen_index, rejected_index) pairs of a ranking (``ranking[i]`` = rank of item i, 1 =
    best): every i, j with ranking[i] < ranking[j], the preferred first; ties give no pair.
    Ordered by chosen index, then rejected index. Raises ValueError for an invalid ranking.

    >>> ranking_pairs([2, 1, 3])
    [(0, 2), (1, 0), (1, 2)]
    """
    ranking = list(ranking)
    problem = _ranking_problem(ranking, len(ranking))
    if problem is not None:
        raise ValueError(problem)
    n = len(ranking)
    return [(i, j) for i in range(n) for j in range(n) if ranking[i] < ranking[j]]


# ---- rows --------------------------------------------------------------------------------------


@dataclass
class PreferenceRow:
    """One parsed row: a prompt (str or messages), its completions, and the (chosen, rejected)
    index pairs among them, with the row's ``file:line``."""

    where: str
    prompt: str | list[dict]
    completions: list
    pairs: list[tuple[int, int]]
    margin: float | None = None


def _is_messages(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in value)


def _text_problem(value: object, what: str) -> str | None:
    if isinstance(value, str):
        return f"{what} is empty" if not value.strip() else None
    if _is_messages(value):
        if any(not str(m.get("content") or "").strip() for m in value if m.get("role") == "assistant"):
            return f"{what} has an empty assistant message"
        return None
    return f"{what} must be a string or a list of {{\"role\", \"content\"}} messages, got {type(value).__name__}"


def parse_preference_row(row: object, where: str) -> PreferenceRow:
    """A :class:`PreferenceRow` from one decoded jsonl row; ValueError with ``where`` and the reason."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise ValueError(f"{where}: margin must be a number, got {margin!r}")
    if "completions" in row or "ranking" in row:
        completions, ranking, prompt = row.get("completions"), row.get("ranking"), row.get("prompt")
        if not isinstance(completions, list) or len(completions) < 2:
            raise ValueError(f'{where}: "completions" must be a list of at least 2 completions')
        problem = _text_problem(prompt, "prompt") if prompt is not None else 'no "prompt"'
        problem = problem or next((p for i, c in enumerate(completions)
                                   if (p := _text_problem(c, f"completions[{i}]"))), None)
        problem = problem or _ranking_problem(ranking, len(completions))
        if problem:
            raise ValueError(f"{where}: {problem}")
        return PreferenceRow(where, prompt, list(completions), ranking_pairs(ranking), margin)
    if "chosen" in row and "rejected" in row:
        chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
        if prompt is None and _is_messages(chosen) and _is_messages(rejected):  # implicit prompt: shared prefix
            k = 0
            while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
                k += 1
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
            if not prompt:
                raise ValueError(f"{where}: chosen and rejected share no leading messages (an implicit prompt)")
        problem = (_text_problem(prompt, "prompt") if prompt is not None else 'no "prompt"') \
            or _text_problem(chosen, "chosen") or _text_problem(rejected, "rejected")
        if problem is None and isinstance(prompt, str) != isinstance(chosen, str):
            problem = "prompt and completions must be all strings or all message lists"
        if problem:
            raise ValueError(f"{where}: {problem}")
        return PreferenceRow(where, prompt, [chosen, rejected], [(0, 1)], margin)
    raise ValueError(f'{where}: expected {{"prompt", "completions", "ranking"}} or {{"prompt", "chosen", '
                     f'"rejected"}} (keys found: {sorted(row)})')


def read_preference_rows(path: str | Path) -> list[tuple[str, object]]:
    """(``file:line``, decoded JSON) of each non-blank line; a line that is not JSON is kept as an
    error string for :func:`encode_pairs` to report (``ValueError`` object in place of the row)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}" if not path.is_dir() else
                                f"data file {path} is a directory; expected a jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (offset {err.start}); expected jsonl preference rows") from None
    rows: list[tuple[str, object]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            rows.append((where, json.loads(line)))
        except json.JSONDecodeError as err:
            rows.append((where, ValueError(f"{where}: not valid JSON ({err})")))
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


# ---- encoding ----------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[str | list[dict]]:
    """Prompts of a jsonl file: a ``"prompt"`` string per row (a ``"completion"`` is ignored: the
    model writes its own), or ``"messages"`` (a chat, as TRL's conversational prompts; a final
    assistant turn is dropped and regenerated). Used by sequence-level distillation and by the
    RL rollouts. Raises ValueError naming ``file:line``."""
    path = Path(path)
    prompts: list[str | list[dict]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
            continue
        messages = row.get("messages") if isinstance(row, dict) else None
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                               for m in messages)):
            raise ValueError(f'{path}:{number}: expected {{"prompt": str}} or {{"messages": [{{"role": ..., '
                             '"content": ...}, ...]}}')
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise ValueError(f"{path}:{number}: the chat has no turn before its assistant answer")
        prompts.append(messages)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def encode_completion(tokenizer: Tokenizer, prompt, completion, template: str, max_len: int
                      ) -> tuple[list[int], list[int], bool]:
    """(ids, loss_mask, cut) of prompt + completion as SFT encodes them, at most ``max_len`` tokens
    (the end cut off): ``loss_mask[i]`` is 1 on completion tokens. Message lists need the
    ``"chat"`` template."""
    if isinstance(prompt, list) or isinstance(completion, list):
        if template != "chat":
            raise ValueError(f"conversational rows need the chat template (got template {template!r})")
        if isinstance(completion, str):  # a generated answer to a chat prompt: the assistant's turn
            completion = [{"role": "assistant", "content": completion}]
        row = list(prompt) + list(completion)
    else:
        row = (prompt, completion)
    ids, targets, cut = _encode_row(tokenizer, row, 0, template, max_len - 1, "right")
    return ids, [int(t != IGNORE_INDEX) for t in targets], cut


@dataclass
class PairExample:
    """One encoded pair: token ids and completion masks of the chosen and rejected sequences."""

    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]
    margin: float = 0.0
    row: int = 0  # index of the row it came from (held-out splits go by row)


@dataclass
class PairReport:
    """What encoding preference rows did: ``rows`` read, ``pairs`` made, sequences ``truncated``
    (completion end cut to fit), ``bad`` rows (``file:line: reason``) refused or skipped,
    ``no_pair`` rows whose completions all tie."""

    rows: int
    pairs: int
    truncated: int = 0
    bad: list[str] = field(default_factory=list)
    no_pair: int = 0


def encode_pairs(tokenizer: Tokenizer, rows: Sequence[tuple[str, object]], template: str | None, max_len: int, *,
                 on_bad_row: str = "error", source: str = "data") -> tuple[list[PairExample], PairReport]:
    """Encode rows from :func:`read_preference_rows` into pair examples. ``template`` None picks
    ``"chat"`` when the tokenizer has a chat template, else ``"plain"``. Bad rows are refused
    (ValueError listing each, ``on_bad_row="error"``) or skipped with a warning (``"skip"``)."""
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"{shown('on_bad_row')} must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"{shown('seq_len')} must be an integer >= 2, got {max_len!r}")
    template = resolve_template(tokenizer, template, tuple(TEMPLATES))
    examples: list[PairExample] = []
    report = PairReport(rows=len(rows), pairs=0)
    for n, (where, raw) in enumerate(rows):
        try:
            if isinstance(raw, ValueError):
                raise raw
            row = parse_preference_row(raw, where)
            encoded = []
            for i, completion in enumerate(row.completions):
                try:
                    ids, mask, cut = encode_completion(tokenizer, row.prompt, completion, template, max_len)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from None
                if not any(mask[1:]):
                    raise ValueError(f"{where}: the prompt fills {shown('seq_len')} {max_len}: no token of "
                                     f"completion {i} is left")
                encoded.append((ids, mask, cut))
        except ValueError as err:
            report.bad.append(str(err))
            continue
        if not row.pairs:
            report.no_pair += 1
        report.truncated += sum(cut for _, _, cut in encoded)
        for i, j in row.pairs:
            examples.append(PairExample(encoded[i][0], encoded[i][1], encoded[j][0], encoded[j][1],
                                        float(row.margin or 0.0), n))
    report.pairs = len(examples)
    if report.bad:
        listing = "\n  ".join(report.bad[:20]) + (f"\n  ... and {len(report.bad) - 20} more" if len(report.bad) > 20
                                                  else "")
        if on_bad_row == "error":
            raise ValueError(f"{source}: {len(report.bad)} bad row(s) of {len(rows)} (pass {shown('on_bad_row')} "
                             f"skip to leave them out):\n  {listing}")
        logger.warning("%s: skipped %d bad row(s) of %d:\n  %s", source, len(report.bad), len(rows), listing)
    if report.truncated:
        logger.warning("%s: %d sequence(s) cut to %s %d (the end of the completion)", source, report.truncated,
                       shown("seq_len"), max_len)
    if not examples:
        raise ValueError(f"{source}: no preference pair left ({report.rows} rows, {len(report.bad)} bad, "
                         f"{report.no_pair} with all completions tied)")
    return examples, report


def load_pairs(path: str | Path, tokenizer: Tokenizer, *, template: str | None = None, max_len: int = 512,
               on_bad_row: str = "error") -> tuple[list[PairExample], PairReport]:
    """:func:`read_preference_rows` + :func:`encode_pairs` of one jsonl file."""
    return encode_pairs(tokenizer, read_preference_rows(path), template, max_len, on_bad_row=on_bad_row,
                        source=str(path))


def split_rows(examples: Sequence[PairExample], val_fraction: float, seed: int = 0
               ) -> tuple[list[PairExample], list[PairExample]]:
    """(train, held-out) pairs split by source row (all pairs of a ranking on one side), a
    ``val_fraction`` of the rows (at least one when there are 2 rows or more) held out."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"{shown('val_fraction')} must be in (0, 1), got {val_fraction!r}")
    row_ids = sorted({e.row for e in examples})
    if len(row_ids) < 2:
        return list(examples), []
    random.Random(seed).shuffle(row_ids)
    held = set(row_ids[:max(1, round(len(row_ids) * val_fraction))])
    return [e for e in examples if e.row not in held], [e for e in examples if e.row in held]


# ---- batches -----------------------------------------------------------------------------------


@dataclass
class PairSource:
    """Batches of preference pairs for :class:`fastlm.train.Trainer` subclasses (deterministic in
    (micro-batch, rank, world size), as every fastlm batch source). A micro-batch of b pairs::

        input_ids       (2b, W) int64   rows 0..b-1 chosen, b..2b-1 rejected, right-padded with pad_id
        attention_mask  (2b, W) int64   1 on real tokens
        loss_mask       (2b, W) int64   1 on completion tokens
        labels          (b,)    int64   zeros: one target per pair (what the Trainer counts)
        index           (b,)    int64   example index (for cached reference log-probs)
        margin          (b,)    float32
    """

    examples: list[PairExample]
    batch_size: int
    pad_id: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.examples:
            raise ValueError("PairSource: no examples")

    def rows(self, micro_batch: int, rank: int = 0, world_size: int = 1) -> list[int]:
        return rank_share(global_rows(micro_batch, self.batch_size, len(self.examples), self.seed), rank, world_size)

    def batch(self, micro_batch: int, rank: int = 0, world_size: int = 1) -> dict:
        return collate_pairs([self.examples[r] for r in self.rows(micro_batch, rank, world_size)], self.pad_id,
                             self.rows(micro_batch, rank, world_size))


def collate_pairs(examples: Sequence[PairExample], pad_id: int, index: Sequence[int] | None = None) -> dict:
    """The :class:`PairSource` batch of ``examples`` (in order)."""
    seqs = [(e.chosen_ids, e.chosen_mask) for e in examples] + [(e.rejected_ids, e.rejected_mask) for e in examples]
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    attention = torch.zeros((len(seqs), width), dtype=torch.int64)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    for i, (ids, mask) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        loss_mask[i, :len(ids)] = torch.tensor(mask)
    b = len(examples)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask,
            "labels": torch.zeros(b, dtype=torch.int64),
            "index": torch.tensor(list(index) if index is not None else range(b), dtype=torch.int64),
            "margin": torch.tensor([e.margin for e in examples], dtype=torch.float32)}


def check_pair_batch(batch: dict, vocab_size: int, what: str) -> int:
    """The data boundary of the pair trainers: token ids in [0, vocab) and consistent shapes,
    checked on the host; returns the number of pairs (the Trainer's target count)."""
    ids, attention, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    b = batch["labels"].shape[0]
    if ids.dim() != 2 or ids.shape[0] != 2 * b or attention.shape != ids.shape or loss_mask.shape != ids.shape:
        raise ValueError(f"{what}: expected input_ids/attention_mask/loss_mask of shape (2·{b}, T), got "
                         f"{tuple(ids.shape)}, {tuple(attention.shape)}, {tuple(loss_mask.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{what}: input_ids must be in [0, {vocab_size}), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}] (does the tokenizer match the model?)")
    return b


@dataclass
class PreparedPairs:
    tokenizer: Tokenizer
    template: str
    train: PairSource
    val: PairSource | None
    report: PairReport
    out: Path


def prepare_pairs(config, *, data: str, model_dir: str, template: str | None, seq_len: int, val_data: str | None,
                  val_fraction: float, on_bad_row: str, resume: bool, overwrite: bool, settings: dict
                  ) -> PreparedPairs:
    """What the preference recipes (``fastlm reward``, ``fastlm dpo``) do before building their
    model, as :func:`fastlm.train.recipes.prepare_finetune` does for SFT: check the arguments,
    read and encode the pairs (reporting bad rows), hold out ``val_fraction`` of the rows (unless
    ``val_data``), prepare ``config.out`` and record or compare the run's settings."""
    from fastlm.train import distributed, rundir
    from fastlm.train.recipes import _trainer_settings, check_jsonl_run

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"{shown('seq_len')} must be an integer >= 2, got {seq_len!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"{shown('val_fraction')} must be in (0, 1), got {val_fraction!r}")
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"{shown('on_bad_row')} must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
    tokenizer, pad = check_jsonl_run(model_dir, seq_len, data, val_data)
    template = resolve_template(tokenizer, template, tuple(TEMPLATES))
    examples, report = load_pairs(data, tokenizer, template=template, max_len=seq_len, on_bad_row=on_bad_row)
    if val_data is not None:
        train, val = examples, load_pairs(val_data, tokenizer, template=template, max_len=seq_len,
                                          on_bad_row=on_bad_row)[0]
    else:
        train, val = split_rows(examples, val_fraction, seed=config.seed)
    info = distributed.setup(config.device)
    out = rundir.prepare_out(config.out, resume=resume, overwrite=overwrite, is_main=info.is_main)
    distributed.barrier()
    fingerprint = rundir.file_fingerprint(data) + (rundir.file_fingerprint(val_data) if val_data else "")
    settings = dict(settings, data=str(data), data_fingerprint=fingerprint, model=str(model_dir), template=template,
                    seq_len=seq_len, val_data=val_data, val_fraction=val_fraction, on_bad_row=on_bad_row,
                    **_trainer_settings(config))
    rundir.begin_run(out, settings, resume=resume, is_main=info.is_main)
    logger.info("%s: %d rows -> %d pairs (%d train, %d held out), %d bad rows skipped", data, report.rows,
                report.pairs, len(train), len(val), len(report.bad))
    return PreparedPairs(tokenizer, template, PairSource(train, config.batch_size, pad, config.seed),
                         PairSource(val, config.batch_size, pad, config.seed + 1) if val else None, report, out)
