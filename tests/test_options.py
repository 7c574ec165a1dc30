"""Plugin options: declared with register(options=...) or read from the factory's signature, and a
study's options checked against them before anything is built."""

from __future__ import annotations

import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from harness import hookimpl
from harness.api import Option, OptionError, Strategy, WeightsError
from harness.errors import StudySpecError
from harness.options import check_options, factory_parameters, signature_mismatches
from harness.registry import PluginInfo, Registry, get_registry
from harness.search import resolve_domain, resolve_methods
from harness.study import load_study
from tests.conftest import write_study

# ------------------------------------------------------------------------------------ Option


def test_option_messages_say_the_type_and_range() -> None:
    with pytest.raises(OptionError, match=r"^hidden must be an int >= 1, got -5$"):
        Option(int, min=1).check("hidden", -5)
    with pytest.raises(OptionError, match=r"^dropout must be a number from 0 to 1, got 2$"):
        Option(float, min=0, max=1).check("dropout", 2)
    with pytest.raises(OptionError, match=r"^gamma must be a number > 0, got 0$"):
        Option(float, gt=0).check("gamma", 0)
    with pytest.raises(OptionError, match=r"^mode must be one of 'a', 'b', got 'c'$"):
        Option(str, choices=("a", "b")).check("mode", "c")
    with pytest.raises(OptionError, match="must be an int"):
        Option(int).check("hidden", True)  # a bool is not an int
    with pytest.raises(OptionError, match="must be an int"):
        Option(int).check("hidden", 2.5)


def test_option_accepts_what_fits() -> None:
    Option(float, min=0, max=1).check("dropout", 0)  # TOML writes 0 for 0.0
    Option(int, min=1, default=None).check("shots", None)
    Option(list).check("channels", [1, 2])
    Option().check("anything", {"x": 1})


# ------------------------------------------------------------------------------ checking


def _entry(kind: str, factory, options=None):
    reg = Registry()
    meta = {"options": options} if options is not None else {}

    def hook(register):
        register("thing", factory, **meta)

    hooks = {
        "head": "register_heads",
        "dataset": "register_datasets",
        "strategy": "register_strategies",
    }
    obj = types.SimpleNamespace(**{hooks[kind]: hookimpl(hook)})
    reg.add_plugin(obj, PluginInfo("p", "dist-p", "1", "p"))
    assert not reg.errors, reg.errors[0].error
    return reg.get(kind, "thing")


def _head(*, backbone, num_classes, task, hidden: int = 256, dropout: float = 0.2):
    return None


def test_unknown_option_names_the_closest_and_the_allowed() -> None:
    entry = _entry("head", _head, {"hidden": Option(int, min=1), "dropout": Option(float)})
    with pytest.raises(OptionError) as err:
        check_options(entry, {"hiden": 256})
    assert str(err.value) == (
        "unknown option 'hiden' of head 'thing'; did you mean 'hidden'? (allowed: hidden, dropout)"
    )


def test_undeclared_factory_is_checked_by_its_signature() -> None:
    entry = _entry("head", _head)
    with pytest.raises(OptionError, match=r"unknown option 'hiden'.*allowed: hidden, dropout"):
        check_options(entry, {"hiden": 1})
    check_options(entry, {"hidden": -5})  # no declared range: the factory's business

    def dataset(domain, *, image_size, seed, root: str, n: int = 3):
        return None

    entry = _entry("dataset", dataset)
    with pytest.raises(OptionError, match=r"missing option 'root' of dataset 'thing'"):
        check_options(entry, {"n": 3})
    check_options(entry, {"root": "/x"})


def test_a_factory_taking_any_options_checks_its_own() -> None:
    entry = _entry("head", lambda **options: None)
    check_options(entry, {"whatever": 1})
    assert factory_parameters(lambda **options: None, "head") is None


def test_a_strategy_keeping_the_base_init_takes_no_options() -> None:
    class Plain(Strategy):
        pass

    entry = _entry("strategy", Plain)
    with pytest.raises(OptionError, match=r"unknown option 'x' of strategy 'thing' \(it takes no"):
        check_options(entry, {"x": 1})


def test_declared_options_may_come_from_a_function() -> None:
    entry = _entry("head", lambda **o: None, lambda: {"depth": Option(int, min=1, max=5)})
    with pytest.raises(OptionError, match="depth must be an int from 1 to 5, got 7"):
        check_options(entry, {"depth": 7})


def test_registration_refuses_a_bad_declaration() -> None:
    reg = Registry()

    def hook(register):
        register("h", _head, options={"hidden": 256})

    reg.add_plugin(
        types.SimpleNamespace(register_heads=hookimpl(hook)), PluginInfo("p", "d", "1", "p")
    )
    assert "options must map option names to harness.api.Option" in reg.plugins["p"].error


