"""precision = "auto": the probe picks the fastest candidate, caches it on disk, and a pinned precision skips it."""

from __future__ import annotations

import itertools

import pytest
import torch

from harness.training import probe
from harness.training.engine import Precision, TransferModel
from harness_plugins.heads import build_linear
from harness_plugins.timm_backbones import build_timm_backbone

CPU = torch.device("cpu")


def fake(times: dict[str, float], calls: list[str]):
    def measure(p: Precision) -> float:
        calls.append(p.describe())
        if times[p.describe()] < 0:
            raise RuntimeError("not supported here")
        return times[p.describe()]

    return measure


TIMES = {
    "fp32": 3.0,
    "fp32+channels_last": 2.5,
    "bf16-autocast": 4.0,
    "bf16-autocast+channels_last": 1.2,
}


def test_picks_the_fastest_and_caches_it_on_disk():
    key = probe.probe_key("test_resnet", 64, 32, CPU) | {"case": "fastest"}
    calls: list[str] = []
    logs: list[str] = []
    choice, record = probe.choose(key, probe.ALL, fake(TIMES, calls), logs.append)
    assert choice == Precision(True, True)
    assert sorted(calls) == sorted(TIMES)
    assert record["seconds_per_step"] == TIMES and "bf16-autocast+channels_last" in logs[-1]
    # a second resolution reads the cache and measures nothing
    again: list[str] = []
    choice2, _ = probe.choose(key, probe.ALL, fake(TIMES, again), logs.append)
    assert choice2 == choice and again == [] and "probed before" in logs[-1]


def test_the_cache_key_separates_backbones_sizes_and_batches():
    base = probe.probe_key("a", 32, 64, CPU)
    keys = [
        base,
        probe.probe_key("b", 32, 64, CPU),
        probe.probe_key("a", 64, 64, CPU),
        probe.probe_key("a", 32, 16, CPU),
    ]
    assert len({probe._cache_file(k) for k in keys}) == 4
    assert base["torch"] == torch.__version__ and base["device"]
    slow_bf16 = {
        "fp32": 1.0,
        "fp32+channels_last": 1.1,
        "bf16-autocast": 2.0,
        "bf16-autocast+channels_last": 1.9,
    }
    for k, times in ((keys[0] | {"case": "sep"}, TIMES), (keys[1] | {"case": "sep"}, slow_bf16)):
        choice, _ = probe.choose(k, probe.ALL, fake(times, []), lambda m: None)
        assert choice.describe() == min(times, key=times.get)


def test_a_failing_candidate_is_skipped():
    times = dict(TIMES, **{"bf16-autocast+channels_last": -1.0})
    choice, record = probe.choose({"case": "failing", "backbone": "x", "image_size": 1, "batch_size": 1, "device": "d"},
                                  probe.ALL, fake(times, []), lambda m: None)  # fmt: skip
    assert choice.describe() == "fp32+channels_last"
    assert "bf16-autocast+channels_last" not in record["seconds_per_step"]


def test_auto_on_a_cpu_leaves_bf16_to_an_explicit_choice(monkeypatch):
    monkeypatch.delenv("HARNESS_PROBE_CPU_BF16", raising=False)
    assert [p.describe() for p in probe.candidates(CPU)] == ["fp32", "fp32+channels_last"]
    assert len(probe.candidates(torch.device("cuda"))) == 4
    monkeypatch.setenv("HARNESS_PROBE_CPU_BF16", "1")
    assert len(probe.candidates(CPU)) == 4


def test_a_pinned_precision_skips_the_probe(monkeypatch):
    monkeypatch.setattr(probe, "choose", lambda *a, **k: pytest.fail("probed a pinned precision"))
    for name, expected in [("fp32", "fp32"), ("bf16-channels_last", "bf16-autocast+channels_last"),
                           ("fp32-channels_last", "fp32+channels_last"), ("bf16", "bf16-autocast")]:  # fmt: skip
        p = probe.resolve(name, CPU, backbone="x", image_size=8, batch_size=2, build=lambda: None)
        assert p.describe() == expected
    with pytest.raises(ValueError, match="unknown precision"):
        probe.from_name("fp16", CPU)


def test_step_timer_times_only_the_steps_after_warm_up():
    ticks = itertools.count()
    stamps: list[int] = []

    def clock() -> float:
        t = next(ticks)
        stamps.append(t)
        return float(
            t * t
        )  # later steps look slower: the fastest timed one is the first after warm-up

    def build():
        bb = build_timm_backbone("test_resnet", weights="none")
        return TransferModel(bb, build_linear(backbone=bb, num_classes=2, task="classification"))

    measure = probe.step_timer(build, 16, 4, CPU, warmup=2, steps=3, clock=clock)
    seconds = measure(Precision(False, True))
    assert len(stamps) == 6  # two clock reads per timed step, none during the two warm-up steps
    assert seconds == 1.0  # the fastest timed step: the first, read at ticks 0 and 1


def test_runner_probes_auto_once_per_backbone_and_records_it(tmp_path, monkeypatch):
    from harness.search.space import train_config
    from harness.study import load_study
    from tests.conftest import write_study
    from tests.test_search import make_runner

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))  # no pick from earlier tests
    (tmp_path / "benchmarks").mkdir()
    spec = load_study(str(write_study(tmp_path / "benchmarks", trials=1)))
    assert spec.precision == "auto"
    measured: list[str] = []
    monkeypatch.setattr(probe, "step_timer", lambda *a, **k: fake(TIMES, measured))
    monkeypatch.setattr(probe, "candidates", lambda device: probe.ALL)
    runner = make_runner(tmp_path, spec)
    rm = runner.methods[0]
    assert runner.models.precision_for(rm).describe() == "bf16-autocast+channels_last"
    assert runner.models.precision_for(rm) is runner.models.precision_for(rm) and len(measured) == 4
    cfg = train_config(spec, {"head.lr": 1e-3, "optimizer.weight_decay": 0, "backbone.freeze_depth": 0,
                              "augment.policy": "none"}, 0, runner.device, runner.models.precision_for(rm))  # fmt: skip
    assert cfg.precision == Precision(True, True)
