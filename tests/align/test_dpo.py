"""DPO/IPO/SimPO losses against TRL's own loss code (DPOTrainer._compute_loss, CPOTrainer.cpo_loss)
and hand formulas; the DPO trainer: cached reference = the model before training, LoRA
reference = adapters off (first loss log 2), metrics logged, the policy moves toward chosen."""

import json
import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fastlm import ops
from fastlm.align import DPOConfig, DPOTrainer, dpo_loss, simpo_loss
from fastlm.align import synthetic as syn
from fastlm.align.data import PairSource, encode_pairs
from fastlm.align.logprobs import sequence_logprobs
from fastlm.config import ModelConfig
from fastlm.data import ByteTokenizer
from fastlm.model import Model
from fastlm.peft import LoraConfig, LoraModel
from fastlm.train.trainer import TrainerConfig

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _per_token(b: int = 5, t: int = 9, seed: int = 0):
    """Per-token log-probs (2b, t-1) of [chosen; rejected] rows, zero outside each completion."""
    gen = torch.Generator().manual_seed(seed)
    completion = torch.zeros(2 * b, t, dtype=torch.int64)
    for i in range(2 * b):
        start = int(torch.randint(1, 4, (1,), generator=gen))
        end = int(torch.randint(start + 1, t + 1, (1,), generator=gen))
        completion[i, start:end] = 1
    raw = (-torch.rand(2 * b, t - 1, generator=gen) * 3).requires_grad_()
    ref = -torch.rand(2 * b, generator=gen) * 10
    return raw, completion, ref


def _trl_dpo(raw, completion, ref, *, beta, loss_type):
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    b = completion.shape[0] // 2
    per_token = raw * completion[:, 1:]
    model = lambda **kw: SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),  # noqa: E731
                                         mean_logits=torch.zeros_like(per_token),
                                         is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    accel = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accel, aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
                           use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1, args=SimpleNamespace())
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "ref_chosen_logps": ref[:b], "ref_rejected_logps": ref[b:]}
    loss = trl_dpo.DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    return loss, fake._metrics["train"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl(loss_type, beta):
    raw, completion, ref = _per_token()
    trl_loss, metrics = _trl_dpo(raw, completion, ref, beta=beta, loss_type=loss_type)
    (trl_grad,) = torch.autograd.grad(trl_loss, raw)
    per_token = raw * completion[:, 1:]
    logps = per_token.sum(1)
    ref_logps = ref
    if loss_type == "ipo":  # per-token means (TRL 1.x divides the log-ratios by the completion length)
        n = completion.sum(1).float()
        logps, ref_logps = logps / n, ref / n
    c, r = logps.chunk(2)
    losses, cr, rr = dpo_loss(c, r, *ref_logps.chunk(2), beta=beta, loss_type=loss_type)
    (grad,) = torch.autograd.grad(losses.mean(), raw)
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-6, atol=1e-8)
    if loss_type == "sigmoid":  # TRL logs rewards from the summed log-ratios
        assert cr.mean().item() == pytest.approx(metrics["rewards/chosen"][0], rel=1e-6)
        assert rr.mean().item() == pytest.approx(metrics["rewards/rejected"][0], rel=1e-6)
        assert (cr > rr).float().mean().item() == pytest.approx(metrics["rewards/accuracies"][0])


