"""The final runs: the trial each selection rule picks, trained again with K seeds and scored once
on the target test split. On a shared storage each run is claimed first, so that processes
sharing the study train each one once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness import api
from harness.errors import NonFiniteLossError
from harness.metrics import is_finite_number, primary_metric
from harness.rules import scores_with_pooled
from harness.search.context import Context, release_memory
from harness.search.held_out import recorded_provider
from harness.search.models import ModelFactory
from harness.search.objective import failure_reason, finite_or_none
from harness.search.resolve import ResolvedMethod
from harness.search.selection import Scorer, selection_rule, selection_rules
from harness.search.space import train_config
from harness.store.leases import claim, claimed_keys, lease, release
from harness.store.schema import (
    FINALS_SUFFIX,
    FinalRun,
    best_trial,
    budget_trials,
    final_key,
    final_seeds,
    parse_final_key,
    per_image_key,
    trial_params,
)
from harness.training.engine import Trainer, seed_everything
from harness.training.probe import device_name

Data = tuple[api.DomainData, api.DomainData]


class FinalRuns:
    """Runs the final runs of one study at a time."""

    def __init__(
        self,
        ctx: Context,
        models: ModelFactory,
        scorer: Scorer,
        storage: optuna.storages.BaseStorage,
        shared: bool,
        commit: str | None,
        results_dir: Path | None = None,
    ) -> None:
        self.ctx, self.spec, self.models, self.scorer = ctx, ctx.spec, models, scorer
        self.storage, self.shared, self.commit, self.log = storage, shared, commit, ctx.log
        #: where the study's results go: final runs stage their weights under ``models/`` there
        #: (``keep_models``); None stages nothing
        self.results_dir = results_dir

    def picks(self, trials: list[FrozenTrial], rm: ResolvedMethod) -> dict[int, FrozenTrial]:
        """The trials the study's rules select, by number (rules may agree)."""
        budgeted = budget_trials(trials, self.spec.budget.trials)
        picks: dict[int, FrozenTrial] = {}
        scores = scores_with_pooled(budgeted, self.scorer.rules)
        for rule, _ in selection_rules(self.spec, rm.new_strategy()):
            best = best_trial(budgeted, rule, scores)
            if best is not None:
                picks.setdefault(best.number, best)
        return picks

    def run(
        self,
        study: optuna.Study,
        rm: ResolvedMethod,
        pair_data: Callable[[int], Data],
        i: int,
        searching: bool,
    ) -> bool:
        """Run this process's share of the missing final runs. False while other processes still
        work on the study (its trials or its final runs), True once nothing is left to do here."""
        trials = study.get_trials(deepcopy=False)
        if any(
            t.state == TrialState.RUNNING or (t.state == TrialState.WAITING and searching)
            for t in trials
        ):
            return False  # the best trial is not known yet
        picks = self.picks(trials, rm)
        if not picks:
            self.log(f"{study.study_name}: no completed trial, no final runs")
            return True
        keys = [final_key(n, s) for n in picks for s in final_seeds(self.spec)]
        missing = [key for key in keys if key not in study.user_attrs]
        if not missing:
            return True
        claims = None
        if self.shared:
            claims = optuna.create_study(
                storage=self.storage,
                study_name=study.study_name + FINALS_SUFFIX,
                direction="maximize",
                load_if_exists=True,
            )
        data = pair_data(i)
        weights: list[str] = []  # the method's weights, found (or pretrained) once
        for key in missing:
            self._run_key(study, claims, key, picks, rm, data, weights)
        if claims is None:
            return True
        attrs = optuna.load_study(study_name=study.study_name, storage=self.storage).user_attrs
        remaining = {key for key in keys if key not in attrs}
        # another process still trains one of them: look again later
        return not (claimed_keys(claims) & remaining)

    def _run_key(
        self,
        study: optuna.Study,
        claims: optuna.Study | None,
        key: str,
        picks: dict[int, FrozenTrial],
        rm: ResolvedMethod,
        data: Data,
        weights: list[str],
    ) -> None:
        claim_id = None
        if claims is not None:
            claim_id = claim(claims, key)
            if claim_id is None:
                return  # done or being done by another process
            if (
                key
                in optuna.load_study(study_name=study.study_name, storage=self.storage).user_attrs
            ):
                release(claims, claim_id, done=True)
                return
        number, seed = parse_final_key(key)
        ok, reason = False, "interrupted"
        try:
            with (
                lease(self.storage, claim_id) if claim_id is not None else contextlib.nullcontext()
            ):
                if not weights:
                    weights.append(self.models.backbone_weights(rm, data[0]))
                self.final_run(study, rm, picks[number], seed, key, weights[0], data)
            ok = True
        except Exception as exc:  # noqa: BLE001 - recorded; the other seeds and studies go on
            reason = failure_reason(exc)
            self.log(
                f"{study.study_name}: final seed {seed} failed ({reason}): {type(exc).__name__}: {str(exc)[:200]}"
            )
        finally:
            if claims is not None and claim_id is not None:
                release(claims, claim_id, done=ok, reason=reason)
            release_memory(self.ctx.device)

    def final_run(
        self,
        study: optuna.Study,
        rm: ResolvedMethod,
        best: FrozenTrial,
        seed: int,
        key: str,
        weights: str,
        data: Data,
    ) -> None:
        """Train ``best``'s parameters with ``seed``, score it, and store the record under ``key``
        (and its per-image test outcomes beside it)."""
        source, target = data
        strategy = rm.new_strategy()
        rule, _ = selection_rule(self.spec, strategy)
        params = trial_params(best)
        t0 = time.perf_counter()
        seed_everything(seed)
        model = self.models.build_model(rm, weights, target.num_classes, reuse=True)
        cfg = train_config(self.spec, params, seed, self.ctx.device, self.models.precision_for(rm))
        trainer = Trainer(model, strategy, source, target, cfg)
        trainer.fit()
        metric = primary_metric(self.spec.task)
        rules = self.scorer.method_rules(strategy, source)
        scores = self.scorer.all_scores(
            trainer.model, source, target, cfg.precision, rules, recorded_provider(best)
        )
        test, outcomes = self.scorer.evaluate_test(trainer, target)
        if not (is_finite_number(scores[rule]) and is_finite_number(test[metric])):
            raise NonFiniteLossError(f"final run scored a non-finite {rule} or test {metric}")
        device = self.ctx.device
        record: FinalRun = {
            "trial": best.number,
            "seed": seed,
            "val": scores[rule],
            "scores": finite_or_none(scores),
            "test": test,
            "seconds": time.perf_counter() - t0,
            "device": str(device),
            # the processor or GPU model: float results differ between kernels that processors pick
            "device_name": device_name(device),
            "precision": cfg.precision.describe(),
            "git_commit": self.commit,
        }
        staged = self._stage(study.study_name, rm, trainer.model, target, params, record)
        if staged is not None:
            record["model"] = staged
        # the outcomes first: a stored record always has them (storages from before them do not)
        study.set_user_attr(per_image_key(best.number, seed), outcomes)
        study.set_user_attr(key, record)
        self.log(
            f"{study.study_name}: final seed {seed} of trial {best.number}: target test {metric} {test[metric]:.4f}"
        )

    def _stage(
        self,
        study_name: str,
        rm: ResolvedMethod,
        model: Any,
        target: api.DomainData,
        params: dict[str, Any],
        record: FinalRun,
    ) -> dict[str, str] | None:
        """Stage the final run's weights and what only the trainer knows, for the leaderboard to
        keep (``harness.models.keep``); nothing where the study keeps no model. A failure to write
        is logged: the run's score is stored all the same."""
        if self.spec.keep_models == "none" or self.results_dir is None:
            return None
        from harness.models import keep
        from harness.models.card import sha256_file
        from harness.models.timm_layout import timm_info

        m = rm.method
        sidecar = {
            "task": self.spec.task,
            "class_names": [str(c) for c in target.class_names],
            "backbone": {"plugin": rm.backbone.plugin, "distribution": rm.backbone.dist,
                         "name": m.backbone, "weights": m.weights},
            "head": {"plugin": rm.head.plugin, "distribution": rm.head.dist, "name": m.head,
                     "options": dict(m.head_options)},
            "strategy": {"plugin": rm.strategy.plugin, "distribution": rm.strategy.dist,
                         "name": m.strategy, "options": dict(m.strategy_options)},
            "params": params,
            "precision": record["precision"],
            "test": record["test"],
            "preprocessing": keep.preprocessing(
                self.spec.task, self.spec.image_size, target.image_shape, target.meta,
                model.spec.mean, model.spec.std,
            ),
            "timm": timm_info(model, (rm.backbone.plugin, rm.backbone.dist),
                              (rm.head.plugin, rm.head.dist, m.head)),
        }  # fmt: skip
        try:
            path = keep.stage(self.results_dir, study_name, record["trial"], record["seed"],
                              model, sidecar)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the run's score matters more than its weights
            self.log(
                f"{study_name}: final seed {record['seed']}: weights not kept "
                f"({type(exc).__name__}: {str(exc)[:200]})"
            )
            return None
        return {"path": str(path.relative_to(self.results_dir)), "sha256": sha256_file(path)}
