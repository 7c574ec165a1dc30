"""The search driver: one Optuna study per (pair, method), then seeded final runs on the test split."""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from harness import api
from harness.engine import (
    Precision,
    TrainConfig,
    Trainer,
    TransferModel,
    predict,
    resolve_device,
    resolve_freeze_depth,
    seed_everything,
    unlabelled_logits,
)
from harness.errors import HarnessError, NonFiniteLossError, PluginContractError, StudySpecError
from harness.metrics import primary_metric, score
from harness.registry import Entry, Registry
from harness.study import Method, Pair, StudySpec, spec_error
from harness.validators import VALIDATORS
from harness.weights import SourceRecipe, build_backbone, source_pretrained

FINISHED = (TrainState := TrialState).COMPLETE, TrialState.PRUNED, TrialState.FAIL
STUDY_SEP = " | "
#: decoder used to pretrain a backbone on a segmentation source (weights = "source")
SOURCE_PRETRAIN_SEG_HEAD = "fpn"
# keys of a study's configuration that must not change between runs sharing a storage
_FROZEN_CONFIG = (
    "pair", "method", "task", "image_size", "batch_size", "max_epochs", "search", "selection", "data", "pretrain",
)  # fmt: skip


def optuna_study_name(pair: Pair, method: Method) -> str:
    return f"{pair.key}{STUDY_SEP}{method.key}"


def default_storage(results_dir: Path) -> str:
    return f"sqlite:///{(results_dir / 'optuna.db').resolve()}"


def make_storage(url: str) -> optuna.storages.BaseStorage:
    try:
        if url.startswith("sqlite:"):
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy, drivers and servers fail in many ways
        raise HarnessError(
            f"cannot open storage {url.split('@')[-1]!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
            hint="use a URL Optuna supports (sqlite:///path.db, postgresql://user@host/db) with its driver installed",
        ) from None


def resolve_rule(rule: str, strategy: api.Strategy) -> tuple[str, bool]:
    """A study's selection rule for one method, and whether that is oracle selection (target
    labels used by a method that claims not to need them)."""
    if rule == "auto":
        rule = "target-val" if strategy.target_labels != "none" else "source-val"
    # "few" counts too: its trials would be chosen with far more target labels than k per class
    oracle = rule == "target-val" and strategy.target_labels in ("none", "few")
    return rule, oracle


def selection_rules(spec: StudySpec, strategy: api.Strategy) -> list[tuple[str, bool]]:
    """Every rule the study selects with, resolved for ``strategy``; the first drives the search."""
    out: list[tuple[str, bool]] = []
    for rule in spec.selection_rules:
        resolved = resolve_rule(rule, strategy)
        if resolved not in out:
            out.append(resolved)
    return out


def selection_rule(spec: StudySpec, strategy: api.Strategy) -> tuple[str, bool]:
    """The rule that drives the search (the sampler and pruner see its scores)."""
    return selection_rules(spec, strategy)[0]


def trial_score(trial: optuna.trial.FrozenTrial, rule: str) -> float | None:
    """A finished trial's score under ``rule`` (validation splits and label-free validators only)."""
    value = (trial.user_attrs.get("scores") or {}).get(rule)
    return value if is_finite_number(value) else None


def best_trial(trials: list[optuna.trial.FrozenTrial], rule: str) -> optuna.trial.FrozenTrial | None:
    """The completed trial that ``rule`` selects: highest score, then the earliest."""
    scored = [(v, t) for t in trials if t.state == TrialState.COMPLETE and (v := trial_score(t, rule)) is not None]
    if not scored:
        # storages written before per-rule scores existed: the objective value is the driving rule's
        scored = [(t.value, t) for t in trials if t.state == TrialState.COMPLETE and is_finite_number(t.value)]
    if not scored:
        return None
    return max(scored, key=lambda vt: (vt[0], -vt[1].number))[1]


# ------------------------------------------------------------------------------------- resolution


@dataclass
class DomainRef:
    text: str
    entry: Entry
    sub: str | None
    options: dict[str, Any]


