"""Perplexity, loglikelihood and multiple-choice accuracy against transformers on the same weights
(fp32) and hand computations."""

import math

import pytest
import torch

import fastlm
from fastlm.eval import evaluate_loss, loglikelihood, loglikelihood_tokens, multiple_choice, perplexity
from fastlm.eval.perplexity import sliding_windows

from tests.eval.conftest import MC_ROWS

transformers = pytest.importorskip("transformers")

TEXTS = [
    "The capital of France is Paris. The capital of Italy is Rome. " * 3,
    "Naïve café owners in Zürich serve crème brûlée — très bien! 東京 😀",
    "one",
    "A cat sat on the mat, and the dog slept by the door. Numbers: one, two, three, four, five.",
]


def _hf_strided(hf, docs, window, stride):
    """The transformers perplexity guide's loop: labels -100 outside the newly scored tokens."""
    total, count = 0.0, 0
    for ids in docs:
        ids = torch.tensor([ids])
        n, prev_end = ids.shape[1], 0
        for begin in range(0, n, stride):
            end = min(begin + window, n)
            trg_len = end - prev_end
            inputs = ids[:, begin:end]
            labels = inputs.clone()
            labels[:, :-trg_len] = -100
            with torch.no_grad():
                logits = hf(inputs).logits.double()
            shift_labels = labels[:, 1:]
            logp = torch.log_softmax(logits[:, :-1], -1)
            valid = shift_labels != -100
            picked = logp.gather(-1, shift_labels.clamp(min=0)[..., None]).squeeze(-1)
            total -= float((picked * valid).sum())
            count += int(valid.sum())
            prev_end = end
            if end == n:
                break
    return total, count


