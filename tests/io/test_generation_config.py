"""generation_config.json: read and written as transformers does, and generate's defaults taken
from it (eos id lists, sampling settings) when the caller gives none — checked against
transformers' own generate on the same checkpoint directory."""

from __future__ import annotations

import json

import pytest
import torch

import fastlm
from fastlm.io.generation_config import UNSET, GenerationConfig, read_generation_config, resolve_generation_args

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = fastlm.Model(fastlm.ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                            max_position_embeddings=128))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # sharper logits: fewer near-ties between greedy choices
    directory = tmp_path_factory.mktemp("ckpt")
    fastlm.save_pretrained(model, directory)
    return directory


def _greedy_tokens(directory, n=24):
    model = fastlm.from_pretrained(directory)
    return fastlm.generate(model, torch.tensor([[3, 5, 7]]), max_new_tokens=n, eos_token_id=None)[0, 3:].tolist()


def test_round_trip_with_transformers(tmp_path):
    theirs = transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2, 7, 9], pad_token_id=0, do_sample=True,
                                           temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1,
                                           max_new_tokens=50)
    theirs.save_pretrained(tmp_path)
    ours = read_generation_config(tmp_path)
    assert (ours.eos_token_id, ours.temperature, ours.top_p, ours.top_k, ours.do_sample) == ([2, 7, 9], 0.6, 0.9, 20, True)
    assert (ours.repetition_penalty, ours.max_new_tokens, ours.bos_token_id, ours.pad_token_id) == (1.1, 50, 1, 0)
    out = tmp_path / "out"
    out.mkdir()
    from fastlm.io.generation_config import write_generation_config

    write_generation_config(ours, out)
    again = transformers.GenerationConfig.from_pretrained(out)
    assert again.to_diff_dict() == theirs.to_diff_dict()


def test_from_pretrained_attaches_and_save_pretrained_writes(checkpoint, tmp_path):
    assert fastlm.from_pretrained(checkpoint).generation_config is None  # no file: no config
    src = tmp_path / "src"
    fastlm.save_pretrained(fastlm.from_pretrained(checkpoint), src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 5], "temperature": 0.7,
                                                            "custom_key": "kept"}))
    model = fastlm.from_pretrained(src)
    assert model.generation_config.eos_token_id == [4, 5] and model.generation_config.temperature == 0.7
    fastlm.save_pretrained(model, tmp_path / "dst")
    assert json.loads((tmp_path / "dst" / "generation_config.json").read_text()) == \
        {"custom_key": "kept", "eos_token_id": [4, 5], "temperature": 0.7}


def test_eos_list_stops_generation_as_transformers(checkpoint, tmp_path):
    tokens = _greedy_tokens(checkpoint)
    stop = tokens[5]
    first = tokens.index(stop)
    never = next(t for t in range(96) if t not in tokens)
    directory = tmp_path / "eos"
    fastlm.save_pretrained(fastlm.from_pretrained(checkpoint), directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [never, stop], "pad_token_id": 0}))
    ours = fastlm.generate(fastlm.from_pretrained(directory), torch.tensor([[3, 5, 7]]), max_new_tokens=24)
    assert ours[0, 3:].tolist() == tokens[: first + 1]  # the second id of the list stops it too
    # eos_token_id=None passed explicitly means no eos, in transformers too.
    no_eos = fastlm.generate(fastlm.from_pretrained(directory), torch.tensor([[3, 5, 7]]), max_new_tokens=24,
                             eos_token_id=None)
    assert no_eos[0, 3:].tolist() == tokens
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory))
    theirs = hf.generate(torch.tensor([[3, 5, 7]]), max_new_tokens=24)  # reads generation_config.json itself
    assert theirs[0].tolist() == ours[0].tolist()


def test_sampling_defaults_from_the_file(checkpoint, tmp_path):
    directory = tmp_path / "sample"
    fastlm.save_pretrained(fastlm.from_pretrained(checkpoint), directory)
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6,
                                                                  "top_p": 0.9, "repetition_penalty": 1.2}))
    model = fastlm.from_pretrained(directory)
    resolved = resolve_generation_args(model, do_sample=UNSET, temperature=UNSET, top_k=UNSET, top_p=UNSET,
                                       repetition_penalty=UNSET, max_new_tokens=UNSET)
    # transformers' global default top_k=50 applies when the file leaves it unset
    assert resolved == {"do_sample": True, "temperature": 0.6, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.2,
                        "max_new_tokens": 32}
    prompt = torch.tensor([[3, 5, 7]])
    by_default = fastlm.generate(model, prompt, max_new_tokens=12, seed=3)
    explicit = fastlm.generate(model, prompt, max_new_tokens=12, seed=3, do_sample=True, temperature=0.6,
                               top_p=0.9, top_k=50, repetition_penalty=1.2)
    assert torch.equal(by_default, explicit)
    # The caller's values win over the file's.
    greedy = fastlm.generate(model, prompt, max_new_tokens=12, do_sample=False, repetition_penalty=1.0)
    assert torch.equal(greedy, fastlm.generate(fastlm.from_pretrained(checkpoint), prompt, max_new_tokens=12))
    # Without a file, fastlm's defaults: greedy, no top-k filter.
    assert resolve_generation_args(fastlm.from_pretrained(checkpoint), do_sample=UNSET, top_k=UNSET) == \
        {"do_sample": False, "top_k": None}
    # Passed explicitly, None wins over the file as in transformers: no top-k, no top-p filter.
    assert resolve_generation_args(model, top_k=None, top_p=None, temperature=None, do_sample=None) == \
        {"top_k": None, "top_p": None, "temperature": 1.0, "do_sample": False}


@pytest.mark.parametrize("content, match", [
    ('{"temperature": "hot"}', "temperature must be a number >= 0"),
    ('{"eos_token_id": ["a"]}', "eos_token_id must be an id or a list of ids"),
    ('{"top_p": 2}', r"top_p must be a number in \[0, 1\]"),
    ("[1, 2]", "must hold a JSON object"),
    ("{oops", "is not valid JSON"),
])
def test_bad_generation_config(tmp_path, content, match):
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        read_generation_config(tmp_path)
    assert "generation_config.json" in str(err.value)


def test_dataclass_validation():
    with pytest.raises(ValueError, match="GenerationConfig.top_k must be an integer >= 0"):
        GenerationConfig(top_k=-1)
