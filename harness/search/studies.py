"""A (pair, method) study in the storage: the configuration it records, and opening it again only
when what decides its trials has not changed since they were run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna

from harness import api
from harness.errors import StudySpecError
from harness.metrics import primary_metric
from harness.search.domains import DomainCache
from harness.search.resolve import ResolvedMethod, plugin_label
from harness.search.selection import selection_rules
from harness.store.backends import (
    close_storage,
    embedded_storage,
    make_storage,
    storage_file,
    study_names,
)
from harness.store.schema import CONFIG, STUDY_FILE_HASH, optuna_study_name
from harness.study import StudySpec

# keys of a study's configuration that must not change between runs sharing a storage
FROZEN_CONFIG = (
    "pair", "method", "task", "metric", "direction", "image_size", "batch_size", "max_epochs", "search", "selection",
    "data", "pretrain", "reuse_backbone",
)  # fmt: skip


def config_of(
    spec: StudySpec, domains: DomainCache, i: int, rm: ResolvedMethod, strategy: api.Strategy
) -> dict[str, Any]:
    """What a study of pair ``i`` and method ``rm`` records as its configuration."""
    source, target = domains.pair_data(i)
    registry = domains.ctx.registry
    rules = selection_rules(spec, strategy, registry)
    rule, oracle = rules[0]
    return {
        **_preprocessing(spec, source, target),
        "selection_rules": [{"rule": r, "oracle": o} for r, o in rules],
        "pair": spec.pairs[i].model_dump(),
        "method": rm.method.model_dump(),
        "task": spec.task,
        "metric": primary_metric(spec.task),
        "direction": "maximize",
        "image_size": spec.image_size,
        "batch_size": spec.batch_size,
        "max_epochs": spec.budget.max_epochs,
        "search": spec.search.config(),
        "selection": rule,
        "oracle": oracle,
        "pretrain": spec.pretrain.model_dump() if rm.method.weights == "source" else None,
        # how a trial's model is made, which decides its random initialization
        "reuse_backbone": spec.reuse_backbone,
        "data": {"source": source.fingerprint, "target": target.fingerprint},
        "target_labels": strategy.target_labels,
        # written only for a strategy that sees no target image: older configurations stay as
        # they were
        **({"target_images": "none"} if strategy.target_images == "none" else {}),
        "plugins": {
            "source": _labels([plugin_label(r.entry, registry) for r in domains.source_refs[i]]),
            "target": plugin_label(domains.refs[(i, "target")].entry, registry),
            "backbone": plugin_label(rm.backbone, registry),
            "head": plugin_label(rm.head, registry),
            "strategy": plugin_label(rm.strategy, registry),
        },
    }


def _labels(labels: list[str]) -> str | list[str]:
    """One source's plugin label as it always was, several sources' as a list."""
    return labels[0] if len(labels) == 1 else labels


def _preprocessing(
    spec: StudySpec, source: api.DomainData, target: api.DomainData
) -> dict[str, Any]:
    """How each side's files became images (``meta["resize"]``, the stored size), the protocol
    and where the images lived, for the settings and datasets that say so; nothing for those
    that do not (the bundled domains, the default protocol)."""
    sides = (("source", source), ("target", target))
    out: dict[str, Any] = {}
    rules = {side: d.meta.get("resize") for side, d in sides}
    if any(rules.values()):
        out["resize"] = rules
    stored = {side: d.meta["stored_size"] for side, d in sides if "stored_size" in d.meta}
    if stored:
        out["stored_size"] = stored
        out["image_size"] = spec.image_size
    placed = {side: d.meta["placement"] for side, d in sides if "placement" in d.meta}
    if placed:
        out["placement"] = placed
    if spec.data.protocol != "held-out":
        out["protocol"] = spec.data.protocol
    return {"preprocessing": out} if out else {}


def _describe_change(old: dict[str, Any], new: dict[str, Any], key: str) -> str:
    a, b = json.dumps(old.get(key), sort_keys=True), json.dumps(new.get(key), sort_keys=True)
    if len(a) + len(b) > 240:
        return f"{key} differs"
    return f"{key} was {a}, now {b}"


def open_study(
    spec: StudySpec,
    storage: optuna.storages.BaseStorage,
    domains: DomainCache,
    i: int,
    rm: ResolvedMethod,
) -> optuna.Study:
    """The study of pair ``i`` and method ``rm``: created with its configuration, or loaded when
    the stored configuration agrees on every key of :data:`FROZEN_CONFIG`."""
    strategy = rm.new_strategy()
    name = optuna_study_name(spec.pairs[i], rm.method)
    config = config_of(spec, domains, i, rm, strategy)
    study = optuna.create_study(
        storage=storage, study_name=name, direction="maximize", load_if_exists=True
    )
    if not check_unchanged(spec, study, config):
        study.set_user_attr(CONFIG, config)
        study.set_user_attr(STUDY_FILE_HASH, spec.file_hash)
    return study


def check_unchanged(spec: StudySpec, study: optuna.Study, config: dict[str, Any]) -> bool:
    """Refuse to resume ``study`` (a :class:`StudySpecError`) when the configuration it records
    differs from ``config`` on a key of :data:`FROZEN_CONFIG`, or it does not maximize. Returns
    False when it records none (a study the harness has not begun: nothing to compare)."""
    old = study.user_attrs.get(CONFIG)
    if old is None and study.direction != optuna.study.StudyDirection.MAXIMIZE:
        old = {}  # made by something else than the harness, which always maximizes
    if old is None:
        return False
    # a key the stored configuration lacks was not recorded by the harness that began the study
    changed = [
        k for k in FROZEN_CONFIG
        if k in old and json.dumps(old.get(k), sort_keys=True) != json.dumps(config.get(k), sort_keys=True)
    ]  # fmt: skip
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        changed.insert(0, "direction")
        old = {**old, "direction": study.direction.name.lower()}
    if changed:
        raise StudySpecError(
            f"{spec.path}: cannot resume {study.study_name!r}: {', '.join(changed)} changed since its "
            f"trials were run ({_describe_change(old, config, changed[0])})",
            hint="name the study differently, pass another --storage, or delete its results to start over",
        )
    return True


def check_stored(
    spec: StudySpec,
    url: str | None,
    results_dir: Path,
    domains: DomainCache,
    methods: list[ResolvedMethod],
) -> None:
    """What :func:`open_study` refuses, for every (pair, method) whose study is already in the
    storage a run would resume (``url``, else the file under ``results_dir``), in the order a run
    opens them. Creates nothing: a storage file that does not exist is not looked for further."""
    url = url or embedded_storage(results_dir)
    path = storage_file(url)
    if path is not None and not path.is_file():
        return
    storage = make_storage(url)
    try:
        names = study_names(storage)
        for i, pair in enumerate(spec.pairs):
            for rm in methods:
                name = optuna_study_name(pair, rm.method)
                if name in names:
                    config = config_of(spec, domains, i, rm, rm.new_strategy())
                    check_unchanged(
                        spec, optuna.load_study(study_name=name, storage=storage), config
                    )
    finally:
        close_storage(storage)
