"""Training data as deterministic batch sources.

A source maps (micro-batch index, rank, world size) to a batch, with no hidden state: the data
position of a run is just the number of micro-batches consumed, which makes resuming exact and
lets every process of a distributed run take its own share of the same global batch.

Batches are dicts: ``input_ids`` (b, T) int64, ``labels`` (b, T) int64 with -100 where no loss
is taken, and the attention layout keys of :meth:`fastlm.Model.forward` (``key_lens``,
``cu_seqlens`` + ``max_seqlen``, ``causal``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastlm._naming import shown
from fastlm.data import Tokenizer
from fastlm.data.chat import check_special_tokens, encode_chat_example, parse_row, resolve_template

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@functools.lru_cache(maxsize=4)
def epoch_order(num_items: int, epoch: int, seed: int) -> torch.Tensor:
    """The shuffled order of the items in ``epoch``: a permutation seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator)


def global_rows(micro_batch: int, batch_size: int, num_items: int, seed: int) -> list[int]:
    """Item indices of the ``micro_batch``-th global batch of ``batch_size`` items, walking
    through shuffled epochs (an epoch's tail continues into the next epoch)."""
    start = micro_batch * batch_size
    rows = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_items)
        rows.append(int(epoch_order(num_items, epoch, seed)[offset]) if num_items > 1 else 0)
    return rows


def rank_share(rows: list[int], rank: int, world_size: int) -> list[int]:
    """The rows of a global batch that process ``rank`` computes (contiguous, equal shares)."""
    if len(rows) % world_size:
        raise ValueError(f"the global batch of {len(rows)} rows does not split evenly over {world_size} processes")
    share = len(rows) // world_size
    return rows[rank * share : (rank + 1) * share]


@dataclass
class PackedSource:
    """Next-token prediction on a token stream cut into rows of seq_len + 1 tokens (stride seq_len).

    Documents are separated in the stream by ``separator`` (the tokenizer's end-of-sequence
    token). With ``document_masking``, each batch carries cu_seqlens so that no token attends
    across a document boundary (a new document starts after each separator).
    With ``mlm_mask_id``, the objective is masked-LM with bidirectional attention instead:
    15% of the tokens are selected (80% replaced by the mask id, 10% by a random token, 10% kept)
    and the loss is taken on them only.
    """

    tokens: torch.Tensor  # (N,) int64
    seq_len: int
    batch_size: int  # rows per global micro-batch
    seed: int = 0
    separator: int | None = None
    document_masking: bool = False
    mlm_mask_id: int | None = None
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 1:
            raise ValueError(f"PackedSource: expected a 1-D token stream, got shape {tuple(self.tokens.shape)}")
        if self.num_rows < 1:
            raise ValueError(
                f"PackedSource: {self.tokens.numel()} tokens do not fill one sequence of {self.seq_len + 1}; "
                "give more data or a shorter --seq-len"
            )
        if self.document_masking and self.separator is None:
            raise ValueError("PackedSource: document_masking needs the separator token id")
        if self.mlm_mask_id is not None and self.vocab_size is None:
            raise ValueError("PackedSource: masked-LM needs vocab_size (for random replacement tokens)")

    @property
    def num_rows(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def _rows(self, rows: Sequence[int]) -> torch.Tensor:
        index = torch.tensor(rows)[:, None] * self.seq_len + torch.arange(self.seq_len + 1)
        return self.tokens[index]

    def batch(self, micro_batch: int, rank: int = 0, world_size: int = 1) -> dict:
        rows = rank_share(global_rows(micro_batch, self.batch_size, self.num_rows, self.seed), rank, world_size)
        windows = self._rows(rows)
        if self.mlm_mask_id is not None:
            return self._mlm_batch(windows[:, :-1], micro_batch, rank)
        batch = {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}
        if self.document_masking:
            batch.update(document_boundaries(batch["input_ids"], self.separator))
        return batch

    def _mlm_batch(self, inputs: torch.Tensor, micro_batch: int, rank: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 7919 + micro_batch * 131 + rank)
        chosen = torch.rand(inputs.shape, generator=generator) < 0.15
        action = torch.rand(inputs.shape, generator=generator)
        random_tokens = torch.randint(0, self.vocab_size, inputs.shape, generator=generator)
        corrupted = torch.where(chosen & (action < 0.8), torch.full_like(inputs, self.mlm_mask_id), inputs)
        corrupted = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, corrupted)
        labels = torch.where(chosen, inputs, torch.full_like(inputs, IGNORE_INDEX))
        return {"input_ids": corrupted, "labels": labels, "causal": False}


