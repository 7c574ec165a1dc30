"""Warm start, ``[search] warm_start``: each (pair, method) search begins with the best
configurations of the same method, queued as its first trials (Optuna's ``enqueue_trial``), from
the pairs of this study whose search has finished (``"pairs"``) or from a bundle's
``best_params.json`` of a study that searched the same space (a path). A configuration is queued
only where this search's space holds every one of its values, and each queued trial records where
it came from (:data:`~harness.store.schema.SEEDED_FROM`), so that the leaderboard can say so."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.distributions import (
    BaseDistribution,
    CategoricalChoiceType,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FixedTrial, FrozenTrial, TrialState

from harness.errors import HarnessError
from harness.rules import rule_set, scores_with_pooled
from harness.search.context import Context
from harness.search.resolve import ResolvedMethod
from harness.search.space import suggest
from harness.store.backends import study_names
from harness.store.schema import (
    CONFIG,
    FINAL_PREFIX,
    PARAMS,
    SEEDED_FROM,
    WARM_START,
    best_trial,
    budget_trials,
    count_budget,
    optuna_study_name,
)
from harness.study import StudySpec, spec_error
from harness.training.weights import build_backbone

KEY = "search.warm_start"
EMA_ON, EMA_DECAY = "ema.on", "ema.decay"
PAIRS = "pairs"
#: settings of ``[search]`` that say how the space is searched, not what it holds
NOT_SPACE = ("sampler", "pruner", "startup_trials", "warm_start")


@dataclass(frozen=True)
class Seed:
    """One configuration offered to a search, and where it came from (as trials record it)."""

    params: dict[str, Any]
    origin: str


def warm_file(spec: StudySpec) -> Path | None:
    """The warm-start file the study names (relative to the study file's folder); None for
    ``"pairs"`` or no warm start."""
    setting = spec.search.warm_start
    if setting is None or setting == PAIRS:
        return None
    path = Path(setting).expanduser()
    if not path.is_absolute():
        path = (Path(spec.path).parent if spec.path else Path.cwd()) / path
    return path


def read_warm_file(spec: StudySpec) -> dict[str, Any]:
    """The study's warm-start file, refused (a :class:`StudySpecError` naming the study file, the
    key and the path) when it cannot be read, is not a bundle's ``best_params.json``, or comes
    from a study with another search space."""
    path = warm_file(spec)
    assert path is not None
    allowed = f'allowed: "{PAIRS}" or the path of a bundle\'s best_params.json'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise spec_error(spec, KEY, f"{path}: no such file; {allowed}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise spec_error(spec, KEY, f"{path}: cannot read it ({exc}); {allowed}") from None
    except json.JSONDecodeError as exc:
        raise spec_error(spec, KEY, f"{path}: not JSON ({exc}); {allowed}") from None
    pairs = data.get("pairs") if isinstance(data, dict) else None
    if not isinstance(pairs, dict) or not all(
        isinstance(methods, dict) and all(isinstance(rules, dict) for rules in methods.values())
        for methods in pairs.values()
    ):
        raise spec_error(
            spec,
            KEY,
            f"{path}: not a best_params.json (pairs -> pair -> method -> rule); {allowed}",
        )
    if not isinstance(data.get("search"), dict):
        raise spec_error(
            spec,
            KEY,
            f"{path}: records no search space (bundled before best_params.json kept one), so it "
            "cannot be matched with this study's; write its bundle again (`harness leaderboard "
            "--report`)",
        )
    differ = space_differences(data["search"], spec.search.config())
    if differ:
        raise spec_error(
            spec,
            KEY,
            f"{path} comes from a study with another search space ({'; '.join(differ)}); "
            "allowed: a best_params.json of a study whose [search] space is this one's",
        )
    return data


def space_differences(there: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """The search-space settings in which two ``SearchSpace.config()`` dicts differ."""
    keys = [k for k in dict.fromkeys([*here, *there]) if k not in NOT_SPACE]
    out = []
    for k in keys:
        a, b = there.get(k), here.get(k)
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append(f"{k} is {json.dumps(a)} there, {json.dumps(b)} here")
    return out


def file_seeds(data: dict[str, Any], shown: str, pair: str, method: str) -> list[Seed]:
    """The file's configurations of ``method``: the same pair's first, then the other pairs' in
    the file's order; one per selection rule that picked a trial."""
    pairs = data["pairs"]
    order = ([pair] if pair in pairs else []) + [p for p in pairs if p != pair]
    out = []
    for p in order:
        for rule, entry in (pairs[p].get(method) or {}).items():
            params = entry.get("params") if isinstance(entry, dict) else None
            if isinstance(params, dict):
                out.append(Seed(params, f"file {shown}:{p}/{method}/{rule}"))
    return out


