"""DomainBed's leave-one-domain-out table, from a synthetic board: its groups, columns, cells,
averages and missing cells, and where it appears (JSON, Markdown, HTML)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from harness.publish import domainbed, leaderboard
from harness.publish.markdown import to_markdown
from harness.study import StudySpec

DOMAINS = ["rotated-digits/0", "rotated-digits/15", "rotated-digits/30"]
METHODS = [
    {"backbone": "test_resnet", "strategy": "erm", "name": "erm"},
    {"backbone": "test_resnet", "strategy": "vrex", "name": "vrex"},
]


def _spec(pairs: list[dict]) -> StudySpec:
    return StudySpec.model_validate(
        {
            "pairs": pairs,
            "methods": METHODS,
            "selection": ["source-val", "target-val"],
            "final_seeds": 3,
        }
    ).model_copy(update={"name": "dg"})


def _row(pair: str, method: str, rule: str, mean: float, se: float, **extra) -> dict:
    return {
        "pair": pair, "method": method, "strategy": method, "selection": rule,
        "oracle": rule == "target-val", "search_saw_target_labels": False, "status": "final",
        "n_seeds": 3, "test_accuracy": mean, "test_accuracy_se": se, **extra,
    }  # fmt: skip


@pytest.fixture
def spec() -> StudySpec:
    return _spec([{"leave_one_out": DOMAINS}])


@pytest.fixture
def board(spec: StudySpec) -> pd.DataFrame:
    """erm complete under both rules; vrex's third pair not started, its second partial."""
    k = [p.key for p in spec.pairs]
    rows = []
    for i, key in enumerate(k):
        rows.append(_row(key, "erm", "source-val", 0.90 + 0.01 * i, 0.01))
        rows.append(_row(key, "erm", "target-val", 0.95, 0.02))
    rows.append(_row(k[0], "vrex", "source-val", 0.80, 0.03))
    rows.append(_row(k[0], "vrex", "target-val", 0.85, float("nan")))
    rows.append(_row(k[1], "vrex", "source-val", 0.70, 0.05, status="2/3 seeds", n_seeds=2))
    rows.append(_row(k[1], "vrex", "target-val", 0.75, 0.05))
    rows.append(
        {"pair": k[2], "method": "vrex", "strategy": "vrex",
         "selection": "source-val, target-val", "status": "not started"}
    )  # fmt: skip
    return pd.DataFrame(rows)


def test_groups_need_three_pairs_sharing_their_domains() -> None:
    spec = _spec([{"leave_one_out": DOMAINS}])
    [group] = domainbed.groups(spec)
    assert group.held_out == DOMAINS
    assert sorted(group.domains) == sorted(DOMAINS)
    two_way = _spec([{"source": "digits", "target": "digits-m"},
                     {"source": "digits-m", "target": "digits"}])  # fmt: skip
    assert domainbed.groups(two_way) == []
    ring = _spec(
        [
            {"source": a, "target": b}
            for a, b in zip(DOMAINS, DOMAINS[1:] + DOMAINS[:1], strict=True)
        ]
    )
    assert domainbed.groups(ring) == []  # one source each: no pair shares all its domains
    mixed = _spec([{"leave_one_out": DOMAINS}, {"source": "digits", "target": "digits-m"}])
    assert [g.held_out for g in domainbed.groups(mixed)] == [DOMAINS]


