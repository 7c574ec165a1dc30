"""The contract kit (``harness.testing``): built-ins and the example plugin pass, broken plugins fail.

Every built-in entry is checked the way a third-party plugin's tests would check theirs (timm
backbones: a few ``test_*`` models only; folder-type datasets are skipped for want of a root).
Broken factories must each fail a named check with a detail that says what is wrong.
"""

from __future__ import annotations

import importlib
import os
import sys
import tomllib
import types
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from harness import hookimpl
from harness.api import (
    Backbone,
    Batch,
    DomainData,
    Split,
    StepContext,
    Strategy,
    fingerprint_tensors,
)
from harness.registry import Entry, PluginInfo, Registry, get_registry
from harness.testing import (
    CheckResult,
    ContractCheck,
    PluginCheckError,
    assert_passes,
    check_backbone,
    check_command,
    check_dataset,
    check_entry,
    check_head,
    check_names,
    check_plugin,
    check_strategy,
    parametrize_with_checks,
)

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = sorted(
    tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["harness"]
)
#: timm registers every timm model; a few tiny ones stand for them
BACKBONES = ("test_resnet", "test_convnext", "test_efficientnet", "test_vit")
#: arguments that keep the checks small; PAN pools its deepest map further and needs 128 px
SMALL: dict[str, dict[str, Any]] = {
    "dataset": {"image_size": 16},
    "dataset:seg-synthetic": {"options": {"n": 20}},
    "dataset:seg-photo": {"options": {"n": 20}},
    "head:pan": {"seg_image_size": 128},
}


def _builtin_ids() -> list[str]:
    registry = Registry()  # not the process-wide one: collection runs before conftest's isolation
    registry.load_entry_points(only=BUILTIN, strict=True)
    ids = [f"backbone:{name}" for name in BACKBONES if name in registry.entries["backbone"]]
    for kind in ("head", "dataset", "strategy"):
        ids += [f"{kind}:{name}" for name in registry.names(kind)]
    return ids


def _kwargs(key: str) -> dict[str, Any]:
    kind = key.split(":")[0]
    return {**SMALL.get(kind, {}), **SMALL.get(key, {})}


def _by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


# =========================================================================================== built-ins


@pytest.mark.parametrize("key", _builtin_ids())
def test_every_builtin_entry_passes(key: str) -> None:
    kind, name = key.split(":", 1)
    entry = get_registry().get(kind, name)
    results = check_entry(entry, **_kwargs(key))
    assert results and all(isinstance(r, CheckResult) for r in results)
    assert_passes(results)
    if not any(r.detail.startswith("skipped: ") for r in results):
        # what parametrize_with_checks lists before running is what runs
        assert [r.name for r in results] == check_names(entry, **_kwargs(key))


def test_a_builtin_strategy_passes_on_segmentation() -> None:
    results = check_strategy(get_registry().get("strategy", "source-only"), task="segmentation")
    assert_passes(results)
    assert "64 px segmentation" in _by_name(results)["strategy.trains"].detail


def _declaring(kind: str, factory: Any, options: dict[str, Any]) -> Entry:
    return Entry(kind, "declaring", factory, "tests", "tests", meta={"options": options})


def test_declared_options_must_match_the_factory() -> None:
    from harness.api import Option

    def head(*, backbone, num_classes, task, width: int):
        return nn.Linear(backbone.num_features, num_classes)

    results = _by_name(check_head(_declaring("head", head, {"widht": Option(int)})))
    failed = results["head.declared_options"]
    assert not failed.passed
    assert "widht not parameters of the factory" in failed.detail
    assert "required parameter(s) width not declared" in failed.detail

    class Shots(Strategy):
        def __init__(self, shots: int = 1) -> None:
            super().__init__()

    results = _by_name(check_strategy(_declaring("strategy", Shots, {"shot": Option(int)})))
    assert "shot not parameters" in results["strategy.declared_options"].detail
    ok = _by_name(check_strategy(_declaring("strategy", Shots, {"shots": Option(int, default=1)})))
    assert ok["strategy.declared_options"].passed
    results = check_entry(_declaring("dataset", dataset_needs_root, {"n": Option(int)}))
    assert results[0].name == "dataset.declared_options" and not results[0].passed