def pair_seeds(
    spec: StudySpec, ctx: Context, storage: optuna.storages.BaseStorage, i: int, rm: ResolvedMethod
) -> list[Seed]:
    """The best trial of ``rm`` on each other pair whose search has finished in ``storage``
    (under the rule that drove that search), the most recently finished first. A pair that saw
    pair ``i``'s target (as its target or one of its sources: leave-one-out, a reversed pair) is
    never used, with a line in the log: its trials were trained or selected with that target."""
    names = study_names(storage)
    found: list[tuple[float, int, Seed]] = []
    target = spec.pairs[i].target
    for j, pair in enumerate(spec.pairs):
        name = optuna_study_name(pair, rm.method)
        if j == i or name not in names:
            continue
        if saw := _saw_domain(spec, pair.sources + [pair.target], target):
            ctx.log(
                f"{optuna_study_name(spec.pairs[i], rm.method)}: warm start never uses pair "
                f"{pair.key}: it saw this pair's target {target!r}"
                + (f" (as {saw!r})" if saw != target else "")
            )
            continue
        other = optuna.load_study(study_name=name, storage=storage)
        trials = other.get_trials(deepcopy=False)
        if not _search_over(trials, other.user_attrs, spec.budget.trials):
            continue
        best = _driving_best(spec, ctx, other.user_attrs, trials)
        if best is None or not best.params:
            continue
        ended = max(t.datetime_complete.timestamp() for t in trials if t.datetime_complete)
        found.append((ended, j, Seed(dict(best.params), f"pair {pair.key} trial {best.number}")))
    return [s for _, _, s in sorted(found, key=lambda x: (x[0], x[1]), reverse=True)]


def _saw_domain(spec: StudySpec, names: list[str], domain: str) -> str | None:
    """Which of ``names`` is ``domain`` (an alias of the study's ``datasets`` and its dataset are
    one domain: :meth:`StudySpec.domain_identity`); None if none is."""
    identity = spec.domain_identity(domain)
    return next((n for n in names if spec.domain_identity(n) == identity), None)


def _search_over(trials: list[FrozenTrial], attrs: dict[str, Any], budget: int) -> bool:
    """Whether a study's search has ended: nothing running or queued, and its budget spent or its
    final runs begun (a search its timeout ended)."""
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return False
    return count_budget(trials) >= budget or any(k.startswith(FINAL_PREFIX) for k in attrs)


def _driving_best(
    spec: StudySpec, ctx: Context, attrs: dict[str, Any], trials: list[FrozenTrial]
) -> FrozenTrial | None:
    """The trial the rule that drove a study's search picks among its budgeted trials."""
    config = attrs.get(CONFIG, {})
    rules = config.get("selection_rules") or [{"rule": config.get("selection", "")}]
    budgeted = budget_trials(trials, spec.budget.trials)
    complete = [t for t in budgeted if t.state == TrialState.COMPLETE]
    scores = scores_with_pooled(budgeted, rule_set(ctx.registry, spec.task))
    return best_trial(complete, rules[0]["rule"], scores)


class _Probe(FixedTrial):
    """A stand-in trial that answers each suggestion from a configuration and notes each value
    this space does not hold (answering with one it does, to go on to the next parameter)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(dict(config))
        self.config = config
        self.asked: dict[str, BaseDistribution] = {}
        self.problems: list[str] = []

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        return self._answer(name, FloatDistribution(low, high, log=log, step=step))

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = 1, log: bool = False
    ) -> int:
        return self._answer(name, IntDistribution(low, high, log=log, step=step))

    def suggest_categorical(  # type: ignore[override]
        self, name: str, choices: Sequence[CategoricalChoiceType]
    ) -> CategoricalChoiceType:
        return self._answer(name, CategoricalDistribution(choices))

    def _answer(self, name: str, dist: BaseDistribution) -> Any:
        self.asked[name] = dist
        if name not in self.config:
            self.problems.append(f"{name} is missing (searched here)")
        elif (why := outside(dist, self.config[name])) is not None:
            self.problems.append(f"{name}={self.config[name]!r} {why}")
        else:
            return self.config[name]
        return dist.choices[0] if isinstance(dist, CategoricalDistribution) else dist.low


def outside(dist: BaseDistribution, value: Any) -> str | None:
    """Why ``value`` is not a point of ``dist``; None when it is."""
    if isinstance(dist, CategoricalDistribution):
        if any(type(value) is type(c) and value == c for c in dist.choices):
            return None
        return f"is not offered here (choices: {', '.join(map(str, dist.choices))})"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "is not a number"
    if isinstance(dist, IntDistribution) and not float(value).is_integer():
        return "is not an integer"
    if not dist.low <= value <= dist.high:
        return f"is outside [{dist.low}, {dist.high}]"
    step = dist.step
    if step and not math.isclose(round((value - dist.low) / step) * step + dist.low, value):
        return f"is off the grid of step {step} from {dist.low}"
    return None


def fit(
    spec: StudySpec, rm: ResolvedMethod, num_stages: int, config: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """What of ``config`` a trial of ``rm`` here would be given (the parameters the sampler
    suggests), and why it cannot be (empty when it can): a value outside this space, a parameter
    it lacks, or one this space does not have (or pins to another value)."""
    probe = _Probe(_with_ema_choice(config))
    try:
        suggest(spec, probe, rm.new_strategy(), num_stages)  # type: ignore[arg-type]
    except (HarnessError, ValueError, TypeError) as exc:
        return {}, [f"the search space refused it ({exc})"]
    problems = list(probe.problems)
    recorded = probe.user_attrs.get(PARAMS, {})
    for name, value in config.items():
        if name in probe.asked:
            continue
        if name not in recorded:
            problems.append(f"{name} is not a parameter here")
        elif json.dumps(recorded[name], default=str) != json.dumps(value, default=str):
            problems.append(f"{name}={value!r}, fixed here at {recorded[name]!r}")
    return {k: probe.config[k] for k in probe.asked if k in probe.config}, problems


def _with_ema_choice(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the sampler's ``ema.on`` choice where it lacks it: recorded parameters (a
    bundle's best_params.json) hold ``ema.decay`` when EMA was on and never the choice itself."""
    if EMA_ON in config:
        return config
    return {**config, EMA_ON: EMA_DECAY in config}


