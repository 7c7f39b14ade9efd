"""Fine-tuning examples from chats: the model's own template, the loss on every assistant turn
only, ChatML control tokens as their real ids, and clear errors for data the template refuses."""

from __future__ import annotations

import json

import pytest
import torch

import fastlm
from fastlm.cli import main
from fastlm.data import ByteTokenizer, load_tokenizer
from fastlm.data.chat import IGNORE_INDEX, encode_chat_example
from fastlm.train.data import encode_example, encode_examples, read_prompt_completions
from tests.data.hf_styles import build

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! 🦊"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
]

# What each template writes after an assistant message's content (the turn's end, learned too).
TURN_END = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>\n"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {style: build(style, tmp_path_factory.mktemp(style)) for style in ("chatml", "llama3", "gemma", "gpt2")}


def _learned_runs(ids, targets):
    """The learned ids as maximal runs of consecutive positions."""
    runs, current = [], []
    for token, target in zip(ids, targets):
        if target != IGNORE_INDEX:
            assert target == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("style", ["chatml", "llama3", "gemma"])
def test_loss_on_every_assistant_turn_only(dirs, style):
    tok = load_tokenizer(dirs[style])
    chat = CHAT[1:] if style == "gemma" else CHAT  # Gemma's template refuses a system message
    ids, targets = encode_chat_example(tok, chat, max_len=10_000)
    assert ids == tok.apply_chat_template(chat)  # the model's own template, as transformers renders it
    runs = _learned_runs(ids, targets)
    answers = [m["content"] for m in chat if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [a + TURN_END[style] for a in answers]
    # The end-of-turn token is learned as its one special id.
    end_id = tok.token_to_id(TURN_END[style].strip())
    assert all(r.count(end_id) == 1 for r in runs)


def test_truncation_keeps_targets_aligned(dirs):
    tok = load_tokenizer(dirs["chatml"])
    full_ids, full_targets = encode_chat_example(tok, CHAT, max_len=10_000)
    ids, targets = encode_chat_example(tok, CHAT, max_len=20)
    assert ids == full_ids[:21] and targets == full_targets[:21]


def test_prompt_completion_rows_use_the_chat_template(dirs, tmp_path):
    tok = load_tokenizer(dirs["chatml"])
    data = tmp_path / "mixed.jsonl"
    data.write_text(json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    rows = read_prompt_completions(data)
    assert rows[0] == ("2+2?", "4") and rows[1] == CHAT
    first, second = encode_examples(tok, rows, None, 512)[0]  # default: the chat template
    assert first == encode_chat_example(tok, [{"role": "user", "content": "2+2?"},
                                              {"role": "assistant", "content": "4"}], 512)
    assert second == encode_chat_example(tok, CHAT, 512)
    # With a plain template, chats are refused; prompt/completion rows keep their old encoding.
    with pytest.raises(ValueError, match='example 1 is a "messages" chat, which needs --template chat'):
        encode_examples(tok, rows, "plain", 512)
    assert encode_examples(tok, rows[:1], "plain", 512)[0] == [encode_example(tok, "2+2?", "4", "plain", 512)]


def test_chatml_template_uses_real_special_token_ids(dirs):
    tok = load_tokenizer(dirs["chatml"])
    ids, targets = encode_example(tok, "hi", "hello", "chatml", 512)
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert ids.count(start) == 2 and ids.count(end) == 2
    assert targets[-1] == end and ids[-2] != end  # the closing <|im_end|> is learned (and is the eos: not doubled)
    # A tokenizer trained here splits special strings (split_special_tokens=True), yet chatml still
    # gets the ids; one without the ChatML tokens is refused instead of training on their text.
    with pytest.raises(ValueError, match="--template chatml writes '<|im_start|>', but this tokenizer has no such token"):
        encode_example(ByteTokenizer(), "hi", "hello", "chatml", 512)


def test_chat_data_errors(dirs, tmp_path):
    gpt2 = load_tokenizer(dirs["gpt2"])
    with pytest.raises(ValueError, match="--template chat needs a tokenizer with a chat template"):
        encode_examples(gpt2, [("a", "b")], "chat", 64)
    chatml = load_tokenizer(dirs["chatml"])
    with pytest.raises(ValueError, match="example 0: .*refused the messages: Each message needs a user or assistant"):
        encode_examples(chatml, [[{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]], "chat", 64)
    with pytest.raises(ValueError, match="needs at least one assistant message"):
        encode_examples(chatml, [[{"role": "user", "content": "x"}]], "chat", 64)
    with pytest.raises(ValueError, match="unknown prompt template 'llama9'"):
        encode_examples(chatml, [("a", "b")], "llama9", 64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"content": "no role"}]}) + "\n")
    with pytest.raises(ValueError, match=r'bad.jsonl:1: messages\[0\] has no "role" string'):
        read_prompt_completions(bad)


def _tiny_checkpoint(directory, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = fastlm.Model(fastlm.ModelConfig(vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2,
                                            max_position_embeddings=256))
    fastlm.save_pretrained(model, directory)
    tok.save(directory)
    return directory


def test_finetune_command_on_chats(dirs, tmp_path):
    model_dir = _tiny_checkpoint(tmp_path / "model", dirs["chatml"])
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(6)))
    out = tmp_path / "ft"
    assert main(["finetune", "--data", str(data), "--model", str(model_dir), "--out", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--seq-len", "96", "--no-progress"]) == 0
    final = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert load_tokenizer(final).chat_template == load_tokenizer(model_dir).chat_template

    plain_dir = _tiny_checkpoint(tmp_path / "plain", dirs["gpt2"])
    with pytest.raises(ValueError, match="--template chat needs a tokenizer with a chat template"):
        main(["finetune", "--data", str(data), "--model", str(plain_dir), "--out", str(tmp_path / "x"),
              "--template", "chat", "--max-steps", "1", "--seq-len", "64", "--no-progress"])
