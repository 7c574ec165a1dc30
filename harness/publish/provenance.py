"""The provenance of a leaderboard: code, packages, devices, seeds, samplers, data fingerprints,
plugins, trial counts and compute, gathered from :class:`~harness.publish.results.Results` and the
study file, so that a reader can tell how every number was made."""

from __future__ import annotations

import datetime as dt
import json
import platform
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from harness.publish.agreement import POOLED, agreement, agreement_rules
from harness.publish.format import shown_storage
from harness.publish.results import Results
from harness.publish.seeded import warm_start
from harness.publish.trainings import trainings
from harness.store.schema import GIT_COMMIT, PRUNER, SAMPLER, WEIGHTS_FILES, final_seeds
from harness.study import StudySpec
from harness.versions import HARNESS_VERSION as __version__
from harness.versions import git_commit, package_version

PACKAGES = (
    "torch", "torchvision", "timm", "optuna", "segmentation-models-pytorch", "pluggy",
    "pandas", "torchmetrics", "numpy", "scikit-learn", "scikit-image",
)  # fmt: skip

SELECTION_NOTE = (
    "trials are scored on validation splits and label-free validators only; the target test split "
    "is read once per final seeded run; target-val accuracy of every trial is recorded to judge the "
    "validators afterwards and selects only rows whose rule is target-val"
)


def provenance_of(results: Results) -> dict[str, Any]:
    """The provenance written with the board (``leaderboard.json``, ``.md`` and ``index.html``)."""
    spec = results.spec
    runs = _runs(results)
    return {
        "study": spec.name,
        "study_file": spec.path,
        "study_file_sha256": spec.file_hash,
        "overrides": spec.overrides,
        "harness_version": __version__,
        "git_commit": git_commit(Path(spec.path).parent if spec.path else Path.cwd()),
        "final_runs_git_commits": sorted(runs["commits"]),
        "trial_git_commits": _trial_commits(results),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: package_version(p) for p in PACKAGES},
        "device": sorted(runs["devices"]),
        "device_names": sorted(runs["device_names"]),
        "precision": sorted(runs["precisions"]),
        "seeds": _seeds(spec),
        **_search(results),
        **warm_start(results),  # only where the study warm-starts its searches
        **trainings(results),  # only where a rule trained more than once per trial
        "selection_rule": spec.selection,
        "selection_note": SELECTION_NOTE,
        "validator_agreement": _agreement(results),
        "data_fingerprints": _fingerprints(results),
        **_preprocessing(results),
        "plugins": _plugins(results),
        **_target_images(results),
        **_weights_files(results),
        "budget": spec.budget.model_dump(),
        "trial_counts": _trial_counts(results),
        "compute_seconds": round(runs["compute_s"], 1),
        "wall_seconds": _wall_seconds(results),
        "storage": shown_storage(results.storage_url),
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _target_images(results: Results) -> dict[str, Any]:
    """Which methods saw target images ("train") and which never did ("none": domain
    generalization), written when a study has one of the latter."""
    seen = {
        e.method.key: e.study.config.get("target_images", "train")
        for e in results.entries
        if e.study is not None
    }
    return {"target_images": seen} if "none" in seen.values() else {}


def _seeds(spec: StudySpec) -> dict[str, Any]:
    return {
        "study": spec.seed,
        "data_split": spec.seed,
        "trial": "study seed + trial number",
        "final": final_seeds(spec),
        # true: a trial's head is initialized from its seed, the backbone reset to the weights;
        # false: the backbone is built under the seed and the head initialized after it
        "reuse_backbone": spec.reuse_backbone,
    }


def _search(results: Results) -> dict[str, Any]:
    """Every sampler and pruner the studies were run with."""
    samplers, pruners = set(), set()
    for e in results.entries:
        if e.study is None:
            continue
        if SAMPLER in e.study.attrs:
            samplers.add(json.dumps(e.study.attrs[SAMPLER], sort_keys=True))
        if PRUNER in e.study.attrs:
            pruners.add(e.study.attrs[PRUNER])
    return {"sampler": [json.loads(s) for s in sorted(samplers)], "pruner": sorted(pruners)}


