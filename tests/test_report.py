"""Publishing: plots, the self-contained index.html, the re-run bundle and results/README.md, built
from a real (tiny) Optuna storage; plus the browser check and Optuna's public API on the storage."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import types
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pytest
import torch
from conftest import BUILTIN_PLUGINS
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image

from harness.publish import index, leaderboard, plots
from harness.publish.bundle import export_bundle
from harness.publish.html import write_report
from harness.publish.results import read_results
from harness.registry import Registry
from harness.search import RunOptions, build_driver
from harness.store.backends import default_storage, journal_storage
from harness.store.schema import FINALS_SUFFIX, optuna_study_name, trial_params
from harness.study import load_study

CHROMIUM = Path("/usr/bin/chromium")

# Two methods, two trials each, two final seeds; one pinned augmentation policy and no pruning keep
# it to a few seconds, and target-val selection makes source-only an oracle row.
STUDY = """
description = "report test: source-only vs fine-tuning <small> & quick"
image_size = 16
batch_size = 64
seed = 0
final_seeds = 2
selection = "target-val"

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
"""


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Run the tiny study once, then publish it: leaderboard files, bundle, report, results index."""
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "benchmarks").mkdir()
    path = tmp / "benchmarks" / "report.toml"
    path.write_text(textwrap.dedent(STUDY))
    spec = load_study(str(path))
    registry = Registry()
    registry.load_entry_points(only=BUILTIN_PLUGINS.split(","))
    results_dir = tmp / "results" / spec.name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and far faster on a busy machine
    try:
        driver = build_driver(
            spec, registry, RunOptions(results_dir=results_dir, log=lambda m: None)
        )
        driver.run()
    finally:
        torch.set_num_threads(threads)
    url = driver.storage_url
    results = read_results(spec, url)  # one read of the storage for everything published
    board, trials, provenance = leaderboard.tables(results)
    leaderboard.write(results_dir, spec, board, trials, provenance)
    bundle = export_bundle(results_dir, results, board)
    page = write_report(results_dir, results, board, trials, provenance)
    readme = index.write_results_index(tmp / "results")
    return types.SimpleNamespace(
        tmp=tmp, spec=spec, url=url, results_dir=results_dir, results=results, board=board,
        trials=trials, provenance=provenance, bundle=bundle, index=page, readme=readme,
        study_file=path,
    )  # fmt: skip


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data", "action") and value is not None:
                self.urls.append((tag, name, value))


def _links(text: str) -> _Links:
    parser = _Links()
    parser.feed(text)
    return parser


def test_plots_are_valid_pngs(published):
    plots = published.results_dir / "plots"
    names = sorted(p.name for p in plots.glob("*.png"))
    assert "digits-digits-m__leaderboard.png" in names
    assert "digits-digits-m__freeze-depth.png" in names
    for kind in ("history", "importance"):
        assert sum(n.endswith(f"__{kind}.png") for n in names) == 2, names
    for name in names:
        path = plots / name
        assert path.stat().st_size > 0
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 100 and img.height > 100
            img.verify()


def test_index_html_is_self_contained_and_complete(published):
    text = published.index.read_text(encoding="utf-8")
    for method in published.board["method"]:
        assert method in text
    assert "± " in text and "Provenance" in text
    assert "report test: source-only vs fine-tuning &lt;small&gt; &amp; quick" in text  # escaped
    assert 'class="badge oracle">oracle</span>' in text  # source-only selected on target labels
    assert text.count("data:image/png;base64,") == len(
        list((published.results_dir / "plots").glob("*.png"))
    )
    # nothing is fetched from anywhere: no scheme but data:, no protocol-relative URLs, no scripts
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert "http://" not in text and "https://" not in text
    links = _links(text)
    assert not {"script", "link", "iframe", "object", "embed"} & set(links.tags)
    assert "url(" not in text and "@import" not in text
    hrefs = {value for tag, attr, value in links.urls if attr == "href"}
    for name in ("leaderboard.csv", "leaderboard.json", "leaderboard.md", "trials.csv"):
        assert name in hrefs, name
    for tag, attr, value in links.urls:
        if attr == "src":
            assert tag == "img" and value.startswith("data:image/png;base64,")
        elif not value.startswith("#"):
            assert ":" not in value, value  # relative links only
            assert (published.results_dir / value).is_file(), value  # and none of them broken
    assert any(v.startswith("plots/") and v.endswith(".png") for v in hrefs)
    assert any(v.startswith("bundle/") for v in hrefs)
    # the table: one row per method, with the trial counts
    assert text.count("<tr>") >= len(published.board) + 1
    assert "2/0/0" in text