@pytest.mark.parametrize("window,stride", [(16, 15), (24, 10), (96, None), (20, None)])
def test_perplexity_equals_transformers(checkpoint, hf_model, window, stride):
    model = fastlm.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = fastlm.load_tokenizer(checkpoint)
    got = perplexity(model, TEXTS, window=window, stride=stride, tokenizer=tokenizer, batch_size=3)
    docs = [[tokenizer.bos_token_id] + tokenizer.encode(t) for t in TEXTS]
    total, count = _hf_strided(hf_model, docs, window, stride or window // 2)
    assert got["tokens"] == count == sum(len(d) - 1 for d in docs)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert got["nll"] == pytest.approx(total / count, rel=1e-4)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert got["bits_per_byte"] == pytest.approx(total / (math.log(2) * n_bytes), rel=1e-4)


def test_sliding_windows_score_each_token_once():
    ids = list(range(23))
    for window, stride in [(5, 4), (5, 2), (8, 3), (23, 1), (30, 29), (2, 1)]:
        scored = []
        for chunk, n in sliding_windows(ids, window, stride):
            assert len(chunk) <= window
            scored += chunk[len(chunk) - n:]
        assert scored == ids[1:], (window, stride)


def test_perplexity_token_ids_and_legacy_stream(checkpoint):
    model = fastlm.from_pretrained(checkpoint, dtype=torch.float32)
    stream = torch.randint(0, model.config.vocab_size, (65,), generator=torch.Generator().manual_seed(0))
    legacy = perplexity(model, stream, seq_len=16, batch_size=2)  # fastlm.quant's form: a float
    assert isinstance(legacy, float)
    assert legacy == pytest.approx(math.exp(evaluate_loss(model, stream, seq_len=16, batch_size=2)), rel=1e-12)
    # The same disjoint windows of 17 tokens as documents, window 17, no BOS: same tokens scored.
    docs = [stream[i * 16:i * 16 + 17] for i in range(4)]
    new = perplexity(model, docs, window=17, stride=16)
    assert new["tokens"] == 64 and new["bits_per_byte"] is None
    assert new["perplexity"] == pytest.approx(legacy, rel=1e-5)


def test_perplexity_bad_arguments(checkpoint):
    model = fastlm.from_pretrained(checkpoint, dtype=torch.float32)
    with pytest.raises(ValueError, match="tokenizer= is required"):
        perplexity(model, ["text"])
    with pytest.raises(ValueError, match=r"window must be an integer in \[2, 96\]"):
        perplexity(model, [[1, 2, 3]], window=97)
    with pytest.raises(ValueError, match=r"stride must be an integer in \[1, window=8\)"):
        perplexity(model, [[1, 2, 3]], window=8, stride=8)
    with pytest.raises(ValueError, match="no token to score"):
        perplexity(model, [[5]])


def _hf_loglikelihood(hf, hf_tok, context, continuation):
    """By hand with transformers: encode whole and context (trailing spaces moved), sum log-probs."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = hf_tok.encode(context + continuation, add_special_tokens=False)
    n_ctx = len(hf_tok.encode(context, add_special_tokens=False))
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    cont = torch.tensor(whole[n_ctx:])
    rows = logp[n_ctx - 1:]
    return float(rows.gather(-1, cont[:, None]).sum()), bool((rows.argmax(-1) == cont).all())


def test_loglikelihood_equals_transformers(checkpoint, hf_model):
    model = fastlm.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = fastlm.load_tokenizer(checkpoint)
    hf_tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    pairs = [("The capital of France is", " Paris."), ("Ice melts at ", "zero degrees."),
             ("Naïve café", " owners in Zürich 😀"), ("A", " cat sat on the mat, and the dog slept by the door.")]
    got = loglikelihood(model, tokenizer, pairs, batch_size=2)
    for (ctx, cont), (logprob, greedy) in zip(pairs, got):
        ref_lp, ref_greedy = _hf_loglikelihood(hf_model, hf_tok, ctx, cont)
        assert logprob == pytest.approx(ref_lp, rel=1e-4), (ctx, cont)
        assert greedy == ref_greedy
    assert not all(g for _, g in got)
    # The model's own greedy continuation is greedy; changing its last token makes it not.
    ids = tokenizer.encode("Water boils at")
    out = fastlm.generate(model, torch.tensor([ids]), max_new_tokens=4)[0, len(ids):].tolist()
    other = out[:-1] + [(out[-1] + 1) % model.config.vocab_size]
    flags = [g for _, g in loglikelihood_tokens(model, [(ids, out), (ids, other)])]
    assert flags == [True, False]


def test_loglikelihood_empty_context_uses_bos(checkpoint):
    model = fastlm.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = fastlm.load_tokenizer(checkpoint)
    (lp, _), = loglikelihood(model, tokenizer, [("", "The cat")])
    ids = [tokenizer.bos_token_id] + tokenizer.encode("The cat")
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)
    assert lp == pytest.approx(float(sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1))), rel=1e-6)
    with pytest.raises(TypeError, match=r"pairs\[0\]"):
        loglikelihood(model, tokenizer, ["just a string"])


def test_multiple_choice_acc_by_hand(checkpoint, hf_model):
    model = fastlm.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = fastlm.load_tokenizer(checkpoint)
    hf_tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    examples = [(r["context"], r["choices"], r["gold"]) for r in MC_ROWS]
    scores, per = multiple_choice(model, tokenizer, examples, batch_size=4)
    acc = acc_norm = 0
    for (ctx, choices, gold), result in zip(examples, per):
        lls = [_hf_loglikelihood(hf_model, hf_tok, ctx, " " + c)[0] for c in choices]
        assert result.loglikelihoods == pytest.approx(lls, rel=1e-4)
        acc += max(range(len(lls)), key=lambda j: lls[j]) == gold
        normed = [ll / len(c) for ll, c in zip(lls, choices)]
        acc_norm += max(range(len(lls)), key=lambda j: normed[j]) == gold
    assert scores == {"acc": acc / len(examples), "acc_norm": acc_norm / len(examples)}
    # acc and acc_norm differ on this data (otherwise the test could not tell them apart).
    assert [r.pred for r in per] != [r.pred_norm for r in per]


@pytest.mark.gpu
def test_cuda_scores_equal_cpu(checkpoint):
    """The same fp32 weights on CUDA give the CPU's perplexity and choice log-likelihoods."""
    tokenizer = fastlm.load_tokenizer(checkpoint)
    cpu = fastlm.from_pretrained(checkpoint, dtype=torch.float32)
    gpu = fastlm.from_pretrained(checkpoint, dtype=torch.float32, device="cuda")
    a = perplexity(cpu, TEXTS, window=24, stride=10, tokenizer=tokenizer)
    b = perplexity(gpu, TEXTS, window=24, stride=10, tokenizer=tokenizer)
    assert b["tokens"] == a["tokens"] and b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-4)
    examples = [(r["context"], r["choices"], r["gold"]) for r in MC_ROWS]
    _, per_cpu = multiple_choice(cpu, tokenizer, examples)
    _, per_gpu = multiple_choice(gpu, tokenizer, examples)
    for x, y in zip(per_cpu, per_gpu):
        assert y.loglikelihoods == pytest.approx(x.loglikelihoods, rel=1e-4)
