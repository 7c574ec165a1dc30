"""Label-free validators on hand-made logits with known answers, and their rank agreement."""

from __future__ import annotations

import math

import pytest
import torch

from harness import validators as v

BIG = 40.0  # logits this far apart give a one-hot softmax in float32


def one_hot_logits(labels: list[int], classes: int) -> torch.Tensor:
    return BIG * torch.nn.functional.one_hot(torch.tensor(labels), classes).float()


def test_entropy_is_zero_for_confident_and_minus_log_c_for_uniform_predictions():
    assert v.neg_entropy(one_hot_logits([0, 1, 2], 4)) == pytest.approx(0.0, abs=1e-6)
    assert v.neg_entropy(torch.zeros(5, 4)) == pytest.approx(-math.log(4))


def test_information_maximization_rewards_confident_and_diverse_predictions():
    diverse = one_hot_logits([0, 1, 2, 3], 4)
    collapsed = one_hot_logits([2, 2, 2, 2], 4)
    assert v.information_maximization(diverse) == pytest.approx(math.log(4), abs=1e-5)
    assert v.information_maximization(collapsed) == pytest.approx(0.0, abs=1e-5)
    assert v.information_maximization(torch.zeros(4, 4)) == pytest.approx(
        0.0, abs=1e-6
    )  # diverse on average, unsure each


def test_batch_nuclear_norm_of_known_matrices():
    # one-hot rows covering every class: singular values all 1 -> C / N
    assert v.batch_nuclear_norm(one_hot_logits([0, 1, 2, 3], 4)) == pytest.approx(1.0, abs=1e-5)
    # all rows the same class: one singular value sqrt(N)
    assert v.batch_nuclear_norm(one_hot_logits([1, 1, 1, 1], 4)) == pytest.approx(2 / 4, abs=1e-5)
    # uniform rows: one singular value sqrt(N * C) / C
    assert v.batch_nuclear_norm(torch.zeros(4, 4)) == pytest.approx(math.sqrt(16) / 4 / 4, abs=1e-5)


def test_soft_neighborhood_density_of_known_layouts():
    # every prediction identical: each row's neighbours are uniform over the other N - 1
    same = one_hot_logits([0] * 5, 3)
    assert v.soft_neighborhood_density(same) == pytest.approx(math.log(4), abs=1e-4)
    # two tight clusters of 3: each row spreads over its 2 cluster mates
    clusters = one_hot_logits([0, 0, 0, 1, 1, 1], 3)
    assert v.soft_neighborhood_density(clusters) == pytest.approx(math.log(2), abs=1e-4)
    # all rows different: every neighbour equally far, uniform over N - 1 again
    distinct = one_hot_logits([0, 1, 2], 3)
    assert v.soft_neighborhood_density(distinct) == pytest.approx(math.log(2), abs=1e-4)


def test_soft_neighborhood_density_subsamples_large_inputs_deterministically():
    logits = torch.randn(v.SND_MAX_ROWS + 500, 5, generator=torch.Generator().manual_seed(0))
    assert v.soft_neighborhood_density(logits) == v.soft_neighborhood_density(logits)


def test_validate_returns_every_validator():
    scores = v.validate(torch.randn(10, 3))
    assert set(scores) == {"entropy", "im", "snd", "bnm"} and all(
        math.isfinite(s) for s in scores.values()
    )


def test_rank_agreement_is_spearman():
    truth = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert v.rank_agreement([1, 2, 3, 4, 5], truth) == pytest.approx(1.0)
    assert v.rank_agreement([10, 8, 3, 2, -1], truth) == pytest.approx(-1.0)
    assert v.rank_agreement([1, 2, 3, 5, 4], truth) == pytest.approx(0.9)  # 1 - 6*2 / (5*24)
    assert v.rank_agreement([1, 2], [0.1, 0.2]) is None  # too few trials
    assert v.rank_agreement([1, 1, 1, 1], truth[:4]) is None  # no spread
    assert v.rank_agreement([1, None, 3, float("nan"), 5, 6], [1, 2, 3, 4, 5, 6]) == pytest.approx(
        1.0
    )