def _runs(results: Results) -> dict[str, Any]:
    """Compute seconds (trials, then each study's final runs, each final run once however many
    rules picked it) and the commits, devices and precisions of the final runs."""
    compute_s = 0.0
    commits: set[str] = set()
    devices: set[str] = set()
    device_names: set[str] = set()
    precisions: set[str] = set()
    for e in results.entries:
        if e.study is None:
            continue
        for t in e.study.trials:
            if t.datetime_start and t.datetime_complete:
                compute_s += (t.datetime_complete - t.datetime_start).total_seconds()
        counted: dict[int, set[int]] = {}  # final runs shared by several rules count once
        for sel in e.study.selections:
            if sel.best is None:
                continue
            for f in sel.finals:
                if f["seed"] not in counted.setdefault(sel.best.number, set()):
                    counted[sel.best.number].add(f["seed"])
                    compute_s += f.get("seconds", 0.0)
                commits.add(f.get("git_commit") or "unknown")
                devices.add(f.get("device", "?"))
                if f.get("device_name"):
                    device_names.add(f["device_name"])
                precisions.add(f.get("precision", "?"))
    return {
        "compute_s": compute_s,
        "commits": commits,
        "devices": devices,
        "device_names": device_names,
        "precisions": precisions,
    }


def _trial_commits(results: Results) -> list[str]:
    """The commits the trials a board is made of ran at ("unknown" for trials stored before
    trials recorded theirs)."""
    return sorted(
        {
            t.user_attrs.get(GIT_COMMIT) or "unknown"
            for e in results.entries
            if e.study is not None
            for t in e.study.budgeted
        }
    )


def _weights_files(results: Results) -> dict[str, Any]:
    """Per (pair, method) study, the weights files its trials started from, with their sha256
    (source-pretrained weights, or the study's own file), where any."""
    found = {
        e.study.name: e.study.attrs[WEIGHTS_FILES]
        for e in results.entries
        if e.study is not None and e.study.attrs.get(WEIGHTS_FILES)
    }
    return {"weights_files": found} if found else {}


def _agreement(results: Results) -> list[dict[str, Any]]:
    """Per pair: the pooled entry first (it rests on several times more trials), then each method."""
    out: list[dict[str, Any]] = []
    every = [s for e in results.entries if e.study for s in e.study.scores.values()]
    rules = agreement_rules(results.spec.task, every)
    for pair in results.spec.pairs:
        pooled: list[dict[str, float]] = []  # scores of every method's completed trials
        per_method = []
        for e in results.of_pair(pair):
            scored = [e.study.scores.get(t.number, {}) for t in e.study.complete] if e.study else []
            per_method.append(agreement(pair.key, e.method.key, scored, rules))
            pooled += scored
        out += [agreement(pair.key, POOLED, pooled, rules), *per_method]
    return out


def _fingerprints(results: Results) -> dict[str, Any]:
    """The data fingerprints of each pair, as the last started method of the pair recorded them."""
    return {e.pair.key: e.study.config.get("data", {}) for e in results.entries if e.study}


def _preprocessing(results: Results) -> dict[str, Any]:
    """How images were made square, per pair, where a dataset recorded it (files it read)."""
    found = {
        e.pair.key: e.study.config["preprocessing"]
        for e in results.entries
        if e.study and "preprocessing" in e.study.config
    }
    return {"preprocessing": found} if found else {}


def _plugins(results: Results) -> list[str]:
    """Every plugin the studies were run with, as "name (distribution)"."""
    plugins: set[str] = set()
    for e in results.entries:
        if e.study is not None:
            for label in (e.study.config.get("plugins") or {}).values():
                plugins.update([label] if isinstance(label, str) else label)  # several sources
    return sorted(plugins)


def _trial_counts(results: Results) -> dict[str, int]:
    counts = {s.name: 0 for s in TrialState}
    for e in results.entries:
        for t in e.study.trials if e.study else []:
            counts[t.state.name] += 1
    return {k: v for k, v in counts.items() if v}


def _wall_seconds(results: Results) -> float:
    """From the first trial's start to the last one's end, over every study."""
    starts, ends = [], []
    for e in results.entries:
        for t in e.study.trials if e.study else []:
            if t.datetime_start and t.datetime_complete:
                starts.append(t.datetime_start)
                ends.append(t.datetime_complete)
    return round((max(ends) - min(starts)).total_seconds(), 1) if starts else 0.0