def test_datasets_that_need_a_root_are_skipped_with_a_note() -> None:
    results = check_entry(get_registry().get("dataset", "folder"))
    assert [(r.name, r.passed) for r in results] == [
        ("dataset.declared_options", True),
        ("dataset.factory", True),
    ]
    assert "needs options: root" in results[1].detail
    cityscapes = check_entry(get_registry().get("dataset", "cityscapes"))  # one per declared domain
    assert [r.name for r in cityscapes] == [
        "dataset.declared_options",
        "dataset/train.factory",
        "dataset/val.factory",
    ]
    assert cityscapes[0].passed
    assert all(r.passed and "needs options: root" in r.detail for r in cityscapes[1:])


def test_folder_dataset_is_checked_when_given_a_root(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        folder = tmp_path / "photos" / cls
        folder.mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    results = check_dataset(
        get_registry().get("dataset", "folder"),
        "photos",
        image_size=8,
        options={"root": str(tmp_path)},
    )
    assert_passes(results)
    assert _by_name(results)["dataset/photos.factory"].detail == "6/2/2 train/val/test images"


def test_check_plugin_covers_one_builtin_plugin() -> None:
    results = check_plugin(
        get_registry(), "heads", options={"head:mlp": {"options": {"hidden": 8}}}
    )
    assert set(results) == {"head:linear", "head:mlp"}
    assert_passes(results)


# =========================================================================================== example plugin


@pytest.fixture
def example_plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """``harness_example.plugin`` imported from the source tree, forgotten again afterwards (the
    third-party test imports the pip-installed copy and checks where it came from)."""

    def ours() -> list[str]:
        return [
            k for k in sys.modules if k == "harness_example" or k.startswith("harness_example.")
        ]

    for key in ours():
        monkeypatch.delitem(sys.modules, key)  # restored when monkeypatch undoes
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "example_plugin"))
    yield importlib.import_module("harness_example.plugin")
    for key in ours():
        del sys.modules[key]


def test_the_example_plugin_passes(example_plugin: types.ModuleType) -> None:
    registry = Registry()
    info = PluginInfo("example", "harness-example-plugin", "0.1.0", "harness_example.plugin")
    registry.add_plugin(example_plugin, info)
    assert info.error is None
    results = check_plugin(
        registry, "example", options={"dataset": {"image_size": 16, "options": {"n": 30}}}
    )
    assert set(results) == {
        "backbone:example-lenet",
        "dataset:example-shapes",
        "strategy:example-entropy",
        "command:example-shapes-info",
        "validator:example-confidence",
        "metric:example-top2",
    }
    assert_passes(results)
    names = {r.name for r in results["dataset:example-shapes"]}
    assert {"dataset/plain.disjoint_splits", "dataset/noisy.disjoint_splits"} <= names


def test_bare_factories_of_the_example_plugin_pass(example_plugin: types.ModuleType) -> None:
    assert_passes(check_backbone(example_plugin.build_lenet, "example-lenet", image_size=16))
    assert_passes(
        check_dataset(example_plugin.build_shapes, "noisy", image_size=16, options={"n": 30})
    )
    assert_passes(check_command(example_plugin.shapes_info, "example-shapes-info"))
    with pytest.raises(TypeError, match="needs the name"):
        check_backbone(example_plugin.build_lenet)


# =========================================================================================== broken plugins


def command_without_docs(n: int = 1) -> None:
    print(n)


def command_typer_cannot_read(size: int | str = 1) -> None:
    """typer has no command-line form for a union."""


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _tiny_backbone(name: str, stages: list[str]) -> Backbone:
    net = TinyNet()
    params = dict(net.named_parameters())
    listed = [[f"{prefix}.weight", f"{prefix}.bias"] for prefix in stages]
    return Backbone(
        module=net,
        num_features=6,
        stages=[[n for n in s if n in params] for s in listed],
        name=name,
    )


def good_backbone(name: str, *, weights: str = "none", in_chans: int = 3) -> Backbone:
    return _tiny_backbone(name, ["conv1", "conv2", "fc"])


def backbone_missing_a_stage(name: str, *, weights: str = "none", in_chans: int = 3) -> Backbone:
    return _tiny_backbone(name, ["conv1", "fc"])  # conv2 is in no stage


def backbone_stages_reversed(name: str, *, weights: str = "none", in_chans: int = 3) -> Backbone:
    return _tiny_backbone(name, ["fc", "conv2", "conv1"])


def backbone_fresh_seed(name: str, *, weights: str = "none", in_chans: int = 3) -> Backbone:
    bb = good_backbone(name)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    with torch.no_grad():
        for p in bb.module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return bb


