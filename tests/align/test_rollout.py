"""fastlm.align.rollout: generation, padding and masks, log-probs (policy, reference), rewards."""

import json

import pytest
import torch

import fastlm
from fastlm.align import rollout as R
from fastlm.config import preset
from fastlm.data.tokenizer import ByteTokenizer
from fastlm.model import Model
from fastlm.peft import LoraConfig, LoraModel

TOK = ByteTokenizer()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids spin-waits on a shared CPU (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0, context: int = 32) -> Model:
    """A 2-layer byte-level model small enough for CPU tests."""
    torch.manual_seed(seed)
    model = Model(preset("tiny", vocab_size=259, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                         intermediate_size=64, max_position_embeddings=context))
    with torch.no_grad():  # a peaked head: sampled completions stop at eos now and then
        model.lm_head.weight.mul_(8)
    return model


def lora(model: Model, seed: int = 1) -> LoraModel:
    torch.manual_seed(seed)
    wrapped = LoraModel(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # non-zero B: the adapter changes the outputs
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return wrapped


PROMPTS = ["Q1:", "Q22:", "hello", "Q7:"]


def _rollout(model, settings, seed=0):
    ids = R.encode_prompts(TOK, PROMPTS, max_len=model.config.context_length - settings.max_new_tokens)
    return ids, R.sample_completions(model, TOK, ids, settings, generator=torch.Generator().manual_seed(seed))


def test_sequences_match_generate_and_masks_mark_completions():
    model = tiny_model()
    settings = R.GenerationSettings(max_new_tokens=6, stop_token_ids=(ord("a"),))
    ids, seqs = _rollout(model, settings)
    bos = [] if TOK.bos_token_id is None else [TOK.bos_token_id]
    assert ids[0] == bos + list(b"Q1:")
    want = fastlm.generate(model, ids, max_new_tokens=6, do_sample=True, temperature=1.0,
                           eos_token_id=R.stop_ids(TOK, settings), pad_token_id=TOK.pad_token_id,
                           generator=torch.Generator().manual_seed(0))
    b, t = seqs.input_ids.shape
    assert b == len(PROMPTS) and t == max(len(w) for w in want)
    for i, row in enumerate(want):
        n, p = len(row), len(ids[i])
        assert seqs.lengths[i] == n and seqs.prompt_lens[i] == p
        assert torch.equal(seqs.input_ids[i, :n], row)
        assert (seqs.input_ids[i, n:] == TOK.pad_token_id).all()
        assert seqs.attention_mask[i].tolist() == [1] * n + [0] * (t - n)
        # target j predicts token j+1: completion tokens are p..n-1
        assert seqs.target_mask[i].tolist() == [0.0] * (p - 1) + [1.0] * (n - p) + [0.0] * (t - n)
        completion = row[p:].tolist()
        assert 1 <= len(completion) <= 6
        stops = set(R.stop_ids(TOK, settings))
        assert not stops & set(completion[:-1])  # a stop token only ever ends a completion
        assert seqs.completions[i] == TOK.decode(completion, skip_special_tokens=True)
    # the same generator seed gives the same rollout; another seed another one
    assert torch.equal(_rollout(model, settings)[1].input_ids, seqs.input_ids)
    assert not torch.equal(_rollout(model, settings, seed=1)[1].input_ids, seqs.input_ids)


def test_paged_cache_gives_the_same_rollout():
    model = tiny_model()
    static = _rollout(model, R.GenerationSettings(max_new_tokens=6))[1]
    paged = _rollout(model, R.GenerationSettings(max_new_tokens=6, cache_implementation="paged"))[1]
    assert torch.equal(static.input_ids, paged.input_ids) and static.completions == paged.completions


def test_policy_logprobs_equal_log_softmax_of_the_logits():
    model = tiny_model()
    _, seqs = _rollout(model, R.GenerationSettings(max_new_tokens=5))
    hidden = model(seqs.input_ids, key_lens=seqs.attention_mask.sum(1), return_hidden=True)
    for temperature in (1.0, 0.7):
        lp, ent = R.policy_logprobs(hidden, model.lm_head.weight, seqs.input_ids, seqs.target_mask,
                                    temperature=temperature)
        logp = torch.log_softmax(model.head(hidden[:, :-1]).double() / temperature, -1)
        want = logp.gather(-1, seqs.input_ids[:, 1:, None]).squeeze(-1) * seqs.target_mask
        torch.testing.assert_close(lp.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent.double(), -(logp.exp() * logp).sum(-1) * seqs.target_mask, atol=1e-5, rtol=1e-5)


def test_policy_logprobs_apply_the_final_soft_cap():
    """A Gemma 2 style head (logits ← c·tanh(logits / c)): RL scores through the fused op with the
    model's cap, equal to log_softmax of the model's own (capped) logits."""
    model = tiny_model()
    model.config.final_softcap = 2.0  # logits of the peaked head reach ~10: the cap bends them
    _, seqs = _rollout(model, R.GenerationSettings(max_new_tokens=5))
    hidden = model(seqs.input_ids, key_lens=seqs.attention_mask.sum(1), return_hidden=True)
    assert R.head_softcap(lora(model)) == 2.0 and R.head_softcap(tiny_model()) is None
    lp, ent = R.policy_logprobs(hidden, R.head_weight(model), seqs.input_ids, seqs.target_mask, temperature=0.7,
                                softcap=R.head_softcap(model))
    logp = torch.log_softmax(model.head(hidden[:, :-1]).double() / 0.7, -1)
    want = logp.gather(-1, seqs.input_ids[:, 1:, None]).squeeze(-1) * seqs.target_mask
    torch.testing.assert_close(lp.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), -(logp.exp() * logp).sum(-1) * seqs.target_mask, atol=1e-5, rtol=1e-5)
    uncapped = R.policy_logprobs(hidden, model.lm_head.weight, seqs.input_ids, seqs.target_mask, temperature=0.7,
                                 return_entropy=False)
    assert (uncapped - lp).abs().max() > 1e-2


