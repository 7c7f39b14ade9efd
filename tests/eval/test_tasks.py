"""Task files (jsonl, YAML, JSON): prompts with few-shot examples and templates, and clear errors
that name the file and the line."""

import json

import pytest

import fastlm
from fastlm.eval import TaskError, evaluate_task, load_task, multiple_choice

from tests.eval.conftest import MC_ROWS, write_jsonl


def test_jsonl_kind_is_inferred(tmp_path):
    mc = load_task(write_jsonl(tmp_path / "mc.jsonl", MC_ROWS))
    assert (mc.kind, mc.metrics, len(mc.examples)) == ("multiple_choice", ("acc", "acc_norm"), 6)
    gen = load_task(write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Q", "references": "A"}]))
    assert gen.kind == "generate" and gen.examples[0].fields["references"] == ["A"]
    ppl = load_task(write_jsonl(tmp_path / "ppl.jsonl", [{"text": "some text"}]))
    assert ppl.kind == "perplexity"


def test_yaml_fewshot_template_prompt(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "France", "references": ["Paris", "paris"]}])
    write_jsonl(tmp_path / "shots.jsonl", [{"prompt": "Italy", "references": "Rome"},
                                           {"prompt": "Spain", "references": "Madrid"}])
    (tmp_path / "t.yaml").write_text(
        'name: caps\ntype: generate\ndata: qa.jsonl\ntemplate: "Capital of {prompt}:"\nfewshot: 2\n'
        'fewshot_data: shots.jsonl\nfewshot_separator: "\\n"\nmetrics: [exact_match, rouge]\n')
    task = load_task(tmp_path / "t.yaml")
    assert task.name == "caps" and task.metrics == ("exact_match", "rouge")
    assert task.prompt(task.examples[0]) == "Capital of Italy: Rome\nCapital of Spain: Madrid\nCapital of France:"
    (tmp_path / "t.json").write_text(json.dumps({"type": "multiple_choice", "examples": MC_ROWS[:2],
                                                 "template": "Q: {context}", "target_delimiter": "\n"}))
    mc = load_task(tmp_path / "t.json")
    assert mc.prompt(mc.examples[0]) == "Q: The capital of France is"


def _error(path, match):
    with pytest.raises(TaskError) as info:
        load_task(path)
    assert str(info.value).startswith(f"{path}:"), str(info.value)
    assert match in str(info.value), str(info.value)
    return str(info.value)


def test_missing_field_names_file_and_line(tmp_path):
    rows = MC_ROWS[:3] + [{"context": "x", "choices": ["a", "b"]}]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    assert _error(path, "missing field 'gold'").startswith(f"{path}:4:")
    path = write_jsonl(tmp_path / "bad_gold.jsonl", MC_ROWS[:1] + [{"context": "x", "choices": ["a"], "gold": 3}])
    assert _error(path, "'gold' must be a choice index").startswith(f"{path}:2:")
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "references": "b"}\n{"prompt": \n')
    assert _error(path, "not valid JSON").startswith(f"{path}:2:")


def test_yaml_errors_name_the_line(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "France", "references": "Paris"}])
    path = tmp_path / "unknown_metric.yaml"
    path.write_text("type: generate\ndata: qa.jsonl\n\nmetrics: [exact_match, meteor]\n")
    assert _error(path, "unknown metric 'meteor'").startswith(f"{path}:4:")
    path = tmp_path / "typo.yaml"
    path.write_text("type: generate\ndata: qa.jsonl\nstops: ['\\n']\n")
    assert _error(path, "unknown task option 'stops'").startswith(f"{path}:3:")
    path = tmp_path / "no_data.yaml"
    path.write_text("type: generate\n")
    _error(path, "missing field 'data'")
    path = tmp_path / "template.yaml"
    path.write_text("type: generate\ndata: qa.jsonl\ntemplate: '{question}'\n")
    message = _error(path, "uses field 'question', which the example at")
    assert message.startswith(f"{path}:3:") and f"{tmp_path / 'qa.jsonl'}:1" in message
    path = tmp_path / "fewshot.yaml"
    path.write_text("type: generate\ndata: qa.jsonl\nfewshot: 3\n")
    assert _error(path, "fewshot=3 but 0 few-shot examples").startswith(f"{path}:3:")
    with pytest.raises(FileNotFoundError, match="task file not found"):
        load_task(tmp_path / "missing.yaml")