def document_boundaries(input_ids: torch.Tensor, separator: int) -> dict:
    """cu_seqlens over the flattened (b·T) tokens: a document ends after each separator token
    and at each row's end. Returns {"cu_seqlens": int32 (docs + 1,), "max_seqlen": int}."""
    b, t = input_ids.shape
    ends = input_ids == separator
    ends[:, -1] = True
    end_positions = (ends.flatten().nonzero().squeeze(-1) + 1).to(torch.int32)
    cu_seqlens = torch.cat((torch.zeros(1, dtype=torch.int32), end_positions))
    return {"cu_seqlens": cu_seqlens, "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max())}


TEMPLATES = {
    # name: (prompt format, text after the completion); the completion follows the formatted prompt.
    "plain": ("{prompt}", ""),
    "alpaca": ("### Instruction:\n{prompt}\n\n### Response:\n", ""),
    "chatml": ("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
}


def read_prompt_completions(path: str | Path) -> list[tuple[str, str] | list[dict]]:
    """Rows of a jsonl file: (prompt, completion) pairs from "prompt"/"completion" strings, or
    message lists from "messages" (chats, see fastlm.data.chat)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}" if not path.is_dir() else
                                f"data file {path} is a directory; expected a jsonl file")
    pairs = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                         'expected jsonl with {"prompt": ..., "completion": ...} or {"messages": [...]} per line') from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
        pairs.append(parse_row(row, f"{path}:{number}"))
    if not pairs:
        raise ValueError(f"{path} holds no examples")
    return pairs


#: How an example longer than seq_len + 1 tokens is cut: "right" cuts the end of the completion
#: (an example whose prompt fills the length keeps no completion token and is dropped);
#: "left" cuts the start of the prompt (after the BOS token) so that the completion fits.
TRUNCATION_SIDES = ("right", "left")


def encode_example(tokenizer: Tokenizer, prompt: str, completion: str, template: str, max_len: int,
                   truncation: str = "right") -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example: the templated prompt is context only (labels -100);
    the completion and the end-of-sequence token are learned. At most max_len + 1 tokens, cut as
    ``truncation`` says (see :data:`TRUNCATION_SIDES`)."""
    ids, targets, _ = _encode(tokenizer, prompt, completion, template, max_len, truncation)
    return ids, targets


def _encode(tokenizer: Tokenizer, prompt: str, completion: str, template: str, max_len: int,
            truncation: str) -> tuple[list[int], list[int], bool]:
    """:func:`encode_example` and whether the example was cut."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; available: {', '.join(TEMPLATES)}")
    if truncation not in TRUNCATION_SIDES:
        raise ValueError(f"truncation must be one of {TRUNCATION_SIDES}, got {truncation!r}")
    prompt_format, suffix = TEMPLATES[template]
    if template == "chatml":  # the control tokens as their real ids, never as their text
        check_special_tokens(tokenizer, ("<|im_start|>", "<|im_end|>"), template)
    split = False if template == "chatml" else None
    context = tokenizer.encode(prompt_format.format(prompt=prompt), add_bos=tokenizer.bos_token_id is not None,
                               split_special_tokens=split)
    answer = tokenizer.encode(completion + suffix, add_special_tokens=False, add_eos=tokenizer.eos_token_id is not None,
                              split_special_tokens=split)
    room = max_len + 1
    cut = len(context) + len(answer) > room
    if truncation == "left" and cut and context:
        keep = max(1, room - len(answer))  # at least one context token: the first token is never a target
        if tokenizer.bos_token_id is not None and context[0] == tokenizer.bos_token_id and keep > 1:
            context = context[:1] + context[len(context) - keep + 1:]
        else:
            context = context[len(context) - keep:]
    ids = (context + answer)[:room]
    targets = ([IGNORE_INDEX] * len(context) + answer)[:room]
    return ids, targets, cut


@dataclass
class EncodeReport:
    """What encoding a set of examples cut: ``truncated`` were shortened but kept completion
    tokens; ``dropped`` kept none (their prompt fills the length) and were left out."""

    total: int
    truncated: int
    dropped: int


def _encode_row(tokenizer: Tokenizer, row, n: int, template: str, max_len: int,
                truncation: str) -> tuple[list[int], list[int], bool]:
    """(ids, targets, cut) of one row of :func:`read_prompt_completions`: ``"chat"`` renders it with
    the tokenizer's chat template, loss on assistant turns (fastlm.data.chat; pairs become a user and
    an assistant turn; chats are cut at the end); other templates take prompt/completion pairs."""
    if template == "chat":
        if truncation != "right":
            raise ValueError(f"chat examples are cut at the end; {shown('truncation')} {truncation} applies to "
                             "prompt/completion examples with a plain template")
        messages = row if isinstance(row, list) else [{"role": "user", "content": row[0]},
                                                       {"role": "assistant", "content": row[1]}]
        try:
            ids, targets = encode_chat_example(tokenizer, messages, _UNCUT)
        except ValueError as e:
            raise ValueError(f"example {n}: {e}") from e
        return ids[: max_len + 1], targets[: max_len + 1], len(ids) > max_len + 1
    if isinstance(row, list):
        raise ValueError(f'example {n} is a "messages" chat, which needs --template chat (got --template {template})')
    return _encode(tokenizer, row[0], row[1], template, max_len, truncation)


_UNCUT = 1 << 62  # a length no example reaches: encode whole, then cut here (to know whether it was cut)


def encode_examples(tokenizer: Tokenizer, pairs: Sequence, template: str | None, max_len: int, *,
                    truncation: str = "right", source: str = "data",
                    length_name: str | None = None) -> tuple[list[tuple[list[int], list[int]]], EncodeReport]:
    """Encode every row of :func:`read_prompt_completions` (prompt/completion pairs or chats),
    count the truncated and dropped ones, warn about them, and raise ValueError naming ``source``
    when no example keeps a completion token. ``template`` None picks ``"chat"`` when the
    tokenizer has a chat template, else ``"plain"``."""
    template = resolve_template(tokenizer, template, tuple(TEMPLATES))
    if truncation not in TRUNCATION_SIDES:
        raise ValueError(f"truncation must be one of {TRUNCATION_SIDES}, got {truncation!r}")
    length_name = length_name or shown("seq_len")
    examples, truncated, dropped = [], 0, 0
    for n, row in enumerate(pairs):
        ids, targets, cut = _encode_row(tokenizer, row, n, template, max_len, truncation)
        if not any(t != IGNORE_INDEX for t in targets[1:]):
            dropped += 1
            continue
        truncated += cut
        examples.append((ids, targets))
    report = EncodeReport(len(pairs), truncated, dropped)
    if not examples:
        advice = f"raise {length_name}"
        if truncation == "right":
            advice += f" or cut prompts from the left ({shown('truncation')} left)"
        raise ValueError(f"all {len(pairs)} examples of {source} are dropped: with {length_name} {max_len} no "
                         f"completion token is left after the prompt; {advice}")
    if truncated or dropped:
        how = "the start of the prompt cut" if truncation == "left" else "the end of the completion cut"
        logger.warning("%s: %d of %d examples truncated to %s %d (%s), %d dropped (the prompt fills %s %d: no "
                       "completion token left)", source, truncated, len(pairs), length_name, max_len, how, dropped,
                       length_name, max_len)
    return examples, report


@dataclass
class SFTSource:
    """Supervised fine-tuning: right-padded batches of templated prompt/completion examples,
    loss on completion tokens only."""

    examples: list[tuple[list[int], list[int]]]  # (ids, targets) of seq_len + 1 tokens at most
    batch_size: int
    pad_id: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.examples:
            raise ValueError("SFTSource: no examples")
        short = [i for i, (ids, _) in enumerate(self.examples) if len(ids) < 2]
        if short:
            raise ValueError(f"SFTSource: example {short[0]} has fewer than 2 tokens")

    def batch(self, micro_batch: int, rank: int = 0, world_size: int = 1) -> dict:
        rows = rank_share(global_rows(micro_batch, self.batch_size, len(self.examples), self.seed), rank, world_size)
        width = max(len(self.examples[r][0]) for r in rows) - 1
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
        lens = []
        for i, r in enumerate(rows):
            ids, targets = self.examples[r]
            n = len(ids) - 1
            input_ids[i, :n] = torch.tensor(ids[:-1])
            labels[i, :n] = torch.tensor(targets[1:])
            lens.append(n)
        return {"input_ids": input_ids, "labels": labels, "key_lens": torch.tensor(lens)}
