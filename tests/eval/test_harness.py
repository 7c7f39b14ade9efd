"""The lm-evaluation-harness backend: on the same tiny Llama (fp32) and local tasks (json data
files, no download), results equal the harness's own hf backend — multiple choice
(loglikelihood), rolling loglikelihood and generate_until."""

import json
import os
import subprocess
import sys

import pytest

from tests.eval.conftest import CORPUS, MC_ROWS, write_jsonl

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

TASKS = {
    "fastlm_tiny_mc": """
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "fastlm_tiny_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "fastlm_tiny_gen": """
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{references[0]}}}}"
generation_kwargs:
  until: [" the", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, monkeypatch_module):
    directory = tmp_path_factory.mktemp("harness_tasks")
    data = {
        "fastlm_tiny_mc": MC_ROWS,
        # One text longer than the model's context (96 tokens): several rolling windows.
        "fastlm_tiny_rolling": [{"text": " ".join(CORPUS[:6])}, {"text": CORPUS[4]}, {"text": "one"}],
        "fastlm_tiny_gen": [{"prompt": "The capital of France", "references": ["is Paris"]},
                            {"prompt": "Numbers: one, two,", "references": ["three"]},
                            {"prompt": "Naïve", "references": ["café"]}],
    }
    for name, body in TASKS.items():
        rows = write_jsonl(directory / f"{name}.jsonl", data[name])
        (directory / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {rows}\n"
            f"test_split: test\n" + body.format(), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("hf_cache")
    for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache / "ds"),
                       "HF_HOME": str(cache)}.items():
        mp.setenv(key, value)
    yield mp
    mp.undo()


def _evaluate(model, checkpoint, task_dir):
    import fastlm.eval.harness  # noqa: F401  (registers "fastlm")
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=f"pretrained={checkpoint},dtype=float32",
                                   tasks=list(TASKS), task_manager=TaskManager(include_path=str(task_dir)),
                                   batch_size=4, device="cpu", log_samples=True, random_seed=0)


@pytest.fixture(scope="module")
def both(checkpoint, task_dir):
    return _evaluate("hf", checkpoint, task_dir), _evaluate("fastlm", checkpoint, task_dir)


def _samples(result, task):
    return sorted(result["samples"][task], key=lambda s: s["doc_id"])


def test_multiple_choice_equals_hf_backend(both):
    hf, ours = both
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["fastlm_tiny_mc"][metric] == hf["results"]["fastlm_tiny_mc"][metric]
    for a, b in zip(_samples(ours, "fastlm_tiny_mc"), _samples(hf, "fastlm_tiny_mc")):
        ours_ll = [r[0] for r in a["filtered_resps"]]
        hf_ll = [r[0] for r in b["filtered_resps"]]
        assert ours_ll == pytest.approx(hf_ll, rel=1e-4)
        assert [r[1] for r in a["filtered_resps"]] == [r[1] for r in b["filtered_resps"]]
    # The hand computation of acc from the per-choice loglikelihoods, as the harness defines it.
    samples = _samples(ours, "fastlm_tiny_mc")
    acc = sum(max(range(3), key=lambda j: s["filtered_resps"][j][0]) == row["gold"]
              for s, row in zip(samples, MC_ROWS)) / len(MC_ROWS)
    assert ours["results"]["fastlm_tiny_mc"]["acc,none"] == acc


def test_rolling_loglikelihood_equals_hf_backend(both):
    hf, ours = both
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["fastlm_tiny_rolling"][metric] == pytest.approx(
            hf["results"]["fastlm_tiny_rolling"][metric], rel=1e-4)


def test_generate_until_equals_hf_backend(both):
    hf, ours = both
    got = [s["filtered_resps"] for s in _samples(ours, "fastlm_tiny_gen")]
    want = [s["filtered_resps"] for s in _samples(hf, "fastlm_tiny_gen")]
    assert got == want
    assert ours["results"]["fastlm_tiny_gen"]["exact_match,none"] == hf["results"]["fastlm_tiny_gen"][
        "exact_match,none"]


def test_command_line(checkpoint, task_dir, tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run(
        [sys.executable, "-m", "fastlm.eval.harness", "--model", "fastlm", "--model_args",
         f"pretrained={checkpoint},dtype=float32", "--tasks", "fastlm_tiny_mc", "--include_path", str(task_dir),
         "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    files = list((tmp_path / "out").rglob("results*.json"))
    assert files, out.stdout[-2000:]
    results = json.loads(files[0].read_text())["results"]["fastlm_tiny_mc"]
    assert 0 <= results["acc,none"] <= 1


def test_lm_eval_not_needed_to_import_fastlm():
    code = ("import sys; sys.modules['lm_eval'] = None; import fastlm, fastlm.eval, fastlm.eval.cli; "
            "from fastlm.cli import build_parser; build_parser()\n"
            "try:\n    import fastlm.eval.harness\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "pip install lm_eval" in out.stdout


def test_unknown_model_arg_is_named(checkpoint):
    from fastlm.eval.harness import FastLM

    with pytest.raises(ValueError, match="unknown model_args.*'dtyp'"):
        FastLM(pretrained=str(checkpoint), dtyp="float32")
