"""The search space and warm start (issue 20), each measured against its alternative in one run:

- ``test_wider_space``: the wider space (augmentation policies, MixUp/CutMix, optimizer,
  schedule, label smoothing) against the current one at the same trial and epoch budget, on the
  quickstart pair's fine-tuning method and on digits-uda's DANN, over ``BENCH_SEEDS`` sampler seeds:
  the best validation score of each search and the test score of its selected trial (one final seed);
- ``test_warm_start``: on four related pairs (rotated digits: 0 degrees to 15, 30, 45 and 60), each
  later pair's search warm-started from the pairs before it against a cold start: how many trials
  the warm search needs to come within 0.5 points of the cold search's best validation score.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from harness.registry import get_registry
from harness.search import RunOptions, build_driver
from harness.store.schema import FINAL_PREFIX
from harness.study import load_study

HERE = Path(__file__).parent
SEEDS = range(int(os.environ.get("BENCH_SEEDS", 5)))
#: the wider space: today's keys kept, the new dimensions searched
WIDER = {
    "search.augment": ["none", "light", "strong", "randaugment", "trivialaugment"],
    "search.num_ops": [1, 3],
    "search.magnitude": [5.0, 20.0],
    "search.mix_prob": [0.0, 1.0],
    "search.mixup_alpha": 0.2,
    "search.cutmix_alpha": 1.0,
    "search.optimizer": ["adamw", "sgd"],
    "search.schedule": ["cosine", "constant", "step"],
    "search.warmup": [0.0, 0.2],
    "search.label_smoothing": [0.0, 0.2],
}
CASES = {
    # (study, method overrides, budget)
    "quickstart finetune": ("quickstart", "finetune", {"budget.trials": 6, "budget.max_epochs": 6}),
    "digits-uda dann": (
        "digits-uda",
        "dann",
        {"budget.trials": 6, "budget.max_epochs": int(os.environ.get("BENCH_DANN_EPOCHS", 12))},
    ),
}


def _method(strategy: str) -> dict:
    return {"backbone": "test_resnet", "weights": "source", "head": "linear", "strategy": strategy}


def _search_and_final(study: str, overrides: dict, tmp: Path, seed: int) -> tuple[float, float]:
    """The best validation score of the search and the test score of the final run of the trial
    its driving rule picks (one seed)."""
    spec = load_study(str(HERE / f"{study}.toml"), overrides=overrides)
    options = RunOptions(results_dir=tmp, log=lambda m: None, sampler_seed=seed)
    driver = build_driver(spec, get_registry(), options)
    rm = driver.methods[0]
    study_ = driver.search(0, rm)
    driver.final_runs(0, rm, study_)
    metric = "accuracy"
    finals = [v for k, v in study_.user_attrs.items() if k.startswith(FINAL_PREFIX)]
    return study_.best_value, finals[0]["test"][metric]


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * sd:.2f} (min {100 * min(values):.2f}, max {100 * max(values):.2f})"


def test_wider_space(benchmark, tmp_path):
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}

    def run_all():
        for case, (study, strategy, budget) in CASES.items():
            if os.environ.get("BENCH_CASE", case) not in case:
                continue
            for space in ("current", "wider"):
                for seed in SEEDS:
                    overrides = {
                        "methods": [_method(strategy)],
                        "final_seeds": 1,
                        "precision": "fp32",
                        "keep_models": "none",
                        **budget,
                        **(WIDER if space == "wider" else {}),
                    }
                    out = _search_and_final(
                        study, overrides, tmp_path / f"{case}-{space}-{seed}", seed
                    )
                    rows.setdefault((case, space), []).append(out)
                    print(f"\n  {case}, {space}, sampler seed {seed}: best validation "
                          f"{100 * out[0]:.2f}, test of the selection {100 * out[1]:.2f}", flush=True)  # fmt: skip

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    print(f"\nwider vs current search space, {len(SEEDS)} sampler seeds (mean ± sd):")
    for (case, space), values in rows.items():
        best, test = [v[0] for v in values], [v[1] for v in values]
        print(
            f"  {case}, {space}: best validation {_spread(best)}; test of the selection {_spread(test)}"
        )
        benchmark.extra_info[f"{case}|{space}"] = values
    assert rows


PAIRS = [("rotated-digits/0", f"rotated-digits/{a}") for a in (15, 30, 45, 60)]
WARM_TRIALS = int(os.environ.get("BENCH_WARM_TRIALS", 10))


def _pair_searches(tmp: Path, seed: int, warm: bool) -> list[list[float]]:
    """Each pair's trial values in order, the pairs searched one after the other."""
    overrides = {
        "pairs": [{"source": s, "target": t} for s, t in PAIRS],
        "methods": [_method("finetune")],
        "budget.trials": WARM_TRIALS,
        "budget.max_epochs": 6,
        "precision": "fp32",
        "keep_models": "none",
        **({"search.warm_start": "pairs"} if warm else {}),
    }
    spec = load_study(str(HERE / "quickstart.toml"), overrides=overrides)
    driver = build_driver(
        spec, get_registry(), RunOptions(results_dir=tmp, log=lambda m: None, sampler_seed=seed)
    )
    out = []
    for i in range(len(PAIRS)):
        study = driver.search(i, driver.methods[0])
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        out.append([t.value if t.state.name == "COMPLETE" else float("-inf") for t in trials])
    return out


def _trials_to_reach(values: list[float], target: float) -> int | None:
    best = float("-inf")
    for n, v in enumerate(values, 1):
        best = max(best, v)
        if best >= target - 0.005:
            return n
    return None


def test_warm_start(benchmark, tmp_path):
    counts: list[int | None] = []

    def run_all():
        for seed in range(int(os.environ.get("BENCH_WARM_SEEDS", 3))):
            cold = _pair_searches(tmp_path / f"cold-{seed}", seed, warm=False)
            warm = _pair_searches(tmp_path / f"warm-{seed}", seed, warm=True)
            for i in range(1, len(PAIRS)):
                n = _trials_to_reach(warm[i], max(cold[i]))
                counts.append(n)
                print(f"  seed {seed}, pair {PAIRS[i][1]}: cold best {100 * max(cold[i]):.2f} % "
                      f"(reached at trial {_trials_to_reach(cold[i], max(cold[i]))}), warm reaches it at trial {n} "
                      f"(warm best {100 * max(warm[i]):.2f} %)")  # fmt: skip

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    never = (
        WARM_TRIALS + 1
    )  # a warm search that never comes within 0.5 points counts as past the budget
    median = statistics.median(n if n is not None else never for n in counts)
    print(f"\nwarm start, {len(counts)} (pair, seed) searches of {WARM_TRIALS} trials: median trials "
          f"to come within 0.5 points of the cold best = {median} (target: <= {WARM_TRIALS / 2}); "
          f"never reached: {sum(n is None for n in counts)}")  # fmt: skip
    benchmark.extra_info.update({"counts": counts, "median": median})
    assert counts