def test_signature_mismatches() -> None:
    meta = {"options": {"hidden": Option(int, default=128), "width": Option(int)}}
    problems = signature_mismatches(_head, "head", meta)
    assert "declared option(s) width not parameters of the factory" in problems
    assert "option 'hidden' declares default 128, the factory's is 256" in problems

    def needs(*, backbone, num_classes, task, k: int):
        return None

    assert signature_mismatches(needs, "head", {"options": {}}) == [
        "required parameter(s) k not declared"
    ]


# --------------------------------------------------------------------- built-ins, in a study


def _study(study_dir: Path, replace: str, by: str) -> Path:
    path = write_study(study_dir)
    text = path.read_text()
    assert replace in text
    path.write_text(text.replace(replace, by, 1))
    return path


@pytest.mark.parametrize(
    ("by", "key", "message"),
    [
        (
            'head = "mlp"\nhead_options = {hiden = 256}',
            "methods[2].head_options",
            "unknown option 'hiden' of head 'mlp'; did you mean 'hidden'? (allowed: hidden, "
            "dropout)",
        ),
        (
            'head = "mlp"\nhead_options = {hidden = -5}',
            "methods[2].head_options",
            "hidden must be an int >= 1, got -5",
        ),
        (
            'head = "mlp"\nstrategy_options = {shots = 0}',
            "methods[2].strategy_options",
            "shots must be an int >= 1, got 0",
        ),
    ],
)
def test_a_study_option_is_refused_at_resolve_time(study_dir, by, key, message) -> None:
    spec = load_study(str(_study(study_dir, 'head = "mlp"', by)))
    with pytest.raises(StudySpecError) as err:
        resolve_methods(spec, get_registry())
    assert str(err.value) == f"{spec.path}: {key}: {message}"


def test_a_dataset_alias_option_is_refused_naming_the_alias(study_dir) -> None:
    path = _study(
        study_dir,
        'target = "digits-m"',
        'target = "mine"\n\n[datasets.mine]\nplugin = "digits-m"\nsizes = 3',
    )
    spec = load_study(str(path))
    with pytest.raises(StudySpecError, match=r"datasets.mine: unknown option 'sizes' of dataset"):
        resolve_domain(spec, get_registry(), "mine", "pairs[0].target")


def test_validate_answers_a_misspelled_option_in_one_line(study_dir) -> None:
    path = _study(study_dir, 'head = "mlp"', 'head = "mlp"\nhead_options = {hiden = 256}')
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "validate", "--study", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "unexpected keyword" not in result.stderr
    assert "did you mean 'hidden'?" in result.stderr.splitlines()[0]


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", "validate", "--study", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_validate_refuses_a_bad_dataset_option_before_reading_a_file(study_dir) -> None:
    root = study_dir / "data"
    (root / "photo" / "cat").mkdir(parents=True)
    (root / "photo" / "cat" / "broken.png").write_bytes(b"not a png")
    alias = f'target = "mine/photo"\n\n[datasets.mine]\nplugin = "folder"\nroot = "{root}"'
    path = _study(study_dir, 'target = "digits-m"', alias + '\nresize = "stretch"')
    result = _validate(path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "broken.png" not in result.stderr
    assert result.stderr.splitlines()[0] == (
        f"error: {path}: datasets.mine: resize must be one of 'center-crop', 'pad', got 'stretch'"
    )
    # the same study with a good value does read the files: the option was refused before
    path.write_text(path.read_text().replace('"stretch"', '"pad"'))
    assert "broken.png" in _validate(path).stderr


def test_every_built_in_declaration_matches_its_factory() -> None:
    registry = get_registry()
    for kind in ("head", "strategy", "dataset"):
        for name in registry.names(kind):
            entry = registry.get(kind, name)
            if entry.dist != "transfer-harness":
                continue
            assert entry.meta.get("options") is not None, f"{kind} {name} declares no options"
            assert signature_mismatches(entry.factory, kind, entry.meta) == [], (kind, name)


def test_smp_head_options_come_from_the_decoder() -> None:
    entry = get_registry().get("head", "fpn")
    with pytest.raises(OptionError, match="decoder_dropout must be a number from 0 to 1, got 2"):
        check_options(entry, {"decoder_dropout": 2})
    with pytest.raises(OptionError, match="did you mean 'decoder_dropout'"):
        check_options(entry, {"decoder_dropuot": 0.1})
    check_options(entry, {"decoder_pyramid_channels": 64, "encoder_depth": 4})


# ------------------------------------------------------------------------ offline weights


def test_imagenet_weights_without_the_hub_fail_in_seconds(monkeypatch, tmp_path) -> None:
    """The hub's host refuses connections (a closed local port): the probe sees it and the
    download runs in huggingface_hub's offline mode instead of retrying for a minute."""
    from huggingface_hub import constants

    from harness_plugins import timm_backbones

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        timm_backbones.build_timm_backbone("test_resnet", weights="imagenet")
    assert time.monotonic() - start < 10
    assert str(err.value).startswith("could not get pretrained weights for 'test_resnet' through")
    assert "http://127.0.0.1:9" in str(err.value) and "safetensors" in (err.value.hint or "")
    assert constants.HF_HUB_OFFLINE is False  # offline only for that one call