def test_text_from_the_study_and_storage_is_escaped(published, tmp_path):
    spec = published.spec.model_copy(update={"description": "<script>alert(1)</script>"})
    board = published.board.copy()
    board.loc[0, "method"] = '<img src=x onerror="alert(1)">'
    results = dataclasses.replace(published.results, spec=spec)
    page = write_report(tmp_path, results, board, published.trials, published.provenance)
    text = page.read_text(encoding="utf-8")
    assert "<script>" not in text and "<img src=x" not in text
    assert "&lt;script&gt;" in text and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in text


def test_report_notes_plots_it_cannot_draw(published, tmp_path):
    """A storage where one method has only pruned trials and the other never started."""
    spec = published.spec
    url = default_storage(tmp_path)
    study = optuna.create_study(
        study_name=optuna_study_name(spec.pairs[0], spec.methods[0]),
        storage=url,
        direction="maximize",
    )
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"head.lr": 1e-3},
                                 distributions={"head.lr": FloatDistribution(1e-4, 1e-2, log=True)},
                                 intermediate_values={0: 0.2}))  # fmt: skip
    results = read_results(spec, url)
    board, trials, provenance = leaderboard.tables(results)
    assert set(board["status"]) == {"no completed trial", "not started"}
    page = write_report(tmp_path, results, board, trials, provenance)
    text = page.read_text(encoding="utf-8")
    assert "no completed trial yet" in text and "not started" in text
    assert "no row has a test score yet" in text
    assert "data:image/png" not in text and not list((tmp_path / "plots").glob("*.png"))


def test_one_read_of_the_storage_makes_every_published_file(published, tmp_path):
    """Everything is published from what read_results read: with the storage gone afterwards, the
    plots and the bundle come out the same, and nothing opened the storage again."""
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(published.results_dir / "optuna.journal", store / "optuna.journal")
    results = read_results(published.spec, journal_storage(store))
    board, trials, provenance = leaderboard.tables(results)
    shutil.rmtree(store)
    out = tmp_path / "out"
    leaderboard.write(out, published.spec, board, trials, provenance)
    export_bundle(out, results, board)
    write_report(out, results, board, trials, provenance)
    assert not store.exists()  # opening a journal storage would have made its folder again
    pngs = sorted(p.name for p in (published.results_dir / "plots").glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in (out / "plots").glob("*.png"))
    for name in pngs:
        assert (out / "plots" / name).read_bytes() == (
            published.results_dir / "plots" / name
        ).read_bytes()
    for name in ("best_params.json", "resolved_study.json", "report.toml"):
        assert (out / "bundle" / name).read_bytes() == (published.bundle / name).read_bytes()
    assert (out / "trials.csv").read_bytes() == (published.results_dir / "trials.csv").read_bytes()


def test_importances_need_two_completed_trials_and_two_varying_params():
    def trials_with(*params: dict) -> list[optuna.trial.FrozenTrial]:
        dists = {"a": FloatDistribution(0.1, 1.0), "b": FloatDistribution(0.1, 1.0)}
        return [
            create_trial(value=0.1 * i, params=p, distributions={k: dists[k] for k in p})
            for i, p in enumerate(params)
        ]

    assert "at least 2 completed trials (1 so far)" in plots.importance_note(
        trials_with({"a": 0.2, "b": 0.3})
    )
    note = plots.importance_note(trials_with({"a": 0.2, "b": 0.3}, {"a": 0.5, "b": 0.3}))
    assert "more than one" in note and "(only a)" in note
    assert plots.importance_note(trials_with({"a": 0.2, "b": 0.3}, {"a": 0.5, "b": 0.4})) is None


