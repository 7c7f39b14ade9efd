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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastlm.data import Tokenizer
from fastlm.data.chat import check_special_tokens, encode_rows, parse_row

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
        raise FileNotFoundError(f"no such data file: {path}")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
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


def encode_example(tokenizer: Tokenizer, prompt: str, completion: str, template: str, max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example: the templated prompt is context only (labels -100);
    the completion and the end-of-sequence token are learned. Truncated to max_len + 1 tokens."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; available: {', '.join(TEMPLATES)}")
    prompt_format, suffix = TEMPLATES[template]
    if template == "chatml":  # the control tokens as their real ids, never as their text
        check_special_tokens(tokenizer, ("<|im_start|>", "<|im_end|>"), template)
    split = False if template == "chatml" else None
    context = tokenizer.encode(prompt_format.format(prompt=prompt), add_bos=tokenizer.bos_token_id is not None,
                               split_special_tokens=split)
    answer = tokenizer.encode(completion + suffix, add_special_tokens=False, add_eos=tokenizer.eos_token_id is not None,
                              split_special_tokens=split)
    ids = (context + answer)[: max_len + 1]
    targets = ([IGNORE_INDEX] * len(context) + answer)[: max_len + 1]
    return ids, targets


def encode_examples(tokenizer: Tokenizer, rows: Sequence, template: str | None, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, targets) of each row of read_prompt_completions: template None or "chat" renders them with the
    tokenizer's chat template, loss on assistant turns (fastlm.data.chat); the others use encode_example."""
    return encode_rows(tokenizer, rows, template, max_len, plain=encode_example, plain_templates=tuple(TEMPLATES))


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