def test_dpo_loss_hand_formula_with_label_smoothing():
    pc, pr = torch.tensor([-3.0, -8.0, -1.5]), torch.tensor([-4.0, -2.0, -1.5])
    rc, rr = torch.tensor([-3.5, -7.0, -1.0]), torch.tensor([-3.0, -2.5, -2.0])
    beta, eps = 0.3, 0.1
    h = (pc - pr) - (rc - rr)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [-(1 - eps) * math.log(sig(beta * v)) - eps * math.log(sig(-beta * v)) for v in h.tolist()]
    losses, cr, rr_ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert cr.tolist() == pytest.approx((beta * (pc - rc)).tolist())
    assert rr_.tolist() == pytest.approx((beta * (pr - rr)).tolist())
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([(v - 1 / (2 * beta)) ** 2 for v in h.tolist()], rel=1e-6)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_equals_trl_cpo(label_smoothing):
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    gen = torch.Generator().manual_seed(3)
    c = (-torch.rand(6, generator=gen) * 2).requires_grad_()
    r = (-torch.rand(6, generator=gen) * 2).requires_grad_()
    fake = SimpleNamespace(alpha=0.0, accelerator=SimpleNamespace(device=torch.device("cpu")), loss_type="simpo",
                           simpo_gamma=0.7, beta=2.5, label_smoothing=label_smoothing)
    t_losses, t_cr, t_rr = cpo.CPOTrainer.cpo_loss(fake, c, r)
    losses, cr, rr = simpo_loss(c, r, beta=2.5, gamma=0.7, label_smoothing=label_smoothing)
    torch.testing.assert_close(losses, t_losses, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cr, t_cr)
    torch.testing.assert_close(rr, t_rr)
    g_t = torch.autograd.grad(t_losses.sum(), (c, r))
    g = torch.autograd.grad(losses.sum(), (c, r))
    for a, b in zip(g, g_t):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    z = 2.5 * (c - r).detach() - 0.7
    torch.testing.assert_close(losses.detach(), -(1 - label_smoothing) * F.logsigmoid(z)
                               - label_smoothing * F.logsigmoid(-z))


# ---- the trainer --------------------------------------------------------------------------------


def _model(seed: int = 0) -> tuple[Model, ByteTokenizer]:
    tok = ByteTokenizer()
    torch.manual_seed(seed)
    config = ModelConfig(arch="llama", vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=4,
                         num_kv_heads=2, intermediate_size=64, max_position_embeddings=32,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return Model(config), tok


def _source(tok, n=24, batch_size=8):
    rows = [(f"row{i}", r) for i, r in enumerate(syn.pair_rows(n, noise=0.0, seed=1))]
    examples, _ = encode_pairs(tok, rows, "plain", 24)
    return PairSource(examples, batch_size, tok.pad_token_id)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_trainer_full_precomputed_reference(tmp_path):
    model, tok = _model()
    source = _source(tok)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainerConfig(out=str(tmp_path), max_steps=6, batch_size=8, lr=3e-3, warmup_steps=0, progress=False,
                           weight_decay=0.0)
    trainer = DPOTrainer(model, source, config, DPOConfig(beta=0.5))
    result = trainer.fit()
    assert trainer.dpo.reference == "precompute"
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    # the cache holds the initial model's log-probs
    fresh = Model(model.config)
    fresh.load_state_dict(initial)
    batch = source.batch(0)
    with torch.no_grad():
        logps = sequence_logprobs(fresh.eval(), batch["input_ids"], batch["loss_mask"],
                                  attention_mask=batch["attention_mask"])
    cached = trainer._ref_cache[id(source)][batch["index"]]
    torch.testing.assert_close(torch.stack(logps.chunk(2), 1), cached, rtol=1e-5, atol=1e-5)
    records = _metrics(tmp_path)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(records[-1])
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]
    assert result.losses[-1] < result.losses[0]


def test_dpo_trainer_lora_reference_is_adapters_off(tmp_path):
    model, tok = _model()
    lora = LoraModel(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    source = _source(tok)
    config = TrainerConfig(out=str(tmp_path), max_steps=5, batch_size=8, lr=1e-2, warmup_steps=0, progress=False,
                           weight_decay=0.0)
    trainer = DPOTrainer(lora, source, config, DPOConfig(beta=0.5))
    result = trainer.fit()
    assert trainer.dpo.reference == "adapters_off"
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-5)  # LoRA B = 0: policy == base
    assert result.losses[-1] < result.losses[0]
    assert sum(p.numel() for p in lora.parameters()) < 1.1 * sum(p.numel() for p in model.parameters())
    assert (tmp_path / "checkpoints" / "step-00000005" / "adapter_model.safetensors").is_file()