def test_table_cells_averages_and_missing(spec: StudySpec, board: pd.DataFrame) -> None:
    [group] = domainbed.tables(spec, board)
    assert group["held_out"] == DOMAINS and group["metric"] == "accuracy"
    assert [t["selection"] for t in group["tables"]] == ["source-val", "target-val"]
    honest, oracle = ({r["method"]: r for r in t["rows"]} for t in group["tables"])
    erm = honest["erm"]
    assert list(erm["cells"]) == DOMAINS
    assert [erm["cells"][d]["mean"] for d in DOMAINS] == [0.90, 0.91, 0.92]
    assert [erm["cells"][d]["se"] for d in DOMAINS] == [0.01, 0.01, 0.01]
    assert erm["average"] == pytest.approx(0.91)
    assert not erm["oracle"] and oracle["erm"]["oracle"]
    vrex = honest["vrex"]
    assert vrex["cells"][DOMAINS[1]] == {"mean": 0.70, "se": 0.05, "n_seeds": 2,
                                         "status": "2/3 seeds"}  # fmt: skip
    assert vrex["cells"][DOMAINS[2]]["mean"] is None
    assert vrex["average"] is None  # a held-out domain missing: no average
    assert oracle["vrex"]["cells"][DOMAINS[0]]["se"] is None  # one seed: no standard error
    json.dumps(group, allow_nan=False)  # JSON-ready: no NaN


def test_markdown_and_html_sections(spec: StudySpec, board: pd.DataFrame) -> None:
    text = "\n".join(domainbed.markdown_lines(spec, board))
    assert "## Leave one domain out: rotated-digits, selected by source-val" in text
    assert "## Leave one domain out: rotated-digits, selected by target-val" in text
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["method", "0", "15", "30", "avg"]
    erm = next(line for line in text.splitlines() if line.startswith("| erm "))
    assert [c.strip() for c in erm.strip("|").split("|")] == [
        "erm", "90.0 ± 1.0", "91.0 ± 1.0", "92.0 ± 1.0", "91.0",
    ]  # fmt: skip
    assert "| erm **oracle**" in text
    vrex = next(line for line in text.splitlines() if line.startswith("| vrex "))
    assert "70.0 ± 5.0 (2/3)" in vrex and vrex.rstrip("| ").endswith("—")
    page = "\n".join(domainbed.html_sections(spec, board))
    assert page.count("<table>") == 2 and '<span class="badge oracle">oracle</span>' in page
    assert "<th>15</th>" in page and '<td class="num">—</td>' in page


def test_no_group_no_section(tmp_path) -> None:
    spec = _spec([{"source": "digits", "target": "digits-m"}])
    board = pd.DataFrame(
        [_row("digits->digits-m", m["name"], "source-val", 0.5, 0.1) for m in METHODS]
    )
    assert domainbed.tables(spec, board) == []
    assert domainbed.markdown_lines(spec, board) == []
    assert domainbed.html_sections(spec, board) == []
    leaderboard.write(tmp_path, spec, board, pd.DataFrame(), _provenance())
    assert "domainbed" not in json.loads((tmp_path / "leaderboard.json").read_text())
    assert "Leave one domain out" not in (tmp_path / "leaderboard.md").read_text()


def test_leaderboard_files_carry_the_table(tmp_path, spec, board) -> None:
    leaderboard.write(tmp_path, spec, board, pd.DataFrame(), _provenance())
    data = json.loads((tmp_path / "leaderboard.json").read_text())
    assert data["domainbed"] == domainbed.tables(spec, board)
    assert "provenance" in data
    md = (tmp_path / "leaderboard.md").read_text()
    assert md == to_markdown(spec, board, _provenance())
    # the tables come before the per-pair boards
    assert md.index("Leave one domain out") < md.index(f"## {spec.pairs[0].key}")
    assert math.isclose(data["domainbed"][0]["tables"][0]["rows"][0]["average"], 0.91)


def _provenance() -> dict:
    return {
        "harness_version": "0", "final_runs_git_commits": [], "git_commit": None,
        "python": "3.11", "packages": {}, "device": ["cpu"], "precision": ["fp32"],
        "seeds": {"study": 0, "final": [0, 1, 2]}, "sampler": "tpe", "pruner": ["median"],
        "data_fingerprints": {}, "study_file": "dg.toml", "study_file_sha256": "0",
        "trial_counts": {}, "compute_seconds": 0.0, "wall_seconds": 0.0, "generated_at": "now",
    }  # fmt: skip
