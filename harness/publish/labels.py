"""What a published value is called and in what unit, by the selection rule that produced it: a
labelled validation split's score is the task's primary metric in % ("target-val acc %"), a
label-free validator's is a plain number named after the validator ("IM score"). One owner, so
every table and figure of the report names the rule and the unit the same way."""

from __future__ import annotations

from typing import Any, NamedTuple

from harness.metrics import LABELS, primary_metric
from harness.publish.format import finite, rank_cell, truthy

#: how the built-in label-free validators are written (a plugin's is shown by its rule name)
VALIDATOR_NAMES = {"im": "IM", "entropy": "entropy", "snd": "SND", "bnm": "BNM"}
#: the rules whose score is a labelled split's metric, shown in %
LABELLED_RULES = ("target-val", "source-val", "leave-one-source-out")


class RuleLabel(NamedTuple):
    """A rule's score as a reader sees it: ``name`` ("target-val acc", "IM score") and ``unit``
    ("%" for a labelled split's metric, "" for a validator's own value)."""

    name: str
    unit: str

    @property
    def percent(self) -> bool:
        return self.unit == "%"

    @property
    def axis(self) -> str:
        """The name with its unit, for an axis or a column: "target-val acc %", "IM score"."""
        return f"{self.name} {self.unit}".strip()

    def value(self, v: Any) -> str:
        """A score of this rule with its name and unit: "74.7 %" or "2.044" (``-`` when missing)."""
        if not finite(v):
            return "-"
        return f"{100 * float(v):.1f} %" if self.percent else f"{float(v):.3f}"

    def scale(self, v: float) -> float:
        """A stored score as plotted: ×100 for a percentage, as it is for a validator."""
        return 100 * v if self.percent else v


def rule_label(rule: str | None, task: str) -> RuleLabel:
    """The label and unit of the scores a selection ``rule`` gives in a study of ``task``."""
    if rule in LABELLED_RULES:
        return RuleLabel(f"{rule} {LABELS[primary_metric(task)]}", "%")
    return RuleLabel(f"{VALIDATOR_NAMES.get(rule or '', rule or 'selection')} score", "")


def label_free(rule: Any) -> bool:
    """Whether ``rule`` is a validator scoring unlabelled target images (any rule but the
    labelled splits' ``target-val`` and ``source-val``; plugins may register more)."""
    return isinstance(rule, str) and bool(rule) and rule not in LABELLED_RULES


def rules_label(rules: list[str], task: str) -> RuleLabel:
    """One label for the values of several rules (e.g. a plot over methods): the rule's own
    label when they agree, else their names joined (values on different scales: say so)."""
    labels = list(dict.fromkeys(rule_label(r, task) for r in rules))
    if len(labels) == 1:
        return labels[0]
    return RuleLabel(" / ".join(lab.axis for lab in labels) + " (per method's rule)", "")


#: how a reference row is marked where other rows show their rank
REFERENCE_LABEL = "reference (target labels)"
#: what a board with reference rows says about them
REFERENCE_NOTE = (
    f"Rows marked *{REFERENCE_LABEL}* train on target labels (fine-tuning on them: the ceiling) "
    "in a table of methods compared without them (rows selected by a label-free validator): "
    "they are shown after the ranked rows and not ranked, since they were given what the "
    "others do without."
)


def rank_label(row: dict[str, Any]) -> str:
    """A row's rank as shown: its number, ``-`` when unranked, or the reference mark."""
    if truthy(row.get("reference")):
        return REFERENCE_LABEL
    return rank_cell(row.get("rank"))
