from __future__ import annotations

import importlib.metadata as md
import importlib.util
import inspect
import tomllib
import types
from pathlib import Path

import pytest

from harness import hookimpl, hookspecs
from harness.errors import DuplicatePluginError, PluginLoadError, UnknownPluginError
from harness.registry import PluginInfo, Registry, get_registry

REPO = Path(__file__).resolve().parents[1]


def plugin(name: str, **hooks) -> tuple[types.SimpleNamespace, PluginInfo]:
    obj = types.SimpleNamespace(**{k: hookimpl(v) for k, v in hooks.items()})
    return obj, PluginInfo(name=name, dist=f"dist-{name}", version="1.0", module=name)


def registers(kind_names: list[str]):
    def hook(register):
        for n in kind_names:
            register(n, lambda *a, **k: None, description=f"{n} thing")

    return hook


def test_entries_know_their_plugin_and_distribution():
    reg = Registry()
    reg.add_plugin(*plugin("alpha", register_strategies=registers(["s1", "s2"])))
    entry = reg.get("strategy", "s1")
    assert (entry.plugin, entry.dist, entry.description) == ("alpha", "dist-alpha", "s1 thing")
    assert reg.plugins["alpha"].registered == {"strategy": ["s1", "s2"]}


def test_duplicate_name_is_an_error_naming_both_plugins():
    reg = Registry()
    reg.add_plugin(*plugin("alpha", register_backbones=registers(["net"])))
    reg.add_plugin(*plugin("beta", register_backbones=registers(["net", "other"])))
    with pytest.raises(DuplicatePluginError) as err:
        reg.get("backbone", "net")
    assert "alpha" in str(err.value) and "beta" in str(err.value)
    assert "dist-alpha" in str(err.value) and "dist-beta" in str(err.value)
    assert "registered twice" in reg.plugins["beta"].error
    # the rest of the second plugin still works
    assert reg.get("backbone", "other").plugin == "beta"


def test_duplicate_name_raises_in_strict_mode():
    reg = Registry()
    reg.strict = True
    reg.add_plugin(*plugin("alpha", register_heads=registers(["h"])))
    with pytest.raises(DuplicatePluginError):
        reg.add_plugin(*plugin("beta", register_heads=registers(["h"])))


def test_unknown_hook_is_reported_and_others_keep_working():
    reg = Registry()

    def register_backbone(register):  # misspelt: the hook is register_backbones
        register("x", lambda: None)

    reg.add_plugin(*plugin("typo", register_backbone=register_backbone))
    reg.add_plugin(*plugin("good", register_heads=registers(["h"])))
    assert "register_backbone" in reg.plugins["typo"].error
    assert "unknown hook" in reg.plugins["typo"].error
    assert reg.get("head", "h").plugin == "good"
    assert [p.name for p in reg.errors] == ["typo"]


def test_plugin_raising_while_registering_is_isolated():
    reg = Registry()

    def boom(register):
        register("half", lambda: None)
        raise RuntimeError("kaput")

    reg.add_plugin(*plugin("bad", register_datasets=boom))
    reg.add_plugin(*plugin("good", register_datasets=registers(["d"])))
    assert "kaput" in reg.plugins["bad"].error
    assert "half" not in reg.names("dataset")  # nothing half-registered survives
    assert reg.names("dataset") == ["d"]


def test_invalid_names_and_factories_are_rejected():
    reg = Registry()

    def bad_name(register):
        register("Has Spaces", lambda: None)

    reg.add_plugin(*plugin("p", register_heads=bad_name))
    assert "invalid head name" in reg.plugins["p"].error


def test_unknown_name_suggests_closest():
    reg = get_registry()
    with pytest.raises(UnknownPluginError) as err:
        reg.get("backbone", "resnt18")
    assert "'resnet18'" in str(err.value)
    assert "harness plugins --kind backbone" in err.value.hint
    with pytest.raises(UnknownPluginError) as err:
        reg.get("strategy", "fine-tune")
    assert "finetune" in str(err.value)


def _fake_distribution(
    site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]
) -> None:
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[harness]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    )
    for mod, source in modules.items():
        (site / f"{mod}.py").write_text(source)