class WarmStart:
    """The study's ``[search] warm_start``: checked in the preflight, then queuing seeds at the
    start of each (pair, method) search (once per study: the study records what it queued)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.spec = ctx, ctx.spec
        self.setting = ctx.spec.search.warm_start
        self._file: dict[str, Any] | None = None
        self._stages: dict[tuple[str, str], int] = {}

    def check(self) -> None:
        """Refuse a warm-start file that cannot seed this study, before anything is trained."""
        if warm_file(self.spec) is not None:
            self._file = read_warm_file(self.spec)

    def seed(
        self, study: optuna.Study, storage: optuna.storages.BaseStorage, i: int, rm: ResolvedMethod
    ) -> None:
        """Queue the seeds of pair ``i`` and ``rm`` in ``study`` (at most half the trial budget),
        unless the study has been seeded before; log each configuration skipped, and why."""
        if self.setting is None or WARM_START in study.user_attrs:
            return
        label = study.study_name
        queued: list[str] = []
        skipped: list[dict[str, Any]] = []
        seen: set[str] = set()
        candidates = self._candidates(storage, i, rm)
        if not candidates and self.setting != PAIRS:
            self.ctx.log(
                f"{label}: warm start: {self.setting} holds no configuration of method "
                f"{rm.method.key}; this search starts cold"
            )
        for seed in candidates:
            if len(queued) >= self.spec.budget.trials // 2:
                break
            params, problems = fit(self.spec, rm, self._num_stages(rm), seed.params)
            if problems:
                self.ctx.log(f"{label}: warm start skips {seed.origin}: {'; '.join(problems)}")
                skipped.append({"from": seed.origin, "why": problems})
                continue
            key = json.dumps(params, sort_keys=True, default=str)
            if key in seen:
                continue  # the same configuration from another pair or rule
            seen.add(key)
            study.enqueue_trial(params, user_attrs={SEEDED_FROM: seed.origin}, skip_if_exists=True)
            queued.append(seed.origin)
        study.set_user_attr(
            WARM_START, {"setting": self.setting, "seeded": queued, "skipped": skipped}
        )
        if queued:
            self.ctx.log(f"{label}: warm start queued {len(queued)}: {', '.join(queued)}")

    def _candidates(
        self, storage: optuna.storages.BaseStorage, i: int, rm: ResolvedMethod
    ) -> list[Seed]:
        if self.setting == PAIRS:
            return pair_seeds(self.spec, self.ctx, storage, i, rm)
        if self._file is None:
            self.check()
        assert self._file is not None and self.setting is not None
        return file_seeds(self._file, self.setting, self.spec.pairs[i].key, rm.method.key)

    def _num_stages(self, rm: ResolvedMethod) -> int:
        """The stages of the method's backbone, from a build without weights that leaves the
        random generators as they were (the search's draws stay those of a cold start)."""
        key = (rm.backbone.plugin, rm.method.backbone)
        if key not in self._stages:
            with torch.random.fork_rng(devices=[]):
                self._stages[key] = len(
                    build_backbone(rm.backbone, rm.method.backbone, "none").stages
                )
        return self._stages[key]
