"""`fastlm ppo` / `fastlm grpo`: end to end on a tiny checkpoint, resume, bad inputs, help."""

import json

import pytest
import torch

from fastlm.align.cli_rl import read_prompts
from fastlm.cli import main
from fastlm.train import checkpoint as ckpt
from tests.align.test_rollout import TOK, tiny_model

REWARD = "tests.align.test_ppo:low_bytes"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy")
    tiny_model().save_pretrained(path)
    TOK.save(path)
    return path


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}:", "id": i}) + "\n" for i in range(10)))
    return path


def _common(checkpoint, prompts, out):
    return ["--prompts", str(prompts), "--model", str(checkpoint), "--reward-fn", REWARD, "--out", str(out),
            "--max-new-tokens", "4", "--no-progress", "--device", "cpu", "--lr", "1e-3"]


def test_grpo_command_trains_saves_and_resumes(checkpoint, prompts, tmp_path, capsys):
    out = tmp_path / "grpo"
    args = _common(checkpoint, prompts, out) + ["--group-size", "4", "--batch-size", "8", "--save-every", "1"]
    assert main(["grpo", *args, "--max-steps", "2"]) == 0
    assert "mean reward" in capsys.readouterr().out
    last = ckpt.latest_checkpoint(out)
    assert last.name == "step-00000002"
    for name in ("config.json", "model.safetensors", "trainer_state.pt"):
        assert (last / name).is_file(), name
    assert (last / "fastlm_tokenizer.json").is_file() or (last / "tokenizer.json").is_file()
    assert main(["grpo", *args, "--max-steps", "2", "--resume"]) == 0  # a finished run resumes to its end
    with pytest.raises(ValueError, match="--max-steps is 3 now, 2 in the run"):
        main(["grpo", *args, "--max-steps", "3", "--resume"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][:2] == [1, 2] and "reward" in rows[0] and "kl" in rows[0]
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["command"] == "grpo" and settings["reward_fn"] == REWARD


def test_ppo_command_with_lora(checkpoint, prompts, tmp_path):
    out = tmp_path / "ppo"
    assert main(["ppo", *_common(checkpoint, prompts, out), "--method", "lora", "--lora-r", "4", "--epochs", "2",
                 "--batch-size", "4", "--max-steps", "2"]) == 0
    last = ckpt.latest_checkpoint(out)
    assert (last / "adapter_config.json").is_file() and (last / "value_head.safetensors").is_file()
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"reward", "kl", "entropy", "clip_fraction", "value_loss", "response_length", "rollout_tokens_per_s",
            "train_tokens_per_s"} <= set(row)


def test_grpo_command_with_a_reward_model(checkpoint, prompts, tmp_path):
    from fastlm.align.reward import RewardModel

    rm_dir = tmp_path / "rm"
    RewardModel(tiny_model(seed=5)).save_pretrained(rm_dir, tokenizer=TOK)
    out = tmp_path / "grpo_rm"
    args = _common(checkpoint, prompts, out)
    args[args.index("--reward-fn"): args.index("--reward-fn") + 2] = ["--reward-model", str(rm_dir)]
    assert main(["grpo", *args, "--group-size", "4", "--batch-size", "8", "--max-steps", "1"]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["reward"] != 0.0  # the reward model's scores (not a constant)
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["reward_model"] == str(rm_dir)


def test_bad_inputs_are_named(checkpoint, prompts, tmp_path):
    out = tmp_path / "x"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected \{\"prompt\""):
        read_prompts(bad)
    with pytest.raises(ValueError, match="module:function"):
        main(["grpo", *_common(checkpoint, prompts, out)[:4], "--reward-fn", "oops", "--out", str(out),
              "--max-steps", "1"])
    with pytest.raises(ValueError, match="multiple of epochs"):
        main(["ppo", *_common(checkpoint, prompts, out), "--epochs", "4", "--max-steps", "6"])
    with pytest.raises(FileNotFoundError, match="--prompts"):
        main(["ppo", *_common(checkpoint, tmp_path / "none.jsonl", out)])
    with pytest.raises(SystemExit):  # argparse: the two reward sources exclude each other
        main(["ppo", *_common(checkpoint, prompts, out), "--reward-model", str(checkpoint)])


@pytest.mark.slow  # ~70 s on the shared 2-core machine: 4 process starts
def test_two_processes_resume_exactly_in_the_middle_of_a_rollout(checkpoint, prompts, tmp_path):
    """torchrun, 2 CPU processes (gloo): a run resumed from a checkpoint between the two epochs of
    a rollout ends with the same weights as the uninterrupted run (each process's rollout is saved)."""
    import os
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    def run(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "fastlm", "grpo", *_common(checkpoint, prompts, out), "--group-size", "4", "--batch-size", "8",
               "--epochs", "2", "--max-steps", "4", "--save-every", "1", *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]

    out, again = tmp_path / "a", tmp_path / "b"
    run(out)
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "step-00000004")  # as if killed after step 3 (mid-rollout)
    run(again, "--resume")
    a = load_file(str(out / "checkpoints" / "step-00000004" / "model.safetensors"))
    b = load_file(str(again / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_on_chat_prompts(tmp_path):
    """TRL's conversational prompts: "messages" rows are rendered by the tokenizer's chat template
    and the reward function receives them as message lists (as TRL passes them)."""
    from fastlm.config import preset
    from fastlm.data import load_tokenizer
    from fastlm.model import Model
    from tests.data.hf_styles import build

    tok_dir = build("chatml", tmp_path / "tok")
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    model = Model(preset("tiny", vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=64, max_position_embeddings=128))
    model.save_pretrained(tmp_path / "policy")
    tok.save(tmp_path / "policy")
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Pick {i}"}]}) + "\n"
                               for i in range(4)))
    out = tmp_path / "grpo"
    args = ["--prompts", str(prompts), "--model", str(tmp_path / "policy"), "--reward-fn",
            "tests.align.test_cli_rl:chat_reward", "--out", str(out), "--max-new-tokens", "3", "--no-progress",
            "--device", "cpu", "--group-size", "2", "--batch-size", "4", "--max-steps", "1"]
    assert main(["grpo", *args]) == 0
    assert SEEN and all(isinstance(p, list) and p[0]["role"] == "user" for p in SEEN)


SEEN: list = []


def chat_reward(prompts, completions):
    SEEN.extend(prompts)
    return [float(len(c)) for c in completions]