@dataclass
class ResolvedMethod:
    method: Method
    backbone: Entry
    head: Entry
    strategy: Entry

    def new_strategy(self) -> api.Strategy:
        s = self.strategy.factory(**self.method.strategy_options)
        if not isinstance(s, api.Strategy):
            raise PluginContractError(
                f"strategy factory of plugin {self.strategy.plugin!r} ({self.strategy.dist}) returned "
                f"{type(s).__name__}, not harness.api.Strategy"
            )
        return s


def resolve_domain(spec: StudySpec, registry: Registry, text: str, key: str) -> DomainRef:
    name, _, sub = text.partition("/")
    try:
        if name in spec.datasets:
            alias = spec.datasets[name]
            entry = registry.get("dataset", alias.plugin)
            options = alias.options
        else:
            entry, options = registry.get("dataset", name), {}
    except HarnessError as exc:
        raise spec_error(spec, key, exc) from None
    if spec.task not in entry.meta.get("tasks", ("classification",)):
        raise spec_error(spec, key, f"dataset {name!r} does not serve {spec.task}")
    declared = entry.meta.get("domains")
    if declared and sub and sub not in declared:
        from harness.registry import unknown_message

        raise spec_error(spec, key, unknown_message(f"domain of {name!r}", sub, list(declared)) + f" (it serves {', '.join(declared)})")
    return DomainRef(text, entry, sub or None, options)


def resolve_methods(spec: StudySpec, registry: Registry) -> list[ResolvedMethod]:
    out = []
    for i, m in enumerate(spec.methods):
        entries = {}
        for kind, attr in (("backbone", "backbone"), ("head", "head"), ("strategy", "strategy")):
            try:
                entries[kind] = registry.get(kind, getattr(m, attr))
            except HarnessError as exc:
                raise spec_error(spec, f"methods[{i}].{attr}", exc) from None
        tasks = entries["head"].meta.get("tasks", ("classification",))
        if spec.task not in tasks:
            raise spec_error(spec, f"methods[{i}].head", f"head {m.head!r} supports {', '.join(tasks)}, not {spec.task}")
        strategy_tasks = entries["strategy"].meta.get("tasks", ("classification", "segmentation"))
        if spec.task not in strategy_tasks:
            raise spec_error(
                spec, f"methods[{i}].strategy", f"strategy {m.strategy!r} supports {', '.join(strategy_tasks)}, not {spec.task}"
            )
        rm = ResolvedMethod(m, entries["backbone"], entries["head"], entries["strategy"])
        try:
            strategy = rm.new_strategy()
        except (TypeError, ValueError) as exc:
            raise spec_error(spec, f"methods[{i}].strategy_options", f"{m.strategy}: {exc}") from None
        if strategy.shots and spec.task != "classification":
            raise spec_error(
                spec, f"methods[{i}].strategy_options", "shots (k labelled images per class) applies to classification only"
            )
        out.append(rm)
    return out


# ------------------------------------------------------------------------------------- the run


@dataclass
class RunOptions:
    results_dir: Path
    storage: str | None = None
    log: Callable[[str], None] = print
    progress: Callable[[dict[str, Any]], None] | None = None


