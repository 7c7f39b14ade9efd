"""--help of every command documents every option with its default; `fastlm generate` has the
API's defaults (greedy unless a sampling option is given) and applies prompt templates."""

import argparse
import json
import shutil

import pytest
import torch

import fastlm
from fastlm.cli import HelpFormatter, build_parser, main
from fastlm.train.data import TEMPLATES


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_help_has_a_line_and_the_default_for_every_option(command):
    sub = _subparsers()[command]
    formatter = HelpFormatter(prog=sub.prog)
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        shown = formatter._get_help_string(action) % {"default": action.default}
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and not isinstance(action, argparse._StoreFalseAction):
            assert "(default" in shown, f"{command} {action.option_strings}: default not shown"
    if command in ("pretrain", "finetune"):
        assert "min(100,10%of--max-steps)" in "".join(sub.format_help().split())


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["pretrain", "--help"])
    assert stop.value.code == 0 and "(default: 1000)" in capsys.readouterr().out


def _api(model, tokenizer, ids, **options):
    return tokenizer.decode(fastlm.generate(model, torch.tensor([ids]), max_new_tokens=5,
                                            eos_token_id=tokenizer.eos_token_id, **options)[0].tolist())


def test_generate_defaults_to_greedy_like_the_api(tiny_checkpoint, capsys):
    model, tokenizer = fastlm.from_pretrained(tiny_checkpoint), fastlm.load_tokenizer(tiny_checkpoint)
    base = ["generate", "--model", str(tiny_checkpoint), "--prompt", "def ", "--max-new-tokens", "5"]
    assert main(base) == 0
    assert capsys.readouterr().out == _api(model, tokenizer, tokenizer.encode("def ")) + "\n"
    assert main([*base, "--greedy"]) == 0
    assert capsys.readouterr().out == _api(model, tokenizer, tokenizer.encode("def ")) + "\n"
    assert main([*base, "--temperature", "5.0", "--seed", "3"]) == 0  # a sampling option turns sampling on
    sampled = capsys.readouterr().out
    assert sampled.startswith("def ")
    assert main([*base, "--do-sample", "--temperature", "5.0", "--seed", "3"]) == 0
    assert capsys.readouterr().out == sampled


def test_generate_applies_the_template(tiny_checkpoint, tmp_path, capsys):
    model, tokenizer = fastlm.from_pretrained(tiny_checkpoint), fastlm.load_tokenizer(tiny_checkpoint)
    text = TEMPLATES["alpaca"][0].format(prompt="add two numbers")
    ids = tokenizer.encode(text, add_bos=tokenizer.bos_token_id is not None)
    expected = tokenizer.decode(fastlm.generate(model, torch.tensor([ids]), max_new_tokens=5,
                                                eos_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist())
    base = ["generate", "--prompt", "add two numbers", "--max-new-tokens", "5"]
    assert main([*base, "--model", str(tiny_checkpoint), "--template", "alpaca"]) == 0
    assert capsys.readouterr().out == expected + "\n"  # the completion only
    chat = shutil.copytree(tiny_checkpoint, tmp_path / "sft")
    (chat / "prompt_template.json").write_text(json.dumps({"template": "alpaca"}))  # as fastlm finetune writes
    assert main([*base, "--model", str(chat), "--chat"]) == 0
    assert capsys.readouterr().out == expected + "\n"
