"""retrieval_metrics agrees with pytorch-metric-learning's AccuracyCalculator and brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.evaluate import retrieval_metrics


def clustered(n_classes=12, dim=16, seed=0, spread=1.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    counts = rng.integers(1, 9, size=n_classes)  # includes lone classes (count 1)
    labels = np.repeat(np.arange(n_classes), counts)
    x = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x, labels


def brute_recall(x, y, k):
    keep = np.array([(y == y[i]).sum() > 1 for i in range(len(y))])
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :k]
    return float((y[order] == y[:, None]).any(axis=1)[keep].mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_pml_and_brute_force(seed):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, y = clustered(seed=seed)
    ours = retrieval_metrics(x, y)
    assert set(ours) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi"}
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "NMI"),
                              k="max_bin_count", device=torch.device("cpu"))
    ref = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    assert ours["recall@1"] == pytest.approx(ref["precision_at_1"], abs=1e-9)
    assert ours["map@r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-9)
    assert ours["nmi"] == pytest.approx(ref["NMI"], abs=1e-9)
    for k in (1, 2, 4, 8):
        assert ours[f"recall@{k}"] == pytest.approx(brute_recall(x, y, k), abs=1e-12)
    # the inputs are informative but not trivially separable, so the check is not vacuous
    assert 0.2 < ours["recall@1"] < 1.0 and ours["recall@8"] >= ours["recall@1"]


def test_perfect_and_unnormalised_inputs():
    y = np.repeat(np.arange(5), 3)
    x = np.eye(8)[y] * 7.0 + 0.01 * np.random.default_rng(0).normal(size=(15, 8))  # not unit norm
    m = retrieval_metrics(torch.from_numpy(x), torch.from_numpy(y))
    assert m["recall@1"] == 1.0 and m["map@r"] == pytest.approx(1.0)
    assert 0.0 < m["nmi"] <= 1.0