def test_bundle_has_study_resolved_spec_best_params_and_rerun_script(published):
    bundle, spec = published.bundle, published.spec
    assert bundle == published.results_dir / "bundle"
    for name in (
        "report.toml",
        "resolved_study.json",
        "best_params.json",
        "rerun.sh",
        "README.txt",
    ):
        assert (bundle / name).is_file(), name
    assert (bundle / "report.toml").read_bytes() == published.study_file.read_bytes()
    resolved = json.loads((bundle / "resolved_study.json").read_text())
    assert resolved == spec.dump()
    # settings added since the first published studies appear only when set: their bundles stay
    assert "data" not in resolved and "keep_models" not in resolved
    assert "crop_scale" not in resolved["search"]
    best = json.loads((bundle / "best_params.json").read_text())
    methods = best["pairs"]["digits->digits-m"]
    assert set(methods) == set(published.board["method"])
    for row in published.board.to_dict("records"):
        entry = methods[row["method"]][row["selection"]]  # one entry per rule
        assert entry["params"] == row["best_params"] and entry["best_trial"] == row["best_trial"]
        assert entry["test_accuracy_se"] == row["test_accuracy_se"]
        assert {"head.lr", "optimizer.weight_decay", "backbone.freeze_depth"} <= set(
            entry["params"]
        )
    script = (bundle / "rerun.sh").read_text()
    assert os.stat(bundle / "rerun.sh").st_mode & stat.S_IXUSR
    assert 'run --study "$HERE/report.toml" --storage "$STORAGE"' in script
    assert "resumes: completed trials are reused" in script and "final seeded runs" in script
    assert subprocess.run(["sh", "-n", str(bundle / "rerun.sh")]).returncode == 0
    assert "rerun.sh" in (bundle / "README.txt").read_text()


