"""The harness's search against the way the field searches today, on the quickstart pair's
fine-tuning method (digits -> digits-m, target labels, target validation accuracy):

- a DomainBed-style sweep: ``SWEEP`` random configurations drawn from the same search space (the
  harness's own ``suggest`` under Optuna's random sampler), no pruning, no feature cache, each trial
  a fresh Python process reading its images through a per-sample torchvision ``DataLoader``
  (``benchmarks/sweep_trial.py``);
- the harness's default search (TPE, the default pruner, the feature cache, one process) with the
  same number of trials.

Reported: the wall time each needs to reach the sweep's best validation score (the sweep: up to
and including its best trial; the harness: until its first trial at or above that score), their
ratio, and the test accuracy of each one's selected configuration (the sweep's best trial as it
ran; the harness's final run of its best trial, one seed). Both run in this one process's run, one
after the other, on the same machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna

from harness.registry import get_registry
from harness.search import RunOptions, build_driver
from harness.search.space import suggest
from harness.store.schema import FINAL_PREFIX
from harness.study import load_study

HERE = Path(__file__).parent
SWEEP = int(os.environ.get("BENCH_SWEEP", 20))
EPOCHS = int(os.environ.get("BENCH_EPOCHS", 6))
SAMPLER_SEED = int(os.environ.get("BENCH_SEED", 0))
METHOD = {"backbone": "test_resnet", "weights": "source", "head": "linear", "strategy": "finetune"}


def _spec(tmp: Path):
    overrides = {
        "methods": [METHOD],
        "budget.trials": SWEEP,
        "budget.max_epochs": EPOCHS,
        "final_seeds": 1,
        "precision": "fp32",
        "keep_models": "none",
    }
    return load_study(str(HERE / "quickstart.toml"), overrides=overrides), overrides


def _sweep_configs(driver, n: int) -> list[dict]:
    """``n`` configurations from the study's space, drawn by the random sampler."""
    rm = driver.methods[0]
    source, target = driver.domains.pair_data(0)
    weights = driver.models.backbone_weights(rm, source)
    stages = driver.models.build_model(rm, weights, target.num_classes).num_stages
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=SAMPLER_SEED))
    return [suggest(driver.spec, study.ask(), rm.new_strategy(), stages) for _ in range(n)]


def _run_sweep(overrides: dict, configs: list[dict]) -> list[dict]:
    out = []
    for i, params in enumerate(configs):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(HERE / "sweep_trial.py"), str(HERE / "quickstart.toml"), json.dumps(overrides),
             json.dumps(params), str(SAMPLER_SEED + i)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["wall_s"] = time.perf_counter() - t0  # the process, start-up included
        out.append(row)
    return out


def _harness(driver) -> tuple[list[tuple[float, float]], float, float]:
    """(seconds since the search began, value) of each completed trial, the search's wall time,
    and the test accuracy of its best trial's final run."""
    rm = driver.methods[0]
    t0 = time.time()
    study = driver.search(0, rm)
    wall = time.time() - t0
    done = [
        (t.datetime_complete.timestamp() - t0, t.value)
        for t in study.get_trials(deepcopy=False)
        if t.state.name == "COMPLETE"
    ]
    driver.final_runs(0, rm, study)
    finals = [v for k, v in study.user_attrs.items() if k.startswith(FINAL_PREFIX)]
    return sorted(done), wall, finals[0]["test"]["accuracy"]


def test_sweep_vs_harness(benchmark, tmp_path):
    spec, overrides = _spec(tmp_path)
    options = RunOptions(results_dir=tmp_path / "h", log=lambda m: None, sampler_seed=SAMPLER_SEED)
    driver = build_driver(spec, get_registry(), options)
    result = {}

    def run_both():
        configs = _sweep_configs(driver, SWEEP)
        result["sweep"] = _run_sweep(overrides, configs)
        result["harness"] = _harness(driver)

    benchmark.pedantic(run_both, rounds=1, iterations=1)
    sweep = result["sweep"]
    best_i = max(range(len(sweep)), key=lambda i: sweep[i]["val"])
    target = sweep[best_i]["val"]
    sweep_s = sum(r["wall_s"] for r in sweep[: best_i + 1])
    done, wall, harness_test = result["harness"]
    reached = next((s for s, v in done if v >= target - 1e-9), None)
    best_h = max(v for _, v in done)
    print(
        f"\nDomainBed-style sweep vs harness, quickstart pair, finetune, {SWEEP} trials x {EPOCHS} epochs:"
    )
    print(f"  sweep: best target-val {100 * target:.2f} % at trial {best_i + 1}, reached after "
          f"{sweep_s:.0f} s (all {SWEEP}: {sum(r['wall_s'] for r in sweep):.0f} s); its test "
          f"{100 * sweep[best_i]['test']:.2f} %")  # fmt: skip
    if reached is None:
        print(f"  harness: never reached it in {SWEEP} trials ({wall:.0f} s); its best {100 * best_h:.2f} %, test {100 * harness_test:.2f} %")  # fmt: skip
    else:
        print(f"  harness: reached it after {reached:.0f} s (all trials {wall:.0f} s); its best "
              f"{100 * best_h:.2f} %, test of its selection {100 * harness_test:.2f} %; "
              f"compute ratio sweep / harness = {sweep_s / reached:.1f}x")  # fmt: skip
    benchmark.extra_info.update({
        "sweep_best_val": target, "sweep_seconds_to_best": sweep_s, "sweep_test": sweep[best_i]["test"],
        "harness_seconds_to_sweep_best": reached, "harness_best_val": best_h,
        "harness_test": harness_test, "harness_wall": wall,
    })  # fmt: skip
    assert len(sweep) == SWEEP
