"""The built-in selection rules on hand-made inputs with known answers, and rank agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.publish.agreement import rank_agreement
from harness.registry import get_registry
from harness.rules import rule_set
from harness_plugins import validators as v

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


def test_every_builtin_rule_is_registered_and_scores_finite_values():
    rules = rule_set(get_registry(), "classification")
    assert list(rules.validators) == [
        "target-val", "source-val", "leave-one-source-out", "entropy", "im", "snd", "bnm", "dev", "ensv"
    ]  # fmt: skip
    assert list(rule_set(get_registry(), "segmentation").validators) == [
        "target-val", "source-val", "leave-one-source-out", "entropy", "im", "snd", "bnm", "ensv"
    ]  # fmt: skip
    logits = torch.randn(10, 3)
    for name in ("entropy", "im", "snd", "bnm"):
        assert math.isfinite(rules.validators[name].score({"target_logits": logits}))
    assert rules.validators["target-val"].uses_target_labels()
    assert not rules.validators["im"].uses_target_labels()
    assert not rules.validators["dev"].higher_is_better and rules.validators["ensv"].pooled


def test_dev_weights_source_images_like_the_target_and_recovers_the_target_risk():
    """Source features from two clusters, the target only from the second: the source images of
    that cluster get the large density ratios, so DEV's risk is that cluster's loss, not the
    plain source mean."""
    g = np.random.default_rng(0)
    a = g.normal(-3, 1, (400, 4))  # only in the source
    b = g.normal(3, 1, (400, 4))  # in both
    source, target = np.concatenate([a, b]), g.normal(3, 1, (800, 4))
    w = v.density_ratios(source, target)
    assert w[400:].mean() > 20 * w[:400].mean()
    losses = np.r_[
        np.full(400, 2.0), np.full(400, 0.5)
    ]  # the model is wrong where the target isn't
    assert losses.mean() == pytest.approx(1.25)
    assert v.dev_risk(losses, w) == pytest.approx(0.5, abs=0.1)
    # with no shift the weights are about one and DEV is the plain mean loss
    same = v.density_ratios(source, source[g.permutation(800)])
    assert v.dev_risk(losses, same) == pytest.approx(1.25, abs=0.15)


def test_dev_control_variate_is_exact_for_constant_loss():
    w = np.random.default_rng(1).exponential(1.0, 500)
    assert v.dev_risk(np.full(500, 0.7), w) == pytest.approx(0.7)


def test_ensv_scores_each_candidate_against_the_majority():
    truth = torch.tensor([0, 1, 2, 0, 1, 2])
    right = one_hot_logits(truth.tolist(), 3).softmax(1)
    wrong_half = one_hot_logits([0, 1, 2, 1, 2, 0], 3).softmax(1)
    scores = v.ensemble_agreement([right, right, wrong_half])
    assert scores == pytest.approx([1.0, 1.0, 0.5])


def test_rank_agreement_is_spearman():
    truth = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert rank_agreement([1, 2, 3, 4, 5], truth) == pytest.approx(1.0)
    assert rank_agreement([10, 8, 3, 2, -1], truth) == pytest.approx(-1.0)
    assert rank_agreement([1, 2, 3, 5, 4], truth) == pytest.approx(0.9)  # 1 - 6*2 / (5*24)
    assert rank_agreement([1, 2], [0.1, 0.2]) is None  # too few trials
    assert rank_agreement([1, 1, 1, 1], truth[:4]) is None  # no spread
    assert rank_agreement([1, None, 3, float("nan"), 5, 6], [1, 2, 3, 4, 5, 6]) == pytest.approx(
        1.0
    )
