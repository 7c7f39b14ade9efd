"""`fastlm eval`: a report that lists every variant, and clear errors for bad input."""

import json
import subprocess
import sys

import pytest

from fastlm.cli import main

from tests.eval.conftest import CORPUS, MC_ROWS, write_jsonl


@pytest.fixture
def tasks(tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS[:3])
    write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "The capital of France is", "references": "Paris"},
                                        {"prompt": "Naïve café", "references": ["owners", "crème"]}])
    gen = tmp_path / "qa.yaml"
    gen.write_text("name: qa\ntype: generate\ndata: qa.jsonl\nmax_new_tokens: 4\nmetrics: [exact_match, f1]\n")
    ppl = write_jsonl(tmp_path / "ppl.jsonl", [{"text": t} for t in CORPUS[:3]])
    return [str(mc), str(gen), str(ppl)]


def test_report_lists_every_variant(checkpoint, checkpoint2, tasks, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", "--model", str(checkpoint), "--model", str(checkpoint2), "--quantize", "int8_weight_only",
                 "--task", *tasks, "--out", str(out), "--samples", "2", "--batch-size", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "results.json, results.md" in printed
    results = json.loads((out / "results.json").read_text())
    names = [v["variant"] for v in results["variants"]]
    assert names == [checkpoint.name, checkpoint2.name, f"{checkpoint.name}:int8_weight_only"]
    for variant in results["variants"]:
        assert set(variant["metrics"]) == {"mc/acc", "mc/acc_norm", "qa/exact_match", "qa/f1", "ppl/perplexity",
                                           "ppl/bits_per_byte"}
        assert variant["gen_tokens_per_s"] > 0 and variant["score_tokens_per_s"] > 0
        assert variant["peak_memory_mib"] > 0 and "RSS" in variant["memory_measure"]
    assert results["variants"][2]["weights_mib"] < results["variants"][0]["weights_mib"]  # int8 weights
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [r.split(" | ")[0][2:] for r in rows] == names
    assert "peak MiB" in table and "Peak memory: process peak RSS" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the chart is optional: one line says it was skipped
        assert "matplotlib is not installed" in printed
    else:
        assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (out / "samples.md").read_text()
    assert all(f"| {n} |" in samples for n in names) and samples.count("## ") == 4  # 2 mc + 2 qa
    assert all(n in (out / "samples.html").read_text() for n in names)


def test_model_dir_that_does_not_load(checkpoint, tasks, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=f"--model {broken}: the checkpoint does not load"):
        main(["eval", "--model", str(broken), "--task", tasks[0], "--out", str(tmp_path / "o"), "--no-progress"])
    with pytest.raises(ValueError, match=f"--model {tmp_path}: not a checkpoint folder"):
        main(["eval", "--model", str(tmp_path), "--task", tasks[0], "--out", str(tmp_path / "o")])


def test_command_line_errors_name_file_and_line(checkpoint, tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "references": "b"}])
    task = tmp_path / "bad.yaml"
    task.write_text("type: generate\ndata: qa.jsonl\nmetrics:\n  - exact_match\n  - bleurt\n")
    out = subprocess.run([sys.executable, "-m", "fastlm", "eval", "--model", str(checkpoint), "--task", str(task),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert f"{task}:5: unknown metric 'bleurt'" in out.stderr, out.stderr
    assert not (tmp_path / "o").exists()


def test_adapter_variant_equals_the_wrapped_model(checkpoint, tmp_path):
    """--adapter adds a row made from the first --model with the PEFT adapter, scored as the
    Python API scores the same wrapped model."""
    import torch

    import fastlm
    from fastlm import peft
    from fastlm.eval import multiple_choice

    base = fastlm.from_pretrained(checkpoint)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero update, so the adapter changes the scores
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    task = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    out = tmp_path / "report"
    assert main(["eval", "--model", str(checkpoint), "--adapter", str(adapter), "--task", str(task),
                 "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())["variants"]
    assert [r["variant"] for r in rows] == [checkpoint.name, f"{checkpoint.name}+adapter"]
    tokenizer = fastlm.load_tokenizer(checkpoint)
    examples = [(r["context"], r["choices"], r["gold"]) for r in MC_ROWS]
    wrapped = peft.from_pretrained(fastlm.from_pretrained(checkpoint), adapter).eval()
    expected, per = multiple_choice(wrapped, tokenizer, examples)
    plain, plain_per = multiple_choice(fastlm.from_pretrained(checkpoint), tokenizer, examples)
    assert rows[1]["metrics"] == {"mc/acc": expected["acc"], "mc/acc_norm": expected["acc_norm"]}
    assert rows[0]["metrics"] == {"mc/acc": plain["acc"], "mc/acc_norm": plain["acc_norm"]}
    assert [r.loglikelihoods for r in per] != [r.loglikelihoods for r in plain_per]


def test_missing_metric_package_is_reported_before_any_model_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "references": "b"}])
    task = tmp_path / "t.yaml"
    task.write_text("type: generate\ndata: qa.jsonl\nmetrics: [bleu]\n")
    with pytest.raises(ValueError, match=r"--task .*t.yaml: metric 'bleu': .*pip install 'fastlm\[eval\]'"):
        main(["eval", "--model", str(tmp_path / "nowhere"), "--task", str(task), "--out", str(tmp_path / "o")])