def backbone_255_scale(name: str, *, weights: str = "none", in_chans: int = 3) -> Backbone:
    return replace(good_backbone(name), mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4))


def head_wrong_shape(*, backbone: Backbone, num_classes: int, task: str) -> nn.Module:
    return nn.Linear(backbone.num_features, num_classes + 1)


def head_swallowing_options(
    *, backbone: Backbone, num_classes: int, task: str, **options: Any
) -> nn.Module:
    return nn.Linear(backbone.num_features, num_classes)


def _pool(n: int = 30, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return x, torch.arange(n) % 3


def good_dataset(domain: str | None, *, image_size: int, seed: int) -> DomainData:
    x, y = _pool(size=image_size)
    return DomainData.from_arrays("good", x, y, class_names=["a", "b", "c"], seed=seed)


def dataset_train_is_test(domain: str | None, *, image_size: int, seed: int) -> DomainData:
    x, y = _pool(size=image_size)
    split = Split(x, y)
    return DomainData(
        "same", "classification", ["a", "b", "c"], split, split, split, fingerprint_tensors(x, y)
    )


def dataset_constant_fingerprint(domain: str | None, *, image_size: int, seed: int) -> DomainData:
    return replace(good_dataset(domain, image_size=image_size, seed=seed), fingerprint="v1")


def dataset_unseeded(domain: str | None, *, image_size: int, seed: int) -> DomainData:
    x = torch.randint(0, 256, (30, 3, image_size, image_size), dtype=torch.uint8)  # global RNG
    return DomainData.from_arrays(
        "unseeded", x, torch.arange(30) % 3, class_names=["a", "b", "c"], seed=seed
    )


def dataset_duplicate_classes(domain: str | None, *, image_size: int, seed: int) -> DomainData:
    return replace(
        good_dataset(domain, image_size=image_size, seed=seed), class_names=["a", "b", "a"]
    )


class UnprefixedSearchSpace(Strategy):
    def search_space(self, trial: Any) -> dict[str, Any]:
        return {"lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True)}

    def training_step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> torch.Tensor:
        x, y = batch.source
        return F.cross_entropy(model(x), y)


class ReadsTargetLabels(Strategy):
    """Declares no target labels, then trains on them."""

    uses_source, uses_target, target_labels = False, True, "none"

    def training_step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> torch.Tensor:
        x, y = batch.target
        return F.cross_entropy(model(x), y)


class DetachedLoss(Strategy):
    def training_step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> torch.Tensor:
        x, y = batch.source
        return F.cross_entropy(model(x), y).detach()


class OracleWithoutTarget(Strategy):
    uses_source, uses_target, target_labels = True, False, "all"

    def training_step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> torch.Tensor:
        x, y = batch.source
        return F.cross_entropy(model(x), y)


class SwallowsOptions(Strategy):
    def __init__(self, **options: Any) -> None:
        super().__init__()

    def training_step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> torch.Tensor:
        x, y = batch.source
        return F.cross_entropy(model(x), y)


BROKEN = [
    # (check, its arguments, the check that must fail, words its detail must contain)
    (
        check_backbone,
        (backbone_missing_a_stage, "tiny"),
        "backbone.stages",
        ["conv2.weight", "no stage"],
    ),
    (check_backbone, (backbone_stages_reversed, "tiny"), "backbone.stage_order", ["stem first"]),
    (check_backbone, (backbone_fresh_seed, "tiny"), "backbone.deterministic", ["same seed"]),
    (check_backbone, (backbone_255_scale, "tiny"), "backbone.normalization", ["0..255"]),
    (check_head, (head_wrong_shape,), "head.classification.output", ["(2, 4)", "expected (2, 3)"]),
    (check_head, (head_swallowing_options,), "head.classification.unknown_option", ["TypeError"]),
    (
        check_dataset,
        (dataset_train_is_test,),
        "dataset.disjoint_splits",
        ["30 of 30", "100%", "train"],
    ),
    (
        check_dataset,
        (dataset_constant_fingerprint,),
        "dataset.fingerprint",
        ["same fingerprint 'v1'"],
    ),
    (check_dataset, (dataset_unseeded,), "dataset.deterministic", ["different data", "train.x"]),
    (check_dataset, (dataset_duplicate_classes,), "dataset.class_names", ["unique", "'a'"]),
    (check_strategy, (UnprefixedSearchSpace,), "strategy.search_space", ["['lr']", "'strategy.'"]),
    (
        check_strategy,
        (ReadsTargetLabels,),
        "strategy.trains",
        ["target_labels='none'", "y=None", "NoneType"],
    ),
    (check_strategy, (DetachedLoss,), "strategy.trains", ["does not require grad"]),
    (check_strategy, (OracleWithoutTarget,), "strategy.declarations", ["uses_target=False"]),
    (check_strategy, (SwallowsOptions,), "strategy.unknown_option", ["accepted silently"]),
    (check_command, (command_without_docs, "no-docs"), "command.docs", ["no docstring"]),
    (check_command, (command_without_docs, "run"), "command.name", ["built-in"]),
    (check_command, (command_typer_cannot_read, "bad"), "command.help", ["--help` fails", "Union"]),
]


@pytest.mark.parametrize(
    ("check", "args", "failing", "words"),
    BROKEN,
    ids=[b[2] + ":" + b[1][0].__name__ for b in BROKEN],
)
def test_the_kit_catches_broken_plugins(
    check: Any, args: tuple[Any, ...], failing: str, words: list[str]
) -> None:
    results = _by_name(check(*args))
    assert failing in results, sorted(results)
    result = results[failing]
    assert not result.passed
    for word in words:
        assert word in result.detail, result.detail
    with pytest.raises(PluginCheckError, match=failing.replace(".", r"\.")) as caught:
        assert_passes(list(results.values()))
    assert isinstance(caught.value, AssertionError)
    assert failing in {f.name for f in caught.value.failures}


def test_one_failing_check_does_not_hide_the_others() -> None:
    results = _by_name(check_backbone(backbone_missing_a_stage, "tiny"))
    assert not results["backbone.stages"].passed
    # freezing needs valid stages: reported as not run, naming the cause
    assert not results["backbone.freeze"].passed
    assert results["backbone.freeze"].detail == "not run: backbone.stages failed"
    for name in (
        "backbone.factory",
        "backbone.forward",
        "backbone.normalization",
        "backbone.trains",
        "backbone.deterministic",
    ):
        assert results[name].passed, results[name]
    with pytest.raises(PluginCheckError) as caught:
        assert_passes(list(results.values()))
    message = str(caught.value)
    assert (
        "backbone.stages: backbone 'tiny': parameters in no stage: conv2.bias, conv2.weight"
        in message
    )
    assert "not run because of the failures above: backbone.freeze" in message


def test_the_good_references_pass_and_keep_the_callers_random_state() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert_passes(check_backbone(good_backbone, "tiny", image_size=16))
    assert_passes(check_dataset(good_dataset, image_size=16))
    assert torch.equal(torch.rand(3), expected)


def test_a_factory_returning_the_wrong_type_fails_the_factory_check() -> None:
    results = check_dataset(lambda domain, *, image_size, seed: {"x": 1}, image_size=16)
    by_name = _by_name(results)
    assert "not harness.api.DomainData" in by_name["dataset.factory"].detail
    assert by_name["dataset.fingerprint"].detail == "not run: dataset.factory failed"
    results = check_strategy(lambda: object())
    assert "not a harness.api.Strategy" in _by_name(results)["strategy.factory"].detail


def test_check_plugin_limits_huge_backbone_plugins_and_reports_load_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plugin = types.ModuleType("many_backbones")

    @hookimpl
    def register_backbones(register: Any) -> None:
        for i in range(60):
            register(f"net{i}", good_backbone)
        register("test_tiny", good_backbone)

    @hookimpl
    def register_commands(register: Any) -> None:
        register("tiny-info", command_without_docs, description="print a number")

    plugin.register_backbones = register_backbones  # type: ignore[attr-defined]
    plugin.register_commands = register_commands  # type: ignore[attr-defined]
    broken = types.ModuleType("broken")

    @hookimpl
    def register_strategies(register: Any) -> None:
        raise RuntimeError("boom")

    broken.register_strategies = register_strategies  # type: ignore[attr-defined]
    registry = Registry()
    registry.add_plugin(plugin, PluginInfo("many", "many-dist", "1", "many_backbones"))
    registry.add_plugin(broken, PluginInfo("broken", "broken-dist", "1", "broken"))

    results = check_plugin(registry, "many", options={"backbone": {"image_size": 16}})
    assert list(results) == ["backbone:test_tiny", "command:tiny-info"]
    assert_passes(results)  # the description documents the command
    # a kind the kit does not know (yet) is listed as unchecked, not failed
    monkeypatch.setattr("harness.testing.plugin.CHECKED_KINDS", ("backbone",))
    unchecked = check_plugin(registry, "many", options={"backbone": {"image_size": 16}})
    assert [(r.name, r.passed) for r in unchecked["command:tiny-info"]] == [
        ("command.unchecked", True)
    ]
    failed = check_plugin(registry, "broken")
    assert list(failed) == ["plugin:broken"]
    with pytest.raises(
        PluginCheckError,
        match="plugin:broken/plugin.load: raised while registering: RuntimeError: boom",
    ):
        assert_passes(failed)
    with pytest.raises(ValueError, match="unknown plugin 'manyy'; did you mean 'many'"):
        check_plugin(registry, "manyy")


def test_tasks_registered_as_a_string_fail() -> None:
    from harness_plugins.heads import build_linear

    head = Entry("head", "lin", build_linear, "p", "d", meta={"tasks": "classification"})
    results = _by_name(check_head(head))
    assert not results["head.tasks"].passed
    assert "tasks=('classification',), a tuple" in results["head.tasks"].detail
    assert results["head.classification.output"].passed  # the other checks still run
    data = Entry("dataset", "good", good_dataset, "p", "d", meta={"tasks": "classification"})
    results = _by_name(check_dataset(data, image_size=16))
    assert not results["dataset.task"].passed and "a tuple" in results["dataset.task"].detail


# =========================================================================================== name collisions


def _commands_plugin(module: str, *names: str) -> types.ModuleType:
    plugin = types.ModuleType(module)

    @hookimpl
    def register_commands(register: Any) -> None:
        for name in names:
            register(name, command_without_docs, description="print a number")

    plugin.register_commands = register_commands  # type: ignore[attr-defined]
    return plugin


def test_a_plugin_whose_entry_name_another_plugin_claims_fails_the_check() -> None:
    registry = Registry()
    registry.add_plugin(_commands_plugin("a"), PluginInfo("first", "first-dist", "1", "a"))
    registry.add_plugin(
        _commands_plugin("b", "dup-info", "own-info"),
        PluginInfo("second", "second-dist", "1", "b"),
    )
    registry.add_plugin(
        _commands_plugin("c", "dup-info"), PluginInfo("third", "third-dist", "1", "c")
    )
    # the registry keeps the entry of the plugin that loaded first, and reports the duplicate on
    # the other plugin's row: the check of the first must fail too, naming both
    results = check_plugin(registry, "second")
    first = results["command:dup-info"][0]
    assert (first.name, first.passed) == ("command.unique_name", False)
    for word in ("registered twice", "'second' (second-dist)", "'third' (third-dist)", "rename"):
        assert word in first.detail, first.detail
    assert [r.name for r in results["command:own-info"]] == check_names(
        registry.get("command", "own-info")
    )
    with pytest.raises(PluginCheckError, match="command:dup-info/command.unique_name"):
        assert_passes(results)
    loser = check_plugin(registry, "third")
    assert list(loser) == ["plugin:third"]
    assert "'second' (second-dist)" in loser["plugin:third"][0].detail
    assert_passes(check_plugin(registry, "first"))  # no entries, no collision


def _fake_distribution(site: Path, dist: str, entry_point: str, module: str, source: str) -> None:
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[harness]\n{entry_point} = {module}\n")
    (site / f"{module}.py").write_text(source)


def test_a_plugin_whose_entry_point_name_another_distribution_declares_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = (
        "from harness import hookimpl\n"
        "@hookimpl\n"
        "def register_commands(register):\n"
        "    register({name!r}, lambda: None, description='does nothing')\n"
    )
    _fake_distribution(tmp_path, "twin-one", "twin", "twin_one", source.format(name="one-info"))
    _fake_distribution(tmp_path, "twin-two", "twin", "twin_two", source.format(name="two-info"))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry()
    registry.load_entry_points(only=["twin"])
    results = check_plugin(registry, "twin")
    problem = results["plugin:twin"]
    assert [(r.name, r.passed) for r in problem] == [("plugin.unique_name", False)]
    assert "twin-one" in problem[0].detail and "twin-two" in problem[0].detail


# =========================================================================================== parametrize


def dataset_needs_root(domain: str | None, *, image_size: int, seed: int, root: str) -> DomainData:
    raise AssertionError("never built without a root")


PARAMETRIZED = [
    Entry("strategy", "unprefixed", UnprefixedSearchSpace, "tests", "tests"),
    Entry("command", "no-docs", command_without_docs, "tests", "tests"),
    Entry("dataset", "rooted", dataset_needs_root, "tests", "tests"),
]


def _outcome(check: ContractCheck) -> str:
    try:
        check()
    except pytest.skip.Exception:
        return "skipped"
    except PluginCheckError:
        return "failed"
    return "passed"


def test_parametrize_with_checks_gives_one_test_per_check() -> None:
    reason = "names its parameter 'lr'"
    mark = parametrize_with_checks(
        PARAMETRIZED, expected_failures={"strategy.search_space": reason}
    )
    assert mark.args[0] == "check"
    params = {p.id: p for p in mark.args[1]}
    assert list(params) == [
        "strategy:unprefixed/strategy.declared_options",
        *(f"strategy:unprefixed/strategy.{n}" for n in ("factory", "declarations")),
        *(f"strategy:unprefixed/strategy.{n}" for n in ("search_space", "unknown_option")),
        *(f"strategy:unprefixed/strategy.{n}" for n in ("trains", "target_labels")),
        *(f"command:no-docs/command.{n}" for n in ("name", "help", "docs")),
        "dataset:rooted/dataset.declared_options",
        *(f"dataset:rooted/dataset.{n}" for n in ("factory", "contract", "image_size", "task")),
        *(f"dataset:rooted/dataset.{n}" for n in ("class_names", "disjoint_splits")),
        *(f"dataset:rooted/dataset.{n}" for n in ("deterministic", "fingerprint")),
    ]
    xfail = params["strategy:unprefixed/strategy.search_space"].marks
    assert [(m.name, m.kwargs["reason"], m.kwargs["strict"]) for m in xfail] == [
        ("xfail", reason, True)
    ]
    assert all(not p.marks for key, p in params.items() if not key.endswith("search_space"))
    outcomes = {key: _outcome(p.values[0]) for key, p in params.items()}
    assert outcomes["strategy:unprefixed/strategy.search_space"] == "failed"  # hence xfail
    # not run because search_space failed: skipped, naming it
    assert outcomes["strategy:unprefixed/strategy.trains"] == "skipped"
    assert outcomes["command:no-docs/command.docs"] == "failed"
    assert outcomes["command:no-docs/command.help"] == "passed"
    # a factory that needs options nobody gave: every check that builds skipped, saying which
    # (its declared options are checked without building it)
    assert outcomes.pop("dataset:rooted/dataset.declared_options") == "passed"
    assert {v for k, v in outcomes.items() if k.startswith("dataset:")} == {"skipped"}
    with pytest.raises(PluginCheckError, match="command:no-docs/command.docs: no description"):
        params["command:no-docs/command.docs"].values[0]()


def test_parametrize_with_checks_refuses_unknown_expected_failures() -> None:
    with pytest.raises(ValueError, match="unknown check 'strategy.search_spac'.*did you mean"):
        parametrize_with_checks(PARAMETRIZED, expected_failures={"strategy.search_spac": "typo"})
    with pytest.raises(TypeError, match="name the plugin"):
        parametrize_with_checks(Registry())


def test_parametrize_with_checks_over_a_plugin_reports_a_name_collision() -> None:
    registry = Registry()
    registry.add_plugin(_commands_plugin("b", "dup-info"), PluginInfo("mine", "my-dist", "1", "b"))
    registry.add_plugin(_commands_plugin("c", "dup-info"), PluginInfo("other", "o-dist", "1", "c"))
    params = {p.id: p for p in parametrize_with_checks(registry, "mine").args[1]}
    assert list(params) == [
        "command:dup-info/command.unique_name",
        "command:dup-info/command.name",
        "command:dup-info/command.help",
        "command:dup-info/command.docs",
    ]
    with pytest.raises(PluginCheckError, match="'other' \\(o-dist\\)"):
        params["command:dup-info/command.unique_name"].values[0]()
    params["command:dup-info/command.docs"].values[0]()  # the description documents it
    other = {p.id: p for p in parametrize_with_checks(registry, "other").args[1]}
    assert list(other) == ["plugin:other/plugin.load"]
    assert _outcome(other["plugin:other/plugin.load"].values[0]) == "failed"


@parametrize_with_checks(
    PARAMETRIZED[:1],
    expected_failures={"strategy:unprefixed/strategy.search_space": "names its parameter 'lr'"},
)
def test_parametrize_with_checks_as_a_plugin_author_uses_it(check: ContractCheck) -> None:
    check()
