"""``fastlm chat``: streaming replies through the checkpoint's chat template, keeping the
conversation, on a tiny random model (stdin piped)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

import fastlm
from fastlm.chat import chat_loop
from fastlm.data import load_tokenizer
from tests.data.hf_styles import build


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat_model")
    build("chatml", directory)
    tok = load_tokenizer(directory)
    torch.manual_seed(0)
    model = fastlm.Model(fastlm.ModelConfig(vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2,
                                            max_position_embeddings=512))
    fastlm.save_pretrained(model, directory)
    return directory


def _expected_reply(model, tok, messages, n):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    out = fastlm.generate(model, torch.tensor([ids]), max_new_tokens=n, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def test_chat_loop_keeps_the_conversation(model_dir):
    model, tok = fastlm.from_pretrained(model_dir), load_tokenizer(model_dir)
    out = io.StringIO()
    messages = chat_loop(model, tok, ["Hello\n", "\n", "How are you?\n", "/exit\n", "never read\n"], out,
                         system="Be brief.", max_new_tokens=6)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    first = _expected_reply(model, tok, messages[:2], 6)
    second = _expected_reply(model, tok, messages[:4], 6)  # the second turn sees the first exchange
    assert (messages[2]["content"], messages[4]["content"]) == (first, second)
    assert out.getvalue() == f"{first}\n{second}\n"


def test_reset_and_context_trimming(model_dir):
    model, tok = fastlm.from_pretrained(model_dir), load_tokenizer(model_dir)
    messages = chat_loop(model, tok, ["one\n", "/reset\n", "two\n"], io.StringIO(), max_new_tokens=4)
    assert [m["content"] for m in messages if m["role"] == "user"] == ["two"]
    # A long conversation drops its oldest turns to leave room for the reply.
    long_lines = [("word " * 40) + "\n"] * 8
    messages = chat_loop(model, tok, long_lines, io.StringIO(), system="S", max_new_tokens=4)
    assert messages[0] == {"role": "system", "content": "S"}
    assert len(tok.apply_chat_template(messages[:-1], add_generation_prompt=True)) <= 512 - 4
    assert len(messages) < 1 + 2 * len(long_lines)
    # A single message too long for the context is not sent; the chat goes on.
    out = io.StringIO()
    messages = chat_loop(model, tok, ["word " * 600 + "\n", "short\n"], out, max_new_tokens=4)
    assert out.getvalue().startswith("(not sent: the message is ") and "lower --max-new-tokens" in out.getvalue()
    assert [m["content"] for m in messages if m["role"] == "user"] == ["short"]


def test_chat_needs_a_template(tmp_path):
    build("gpt2", tmp_path)
    tok = load_tokenizer(tmp_path)
    model = fastlm.Model(fastlm.ModelConfig(vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="fastlm chat needs a tokenizer with a chat template"):
        chat_loop(model, tok, ["hi\n"], io.StringIO())


def test_chat_command_with_piped_stdin_and_an_adapter(model_dir, tmp_path):
    model, tok = fastlm.from_pretrained(model_dir), load_tokenizer(model_dir)
    lora = fastlm.peft.get_peft_model(fastlm.from_pretrained(model_dir), fastlm.peft.LoraConfig(r=2, init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for extra, reference in (([], model), (["--adapter", str(tmp_path / "adapter")], lora)):
        run = subprocess.run([sys.executable, "-m", "fastlm", "chat", "--model", str(model_dir), "--max-new-tokens",
                              "5", *extra], input="Hi\nAnd then?\n", capture_output=True, text=True, env=env,
                             timeout=300)
        assert run.returncode == 0, run.stderr
        history = [{"role": "user", "content": "Hi"}]
        first = _expected_reply(reference, tok, history, 5)
        history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
        second = _expected_reply(reference, tok, history, 5)
        assert run.stdout == f"{first}\n{second}\n"
    (model_dir / "generation_config.json").write_text(json.dumps({"temperature": "hot"}))
    try:
        run = subprocess.run([sys.executable, "-m", "fastlm", "chat", "--model", str(model_dir)], input="Hi\n",
                             capture_output=True, text=True, env=env, timeout=300)
    finally:
        (model_dir / "generation_config.json").unlink()
    assert run.returncode == 2 and "generation_config.json: GenerationConfig.temperature" in run.stderr