def test_evaluate_task_multiple_choice_matches_api(checkpoint, tmp_path):
    model = fastlm.from_pretrained(checkpoint)
    tokenizer = fastlm.load_tokenizer(checkpoint)
    result = evaluate_task(model, tokenizer, load_task(write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)))
    expected, _ = multiple_choice(model, tokenizer, [(r["context"], r["choices"], r["gold"]) for r in MC_ROWS])
    assert result.metrics == expected and result.tokens_scored > 0 and len(result.outputs) == 6


def test_evaluate_task_generate_metrics_equal_reference_packages(checkpoint, tmp_path):
    sacrebleu = pytest.importorskip("sacrebleu")
    model = fastlm.from_pretrained(checkpoint)
    tokenizer = fastlm.load_tokenizer(checkpoint)
    rows = [{"prompt": "The capital of France is", "references": ["Paris", "Paris."]},
            {"prompt": "Naïve café", "references": "owners in Zürich"}]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    (tmp_path / "t.yaml").write_text("type: generate\ndata: qa.jsonl\nmetrics: [bleu, f1]\nmax_new_tokens: 5\n"
                                     "stop: [' the']\n")
    result = evaluate_task(model, tokenizer, load_task(tmp_path / "t.yaml"))
    outputs = [o["output"] for o in result.outputs]
    assert all(" the" not in o for o in outputs)
    assert result.metrics["bleu"] == sacrebleu.corpus_bleu(outputs, [["Paris", "owners in Zürich"],
                                                                     ["Paris.", None]]).score
    assert set(result.metrics) == {"bleu", "chrf", "f1"} and 0 < result.tokens_generated <= 10


def test_chat_without_template_is_a_clear_error(checkpoint, tmp_path):
    model = fastlm.from_pretrained(checkpoint)
    tokenizer = fastlm.load_tokenizer(checkpoint)
    write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Hi", "references": "Hello"}])
    (tmp_path / "t.yaml").write_text("type: generate\ndata: qa.jsonl\nchat: true\n")
    with pytest.raises(ValueError, match="chat"):
        evaluate_task(model, tokenizer, load_task(tmp_path / "t.yaml"))


def test_yaml_without_pyyaml_says_so(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "t.yaml"
    path.write_text("type: generate\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(TaskError, match=r"t.yaml:1: reading a YAML task needs PyYAML .*\.json or \.jsonl"):
        load_task(path)


def test_chat_template_is_applied_when_the_tokenizer_has_one(checkpoint):
    """chat=True renders the prompt through tokenizer.apply_chat_template (transformers' signature)."""
    from fastlm.eval import generate_texts

    model = fastlm.from_pretrained(checkpoint)
    base = fastlm.load_tokenizer(checkpoint)
    seen = []

    class ChatTokenizer:
        bos_token_id, eos_token_id = base.bos_token_id, base.eos_token_id

        def encode(self, text):
            seen.append(text)
            return base.encode(text)

        def decode(self, ids, skip_special_tokens=True):
            return base.decode(ids, skip_special_tokens=skip_special_tokens)

        def apply_chat_template(self, messages, *, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    texts, n = generate_texts(model, ChatTokenizer(), ["Hi"], max_new_tokens=3, chat=True, system="Be brief")
    assert seen[0] == "<system>Be brief<user>Hi<assistant>" and n == 3 and len(texts) == 1


def test_perplexity_task_from_text_files(checkpoint, tmp_path):
    """`data` naming a folder of text files: one document per file, scored as perplexity() scores them."""
    from fastlm.eval import perplexity

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The capital of France is Paris.", encoding="utf-8")
    (docs / "b.md").write_text("Naïve café owners in Zürich 😀", encoding="utf-8")
    (tmp_path / "t.yaml").write_text("type: perplexity\ndata: [docs]\nwindow: 8\nstride: 3\n"
                                     "metrics: [perplexity, nll, bits_per_byte]\n")
    task = load_task(tmp_path / "t.yaml")
    assert [e.fields["text"][:3] for e in task.examples] == ["The", "Naï"]
    model = fastlm.from_pretrained(checkpoint)
    tokenizer = fastlm.load_tokenizer(checkpoint)
    result = evaluate_task(model, tokenizer, task)
    expected = perplexity(model, [e.fields["text"] for e in task.examples], window=8, stride=3, tokenizer=tokenizer)
    assert result.metrics == {k: expected[k] for k in ("perplexity", "nll", "bits_per_byte")}