def test_entry_point_that_fails_to_import_is_reported(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _fake_distribution(
        site,
        "broken-plugin",
        {"broken": "broken_mod", "fine": "fine_mod"},
        {
            "broken_mod": "raise ImportError('needs a missing library')\n",
            "fine_mod": (
                "from harness import hookimpl\n"
                "@hookimpl\n"
                "def register_strategies(register):\n"
                "    register('fine-strategy', object)\n"
            ),
        },
    )
    monkeypatch.syspath_prepend(str(site))
    reg = Registry()
    reg.load_entry_points(only=["broken", "fine", "heads"])
    assert set(reg.plugins) == {"broken", "fine", "heads"}
    broken = reg.plugins["broken"]
    assert broken.dist == "broken-plugin" and "needs a missing library" in broken.error
    assert reg.get("strategy", "fine-strategy").dist == "broken-plugin"
    assert "linear" in reg.names("head")
    with pytest.raises(PluginLoadError) as err:
        Registry().load_entry_points(only=["broken"], strict=True)
    assert "broken" in str(err.value) and "broken-plugin" in str(err.value)


def test_environment_variable_limits_plugins(monkeypatch):
    monkeypatch.setenv("HARNESS_PLUGINS", "heads")
    try:
        reg = get_registry(reload=True)
        assert set(reg.plugins) == {"heads"}
        assert reg.names("backbone") == []
    finally:
        monkeypatch.undo()
        get_registry(reload=True)


def test_builtin_plugins_are_declared_in_the_entry_point_group():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"]["harness"]
    # every module that implements a hook; helpers (images, photos, shapes, ...) register nothing
    modules = {p.stem for p in (REPO / "plugins").glob("*.py") if "@hookimpl" in p.read_text()}
    assert {v.split(".")[-1] for v in declared.values()} == modules
    installed = {ep.name: ep.value for ep in md.entry_points(group="harness")}
    for name, value in declared.items():
        assert installed.get(name) == value, (
            f"entry point {name} not installed; reinstall the project"
        )


def test_every_hook_is_documented_with_an_example():
    names = hookspecs.hook_names()
    assert names == [
        "register_backbones",
        "register_commands",
        "register_datasets",
        "register_heads",
        "register_metrics",
        "register_strategies",
        "register_validators",
    ]
    for name in names:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and "register(" in doc and "Example" in doc, name
        assert list(inspect.signature(getattr(hookspecs, name)).parameters) == ["register"]


def test_every_builtin_registers_something():
    reg = get_registry()
    for name in ("timm", "heads", "datasets", "strategies"):
        assert reg.plugins[name].registered, name
        assert reg.plugins[name].error is None
    assert {"source-only", "finetune", "linear-probe"} <= set(reg.names("strategy"))
    assert {"digits", "digits-m", "folder"} <= set(reg.names("dataset"))
    assert {"linear", "mlp"} <= set(reg.names("head"))
    assert "test_resnet" in reg.names("backbone") and "resnet18" in reg.names("backbone")


def test_the_plugin_guide_carries_every_hook_docstring_verbatim():
    """docs/plugins.md's hook reference is generated from hookspecs.py: they cannot drift."""
    spec = importlib.util.spec_from_file_location("hook_reference", REPO / "docs/hook_reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    guide = (REPO / "docs" / "plugins.md").read_text()
    assert reference.render(guide) == guide, "run: python docs/hook_reference.py"
    for name in hookspecs.hook_names():
        assert inspect.getdoc(getattr(hookspecs, name)) in guide, name


def test_the_plugin_surface_is_importable_from_harness_api():
    import harness.api as api
    from harness import errors

    for name in api.__all__:
        assert hasattr(api, name), name
    assert api.hookimpl is hookimpl and api.Register is hookspecs.Register
    for error in ("DatasetError", "WeightsError", "PluginContractError", "NonFiniteLossError"):
        assert getattr(api, error) is getattr(errors, error)


def test_tasks_are_declared_with_register_only():
    from harness.api import Strategy

    reg = Registry()
    reg.add_plugin(*plugin("a", register_heads=registers(["h"])))
    reg.add_plugin(*plugin("b", register_strategies=registers(["s"])))
    assert reg.get("head", "h").tasks == ("classification",)  # the kind's default
    assert reg.get("strategy", "s").tasks == hookspecs.TASKS

    def seg_head(register):
        register("seg", lambda **k: None, tasks=["segmentation"])

    reg.add_plugin(*plugin("c", register_heads=seg_head))
    assert reg.get("head", "seg").tasks == ("segmentation",)
    for bad in ("classification", (), ("detection",)):

        def hook(register, bad=bad):
            register("bad", lambda **k: None, tasks=bad)

        reg.add_plugin(*plugin(f"bad-{len(reg.plugins)}", register_heads=hook))
        assert "tasks must be" in reg.plugins[f"bad-{len(reg.plugins) - 1}"].error

    # a class attribute (how strategies once declared it) is ignored, with a warning saying so
    with pytest.warns(FutureWarning, match="is ignored.*register"):

        class WithTasks(Strategy):  # noqa: F841 - defining it is what warns
            tasks = ("classification",)


def test_open_domains_validate_a_parametric_sub_domain():
    from harness.api import OpenDomains
    from harness.registry import check_domain

    rotations = OpenDomains(r"\d+", examples=("0", "90"), help="an angle in degrees")
    assert "270" in rotations and "left" not in rotations and list(rotations) == ["0", "90"]
    by_rule = OpenDomains(lambda s: s.isdigit() and int(s) < 360, examples=("0",))
    assert "359" in by_rule and "360" not in by_rule
    with pytest.raises(ValueError, match="examples"):
        OpenDomains(r"\d+", examples=("left",))

    def datasets(register):
        register("rotated", lambda *a, **k: None, domains=rotations)
        register("office", lambda *a, **k: None, domains=("amazon", "dslr"))

    reg = Registry()
    reg.add_plugin(*plugin("d", register_datasets=datasets))
    rotated, office = reg.get("dataset", "rotated"), reg.get("dataset", "office")
    check_domain(rotated, "90")
    check_domain(rotated, None)
    check_domain(office, "dslr")
    with pytest.raises(UnknownPluginError, match="an angle in degrees, e.g. 0, 90"):
        check_domain(rotated, "left")
    with pytest.raises(UnknownPluginError, match="did you mean 'amazon'.*it serves amazon, dslr"):
        check_domain(office, "amazn")

    def bad(register):
        register("h", lambda **k: None, domains=["a"])

    reg.add_plugin(*plugin("e", register_heads=bad))
    assert "domains= applies to datasets only" in reg.plugins["e"].error


def test_the_naming_rule_is_stated_once():
    assert hookspecs.NAME_PATTERN.match("rotated-digits_2.v1")
    assert not hookspecs.NAME_PATTERN.match("Rotated") and not hookspecs.NAME_PATTERN.match("a/b")
    readme = (REPO / "tests" / "example_plugin" / "README.md").read_text()
    assert (
        "NAME_RULE" in readme and "NAME_RULE" in (REPO / "docs" / "hook_reference.py").read_text()
    )
