"""Preference data: ranking_pairs (ties, permutations), the jsonl forms (rankings, TRL standard and
conversational pairs through the chat template), bad rows reported with file:line and refused or
skipped, and PairSource batches."""

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm.align import synthetic as syn
from fastlm.align.data import PairSource, encode_completion, load_pairs, ranking_pairs, split_rows
from fastlm.data import ByteTokenizer, load_tokenizer
from fastlm.train.data import encode_example
from tests.data.hf_styles import build


def test_ranking_pairs_examples():
    assert ranking_pairs([2, 1, 3]) == [(0, 2), (1, 0), (1, 2)]
    assert ranking_pairs([1, 2, 2, 4]) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]  # competition ties
    assert ranking_pairs([1, 2, 2, 3]) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]  # dense ties
    assert ranking_pairs([1, 1]) == []
    for bad in ([2, 3, 4], [1, 3, 3], [0, 1], [1, 2, 5], [1, True], [1.0, 2]):
        with pytest.raises(ValueError, match="rank"):
            ranking_pairs(bad)


@settings(max_examples=40, deadline=None)
@given(st.permutations(list(range(1, 7))))
def test_ranking_pairs_of_a_permutation_are_all_n_choose_2(perm):
    pairs = ranking_pairs(perm)
    assert len(pairs) == 15 and len(set(pairs)) == 15
    assert {frozenset(p) for p in pairs} == {frozenset(p) for p in itertools.combinations(range(6), 2)}
    assert all(perm[c] < perm[r] for c, r in pairs)


def test_encoding_matches_sft_and_masks_the_completion():
    tok = ByteTokenizer()
    ids, mask, cut = encode_completion(tok, "Q7:", "0123\n", "plain", 64)
    sft_ids, sft_targets = encode_example(tok, "Q7:", "0123\n", "plain", 63)
    assert ids == sft_ids and not cut
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("0123\n") + [tok.eos_token_id]
    ids, mask, cut = encode_completion(tok, "Q7:", "0123\n", "plain", 6)
    assert len(ids) == 6 and cut and sum(mask) == 2


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_rankings_and_standard_pairs(tmp_path):
    tok = ByteTokenizer()
    rows = syn.ranking_rows(3, k=3, noise=0.0, seed=0) + syn.pair_rows(2, seed=0) + [
        {"prompt": "Q1:", "chosen": "2\n", "rejected": "1\n", "margin": 0.5},
        {"prompt": "Q2:", "completions": ["1\n", "3\n"], "ranking": [1, 1]}]  # a full tie: no pair
    examples, report = load_pairs(_write(tmp_path / "p.jsonl", rows), tok, template="plain", max_len=32)
    expected = sum(len(ranking_pairs(r["ranking"])) for r in rows[:3]) + 3
    assert report.pairs == len(examples) == expected and report.no_pair == 1 and not report.bad
    last = examples[-1]
    assert last.margin == 0.5
    assert tok.decode([t for t, m in zip(last.chosen_ids, last.chosen_mask) if m]) == "2\n<|eos|>"
    first = rows[0]
    c, r = ranking_pairs(first["ranking"])[0]
    chosen = [t for t, m in zip(examples[0].chosen_ids, examples[0].chosen_mask) if m]
    assert tok.decode(chosen) == first["completions"][c] + "<|eos|>"


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    tok = ByteTokenizer()
    good = {"prompt": "Q1:", "chosen": "2\n", "rejected": "1\n"}
    rows = [good,
            {"prompt": "Q1:", "completions": ["1\n", "2\n", "3\n"], "ranking": [1, 2, 2, 3][:2]},  # line 2
            {"prompt": "Q1:", "chosen": "", "rejected": "1\n"},  # line 3: empty completion
            {"prompt": "Q" * 40, "chosen": "2\n", "rejected": "1\n"},  # line 4: prompt over the context
            "{not json",  # line 5
            {"prompt": "Q1:", "completions": ["1\n", "2\n"], "ranking": [1, 3]},  # line 6
            good]
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as err:
        load_pairs(path, tok, template="plain", max_len=24)
    message = str(err.value)
    assert "5 bad row(s) of 7" in message and "on_bad_row" in message
    for line, reason in ((2, "2 entries for 3 completions"), (3, "chosen is empty"), (4, "fills seq_len 24"),
                         (5, "not valid JSON"), (6, "ranks must be in 1..2")):
        assert f"{path}:{line}: " in message and reason in message, (line, reason)
    examples, report = load_pairs(path, tok, template="plain", max_len=24, on_bad_row="skip")
    assert len(examples) == 2 and report.rows == 7 and len(report.bad) == 5
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        load_pairs(path, tok, max_len=24, on_bad_row="ignore")


def test_conversational_pairs_use_the_chat_template(tmp_path):
    tok = load_tokenizer(build("chatml", tmp_path / "tok"))
    prompt = [{"role": "user", "content": "Pick a number"}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "Two"}],
             "rejected": [{"role": "assistant", "content": "One"}]},
            {"chosen": prompt + [{"role": "assistant", "content": "Two"}],  # implicit prompt
             "rejected": prompt + [{"role": "assistant", "content": "One"}]}]
    examples, report = load_pairs(_write(tmp_path / "c.jsonl", rows), tok, max_len=64)
    assert report.pairs == 2
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "Two"}])
    for e in examples:
        assert e.chosen_ids == full
        assert tok.decode([t for t, m in zip(e.chosen_ids, e.chosen_mask) if m]) == "Two<|im_end|>\n"
    with pytest.raises(ValueError, match="chat template"):
        load_pairs(tmp_path / "c.jsonl", tok, template="plain", max_len=64)


def test_pair_source_batches_and_row_split(tmp_path):
    tok = ByteTokenizer()
    path = _write(tmp_path / "r.jsonl", syn.ranking_rows(10, k=3, noise=0.0, seed=4))
    examples, _ = load_pairs(path, tok, template="plain", max_len=32)
    train, held = split_rows(examples, 0.2, seed=0)
    assert {e.row for e in train}.isdisjoint({e.row for e in held}) and len(train) + len(held) == len(examples)
    source = PairSource(examples, 4, tok.pad_token_id)
    batch = source.batch(1)
    b = batch["labels"].shape[0]
    assert b == 4 and batch["input_ids"].shape[0] == 8
    for i, index in enumerate(batch["index"].tolist()):
        e = examples[index]
        n = len(e.chosen_ids)
        assert batch["input_ids"][i, :n].tolist() == e.chosen_ids
        assert batch["attention_mask"][i].sum() == n and (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert batch["loss_mask"][b + i, :len(e.rejected_ids)].tolist() == e.rejected_mask
    assert torch.equal(source.batch(1)["input_ids"], batch["input_ids"])  # deterministic
    assert torch.equal(source.batch(1, rank=1, world_size=2)["index"], batch["index"][2:])


def test_a_generated_answer_to_a_chat_prompt_is_the_assistant_turn(tmp_path):
    """What RL rollouts score: a chat prompt and a decoded string completion encode as the chat
    with the completion as the assistant's message (not as a list of characters)."""
    tok = load_tokenizer(build("chatml", tmp_path / "tok"))
    prompt = [{"role": "user", "content": "Pick a number"}]
    as_text = encode_completion(tok, prompt, "Two", "chat", 64)
    as_turn = encode_completion(tok, prompt, [{"role": "assistant", "content": "Two"}], "chat", 64)
    assert as_text == as_turn and sum(as_text[1]) > 0