def test_lora_reference_is_the_base_with_adapters_off():
    base = tiny_model()
    frozen = tiny_model()  # the same weights, a separate copy
    policy = lora(base)
    _, seqs = _rollout(policy, R.GenerationSettings(max_new_tokens=5))
    ref_lora = R.reference_logprobs(policy, None, seqs)
    ref_copy = R.reference_logprobs(frozen, frozen, seqs)
    torch.testing.assert_close(ref_lora, ref_copy)
    assert not policy.adapters_disabled
    hidden = policy(seqs.input_ids, key_lens=seqs.attention_mask.sum(1), return_hidden=True)
    mine = R.policy_logprobs(hidden, R.head_weight(policy), seqs.input_ids, seqs.target_mask, return_entropy=False)
    assert (mine - ref_lora).abs().max() > 1e-3  # the adapter is active in the policy's own scores
    with pytest.raises(ValueError, match="LoraModel"):
        R.reference_logprobs(frozen, None, seqs)


def test_compile_path_merges_the_adapter_exactly_and_unmerges():
    policy = lora(tiny_model())
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    x = torch.tensor([[1, 2, 3, 4]])
    want = policy(x)
    with R._plain_model_for_compile(policy) as plain:
        assert type(plain) is Model
        torch.testing.assert_close(plain(x), want, atol=1e-5, rtol=1e-5)
    for k, v in policy.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
    assert policy.merged_adapter is None


def test_head_weight_refuses_lora_on_lm_head():
    model = LoraModel(tiny_model(), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="lm_head"):
        R.head_weight(model)


def test_reward_source_checks_scores():
    ok = R.RewardSource(reward_fn=lambda p, c: [len(x) for x in c])
    torch.testing.assert_close(ok(["a", "b"], ["xy", "z"], torch.device("cpu")), torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        R.RewardSource(reward_fn=lambda p, c: [0.0])(["a", "b"], ["x", "y"], torch.device("cpu"))
    with pytest.raises(ValueError, match="non-finite"):
        R.RewardSource(reward_fn=lambda p, c: [float("nan")])(["a"], ["x"], torch.device("cpu"))
    with pytest.raises(TypeError, match="list of floats"):
        R.RewardSource(reward_fn=lambda p, c: ["high"])(["a"], ["x"], torch.device("cpu"))

    class RM:
        def score(self, prompts, completions, tokenizer):
            assert tokenizer is TOK
            return torch.tensor([0.5] * len(completions))

    torch.testing.assert_close(R.RewardSource(reward_model=RM(), tokenizer=TOK)(["a"], ["b"], torch.device("cpu")),
                               torch.tensor([0.5]))
    with pytest.raises(ValueError, match="exactly one"):
        R.RewardSource()


def test_load_reward_fn():
    fn = R.load_reward_fn("fastlm.align.synthetic:oracle_rewards")
    assert fn(["02468024\n"]) == [1.0]
    for spec, match in (("nocolon", "module:function"), ("no_such_module_xyz:f", "cannot import"),
                        ("fastlm.align.synthetic:nope", "no callable")):
        with pytest.raises(ValueError, match=match):
            R.load_reward_fn(spec)


def test_settings_and_prompts_are_checked():
    with pytest.raises(ValueError, match="max_new_tokens"):
        R.GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        R.GenerationSettings(temperature=0)
    with pytest.raises(ValueError, match="prompt 1"):
        R.encode_prompts(TOK, ["ok", "x" * 50], max_len=20)


def test_chat_prompts_go_through_the_chat_template(tmp_path):
    """TRL's conversational prompts: message lists are rendered by the tokenizer's chat template
    with the generation prompt (the ids SFT trained on), plain prompts as text; a chat prompt with
    a tokenizer that has no template is refused."""
    from fastlm.data import load_tokenizer
    from tests.data.hf_styles import build

    tok = load_tokenizer(build("chatml", tmp_path / "tok"))
    chat = [{"role": "user", "content": "Pick a number"}]
    ids = R.encode_prompts(tok, [chat, "plain text"], max_len=64)
    assert ids[0] == list(tok.apply_chat_template(chat, add_generation_prompt=True))
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
    assert ids[1] == tok.encode("plain text", add_bos=tok.bos_token_id is not None)
    with pytest.raises(ValueError, match="prompt 0 is a chat"):
        R.encode_prompts(ByteTokenizer(), [chat], max_len=64)
    with pytest.raises(ValueError, match="prompt 1: expected a non-empty string or list of messages"):
        R.encode_prompts(tok, ["a", []], max_len=64)


def test_read_prompts_takes_plain_and_chat_rows(tmp_path):
    from fastlm.align.data import read_prompts

    chat = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "hi"}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ({"prompt": "a"}, {"messages": chat},
                                                        {"messages": chat + [{"role": "assistant", "content": "x"}]})))
    assert read_prompts(path) == ["a", chat, chat]  # a final assistant turn is dropped
