"""Pairs with several source domains: the study syntax (lists, ``leave_one_out``), the pooled
source data, batches drawn in equal shares per domain, strategies that see no target image, and
what is refused before anything trains."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import write_study
from test_engine import config, model
from test_search import make_runner, registry_with

from harness.api import DomainData, Strategy
from harness.data.pooled import SOURCE_DOMAINS, num_domains, pool_domains, source_domain
from harness.errors import PluginContractError, StudySpecError
from harness.publish import leaderboard
from harness.search import DomainCache
from harness.study import Pair, load_study
from harness.training.batches import Batches, DomainBatches, domain_shares, steps_per_epoch
from harness.training.engine import Trainer

MULTI = """
image_size = 16
batch_size = 32
seed = 0
final_seeds = 1
selection = {selection}

[datasets.m2]
plugin = "digits-m"
photo_seed = 7

{pairs}

{methods}

[budget]
trials = 1
max_epochs = 1

[search]
startup_trials = 1
"""
PAIR = '[[pairs]]\nsource = ["digits", "m2"]\ntarget = "digits-m"'
METHOD = '[[methods]]\nbackbone = "test_resnet"\nstrategy = "{}"\n'


def study(tmp_path, pairs=PAIR, strategies=("source-only",), selection='"auto"', name="multi"):
    (tmp_path / "benchmarks").mkdir(exist_ok=True)
    methods = "\n".join(METHOD.format(s) for s in strategies)
    body = MULTI.format(pairs=pairs, methods=methods, selection=selection)
    return write_study(tmp_path / "benchmarks", name, body=body)


class SourcesOnly(Strategy):
    """Domain generalization's baseline as a test strategy: pooled sources, no target image."""

    uses_target = False
    target_images = "none"

    def training_step(self, m, batch, ctx):
        x, y = batch.source
        return F.cross_entropy(m(x), y)


class SeesTarget(SourcesOnly):
    uses_target = True


# ------------------------------------------------------------------------------- study files


def test_a_pair_names_several_sources_and_one_source_serializes_as_before(tmp_path):
    spec = load_study(str(study(tmp_path)))
    pair = spec.pairs[0]
    assert pair.sources == ["digits", "m2"] and pair.source_name == "digits+m2"
    assert pair.key == "digits+m2->digits-m"
    assert spec.dump()["pairs"] == [{"source": ["digits", "m2"], "target": "digits-m"}]
    one = Pair.model_validate({"source": "digits", "target": "digits-m"})
    assert one.model_dump() == {"source": "digits", "target": "digits-m"}
    assert one.sources == ["digits"] and one.key == "digits->digits-m"
    listed = Pair.model_validate({"source": ["digits"], "target": "digits-m"})
    assert listed.model_dump() == one.model_dump() and listed.key == one.key


def test_leave_one_out_expands_into_a_pair_per_domain_among_ordinary_pairs(tmp_path):
    pairs = (
        '[[pairs]]\nsource = "digits"\ntarget = "digits-m"\n\n'
        '[[pairs]]\nleave_one_out = ["digits", "digits-m", "m2"]'
    )
    spec = load_study(str(study(tmp_path, pairs=pairs)))
    assert [p.key for p in spec.pairs] == [
        "digits->digits-m",
        "digits-m+m2->digits",
        "digits+m2->digits-m",
        "digits+digits-m->m2",
    ]
    assert spec.pair_where(0, "source") == "pairs[0].source"
    assert spec.pair_where(3, "source") == "pairs[1].leave_one_out"


