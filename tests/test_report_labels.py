"""A domain-adaptation study as published: every table and figure names the rule whose value it
shows and its unit, fine-tuning on target labels is a reference row apart from the ranking, and a
study's ``notes`` are shown everywhere without counting as a change of its configuration; plus
the page as headless Chromium renders it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import BUILTIN_PLUGINS

from harness.publish import index, leaderboard
from harness.publish.html import write_report
from harness.publish.labels import REFERENCE_LABEL, rank_label, rule_label
from harness.publish.rank import reference_rows
from harness.publish.results import read_results
from harness.registry import Registry
from harness.search import RunOptions, build_driver
from harness.search.studies import FROZEN_CONFIG
from harness.study import load_study

CHROMIUM = Path("/usr/bin/chromium")

# IM drives the search; each method also gets a target-val row (source-only's flagged oracle).
STUDY = """
description = "labels test: source-only vs fine-tuning, IM and oracle rows"
{notes}
image_size = 16
batch_size = 64
seed = 0
final_seeds = 2
selection = ["im", "target-val"]

[[pairs]]
source = "digits"
target = "digits-m"

[[methods]]
backbone = "test_resnet"
head = "linear"
strategy = "source-only"

[[methods]]
backbone = "test_resnet"
head = "linear"
strategy = "finetune"

[budget]
trials = 2
max_epochs = 2

