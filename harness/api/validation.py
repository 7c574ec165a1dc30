"""Selection rules as plugins: what a validator reads, and what it returns.

A validator scores one trained model (a trial) so that the search can pick among trials without
the target test split. It declares what it reads from a fixed menu (``INPUTS``); the harness
computes only what the study's validators read, once per trial. A validator that reads target
labels (``target_labels`` or ``target_metric``) is *oracle* for methods that claim to need none,
and every leaderboard says so.

A *pooled* validator scores every completed trial of a method together (EnsV scores each against
the ensemble of all of them); it reads ``candidates`` only, is scored after the search from
predictions stored with each trial, and cannot drive the sampler or the pruner (the first rule of
a study's ``selection`` list).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

#: the menu a validator reads from, with what each item is
INPUTS: dict[str, str] = {
    "target_logits": "float logits (N, C) of the target validation images, without their labels "
    "(64 seeded pixels per image for segmentation)",
    "target_labels": "the labels (N,) of target_logits' rows (reading them makes the rule oracle)",
    "source_logits": "float logits (N, C) of the source validation images",
    "source_labels": "the labels (N,) of source_logits' rows",
    "target_features": "pooled backbone features (N, D) of the target validation images",
    "source_features": "pooled backbone features (N, D) of the source validation images",
    "target_metric": "the task's primary metric on the labelled target validation split "
    "(accuracy or mIoU; reading it makes the rule oracle)",
    "source_metric": "the task's primary metric on the labelled source validation split",
    "held_out_source_metric": "pairs of several sources only: the task's primary metric on each "
    "source's validation split, of a model trained on the other sources with the trial's "
    "parameters and seed, averaged over the sources (costs one more training per source)",
    "candidates": "pooled validators only: a list of every completed trial's target "
    "probabilities (N, C), the same rows in every trial",
}
#: what segmentation provides (features and source pixels are not computed for it)
SEGMENTATION_INPUTS = (
    "target_logits",
    "target_metric",
    "source_metric",
    "held_out_source_metric",
)
#: read by leave-one-source-out: trains once more per source of the pair
HELD_OUT_SOURCES = "held_out_source_metric"
#: reading one of these uses target labels
TARGET_LABELLED = ("target_labels", "target_metric")


class Validator:
    """Base class of a selection rule. Subclass it, set ``reads`` and implement ``score`` (or,
    for a pooled rule, set ``pooled = True`` and implement ``score_candidates``).

    ``higher_is_better = False`` declares a risk or a loss: the harness stores and ranks its
    value negated, so every stored score is better when higher."""

    reads: ClassVar[tuple[str, ...]] = ("target_logits",)
    higher_is_better: ClassVar[bool] = True
    pooled: ClassVar[bool] = False

    def score(self, inputs: Mapping[str, Any]) -> float:
        """The rule's value for one trial; ``inputs`` holds exactly the items of ``reads``."""
        raise NotImplementedError

    def score_candidates(self, candidates: Sequence[Any]) -> list[float]:
        """A pooled rule's value for each candidate (the same order), from every candidate's
        target probabilities."""
        raise NotImplementedError

    @classmethod
    def uses_target_labels(cls) -> bool:
        return any(item in TARGET_LABELLED for item in cls.reads)


def declaration_problem(validator: Any) -> str | None:
    """Why ``validator`` breaks the contract above, or None."""
    if not isinstance(validator, Validator):
        return f"returned {type(validator).__name__}, not a harness.api.Validator"
    reads = validator.reads
    if isinstance(reads, str) or not reads:
        return f"reads must be a non-empty tuple of {', '.join(INPUTS)}"
    unknown = [r for r in reads if r not in INPUTS]
    if unknown:
        return f"reads unknown input {unknown[0]!r}; the menu: {', '.join(INPUTS)}"
    if validator.pooled != (tuple(reads) == ("candidates",)):
        return "a pooled validator reads ('candidates',) only, and only a pooled one reads it"
    return None