@dataclass
class Runner:
    """Runs a study: resolves plugins, searches every (pair, method), then the final seeded runs."""

    spec: StudySpec
    registry: Registry
    options: RunOptions
    device: torch.device = field(init=False)
    precision: Precision = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.device = resolve_device(self.spec.device)
        except (RuntimeError, ValueError) as exc:
            raise spec_error(self.spec, "device", str(exc)) from None
        self.precision = Precision.for_device(self.device, self.spec.precision)
        self.methods = resolve_methods(self.spec, self.registry)
        self.domains = {
            (i, side): resolve_domain(self.spec, self.registry, getattr(p, side), f"pairs[{i}].{side}")
            for i, p in enumerate(self.spec.pairs)
            for side in ("source", "target")
        }
        self._data: dict[str, api.DomainData] = {}
        self.storage_url = self.options.storage or default_storage(self.options.results_dir)
        self.options.results_dir.mkdir(parents=True, exist_ok=True)
        self.storage = make_storage(self.storage_url)
        self.log = self.options.log
        self.searching = False  # set once preflight passed: from then on results are worth writing
        from harness.leaderboard import git_commit

        self.git_commit = git_commit(Path(self.spec.path).parent if self.spec.path else Path.cwd())

    # -------------------------------------------------------------------------------- data

    def domain(self, i: int, side: str) -> api.DomainData:
        ref = self.domains[(i, side)]
        key = json.dumps([ref.entry.plugin, ref.entry.name, ref.sub, ref.options], sort_keys=True, default=str)
        if key not in self._data:
            try:
                data = ref.entry.factory(ref.sub, image_size=self.spec.image_size, seed=self.spec.seed, **ref.options)
            except TypeError as exc:
                raise spec_error(self.spec, f"pairs[{i}].{side}", f"dataset {ref.entry.name!r}: {exc}") from None
            except HarnessError as exc:
                raise spec_error(self.spec, f"pairs[{i}].{side}", exc) from None
            if not isinstance(data, api.DomainData):
                raise PluginContractError(
                    f"dataset factory of plugin {ref.entry.plugin!r} ({ref.entry.dist}) returned "
                    f"{type(data).__name__}, not harness.api.DomainData"
                )
            data.check(self.spec.image_size)
            self._data[key] = api.DomainData(
                name=ref.text,
                task=data.task,
                class_names=data.class_names,
                train=data.train.to(self.device),
                val=data.val.to(self.device),
                test=data.test.to(self.device),
                fingerprint=data.fingerprint,
                meta=data.meta,
            )
        return self._data[key]

    def pair_data(self, i: int) -> tuple[api.DomainData, api.DomainData]:
        source, target = self.domain(i, "source"), self.domain(i, "target")
        if source.class_names != target.class_names:
            raise spec_error(
                self.spec,
                f"pairs[{i}]",
                f"source {source.name!r} and target {target.name!r} have different classes "
                f"({len(source.class_names)} vs {len(target.class_names)})",
            )
        return source, target

    # -------------------------------------------------------------------------------- models

    def backbone_weights(self, rm: ResolvedMethod, source: api.DomainData) -> str:
        w = rm.method.weights
        if w != "source":
            return w
        p = self.spec.pretrain
        recipe = SourceRecipe(p.epochs, p.lr, p.weight_decay, p.augment, self.spec.batch_size, self.spec.seed)
        head = None
        if source.task == "segmentation":
            head = self.registry.get("head", SOURCE_PRETRAIN_SEG_HEAD)
        return str(
            source_pretrained(rm.backbone, rm.method.backbone, source, recipe, self.device, self.precision_for(rm), self.log, head)
        )

    def build_model(self, rm: ResolvedMethod, weights: str, num_classes: int) -> TransferModel:
        backbone = build_backbone(rm.backbone, rm.method.backbone, weights)
        head = rm.head.factory(backbone=backbone, num_classes=num_classes, task=self.spec.task, **rm.method.head_options)
        if not isinstance(head, torch.nn.Module):
            raise PluginContractError(
                f"head factory of plugin {rm.head.plugin!r} ({rm.head.dist}) returned {type(head).__name__}, "
                "not a torch.nn.Module"
            )
        return TransferModel(backbone, head, self.spec.task)

    def precision_for(self, rm: ResolvedMethod) -> Precision:
        """The pinned precision, or for "auto" the fastest by a short probe, cached on disk per
        backbone, image size, batch size, device and torch version (see ``harness.probe``)."""
        if self.spec.precision != "auto":
            return self.precision
        chosen = self.__dict__.setdefault("_precisions", {})
        name = rm.method.backbone
        if name not in chosen:
            from harness import probe

            chosen[name] = probe.resolve(
                "auto", self.device, backbone=name, image_size=self.spec.image_size, batch_size=self.spec.batch_size,
                build=lambda: self.build_model(rm, "none", 2), log=self.log,
            )  # fmt: skip
        return chosen[name]

    def preflight(self) -> None:
        """Everything that can fail before training: data, weights, heads, options."""
        for i in range(len(self.spec.pairs)):
            source, target = self.pair_data(i)
            for j, rm in enumerate(self.methods):
                try:
                    weights = self.backbone_weights(rm, source)
                    model = self.build_model(rm, weights, target.num_classes)
                    expected = (2, target.num_classes) + (tuple(target.image_shape[1:]) if self.spec.task == "segmentation" else ())
                    try:
                        with torch.no_grad():
                            x = target.val.x[:2].float().div(255)
                            out = model.eval().to(self.device)(model.to(self.device).normalize(x))
                    except Exception as exc:  # noqa: BLE001 - timm and smp refuse shapes in many ways
                        raise PluginContractError(
                            f"{rm.method.backbone} + {rm.method.head} fails on a sample batch of "
                            f"{self.spec.image_size} px images: {str(exc).splitlines()[0][:200]}"
                        ) from None
                    if tuple(out.shape) != expected:
                        raise PluginContractError(f"model output has shape {tuple(out.shape)}, expected {expected}")
                except HarnessError as exc:
                    raise spec_error(self.spec, f"methods[{j}]", exc) from None
                except TypeError as exc:
                    raise spec_error(self.spec, f"methods[{j}].head_options", f"head {rm.method.head!r}: {exc}") from None

    # -------------------------------------------------------------------------------- search

    def config_of(self, i: int, rm: ResolvedMethod, strategy: api.Strategy) -> dict[str, Any]:
        source, target = self.pair_data(i)
        rule, oracle = selection_rule(self.spec, strategy)
        return {
            "selection_rules": [{"rule": r, "oracle": o} for r, o in selection_rules(self.spec, strategy)],
            "pair": self.spec.pairs[i].model_dump(),
            "method": rm.method.model_dump(),
            "task": self.spec.task,
            "image_size": self.spec.image_size,
            "batch_size": self.spec.batch_size,
            "max_epochs": self.spec.budget.max_epochs,
            "search": self.spec.search.model_dump(),
            "selection": rule,
            "oracle": oracle,
            "pretrain": self.spec.pretrain.model_dump() if rm.method.weights == "source" else None,
            "data": {"source": source.fingerprint, "target": target.fingerprint},
            "target_labels": strategy.target_labels,
            "plugins": {
                "source": f"{self.domains[(i, 'source')].entry.plugin} ({self.domains[(i, 'source')].entry.dist})",
                "target": f"{self.domains[(i, 'target')].entry.plugin} ({self.domains[(i, 'target')].entry.dist})",
                "backbone": f"{rm.backbone.plugin} ({rm.backbone.dist})",
                "head": f"{rm.head.plugin} ({rm.head.dist})",
                "strategy": f"{rm.strategy.plugin} ({rm.strategy.dist})",
            },
        }

    def open_study(self, i: int, rm: ResolvedMethod) -> optuna.Study:
        strategy = rm.new_strategy()
        name = optuna_study_name(self.spec.pairs[i], rm.method)
        config = self.config_of(i, rm, strategy)
        study = optuna.create_study(storage=self.storage, study_name=name, direction="maximize", load_if_exists=True)
        old = study.user_attrs.get("config")
        if old is None:
            study.set_user_attr("config", config)
            study.set_user_attr("study_file_hash", self.spec.file_hash)
        else:
            changed = [k for k in _FROZEN_CONFIG if json.dumps(old.get(k), sort_keys=True) != json.dumps(config.get(k), sort_keys=True)]
            if changed:
                raise StudySpecError(
                    f"{self.spec.path}: cannot resume {name!r}: {', '.join(changed)} changed since its "
                    f"trials were run ({_describe_change(old, config, changed[0])})",
                    hint="name the study differently, pass another --storage, or delete its results to start over",
                )
        return study

    def _sampler(self, n_done: int) -> optuna.samplers.BaseSampler:
        # The seed moves with the number of finished trials so that a resumed run does not replay
        # the same random start-up suggestions.
        seed = self.spec.seed + n_done
        if self.spec.search.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        # TPE counts the finished trials itself when deciding whether start-up is over
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.spec.search.startup_trials, multivariate=True)

    def _pruner(self) -> optuna.pruners.BasePruner:
        s, epochs = self.spec.search, self.spec.budget.max_epochs
        if s.pruner == "none":
            return optuna.pruners.NopPruner()
        if s.pruner == "asha":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
        if s.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
        return optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials, n_warmup_steps=max(1, epochs // 3))

    def suggest(self, trial: optuna.Trial, strategy: api.Strategy, num_stages: int) -> dict[str, Any]:
        s = self.spec.search
        params: dict[str, Any] = {}
        if "freeze_depth" in strategy.fixed:
            depth = resolve_freeze_depth(strategy.fixed["freeze_depth"], num_stages)
        elif s.freeze_depth == "auto":
            depth = trial.suggest_int("backbone.freeze_depth", 0, num_stages)
        elif isinstance(s.freeze_depth, list):
            lo, hi = (min(v, num_stages) for v in s.freeze_depth)
            depth = trial.suggest_int("backbone.freeze_depth", lo, hi)
        else:
            depth = min(int(s.freeze_depth), num_stages)
        params["backbone.freeze_depth"] = depth
        if depth < num_stages:
            params["backbone.lr"] = _suggest_float(trial, "backbone.lr", s.backbone_lr)
            if isinstance(s.layer_decay, list) and s.layer_decay[0] < s.layer_decay[1]:
                params["backbone.lr_decay"] = trial.suggest_float("backbone.lr_decay", *s.layer_decay)
            else:
                decay = s.layer_decay[0] if isinstance(s.layer_decay, list) else s.layer_decay
                if decay != 1.0:
                    params["backbone.lr_decay"] = float(decay)
        params["head.lr"] = _suggest_float(trial, "head.lr", s.head_lr)
        params["optimizer.weight_decay"] = _suggest_float(trial, "optimizer.weight_decay", s.weight_decay)
        policies = [s.augment] if isinstance(s.augment, str) else s.augment
        params["augment.policy"] = (
            policies[0] if len(policies) == 1 else trial.suggest_categorical("augment.policy", policies)
        )
        extra = strategy.search_space(trial)
        bad = [k for k in extra if not k.startswith("strategy.")]
        if bad:
            raise PluginContractError(f"strategy search_space returned {bad}; names must start with 'strategy.'")
        params.update(extra)
        for k, v in params.items():
            trial.set_user_attr(f"param:{k}", v)
        return params

    def train_config(
        self, params: dict[str, Any], seed: int, num_stages: int, precision: Precision | None = None
    ) -> TrainConfig:
        return TrainConfig(
            epochs=self.spec.budget.max_epochs,
            batch_size=self.spec.batch_size,
            backbone_lr=float(params.get("backbone.lr", 0.0)),
            head_lr=float(params["head.lr"]),
            weight_decay=float(params["optimizer.weight_decay"]),
            freeze_depth=int(params["backbone.freeze_depth"]),
            augment=str(params["augment.policy"]),
            seed=seed,
            device=self.device,
            precision=precision or self.precision,
            params=params,
            data_seed=self.spec.seed,
        )

    def rule_score(
        self, rule: str, model: TransferModel, source: api.DomainData, target: api.DomainData, precision: Precision
    ) -> float:
        """``model``'s score under a selection rule: accuracy (mIoU) on a labelled validation split,
        or a label-free validator on the unlabelled target validation images."""
        if rule in ("target-val", "source-val"):
            split = target.val if rule == "target-val" else source.val
            out = predict(model, split, self.spec.batch_size * 4, self.device, precision)
            return float(score(self.spec.task, out, split.y, target.num_classes)[primary_metric(self.spec.task)])
        logits = unlabelled_logits(model, target.val, self.spec.batch_size * 4, self.device, precision, seed=self.spec.seed)
        return VALIDATORS[rule](logits)

    def all_scores(
        self, model: TransferModel, source: api.DomainData, target: api.DomainData, precision: Precision
    ) -> dict[str, float]:
        """Every rule's score, recorded with each trial: the study's rules select from them, and the
        label-free validators are later compared with target-val (never used by the search)."""
        rules = ("target-val", "source-val", *VALIDATORS)
        return {rule: self.rule_score(rule, model, source, target, precision) for rule in rules}

    def objective(self, i: int, rm: ResolvedMethod, weights: str) -> Callable[[optuna.Trial], float]:
        source, target = self.pair_data(i)

        def run(trial: optuna.Trial) -> float:
            strategy = rm.new_strategy()
            rule, _ = selection_rule(self.spec, strategy)
            try:
                seed_everything(self.spec.seed + trial.number)
                model = self.build_model(rm, weights, target.num_classes)
                params = self.suggest(trial, strategy, model.num_stages)
                cfg = self.train_config(params, self.spec.seed + trial.number, model.num_stages, self.precision_for(rm))
                trainer = Trainer(model, strategy, source, target, cfg)

                def on_epoch(epoch: int, m: TransferModel) -> float:
                    value = self.rule_score(rule, m, source, target, cfg.precision)
                    if not math.isfinite(value):
                        raise NonFiniteLossError(f"non-finite {rule} score ({value}) after epoch {epoch + 1}")
                    trial.report(value, epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}")
                    return value

                result = trainer.fit(on_epoch)
                scores = self.all_scores(trainer.model, source, target, cfg.precision)
                trial.set_user_attr("scores", {k: v if math.isfinite(v) else None for k, v in scores.items()})
                trial.set_user_attr("epochs", result.epochs_run)
                trial.set_user_attr("train_loss", result.train_loss[-1])
                return result.history[-1]
            except optuna.TrialPruned:
                raise
            except Exception as exc:
                trial.set_user_attr("fail_reason", failure_reason(exc))
                trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc)[:300]}")
                raise
            except BaseException:  # Ctrl-C, SIGTERM: the trial did not fail on its own merits
                trial.set_user_attr("fail_reason", "interrupted")
                raise
            finally:
                _release_memory(self.device)

        return run

    def search(self, i: int, rm: ResolvedMethod) -> optuna.Study:
        study = self.open_study(i, rm)
        source, _ = self.pair_data(i)
        if self.storage_url == default_storage(self.options.results_dir):
            _fail_stale_running(study)
        done = count_budget(study)
        remaining = self.spec.budget.trials - done
        label = optuna_study_name(self.spec.pairs[i], rm.method)
        if remaining <= 0:
            self.log(f"{label}: budget of {self.spec.budget.trials} trials already spent ({done} finished)")
            return study
        weights = self.backbone_weights(rm, source)
        study.sampler = self._sampler(done)
        study.pruner = self._pruner()
        study.set_user_attr("sampler", {"name": type(study.sampler).__name__, "seed": self.spec.seed, "resumed_at": done})
        study.set_user_attr("pruner", type(study.pruner).__name__)
        study.set_user_attr("precision", self.precision_for(rm).describe())
        # Everything alive now (plugins, registries, data, imports) lives as long as the process:
        # leave it out of the garbage collector's scans, so that the collection after each trial
        # only walks that trial's objects (a full scan cost about a second per trial here).
        gc.collect()
        gc.freeze()
        started = time.perf_counter()
        callbacks = [self._progress_callback(label, started), self._budget_callback(), *self._tracking_callbacks()]
        study.optimize(
            self.objective(i, rm, weights),
            n_trials=remaining,
            timeout=self.spec.budget.timeout_s,
            catch=(Exception,),
            callbacks=callbacks,
            gc_after_trial=False,
        )
        return study

    def _tracking_callbacks(self) -> list[Callable[[optuna.Study, Any], None]]:
        uri = self.spec.tracking.mlflow_uri
        if not uri:
            return []
        try:
            from optuna_integration.mlflow import MLflowCallback
        except ImportError:
            raise spec_error(
                self.spec,
                "tracking.mlflow_uri",
                "MLflow tracking needs the optional packages: pip install 'transfer-harness[tracking]'",
            ) from None
        return [MLflowCallback(tracking_uri=uri, metric_name=primary_metric(self.spec.task), create_experiment=True)]

    def _budget_callback(self) -> Callable[[optuna.Study, Any], None]:
        def cb(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if count_budget(study) >= self.spec.budget.trials:
                study.stop()

        return cb

    def _progress_callback(self, label: str, started: float) -> Callable[[optuna.Study, Any], None]:
        def cb(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            trials = study.get_trials(deepcopy=False)
            n = sum(1 for t in trials if t.state in FINISHED)
            best = max((t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None), default=None)
            value = f"{trial.value:.4f}" if trial.value is not None else trial.user_attrs.get("fail_reason", "")
            if trial.state == TrialState.PRUNED:
                value = f"pruned@{len(trial.intermediate_values)}"
            info = {
                "study": label,
                "trial": trial.number,
                "state": trial.state.name,
                "value": value,
                "best": best,
                "done": n,
                "budget": self.spec.budget.trials,
                "elapsed": time.perf_counter() - started,
            }
            if self.options.progress:
                self.options.progress(info)
            else:
                best_s = f"{best:.4f}" if best is not None else "-"
                self.log(
                    f"{label}: trial {trial.number} {trial.state.name.lower()} {value}  "
                    f"[{n}/{self.spec.budget.trials}, best {best_s}, {info['elapsed']:.0f}s]"
                )

        return cb

    # -------------------------------------------------------------------------------- finals

    def final_runs(self, i: int, rm: ResolvedMethod, study: optuna.Study) -> None:
        """Re-train the trial each selection rule picks with K seeds; each run reads the target test
        split once. Rules that pick the same trial share its runs."""
        trials = study.get_trials(deepcopy=False)
        picks: list[optuna.trial.FrozenTrial] = []
        for rule, _ in selection_rules(self.spec, rm.new_strategy()):
            best = best_trial(trials, rule)
            if best is not None and best.number not in {t.number for t in picks}:
                picks.append(best)
        if not picks:
            self.log(f"{study.study_name}: no completed trial, no final runs")
            return
        source, target = self.pair_data(i)
        weights = None
        metric = primary_metric(self.spec.task)
        for best in picks:
            for k in range(self.spec.final_seeds):
                seed = self.spec.seed + 10_000 + k
                key = f"final:{best.number}:{seed}"
                if key in study.user_attrs:
                    continue
                weights = weights or self.backbone_weights(rm, source)
                strategy = rm.new_strategy()
                rule, _ = selection_rule(self.spec, strategy)
                params = {k2.removeprefix("param:"): v for k2, v in best.user_attrs.items() if k2.startswith("param:")}
                t0 = time.perf_counter()
                seed_everything(seed)
                model = self.build_model(rm, weights, target.num_classes)
                cfg = self.train_config(params, seed, model.num_stages, self.precision_for(rm))
                trainer = Trainer(model, strategy, source, target, cfg)
                trainer.fit()
                scores = self.all_scores(trainer.model, source, target, cfg.precision)
                test = self.evaluate_test(trainer, target)
                record = {
                    "trial": best.number,
                    "seed": seed,
                    "val": scores[rule],
                    "scores": {k2: v if math.isfinite(v) else None for k2, v in scores.items()},
                    "test": test,
                    "seconds": time.perf_counter() - t0,
                    "device": str(self.device),
                    "precision": cfg.precision.describe(),
                    "git_commit": self.git_commit,
                }
                study.set_user_attr(key, record)
                self.log(f"{study.study_name}: final seed {seed} of trial {best.number}: target test {metric} {test[metric]:.4f}")
                _release_memory(self.device)

    def evaluate_test(self, trainer: Trainer, target: api.DomainData) -> dict[str, Any]:
        """The only place the target test split is read."""
        return score(self.spec.task, trainer.predict(target.test), target.test.y, target.num_classes)

    # -------------------------------------------------------------------------------- all

    def run(self) -> None:
        self.preflight()
        self.searching = True
        for i in range(len(self.spec.pairs)):
            for rm in self.methods:
                study = self.search(i, rm)
                self.final_runs(i, rm, study)


def count_budget(study: optuna.Study) -> int:
    """Finished trials that use up the budget: interrupted ones (killed, pre-empted) do not."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False, states=FINISHED)
        if not (t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") == "interrupted")
    )


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, NonFiniteLossError):
        return "nonfinite"
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "oom"
    return "error"


def _suggest_float(trial: optuna.Trial, name: str, space: list[float] | float) -> float:
    if isinstance(space, list):
        lo, hi = space
        return lo if lo == hi else trial.suggest_float(name, lo, hi, log=True)
    return float(space)


def _describe_change(old: dict[str, Any], new: dict[str, Any], key: str) -> str:
    a, b = json.dumps(old.get(key), sort_keys=True), json.dumps(new.get(key), sort_keys=True)
    if len(a) + len(b) > 240:
        return f"{key} differs"
    return f"{key} was {a}, now {b}"


def _fail_stale_running(study: optuna.Study) -> None:
    """A trial left RUNNING in the embedded storage belongs to a process that died."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "interrupted")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def _release_memory(device: torch.device) -> None:
    # A trial's tensors go with their last reference; collecting cycles matters only where the
    # caching allocator can then hand their memory back (a forced collection cost ~50 ms a trial).
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def is_finite_number(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