REFUSED = {
    "source listed twice": (
        '[[pairs]]\nsource = ["digits", "m2", "digits"]\ntarget = "digits-m"',
        "pairs[0].source: 'digits' is listed twice",
    ),
    "alias of a source": (
        '[[pairs]]\nsource = ["digits-m", "m3"]\ntarget = "digits"\n'
        '[datasets.m3]\nplugin = "digits-m"',
        "pairs[0].source: 'digits-m' names a domain listed twice (as alias 'm3'); each source "
        "domain once",
    ),
    "target is a source through an alias": (
        '[[pairs]]\nsource = ["dig", "m2"]\ntarget = "digits"\n[datasets.dig]\nplugin = "digits"',
        "pairs[0]: target 'digits' is also a source (as alias 'dig'); the target",
    ),
    "leave_one_out twice through an alias": (
        '[[pairs]]\nleave_one_out = ["digits", "digits-m", "dig"]\n'
        '[datasets.dig]\nplugin = "digits"',
        "pairs[0].leave_one_out: 'digits' is listed twice (through alias 'dig'); each domain once",
    ),
    "target is a source": (
        '[[pairs]]\nsource = ["digits", "m2"]\ntarget = "m2"',
        "pairs[0]: target 'm2' is also a source",
    ),
    "leave_one_out of two": (
        '[[pairs]]\nleave_one_out = ["digits", "m2"]',
        "pairs[0].leave_one_out: needs at least three domains",
    ),
    "leave_one_out twice": (
        '[[pairs]]\nleave_one_out = ["digits", "m2", "digits"]',
        "pairs[0].leave_one_out: 'digits' is listed twice",
    ),
    "leave_one_out with a target": (
        '[[pairs]]\nleave_one_out = ["digits", "m2", "digits-m"]\ntarget = "digits"',
        "pairs[0].leave_one_out: a leave_one_out table holds no other key (found target)",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_pairs_are_refused_in_one_line_naming_file_and_key(tmp_path, case):
    pairs, expected = REFUSED[case]
    path = study(tmp_path, pairs=pairs)
    with pytest.raises(StudySpecError) as err:
        load_study(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: {expected}"), message
    assert "\n" not in message and err.value.exit_code == 2


def test_the_cli_exits_2_with_the_refusal(tmp_path):
    study(tmp_path, pairs='[[pairs]]\nleave_one_out = ["digits", "m2"]', name="short")
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "validate", "--study", "short"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ},
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pairs[0].leave_one_out: needs at least three domains" in result.stderr


DIGITS = [str(d) for d in range(10)]
RELABELLED = {
    "another class": (
        lambda names: [*names[:-1], "ten"],
        "have different classes (only in 'digits': '9'; only in 'm2': 'ten'); the domains",
    ),
    "another order": (
        lambda names: names[::-1],
        f"have the same classes in another order ({DIGITS} vs {DIGITS[::-1]}); the domains",
    ),
}


@pytest.mark.parametrize("case", sorted(RELABELLED))
def test_sources_with_different_classes_are_refused_before_training(tmp_path, case):
    spec = load_study(str(study(tmp_path)))
    relabel, says = RELABELLED[case]

    class Relabelled(DomainCache):
        def _one(self, i, side, ref):
            data = super()._one(i, side, ref)
            if ref.text != "m2":
                return data
            names = relabel(data.class_names)
            return DomainData(data.name, data.task, names, data.train, data.val, data.test, "x")

    runner = make_runner(tmp_path, spec, domains=Relabelled)
    with pytest.raises(StudySpecError) as err:
        runner.preflight()
    assert str(err.value).startswith(
        f"{spec.path}: pairs[0].source: sources 'digits' and 'm2' {says}"
    ), str(err.value)


@pytest.mark.parametrize("rule", ["entropy", '["source-val", "im"]', "dev"])
def test_a_strategy_without_target_images_refuses_label_free_rules(tmp_path, rule):
    selection = rule if rule.startswith("[") else f'"{rule}"'
    spec = load_study(str(study(tmp_path, strategies=("dg",), selection=selection)))
    runner = make_runner(tmp_path, spec, registry_with(("dg", SourcesOnly)))
    with pytest.raises(StudySpecError) as err:
        runner.preflight()
    message = str(err.value)
    assert message.startswith(f"{spec.path}: selection: ")
    assert "strategy 'dg' (methods[0]) sees no target image" in message
    assert "allowed for it: auto, target-val, source-val" in message
    assert not runner.started


def test_uses_target_with_target_images_none_is_a_contract_error(tmp_path):
    spec = load_study(str(study(tmp_path, strategies=("bad",))))
    runner = make_runner(tmp_path, spec, registry_with(("bad", SeesTarget)))
    with pytest.raises(StudySpecError) as err:
        runner.preflight()
    assert str(err.value).startswith(f"{spec.path}: methods[0].strategy: strategy 'bad': declares")
    source = DomainData.from_arrays(
        "s", torch.zeros(20, 3, 8, 8, dtype=torch.uint8), torch.arange(20) % 2, class_names="ab",
        seed=0,
    )  # fmt: skip
    with pytest.raises(PluginContractError):
        Trainer(model(classes=2), SeesTarget(), source, source, config())


# -------------------------------------------------------------------------------- batches


def _domain(name: str, n: int, value: int) -> DomainData:
    """``n`` images of one grey ``value`` (the domain is legible in every image)."""
    x = torch.full((n, 3, 16, 16), value, dtype=torch.uint8)
    return DomainData.from_arrays(name, x, torch.arange(n) % 3, class_names=["0", "1", "2"], seed=0)


def test_pooled_domains_concatenate_splits_with_their_domain_index():
    parts = [_domain("a", 30, 10), _domain("b", 50, 120), _domain("c", 20, 240)]
    pooled = pool_domains("a+b+c", parts)
    assert num_domains(pooled) == 3 and pooled.meta[SOURCE_DOMAINS] == ["a", "b", "c"]
    for split in ("train", "val", "test"):
        sizes = [len(getattr(p, split)) for p in parts]
        index = source_domain(pooled, split)
        assert len(getattr(pooled, split)) == sum(sizes) == len(index)
        assert torch.bincount(index).tolist() == sizes
        values = getattr(pooled, split).x[:, 0, 0, 0].long()
        assert torch.equal(values, torch.tensor([10, 120, 240])[index])
    assert num_domains(parts[0]) == 1 and source_domain(parts[0]) is None


def test_every_step_draws_each_domain_in_equal_shares():
    domains = torch.repeat_interleave(torch.arange(3), torch.tensor([30, 50, 20]))
    batches = DomainBatches(domains, 16, torch.Generator().manual_seed(0))
    epoch = batches.epoch()
    assert (
        len(epoch) == steps_per_epoch(100, 16) == len(Batches(100, 16, torch.Generator()).epoch())
    )
    assert domain_shares(16, 3) == [6, 5, 5]
    seen = [set() for _ in range(3)]
    for idx in epoch:
        assert torch.bincount(domains[idx], minlength=3).tolist() == [6, 5, 5]
        for k in range(3):
            seen[k] |= set(idx[domains[idx] == k].tolist())
    assert len(seen[2]) == 20  # the smallest domain cycles through all its images
    again = DomainBatches(domains, 16, torch.Generator().manual_seed(0)).epoch()
    assert all(torch.equal(a, b) for a, b in zip(epoch, again, strict=True))


class Recorder(Strategy):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []

    def training_step(self, m, batch, ctx):
        x, y = batch.source
        self.seen.append((x[:, 0, 0, 0].detach(), batch.source_domain, ctx.num_source_domains))
        return F.cross_entropy(m(x), y)


def test_the_engine_hands_each_image_its_domain_index():
    pooled = pool_domains(
        "a+b+c", [_domain("a", 30, 10), _domain("b", 50, 120), _domain("c", 20, 240)]
    )
    strategy = Recorder()
    Trainer(model(), strategy, pooled, _domain("t", 20, 60), config(batch_size=16)).fit()
    assert len(strategy.seen) == steps_per_epoch(len(pooled.train), 16)
    for pixels, domains, count in strategy.seen:
        assert count == 3 and domains.dtype == torch.int64
        assert torch.bincount(domains, minlength=3).tolist() == [6, 5, 5]
        # brighter domains have higher indices: the order of the pixels is the order of the index
        order = torch.argsort(pixels, stable=True)
        assert torch.equal(domains[order], torch.sort(domains).values)


def test_one_source_trains_as_before():
    source, target = _domain("a", 40, 10), _domain("t", 20, 60)
    strategy = Recorder()
    Trainer(model(), strategy, source, target, config(batch_size=16)).fit()
    assert all(d is None and n == 1 for _, d, n in strategy.seen)


# -------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_multi_source_study_runs_end_to_end(tmp_path):
    spec = load_study(str(study(tmp_path, strategies=("source-only", "dann", "dg"))))
    runner = make_runner(tmp_path, spec, registry_with(("dg", SourcesOnly)))
    runner.run()
    board, _, prov = leaderboard.collect(spec, runner.storage_url)
    assert set(board["pair"]) == {"digits+m2->digits-m"} and set(board["source"]) == {"digits+m2"}
    assert (board["status"] == "final").all(), board[["method", "status"]]
    assert board["test_accuracy"].notna().all()
    dg = [k for k in prov["target_images"] if k.endswith("+dg")]
    assert prov["target_images"][dg[0]] == "none"
    assert {v for k, v in prov["target_images"].items() if k not in dg} == {"train"}
    source = runner.domains.domain(0, "source")
    assert source.meta[SOURCE_DOMAINS] == ["digits", "m2"]
    assert len(source.train) == 2 * len(runner.domains.domain(0, "target").train)
