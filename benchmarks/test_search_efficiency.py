"""Search efficiency on the quickstart pair (digits -> digits-m, benchmarks/quickstart.toml):

- pruning pays: the default pruner against no pruning, same trials and sampler seed, over three
  sampler seeds: the best validation score each reaches, and the epochs each trains;
- per-trial overhead: harness time outside Trainer.fit (storage, sampling, model reset,
  bookkeeping) as a share of the trials' wall time, against a fresh Python + torch start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import harness.search
from harness.engine import Trainer
from harness.registry import get_registry
from harness.search import Runner, RunOptions
from harness.study import SearchSpace, load_study

QUICKSTART = str(Path(__file__).parent / "quickstart.toml")
SAMPLER_SEEDS = (0, 1, 2)
# a reduced quickstart for pruning: the fine-tuning method only (the widest search space), more
# trials than the quickstart's six so that the pruner has trials to prune after TPE's start-up
PRUNING = {"budget.trials": int(os.environ.get("BENCH_TRIALS", 10)), "budget.max_epochs": 6, "precision": "fp32"}
DEFAULT_PRUNER = SearchSpace.model_fields["pruner"].default
# BENCH_PRUNER compares another pruner setting against no pruning (BENCH_TRIALS: trials per search)
PRUNER = os.environ.get("BENCH_PRUNER", DEFAULT_PRUNER)


class _SeededRunner(Runner):
    """The Runner with the sampler's seed moved away from the study seed (same data, same weights)."""

    sampler_seed = 0

    def _sampler(self, n_done):
        spec = self.spec
        self.spec = spec.model_copy(update={"seed": self.sampler_seed})
        try:
            return super()._sampler(n_done)
        finally:
            self.spec = spec


def _runner(tmp: Path, overrides: dict, sampler_seed: int = 0) -> Runner:
    spec = load_study(QUICKSTART, overrides=overrides)
    runner = _SeededRunner(spec, get_registry(), RunOptions(results_dir=tmp, log=lambda m: None))
    runner.sampler_seed = sampler_seed
    return runner


def _search(runner: Runner, strategy: str):
    rm = next(rm for rm in runner.methods if rm.method.strategy == strategy)
    source, _ = runner.pair_data(0)
    runner.backbone_weights(rm, source)  # source pretraining is cached on disk: not part of the search
    runner.precision_for(rm)
    t0 = time.perf_counter()
    study = runner.search(0, rm)
    return study, time.perf_counter() - t0


def test_pruning_pays(benchmark, tmp_path):
    rows = []

    def run_all():
        for seed in SAMPLER_SEEDS:
            out = {}
            for pruner in ("none", PRUNER):
                runner = _runner(tmp_path / f"{pruner}-{seed}", {**PRUNING, "search.pruner": pruner}, seed)
                study, wall = _search(runner, "finetune")
                trials = study.get_trials(deepcopy=False)
                out[pruner] = {
                    "best": max(t.value for t in trials if t.state.name == "COMPLETE"),
                    "epochs": sum(len(t.intermediate_values) for t in trials),
                    "pruned": sum(t.state.name == "PRUNED" for t in trials),
                    "wall_s": wall,
                }
            rows.append((seed, out))

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    total = {p: sum(o[p]["epochs"] for _, o in rows) for p in ("none", PRUNER)}
    print(f"\npruning on the quickstart pair, finetune, {PRUNING['budget.trials']} trials x "
          f"{PRUNING['budget.max_epochs']} epochs, TPE; best target-val accuracy and epochs trained:")  # fmt: skip
    for seed, o in rows:
        p = o[PRUNER]
        gap = 100 * (o["none"]["best"] - p["best"])
        print(f"  sampler seed {seed}: no pruning {100 * o['none']['best']:.2f} % in {o['none']['epochs']} epochs "
              f"({o['none']['wall_s']:.0f} s); {PRUNER} pruner {100 * p['best']:.2f} % in "
              f"{p['epochs']} epochs ({p['pruned']} pruned, {p['wall_s']:.0f} s); "
              f"gap {gap:+.2f} points")  # fmt: skip
        benchmark.extra_info[f"seed{seed}"] = {
            "best_no_pruning": o["none"]["best"], "best_pruned": p["best"], "gap_points": round(gap, 2),
            "epochs_no_pruning": o["none"]["epochs"], "epochs_pruned": p["epochs"],
        }  # fmt: skip
    fraction = total[PRUNER] / total["none"]
    benchmark.extra_info["epochs_fraction"] = round(fraction, 3)
    print(f"  epochs trained with pruning / without: {total[PRUNER]} / {total['none']} = {fraction:.2f}")
    assert total["none"] > 0


def _startup_seconds(rounds: int = 2) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, timm"], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def test_per_trial_overhead(benchmark, tmp_path, monkeypatch):
    fits: list[float] = []

    class TimedTrainer(Trainer):
        def fit(self, on_epoch=None):
            t0 = time.perf_counter()
            try:
                return super().fit(on_epoch)
            finally:
                fits.append(time.perf_counter() - t0)

    monkeypatch.setattr(harness.search, "Trainer", TimedTrainer)
    runner = _runner(tmp_path, {})  # the quickstart as published: 6 trials x 6 epochs per method
    results = {}

    def run_all():
        for rm in runner.methods:
            fits.clear()
            study, wall = _search(runner, rm.method.strategy)
            durations = [t.duration.total_seconds() for t in study.get_trials(deepcopy=False) if t.duration]
            results[rm.method.strategy] = (wall, sum(durations), sum(fits), len(durations))

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    startup = _startup_seconds()
    print(f"\nper-trial overhead on the quickstart (trials run in one process; fresh `python -c 'import torch, "
          f"timm'` takes {startup:.2f} s):")  # fmt: skip
    all_wall = all_fit = 0.0
    for strategy, (wall, trial_s, fit_s, n) in results.items():
        in_trial = (trial_s - fit_s) / n
        share = (wall - fit_s) / wall
        all_wall, all_fit = all_wall + wall, all_fit + fit_s
        print(f"  {strategy}: {n} trials, search wall {wall:.1f} s, in Trainer.fit {fit_s:.1f} s; overhead "
              f"{in_trial * 1e3:.0f} ms per trial inside the trial, {share:.2%} of the search wall time "
              f"(a per-trial process start-up would add {startup / (wall / n):.0%})")  # fmt: skip
        benchmark.extra_info[strategy] = {
            "trials": n, "search_wall_s": round(wall, 2), "fit_s": round(fit_s, 2),
            "overhead_ms_per_trial": round(in_trial * 1e3, 1), "overhead_share": round(share, 4),
        }  # fmt: skip
    benchmark.extra_info["python_torch_timm_startup_s"] = round(startup, 2)
    print(f"  all methods: overhead {(all_wall - all_fit) / all_wall:.2%} of search wall time")
    assert all_wall > 0
