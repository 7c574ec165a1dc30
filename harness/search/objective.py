"""One trial: build the model, suggest its parameters, train it, report each epoch's score to the
pruner, and record every rule's score; a failure is recorded with its reason."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError

from harness import api
from harness.api.validation import HELD_OUT_SOURCES
from harness.data.pooled import num_domains
from harness.errors import NonFiniteLossError
from harness.metrics import is_finite_number
from harness.rules import RuleSet
from harness.search.context import Context, release_memory
from harness.search.held_out import held_out_metrics, held_out_provider
from harness.search.models import ModelFactory
from harness.search.resolve import ResolvedMethod
from harness.search.selection import Scorer, selection_rule
from harness.search.space import suggest, train_config
from harness.store.schema import (
    DIAGNOSTICS,
    ERROR,
    FAIL_REASON,
    GIT_COMMIT,
    PREDICTIONS,
    SCORES,
    TRAIN_LOSS,
)
from harness.training.engine import Trainer, TransferModel, seed_everything


def failure_reason(exc: BaseException) -> str:
    """The ``fail_reason`` a trial or final run that raised ``exc`` is recorded with."""
    if isinstance(exc, NonFiniteLossError):
        return "nonfinite"
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "oom"
    return "error"


def finite_or_none(scores: dict[str, float]) -> dict[str, float | None]:
    """Scores as stored: a non-finite one is None (JSON has no NaN)."""
    return {k: v if math.isfinite(v) else None for k, v in scores.items()}


def _per_epoch(diagnostics: dict[str, list[float]]) -> dict[str, list[float | None]]:
    """Diagnostics as stored: a non-finite value (an epoch that logged nothing) is None."""
    return {k: [v if math.isfinite(v) else None for v in vs] for k, vs in diagnostics.items()}


class Objective:
    """The objective of one (pair, method) study: called once per trial with Optuna's trial."""

    def __init__(
        self,
        ctx: Context,
        models: ModelFactory,
        scorer: Scorer,
        rm: ResolvedMethod,
        weights: str,
        data: tuple[api.DomainData, api.DomainData],
        commit: str | None = None,
    ) -> None:
        self.ctx, self.spec, self.models, self.scorer = ctx, ctx.spec, models, scorer
        self.rm, self.weights = rm, weights
        self.source, self.target = data
        #: the commit of the code the trials run at (``harness.versions.git_commit``)
        self.commit = commit

    def __call__(self, trial: optuna.Trial) -> float:
        strategy = self.rm.new_strategy()
        rule, _ = selection_rule(self.spec, strategy)
        try:
            trial.set_user_attr(GIT_COMMIT, self.commit)  # failed and pruned trials too
            return self._train(trial, strategy, rule)
        except (optuna.TrialPruned, UpdateFinishedTrialError):
            raise  # pruned; or reaped by another process, which wrote the reason
        except Exception as exc:
            # a reaped trial takes no more writes: keep the original error, not the refusal
            with contextlib.suppress(UpdateFinishedTrialError):
                trial.set_user_attr(FAIL_REASON, failure_reason(exc))
                trial.set_user_attr(ERROR, f"{type(exc).__name__}: {str(exc)[:300]}")
            raise
        except BaseException:  # Ctrl-C, SIGTERM: the trial did not fail on its own merits
            with contextlib.suppress(UpdateFinishedTrialError):
                trial.set_user_attr(FAIL_REASON, "interrupted")
            raise
        finally:
            release_memory(self.ctx.device)

    def _train(self, trial: optuna.Trial, strategy: api.Strategy, rule: str) -> float:
        rm, source, target, scorer = self.rm, self.source, self.target, self.scorer
        seed_everything(self.spec.seed + trial.number)
        model = self.models.build_model(rm, self.weights, target.num_classes, reuse=True)
        params = suggest(self.spec, trial, strategy, model.num_stages)
        cfg = train_config(
            self.spec,
            params,
            self.spec.seed + trial.number,
            self.ctx.device,
            self.models.precision_for(rm),
        )
        trainer = Trainer(model, strategy, source, target, cfg)
        rules, extra = self._rules(trial, strategy, params, cfg.seed)
        # a rule that trains once more per source scores the final model only (never pruned)
        each_epoch = HELD_OUT_SOURCES not in scorer.rules.validators[rule].reads

        last: dict[str, float] = {}

        def on_epoch(epoch: int, m: TransferModel) -> float | None:
            if epoch == cfg.epochs - 1:  # the final model: every rule's score in one go
                scores, kept = scorer.scores_and_predictions(
                    m, source, target, cfg.precision, rules, extra
                )
                last.update(scores)
                if kept is not None:  # what pooled rules (EnsV) score after the search
                    trial.set_user_attr(PREDICTIONS, kept)
                value = last[rule]
            elif not each_epoch:
                return None
            else:
                value = scorer.rule_score(rule, m, source, target, cfg.precision)
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"non-finite {rule} score ({value}) after epoch {epoch + 1}"
                )
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}")
            return value

        result = trainer.fit(on_epoch)
        # the model is unchanged since the last epoch's scores
        scores = last or scorer.all_scores(
            trainer.model, source, target, cfg.precision, rules, extra
        )
        # (the epochs it trained are its reported intermediate values: no attribute of their own)
        trial.set_user_attr(SCORES, finite_or_none(scores))
        trial.set_user_attr(TRAIN_LOSS, result.train_loss[-1])
        if result.diagnostics:  # only strategies that log write it
            trial.set_user_attr(DIAGNOSTICS, _per_epoch(result.diagnostics))
        if not (is_finite_number(result.history[-1]) and is_finite_number(result.train_loss[-1])):
            raise NonFiniteLossError(
                f"the trial ended with {rule} {result.history[-1]}, loss {result.train_loss[-1]}"
            )
        return result.history[-1]

    def _rules(
        self, trial: optuna.Trial, strategy: api.Strategy, params: dict[str, Any], seed: int
    ) -> tuple[RuleSet, dict[str, Any]]:
        """The rules this method's trials are scored under, and what only a trial can provide
        them (leave-one-source-out's held-out trainings, when a rule reads them)."""
        rules = self.scorer.method_rules(strategy, self.source)
        if not any(HELD_OUT_SOURCES in v.reads for v in rules.validators.values()):
            return rules, {}
        data = (self.source, self.target)

        def compute() -> list[float]:
            return held_out_metrics(
                self.models, self.rm, self.weights, data, params, seed, self.scorer.split_score
            )

        return rules, held_out_provider(trial, compute, num_domains(self.source))
