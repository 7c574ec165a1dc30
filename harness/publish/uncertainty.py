"""What a row's mean ± seed standard error leaves out: its per-seed test values, and the test
sampling uncertainty, a bootstrap interval over test images combined with the seed spread.

Each of :data:`RESAMPLES` resamples draws the test images with replacement, the same images for
every seed's per-image outcomes, and the seeds with replacement; the statistic is the mean over the
drawn seeds of each seed's primary metric on the drawn images (accuracy: the share of correct
images; mIoU: from the summed intersections and unions, as :func:`harness.metrics.segmentation_metrics`
computes it). The interval is the 2.5th and 97.5th percentiles of those means. The resamples come
from numpy's own generator with a fixed seed, so the published interval repeats exactly, and no
global random state is touched. Rows whose final runs have no per-image outcomes (storages written
before they were kept) get no interval: ``None`` in the JSON, ``n/a`` in the tables.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from harness.metrics import primary_metric
from harness.publish.format import finite
from harness.publish.results import Results, Selection
from harness.store.per_image import decode

RESAMPLES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
#: the column of the interval in the Markdown and HTML tables
CI_LABEL = "95% CI (images+seeds)"
NA = "n/a"


def row_fields(task: str, sel: Selection) -> dict[str, Any]:
    """A board row's per-seed test values of the primary metric (seed -> value) and its interval
    (``test_<metric>_ci_low`` / ``_ci_high``, NaN without per-image outcomes)."""
    metric = primary_metric(task)
    per_seed = {
        str(f["seed"]): float(f["test"][metric])
        for f in sel.finals
        if finite(f["test"].get(metric))
    }
    low, high = interval(task, sel.per_image)
    return {
        "test_per_seed": per_seed,
        f"test_{metric}_ci_low": low,
        f"test_{metric}_ci_high": high,
    }


def interval(task: str, records: list[Any]) -> tuple[float, float]:
    """The bootstrap interval of the seed mean from each seed's stored per-image outcomes; NaNs
    unless every seed has them, over the same number of test images."""
    arrays = [decode(r) for r in records]
    if not arrays or any(a is None for a in arrays) or len({a.shape for a in arrays}) != 1:
        return math.nan, math.nan
    stacked = np.stack(arrays)  # (seeds, images, ...)
    if stacked.shape[1] == 0:
        return math.nan, math.nan
    stat = _miou if task == "segmentation" else _accuracy
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    k, n = stacked.shape[:2]
    means = np.empty(RESAMPLES)
    for b in range(RESAMPLES):
        images = rng.integers(0, n, n)
        seeds = rng.integers(0, k, k)
        means[b] = stat(stacked[:, images])[seeds].mean()
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _accuracy(correct: np.ndarray) -> np.ndarray:
    """Each seed's share of correct images: ``correct`` is (seeds, images) of bools."""
    return correct.mean(axis=1)


def _miou(counts: np.ndarray) -> np.ndarray:
    """Each seed's mIoU over the classes present in prediction or truth: ``counts`` is
    (seeds, images, 2, classes) of intersections and unions."""
    inter, union = counts.sum(axis=1).transpose(1, 0, 2)  # each (seeds, classes)
    present = union > 0
    iou = np.where(present, inter / np.maximum(union, 1), 0.0)
    n = present.sum(axis=1)
    return np.where(n > 0, iou.sum(axis=1) / np.maximum(n, 1), 0.0)


def ci_cell(row: dict[str, Any], metric: str) -> str:
    """A row's interval in %, ``low–high``; ``n/a`` where it has none."""
    low, high = row.get(f"test_{metric}_ci_low"), row.get(f"test_{metric}_ci_high")
    if not (finite(low) and finite(high)):
        return NA
    return f"{100 * float(low):.1f}–{100 * float(high):.1f}"


def with_final_runs(trials: pd.DataFrame, results: Results) -> pd.DataFrame:
    """``trials.csv`` with the test primary metric of every final run on the trial it re-ran:
    one column ``final_test_<metric>:<seed>`` per final seed (empty for other trials)."""
    metric = primary_metric(results.spec.task)
    values: dict[tuple[str, str, int], dict[str, float]] = {}
    for e in results.entries:
        for sel in e.study.selections if e.study else []:
            for f in sel.finals:
                if finite(f["test"].get(metric)):
                    cells = values.setdefault((e.pair.key, e.method.key, int(f["trial"])), {})
                    cells[f"final_test_{metric}:{f['seed']}"] = float(f["test"][metric])
    if trials.empty or not values:
        return trials
    columns = sorted(
        {c for cells in values.values() for c in cells}, key=lambda c: int(c.rsplit(":", 1)[1])
    )
    keys = zip(trials["pair"], trials["method"], trials["trial"], strict=True)
    extra = pd.DataFrame(
        [values.get((p, m, int(t)), {}) for p, m, t in keys], columns=columns, index=trials.index
    )
    return pd.concat([trials, extra], axis=1)
