"""The synthetic preference task: oracle, fluency, generators' shapes, determinism and noise."""

import pytest

from fastlm.align import synthetic as syn
from fastlm.data import ByteTokenizer


def test_oracle_and_fluency():
    assert syn.is_fluent("01234567\n")
    assert syn.oracle_reward("01234567\n") == 0.5
    assert syn.oracle_reward("02468024\n") == 1.0
    assert syn.oracle_reward("13579135\n") == 0.0
    for bad in ("0123456\n", "012345678\n", "01234567", "0123456a\n", " 01234567\n", "01234567\n\n", ""):
        assert not syn.is_fluent(bad), bad
        assert syn.oracle_reward(bad) == 0.0
    with pytest.raises(TypeError, match="completion must be a str"):
        syn.is_fluent(5)


def test_sft_rows_uniform_and_byte_encodable():
    rows = syn.sft_rows(400, seed=3)
    assert rows == syn.sft_rows(400, seed=3) and rows != syn.sft_rows(400, seed=4)
    assert all(r["prompt"].startswith("Q") and r["prompt"].endswith(":") for r in rows)
    stats = syn.summarize([r["completion"] for r in rows])
    assert stats["fluency"] == 1.0
    assert abs(stats["mean_reward"] - 0.5) < 0.03  # 3200 digits: std of the mean ~0.009
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(rows[0]["prompt"] + rows[0]["completion"])) == rows[0]["prompt"] + rows[0]["completion"]


def test_ranking_rows_follow_oracle_up_to_noise():
    clean = syn.ranking_rows(200, k=4, noise=0.0, seed=1)
    for row in clean:
        assert len(row["completions"]) == len(row["ranking"]) == 4
        r = syn.oracle_rewards(row["completions"])
        for i in range(4):
            for j in range(4):
                if r[i] > r[j]:
                    assert row["ranking"][i] < row["ranking"][j]
                elif r[i] == r[j]:
                    assert row["ranking"][i] == row["ranking"][j]
    assert any(len(set(row["ranking"])) < 4 for row in clean), "ties should occur"
    assert min(min(row["ranking"]) for row in clean) == 1

    def disagreement(rows):
        bad = total = 0
        for row in rows:
            r = syn.oracle_rewards(row["completions"])
            for i in range(4):
                for j in range(4):
                    if r[i] > r[j]:
                        total += 1
                        bad += row["ranking"][i] > row["ranking"][j]
        return bad / total

    assert disagreement(clean) == 0.0
    assert 0.05 < disagreement(syn.ranking_rows(300, k=4, noise=0.4, seed=1)) < 0.4


def test_pair_rows_and_malformed():
    rows = syn.pair_rows(300, noise=0.0, seed=2)
    assert all(syn.oracle_reward(r["chosen"]) > syn.oracle_reward(r["rejected"]) for r in rows)
    noisy = syn.pair_rows(1000, noise=0.2, seed=2)
    flipped = sum(syn.oracle_reward(r["chosen"]) < syn.oracle_reward(r["rejected"]) for r in noisy) / 1000
    assert 0.15 < flipped < 0.25
    bad = syn.ranking_rows(100, k=4, noise=0.0, seed=0, malformed=0.5)
    frac = sum(not syn.is_fluent(c) for row in bad for c in row["completions"]) / 400
    assert 0.4 < frac < 0.6


def test_bad_arguments_named():
    with pytest.raises(ValueError, match="noise"):
        syn.ranking_rows(3, noise=1.5)
    with pytest.raises(ValueError, match="k must be"):
        syn.ranking_rows(3, k=1)
    with pytest.raises(ValueError, match="n must be"):
        syn.prompts(-1)