def test_bundle_rerun_script_runs_harness_with_the_right_arguments(published, tmp_path):
    """rerun.sh with a stand-in harness that prints its arguments: the study copy and the storage."""
    fake = tmp_path / "fake-harness"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    out = subprocess.run(
        ["sh", str(published.bundle / "rerun.sh"), "--quiet"], capture_output=True, text=True,
        env={**os.environ, "HARNESS": str(fake)}, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert out[0] == "run" and out[-1] == "--quiet"
    args = dict(zip(out[1:-1:2], out[2:-1:2], strict=True))
    assert Path(args["--study"]).resolve() == (published.bundle / "report.toml").resolve()
    journal = Path(args["--storage"].removeprefix("journal:///"))
    assert (
        args["--storage"].startswith("journal:////")
        and journal.resolve() == (published.results_dir / "optuna.journal").resolve()
    )
    assert Path(args["--results-dir"]).resolve() == published.results_dir.parent.resolve()


@pytest.mark.slow
def test_bundle_rerun_script_resumes_without_training(published):
    """The real thing: the same storage, every trial and final run done, so nothing is trained."""
    exe = Path(sys.executable).with_name("harness")
    if not exe.is_file():
        pytest.skip(f"no harness executable beside {sys.executable}")
    before = json.loads((published.results_dir / "leaderboard.json").read_text())["rows"]
    result = subprocess.run(
        ["sh", str(published.bundle / "rerun.sh")], capture_output=True, text=True, cwd=published.tmp,
        env={**os.environ, "HARNESS": str(exe)}, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already spent" in result.stderr and "final seed" not in result.stderr
    after = json.loads((published.results_dir / "leaderboard.json").read_text())["rows"]
    assert [r["test_accuracy"] for r in after] == [r["test_accuracy"] for r in before]


def test_results_index_lists_every_published_study(published, tmp_path):
    text = published.readme.read_text()
    assert published.readme == published.tmp / "results" / "README.md"
    board = published.board
    # source-only selected on target labels is an oracle row: it ranks among oracle rows and
    # never makes the headline, which names the honestly selected winner
    top = board[(board["rank"] == 1) & ~board["oracle"].astype(bool)].iloc[0]
    oracle = board[board["oracle"].astype(bool)]
    row = next(line for line in text.splitlines() if line.startswith("| report |"))
    assert top["method"] in row and "acc " in row and "± " in row
    assert list(oracle["method"]) == ["test_resnet(none)+linear+source-only"]
    assert "source-only" not in row.split("|")[3]  # the headline cell
    assert (
        "[index.html](report/index.html)" in row
        and "[leaderboard.md](report/leaderboard.md)" in row
    )
    assert "report test: source-only vs fine-tuning &lt;small> & quick" in row
    assert row.split("|")[4].strip() == str(len(published.board))
    # other folders: a second study, one with a broken leaderboard.json, one with none
    shutil.copytree(
        published.results_dir,
        tmp_path / "second",
        ignore=shutil.ignore_patterns("optuna.journal*", "bundle"),
    )
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "leaderboard.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    text = index.write_results_index(tmp_path).read_text()
    assert (
        "| second |" in text
        and "| broken | (unreadable leaderboard.json" in text
        and "| empty |" not in text
    )


def test_storage_loads_with_optunas_public_api_as_optuna_dashboard_does(published):
    """optuna-dashboard reads a storage with these calls only."""
    spec, url = published.spec, published.url
    assert url == journal_storage(published.results_dir)
    # what `optuna-dashboard results/NAME/optuna.journal` opens
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(
        JournalFileBackend(str(published.results_dir / "optuna.journal"))
    )
    summaries = optuna.get_all_study_summaries(storage)
    names = {optuna_study_name(spec.pairs[0], m) for m in spec.methods}
    # beside each (pair, method) study, the one that holds the claims of its final runs
    assert {s.study_name for s in summaries} == names | {n + FINALS_SUFFIX for n in names}
    for summary in (s for s in summaries if s.study_name in names):
        assert summary.n_trials == 2 and summary.direction == optuna.study.StudyDirection.MAXIMIZE
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        best = study.best_trial
        assert best.params and set(best.params) <= set(trial_params(best))
        assert any(k.startswith(f"final:{best.number}:") for k in study.user_attrs)
        assert all(len(t.intermediate_values) == 2 for t in study.trials)


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]  # fmt: skip
    return subprocess.run(
        [str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_index_html_renders_in_headless_chromium(published, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); the browser check needs it")
    url = published.index.resolve().as_uri()
    shot = tmp_path / "shot.png"
    result = _chromium(
        f"--screenshot={shot}", "--window-size=1200,1600", url, profile=tmp_path / "profile"
    )
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    dom = _chromium("--dump-dom", url, profile=tmp_path / "profile2")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    assert "<table>" in text and "Leaderboard: report" in text
    for method in published.board["method"]:
        assert method in text
    rows = re.findall(r"<tr>.*?</tr>", text, re.S)
    assert any("source-only" in r and "oracle" in r and "± " in r for r in rows)
    assert any("finetune" in r and "± " in r and "target-val" in r for r in rows)
    images = re.findall(r"<img [^>]*>", text)
    assert len(images) == len(list((published.results_dir / "plots").glob("*.png")))
    assert all('src="data:image/png;base64,' in img for img in images)
    with Image.open(shot) as img:
        rgb = img.convert("RGB")
        assert rgb.size == (1200, 1600)
        colours = rgb.getcolors(maxcolors=1 << 24)
        assert len(colours) > 1, "blank screenshot"
        # the leaderboard bar chart is in view: its bars are matplotlib's first colour
        r0, g0, b0 = (int(plots.BAR_COLOUR[i : i + 2], 16) for i in (1, 3, 5))
        bar = sum(
            n
            for n, (r, g, b) in colours
            if abs(r - r0) < 12 and abs(g - g0) < 12 and abs(b - b0) < 12
        )
        assert bar > 500, f"only {bar} bar-coloured pixels: the plots did not render"


def test_results_index_lists_a_pair_once_per_result_and_names_the_selecting_rules(tmp_path):
    """Rules that picked the same trial give rows that tie at rank 1: one headline entry for them."""
    row = {
        "pair": "a->b",
        "method": "m",
        "rank": 1,
        "oracle": False,
        "test_accuracy": 0.5,
        "test_accuracy_se": 0.01,
    }
    records = [
        {**row, "selection": "im"},
        {**row, "selection": "target-val"},
        {**row, "method": "other", "selection": "im"},  # another method tied at rank 1
        {
            **row,
            "method": "peek",
            "selection": "target-val",
            "oracle": True,
        },  # oracle: never a headline
        {**row, "method": "second", "rank": 2, "selection": "im"},
    ]
    assert index._headline(records) == (
        "a->b: m, acc 50.0 ± 1.0 (selected by im, target-val); a->b: other, acc 50.0 ± 1.0 (selected by im)"
    )
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "leaderboard.json").write_text(
        json.dumps({"description": "d", "rows": records})
    )
    text = index.write_results_index(tmp_path).read_text()
    assert (
        text.count("a->b: m,") == 1
        and "label-free validator scoring unlabelled target validation images" in text
    )
    assert "trials were selected on validation splits" not in text


def test_a_complete_study_is_not_labelled_partial(published):
    data = json.loads((published.results_dir / "leaderboard.json").read_text())
    assert "state" not in data and "missing" not in data
    text = (published.results_dir / "leaderboard.md").read_text()
    assert text.startswith("# Leaderboard: report\n") and "Partial results" not in text
    assert "## Unfinished" not in published.readme.read_text()


def test_an_unfinished_study_is_labelled_partial_and_listed_apart(published, tmp_path):
    """A method not started and rows short of their final seeds (as after Ctrl-C): the files say
    so, rows are unranked and shown as '-', nothing is marked oracle without a row, and the index
    lists the study apart from the published ones."""
    text = textwrap.dedent(STUDY).replace("final_seeds = 2", "final_seeds = 3")
    text = text.replace(
        "[budget]",
        '[[methods]]\nbackbone = "test_resnet"\nhead = "linear"\nstrategy = "linear-probe"\n\n[budget]',
    )
    (tmp_path / "partial.toml").write_text(text)
    spec = load_study(str(tmp_path / "partial.toml"))
    folder = tmp_path / "results" / "partial"
    folder.mkdir(parents=True)
    shutil.copy(published.results_dir / "optuna.journal", folder / "optuna.journal")
    results = read_results(spec, journal_storage(folder))
    board, trials, provenance = leaderboard.tables(results)
    leaderboard.write(folder, spec, board, trials, provenance)
    page = write_report(folder, results, board, trials, provenance).read_text()
    shutil.copytree(published.results_dir, tmp_path / "results" / "report")  # a published one
    readme = index.write_results_index(tmp_path / "results").read_text()

    data = json.loads((folder / "leaderboard.json").read_text())
    new = "digits->digits-m: test_resnet(none)+linear+linear-probe"
    assert data["state"] == "partial" and data["missing"]["not_started"] == [new]
    short = data["missing"]["without_final_seeds"]
    assert len(short) == 2 and {r["status"] for r in short} == {"2/3 seeds"}
    assert all(r["rank"] is None for r in data["rows"])
    md = (folder / "leaderboard.md").read_text()
    assert md.startswith("# Leaderboard: partial (partial)\n") and "**Partial results**" in md
    row = next(line for line in md.splitlines() if "linear-probe" in line and "|" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "-" and "oracle" not in row and cells[-1] == "not started"
    assert "<h1>Leaderboard: partial (partial)</h1>" in page and "Partial results" in page
    published_part, unfinished = readme.split("## Unfinished")
    assert "| report |" in published_part and "| partial |" not in published_part
    assert (
        "| partial |" in unfinished
        and "1 not started, 2 row(s) without all final seeds" in unfinished
    )
    assert index.study_state(tmp_path / "partial.toml", folder)[0] == "partial"


def test_a_study_outside_benchmarks_publishes_beside_itself(published, tmp_path, monkeypatch):
    """Its results go to <its folder>/results/<stem>/, and the published index is left alone
    (even with a stem a published study has) unless --index asks for it."""
    from typer.testing import CliRunner

    from harness.cli import app

    own = tmp_path / "mine"
    (own / "results" / "report").mkdir(parents=True)
    shutil.copy(published.study_file, own / "report.toml")
    shutil.copy(published.results_dir / "optuna.journal", own / "results" / "report")
    monkeypatch.chdir(published.tmp)  # a checkout: benchmarks/ and the published results/
    before = {
        p: p.read_bytes() for p in (published.readme, published.results_dir / "leaderboard.md")
    }
    args = ["leaderboard", "--study", str(own / "report.toml"), "--no-report"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (own / "results" / "report" / "leaderboard.json").is_file()
    assert not (own / "results" / "README.md").exists()
    assert all(p.read_bytes() == b for p, b in before.items())
    result = CliRunner().invoke(app, [*args[:3], "--index"])
    assert result.exit_code == 0, result.output
    assert "| report |" in (own / "results" / "README.md").read_text()
    assert all(p.read_bytes() == b for p, b in before.items())