[search]
startup_trials = 1
pruner = "none"
augment = "none"
freeze_depth = [0, 1]
"""
NOTES = 'notes = "Epochs chosen after a <first> try & seen."'


def _run(path: Path, registry: Registry, results_dir: Path) -> str:
    spec = load_study(str(path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        driver = build_driver(
            spec, registry, RunOptions(results_dir=results_dir, log=lambda m: None)
        )
        driver.run()
    finally:
        torch.set_num_threads(threads)
    return driver.storage_url


@pytest.fixture(scope="module")
def uda(tmp_path_factory):
    """The tiny study run without notes, then notes added and the run resumed, then published."""
    tmp = tmp_path_factory.mktemp("labels")
    (tmp / "benchmarks").mkdir()
    path = tmp / "benchmarks" / "uda.toml"
    path.write_text(textwrap.dedent(STUDY.format(notes="")))
    registry = Registry()
    registry.load_entry_points(only=BUILTIN_PLUGINS.split(","))
    results_dir = tmp / "results" / "uda"
    url = _run(path, registry, results_dir)
    before = read_results(load_study(str(path)), url)
    path.write_text(textwrap.dedent(STUDY.format(notes=NOTES)))
    _run(path, registry, results_dir)  # refused if notes counted as a changed configuration
    spec = load_study(str(path))
    results = read_results(spec, url)
    board, trials, provenance = leaderboard.tables(results)
    leaderboard.write(results_dir, spec, board, trials, provenance)
    page = write_report(results_dir, results, board, trials, provenance)
    readme = index.write_results_index(tmp / "results")
    return types.SimpleNamespace(
        spec=spec, before=before, results=results, board=board, provenance=provenance,
        results_dir=results_dir, page=page, readme=readme,
    )  # fmt: skip


def test_rule_labels_name_the_rule_and_the_unit():
    assert rule_label("target-val", "classification").axis == "target-val acc %"
    assert rule_label("source-val", "segmentation").axis == "source-val mIoU %"
    im = rule_label("im", "classification")
    assert im.axis == "IM score" and im.value(2.0441) == "2.044" and im.scale(2.0) == 2.0
    assert rule_label("target-val", "classification").value(0.747) == "74.7 %"
    assert rule_label("my-validator", "classification").axis == "my-validator score"


def test_notes_are_not_configuration_and_not_dumped_when_unset(uda):
    assert "notes" not in FROZEN_CONFIG
    assert uda.spec.notes.startswith("Epochs chosen") and uda.spec.dump()["notes"] == uda.spec.notes
    assert "notes" not in uda.spec.model_copy(update={"notes": ""}).dump()
    # the resume trained nothing: the same trials and final runs as before the notes
    for old, new in zip(uda.before.entries, uda.results.entries, strict=True):
        assert [t.number for t in old.study.trials] == [t.number for t in new.study.trials]
        assert [s.finals for s in old.study.selections] == [s.finals for s in new.study.selections]
    # the provenance records the file as it is now; the studies keep the hash they began with
    assert uda.provenance["study_file_sha256"] == uda.spec.file_hash
    assert all(e.study.file_hash != uda.spec.file_hash for e in uda.results.entries)


def test_notes_are_shown_in_every_published_file(uda):
    md = (uda.results_dir / "leaderboard.md").read_text()
    assert "**Notes.** Epochs chosen after a <first> try & seen." in md
    assert json.loads((uda.results_dir / "leaderboard.json").read_text())["notes"] == uda.spec.notes
    assert "Epochs chosen after a &lt;first&gt; try &amp; seen." in uda.page.read_text()
    assert "*Notes:* Epochs chosen after a &lt;first> try & seen." in uda.readme.read_text()


def test_fine_tuning_on_target_labels_is_a_reference_row_not_ranked(uda):
    rows = json.loads((uda.results_dir / "leaderboard.json").read_text())["rows"]
    by = {(r["strategy"], r["selection"]): r for r in rows}
    for rule in ("im", "target-val"):
        ref = by[("finetune", rule)]
        assert ref["reference"] is True and ref["rank"] is None and not ref["oracle"]
    assert by[("source-only", "im")]["rank"] == 1 and not by[("source-only", "im")]["reference"]
    assert by[("source-only", "target-val")]["rank"] == 1  # oracle rows rank among themselves
    assert [r["strategy"] for r in rows][-2:] == ["finetune", "finetune"]  # apart, after
    md = (uda.results_dir / "leaderboard.md").read_text()
    assert md.count(f"| {REFERENCE_LABEL}") == 2 and "not ranked" in md
    # a table without label-free rows (e.g. the quickstart's) ranks as before
    plain = pd.DataFrame(
        {"pair": ["p", "p"], "selection": ["source-val", "target-val"],
         "target_labels": ["none", "all"]}
    )  # fmt: skip
    assert not reference_rows(plain).any()
    assert rank_label({"rank": 2}) == "2" and rank_label({"rank": None}) == "-"


def test_page_and_plots_name_the_rule_of_every_value(uda):
    text = uda.page.read_text()
    assert "validation acc" not in text and "validation score" not in text
    assert "mean ± sd" not in text and "mean ± standard error over seeds" in text
    # the search was driven by IM: its plots say so, in IM's own unit
    assert text.count("optimization history, trial value = IM score") == 4  # alt + caption, x2
    assert "parameter importances for the trial value (IM score)" in text
    assert "freeze depth vs trial value (IM score)" in text
    # each row's picked trial is given with its rule's name and unit
    for r in uda.board.to_dict("records"):
        label = rule_label(r["selection"], "classification")
        assert f"under {r['selection']}: {label.name} {label.value(r['val_score'])}" in text
    assert re.search(r"IM score \d+\.\d{3}<", text) and re.search(r"target-val acc \d+\.\d %", text)
    assert not re.search(r"IM score [\d.]+ %", text)


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]  # fmt: skip
    return subprocess.run(
        [str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_the_page_in_headless_chromium_labels_values_by_their_rule(uda, tmp_path):
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is missing (apt-get install chromium); the browser check needs it"
        if os.environ.get("HARNESS_REQUIRE_CHROMIUM") == "1":
            pytest.fail(message + " (HARNESS_REQUIRE_CHROMIUM=1)")
        pytest.skip(message)
    url = uda.page.resolve().as_uri()
    shot = tmp_path / "shot.png"
    result = _chromium(
        f"--screenshot={shot}", "--window-size=1200,1600", url, profile=tmp_path / "p1"
    )
    assert result.returncode == 0 and shot.stat().st_size > 0, result.stderr[-2000:]
    dom = _chromium("--dump-dom", url, profile=tmp_path / "p2")
    assert dom.returncode == 0, dom.stderr[-2000:]
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", dom.stdout, re.S)
    alts = re.findall(r'<img [^>]*alt="([^"]*)"', dom.stdout)
    assert captions and alts
    for shown in captions + alts:
        assert "validation acc" not in shown and "mean ± sd" not in shown
        if "history" in shown or "importances" in shown or "freeze depth" in shown:
            assert "IM score" in shown, shown
    rows = re.findall(r"<tr>(.*?)</tr>", dom.stdout, re.S)
    im_rows = [r for r in rows if re.search(r"<td[^>]*>im</td>", r)]
    tv_rows = [r for r in rows if re.search(r"<td[^>]*>target-val", r)]
    assert len(im_rows) == len(tv_rows) == 2
    assert all(
        "IM score" in r and "%" not in r.split("IM score")[1].split("</td>")[0] for r in im_rows
    )
    assert all("target-val acc" in r for r in tv_rows)
    references = [r for r in rows if REFERENCE_LABEL in r]
    assert len(references) == 2 and all("finetune" in r for r in references)
