"""The data path at 10,000 and 100,000 images: a ``folder`` dataset of JPEG photo crops
(``data_at_scale.make_photo_folders``, 256 px, two domains) read through the decoded-image cache
(``harness.data.cache``) by ``harness run`` in child processes:

- the cache build's images/s against a plain threaded PIL loop decoding the same files to the same
  size (``plain_decode_rate``), measured in the same run (0.8x or more wanted);
- the peak anonymous memory (``RssAnon``) of a one-trial search, at each size: mapped cache pages
  are file pages, so it should grow by 15 % at most from 10,000 to 100,000 images;
- the time from the data step to the first trial, on a first run (the cache built) and a second
  run (the cache mapped);
- two workers (``--workers 2``) sharing one copy of the mapped data (their ``Pss`` of it).

Sizes: ``BENCH_DATA_SIZES=10000,100000`` (default 10000); ``BENCH_IMAGE_SIZE`` (default 64) is the
study's image size; the generated folders are kept under ``BENCH_DATA_DIR`` (default
``$HARNESS_CACHE_DIR/bench-photos``) and reused; ``BENCH_DECODE_THREADS`` (default: this
process's CPUs) sets the reference loop's threads.

How the cache build is timed: the first and the second run search the same single trial, the
first building the cache, the second mapping it; the build's seconds are the difference of their
times from the run's header line (``study NAME: ...``, printed just before the preflight builds the
domains) to the first trial's line (``NAME: trial 0 complete ...``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from data_at_scale import (
    ChildRun,
    default_threads,
    descendants,
    first_trial_timing,
    harness_argv,
    make_photo_folders,
    mapped_usage,
    photo_files,
    plain_decode_rate,
    run_child,
    smaps_rollup,
    write_study,
)

from harness.fileio import cache_dir

SIZES = [int(s.lower().replace("k", "000")) for s in os.environ.get("BENCH_DATA_SIZES", "10000").split(",")]  # fmt: skip
IMAGE_SIZE = int(os.environ.get("BENCH_IMAGE_SIZE", 64))
DATA_DIR = Path(os.environ.get("BENCH_DATA_DIR") or cache_dir() / "bench-photos")
THREADS = int(os.environ.get("BENCH_DECODE_THREADS") or default_threads())
TIMEOUT_S = 3 * 3600
#: peak RssAnon of the one-trial searches, by size and run (filled by test_one_trial_search)
PEAKS: dict[int, dict[str, int]] = {}
#: each size's decoded-image cache directory, built by test_one_trial_search
CACHES: dict[int, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def _cache_available():
    try:
        import harness.data.cache  # noqa: F401
    except ImportError:
        pytest.skip("harness.data.cache not available")


def _run(study: Path, results: Path, cache: Path, *args: str, sample=None) -> ChildRun:
    argv = harness_argv("run", "--study", str(study), "--results-dir", str(results), "--no-report", "--no-index", *args)  # fmt: skip
    run = run_child(
        argv, env={"HARNESS_CACHE_DIR": str(cache)}, sample=sample,
        interval_s=0.1 if sample is None else 0.5, timeout_s=TIMEOUT_S,
    )  # fmt: skip
    assert run.returncode == 0, run.output[-3000:]
    return run


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n // 1000}k")
def test_one_trial_search(benchmark, n, tmp_path):
    """A first run (cache built) and a second run (cache mapped) of a one-trial, one-epoch search:
    the build's rate against the plain loop, each run's peak memory and time to its first trial."""
    root = make_photo_folders(DATA_DIR / f"photos-{n}", n)
    plain = plain_decode_rate(photo_files(root), IMAGE_SIZE, THREADS)
    study = write_study(tmp_path / "study.toml", root, IMAGE_SIZE)
    cache = CACHES.setdefault(n, tmp_path / "cache")
    runs: dict[str, ChildRun] = {}

    def both() -> None:
        runs["first"] = _run(study, tmp_path / "first", cache)
        runs["second"] = _run(study, tmp_path / "second", cache)

    benchmark.pedantic(both, rounds=1, iterations=1)
    timing = {k: first_trial_timing(r.lines) for k, r in runs.items()}
    assert all(timing.values()), (
        "no header or trial line in the log: " + runs["first"].output[-2000:]
    )
    build_s = (
        timing["first"]["header_to_first_trial_line_s"]
        - timing["second"]["header_to_first_trial_line_s"]
    )
    rate = n / build_s if build_s > 0 else float("inf")
    PEAKS[n] = {k: r.peak.get("RssAnon", 0) for k, r in runs.items()}
    info = {
        "images": n, "image_size": IMAGE_SIZE, "decode_threads": THREADS,
        "plain_decode_img_s": round(plain, 1), "cache_build_s": round(build_s, 2),
        "cache_build_img_s": round(rate, 1), "build_over_plain": round(rate / plain, 3),
        "cache_mb": _mb(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) // 1024),
    }  # fmt: skip
    for k, r in runs.items():
        info[k] = {
            "wall_s": round(r.wall_s, 1), "max_rss_mb": _mb(r.max_rss_kb),
            "peak_rss_anon_mb": _mb(r.peak.get("RssAnon", 0)),
            "peak_rss_file_mb": _mb(r.peak.get("RssFile", 0)),
            **{key: round(v, 2) for key, v in timing[k].items()},
        }  # fmt: skip
    benchmark.extra_info.update(info)
    print(f"\n{n} images at {IMAGE_SIZE} px: plain decode {plain:.0f} img/s ({THREADS} threads), cache "
          f"build {rate:.0f} img/s ({build_s:.1f} s) = {rate / plain:.2f}x; " + "; ".join(
              f"{k} run: data to first trial {info[k]['data_to_first_trial_s']:.1f} s, peak RssAnon "
              f"{info[k]['peak_rss_anon_mb']} MB, RssFile {info[k]['peak_rss_file_mb']} MB, max RSS "
              f"{info[k]['max_rss_mb']} MB" for k in runs))  # fmt: skip


def test_anonymous_memory_flat_over_size(benchmark):
    """Peak ``RssAnon`` of the largest size over the smallest, for each run: 1.15 at most."""
    if len(PEAKS) < 2:
        pytest.skip("needs two sizes measured: BENCH_DATA_SIZES=10000,100000")
    small, large = min(PEAKS), max(PEAKS)
    growth = {k: PEAKS[large][k] / PEAKS[small][k] - 1 for k in PEAKS[small]}
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update({"sizes": [small, large], "rss_anon_growth": growth})
    print(f"\npeak RssAnon {small} -> {large} images: " + ", ".join(f"{k} run {g:+.1%}" for k, g in growth.items()))  # fmt: skip
    assert all(g <= 0.15 for g in growth.values()), growth  # memory, not speed: a target


def _workers_sample(cache: Path):
    def sample(pid: int) -> dict[int, dict]:
        return {
            p: {"mapped": mapped_usage(p, cache), "rollup": smaps_rollup(p)}
            for p in [pid, *descendants(pid)]
        }

    return sample


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n // 1000}k")
def test_two_workers_share_mapping(benchmark, n, tmp_path):
    """``--workers 2`` on four one-epoch trials: at the look where the processes held the most
    of the cache's mapping, the sum of their ``Pss`` of it against one process's ``Rss`` of it
    (about 1: one copy in memory; 2 or more: a copy each)."""
    root = make_photo_folders(DATA_DIR / f"photos-{n}", n)
    study = write_study(tmp_path / "study.toml", root, IMAGE_SIZE, trials=4)
    cache = CACHES.get(n, tmp_path / "cache")
    out: dict[str, ChildRun] = {}

    def run() -> None:
        out["run"] = _run(
            study, tmp_path / "r", cache, "--workers", "2", sample=_workers_sample(cache)
        )

    benchmark.pedantic(run, rounds=1, iterations=1)
    looks = [s for s in out["run"].samples if len(s) >= 3]  # the parent and two workers
    assert looks, "never saw two worker processes"
    best = max(looks, key=lambda s: sum(v["mapped"]["Rss"] for v in s.values()))
    mapped = {p: v["mapped"] for p, v in best.items()}
    one_copy = max(m["Rss"] for m in mapped.values())
    assert one_copy > 0, f"no process mapped a file under {cache}"
    share = sum(m["Pss"] for m in mapped.values()) / one_copy
    per = {str(p): {"mapped_rss_mb": _mb(m["Rss"]), "mapped_pss_mb": _mb(m["Pss"]),
                    "uss_mb": _mb(best[p]["rollup"].get("USS", 0)),
                    "pss_mb": _mb(best[p]["rollup"].get("Pss", 0)),
                    "pss_anon_mb": _mb(best[p]["rollup"].get("Pss_Anon", 0))}
           for p, m in mapped.items()}  # fmt: skip
    benchmark.extra_info.update(
        {"images": n, "processes": per, "pss_sum_over_one_rss": round(share, 3)}
    )
    print(f"\n{n} images, --workers 2: mapped cache Pss summed over {len(mapped)} processes = "
          f"{share:.2f}x one process's Rss of it; per process: {per}")  # fmt: skip
    assert share <= 1.15, per  # one copy shared, not one per worker