def test_simpo_trainer_runs_reference_free(tmp_path):
    model, tok = _model()
    config = TrainerConfig(out=str(tmp_path), max_steps=3, batch_size=8, lr=3e-3, warmup_steps=0, progress=False)
    trainer = DPOTrainer(model, _source(tok), config, DPOConfig(loss="simpo", beta=2.0))
    result = trainer.fit()
    assert trainer.dpo.reference == "none" and not trainer._ref_cache
    assert all(math.isfinite(v) for v in result.losses)
    with pytest.raises(ValueError, match="adapters_off"):
        DPOTrainer(model, _source(tok), config, DPOConfig(reference="adapters_off"))
    with pytest.raises(ValueError, match="reference-free"):
        DPOConfig(loss="simpo", reference="precompute")


# ---- the fused op (fastlm.ops.linear_preference_loss) ------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_fused_preference_op_equals_trl_on_the_same_logits(loss_type):
    """The fused op's loss (a sum over pairs) / P equals TRL's DPOTrainer loss (a mean) on the
    per-token log-probs of the same logits h·Wᵀ, and so do the gradients w.r.t. h and W."""
    b, t, hdim, vocab, beta = 3, 7, 16, 29, 0.3
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(2 * b * (t - 1), hdim, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(vocab, hdim, generator=gen, dtype=torch.float64) / 2).requires_grad_()
    tokens = torch.randint(0, vocab, (2 * b, t - 1), generator=gen)
    _, completion, ref = _per_token(b, t, seed=2)
    ref = ref.double()
    logits = hidden @ weight.t()
    raw = torch.log_softmax(logits, -1).gather(-1, tokens.reshape(-1, 1)).view(2 * b, t - 1)
    trl_loss, _ = _trl_dpo(raw, completion, ref, beta=beta, loss_type=loss_type)
    trl_grads = torch.autograd.grad(trl_loss, (hidden, weight))
    ref_in = ref / completion.sum(1) if loss_type == "ipo" else ref  # IPO: per-token means
    out = ops.linear_preference_loss(hidden, weight, tokens, completion[:, 1:], torch.stack(ref_in.chunk(2), 1),
                                     loss=loss_type, beta=beta, chunk_size=2)
    torch.testing.assert_close(out.loss / b, trl_loss.double(), rtol=1e-6, atol=1e-8)
    grads = torch.autograd.grad(out.loss / b, (hidden, weight))
    for g, tg in zip(grads, trl_grads):
        torch.testing.assert_close(g, tg.double(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss,softcap", [("sigmoid", None), ("ipo", None), ("simpo", None), ("sigmoid", 3.0)])
def test_trainer_fused_loss_equals_sequence_logprobs_path(tmp_path, loss, softcap, monkeypatch):
    """DPOTrainer's loss through the fused op equals the sequence_logprobs + dpo_loss/simpo_loss
    path: the loss sum, every parameter's gradient and the reward statistics (the metrics)."""
    calls = []
    fused_op = ops.linear_preference_loss
    monkeypatch.setattr(ops, "linear_preference_loss", lambda *a, **k: calls.append(1) or fused_op(*a, **k))
    model, tok = _model(seed=1)
    model.config.final_softcap = softcap  # Gemma 2's final logit soft-cap: applied by both paths
    source = _source(tok, n=8)
    config = TrainerConfig(out=str(tmp_path), max_steps=1, batch_size=8, lr=1e-3, warmup_steps=0, progress=False)
    dpo = DPOConfig(loss=loss, beta=0.5 if loss != "simpo" else 2.0, label_smoothing=0.1 if loss != "ipo" else 0.0,
                    reference="none" if loss == "simpo" else "precompute")
    trainer = DPOTrainer(model, source, config, dpo)
    trainer._build()  # what fit() sets up before the first step (self.forward, the reference cache)
    batch = trainer._to_device(source.batch(0))
    pairs = batch["labels"].shape[0]
    batch["ref_logps"] = -torch.rand(pairs, 2, generator=torch.Generator().manual_seed(0)) * 20
    results = {}
    for fused in (True, False):
        trainer.fused, trainer._stats = fused, None
        model.zero_grad()
        loss_sum = trainer._loss_sum(batch, pairs)
        loss_sum.backward()
        results[fused] = (loss_sum.detach(), trainer._stats.clone(),
                          {n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == 1  # the fused run took the op, the other did not
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-5)
    for name, grad in results[True][2].items():
        torch.testing.assert_close(grad, results[False][2][name], rtol=1e-4, atol=1e-6, msg=name)
