from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import write_study

from harness.errors import StudySpecError
from harness.study import load_study


def test_defaults_and_lookup_by_name(study_dir, monkeypatch):
    write_study(study_dir, "tiny")
    monkeypatch.chdir(study_dir.parent)
    spec = load_study("tiny")
    assert spec.name == "tiny" and spec.path == "benchmarks/tiny.toml"
    assert spec.selection == "auto" and spec.search.sampler == "tpe"
    assert spec.search.augment == ["none", "light", "strong"]
    assert len(spec.file_hash) == 16
    assert [m.key for m in spec.methods] == [
        "test_resnet(none)+linear+source-only",
        "test_resnet(none)+linear+finetune",
        "test_resnet(none)+mlp+linear-probe",
    ]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ("[budget]", "[budget]\nepochs = 3"),
            ["budget.epochs", "unknown key", "allowed here: trials, max_epochs"],
        ),
        (("trials = 2", 'trials = "many"'), ["budget.trials", "integer"]),
        (
            ("[search]", "[search]\nbackbone_lr = [0.1, 0.001]"),
            ["search.backbone_lr", "empty range"],
        ),
        (
            ("[search]", '[search]\naugment = ["none", "wild"]'),
            ["search.augment", "'wild'", "light"],
        ),
        (("[search]", "[search]\naugment = []"), ["search.augment", "empty"]),
        (("[search]", '[search]\nsampler = "grid"'), ["search.sampler", "'tpe'", "'random'"]),
        (("image_size = 16", "image_size = 4"), ["image_size", "greater than or equal to 8"]),
        (("seed = 0", 'seed = 0\nreuse_backbone = "sometimes"'), ["reuse_backbone", "boolean"]),
        (('selection = "x"\n', ""), []),  # no-op edit keeps the file valid
    ],
)
def test_bad_values_name_file_key_and_what_is_allowed(study_dir, edit, expected):
    path = write_study(study_dir)
    text = path.read_text()
    path.write_text(text.replace(edit[0], edit[1], 1))
    if not expected:
        load_study(str(path))
        return
    with pytest.raises(StudySpecError) as err:
        load_study(str(path))
    message = str(err.value)
    assert message.startswith(str(path)), message
    assert "\n" not in message
    for part in expected:
        assert part in message, message


def test_missing_required_and_invalid_toml(study_dir):
    path = study_dir / "empty.toml"
    path.write_text('description = "no pairs"\n')
    with pytest.raises(StudySpecError, match="pairs: required key is missing"):
        load_study(str(path))
    path.write_text("pairs = [\n")
    with pytest.raises(StudySpecError, match="not valid TOML"):
        load_study(str(path))


def test_unknown_study_name_lists_studies(study_dir, monkeypatch):
    write_study(study_dir, "quick")
    monkeypatch.chdir(study_dir.parent)
    with pytest.raises(StudySpecError) as err:
        load_study("quik")
    assert "'quick'" in str(err.value)


def test_duplicate_methods_need_a_name(study_dir):
    path = write_study(study_dir)
    text = path.read_text()
    block = text[
        text.index("[[methods]]") : text.index("[[methods]]", text.index("[[methods]]") + 1)
    ]
    path.write_text(text.replace(block, block + block, 1))
    with pytest.raises(StudySpecError, match="distinct `name`"):
        load_study(str(path))


def test_overrides_from_the_command_line(study_dir):
    path = write_study(study_dir)
    spec = load_study(str(path), {"budget.trials": 5, "search.pruner": "none"})
    assert spec.budget.trials == 5 and spec.search.pruner == "none"
    with pytest.raises(StudySpecError, match="budget.trials"):
        load_study(str(path), {"budget.trials": 0})


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_cli_bad_study_is_one_line_exit_2_no_traceback(study_dir):
    path = write_study(study_dir)
    path.write_text(path.read_text().replace("trials = 2", "trials = -1"))
    result = _cli("validate", "--study", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    first = result.stderr.strip().splitlines()[0]
    assert str(path) in first and "budget.trials" in first


@pytest.mark.parametrize(
    ("old", "new", "key", "suggestion"),
    [
        ('backbone = "test_resnet"', 'backbone = "resnt18"', "methods[0].backbone", "'resnet18'"),
        ('strategy = "finetune"', 'strategy = "fine-tune"', "methods[1].strategy", "'finetune'"),
        ('head = "mlp"', 'head = "mpl"', "methods[2].head", "'mlp'"),
        ('target = "digits-m"', 'target = "digit-m"', "pairs[0].target", "'digits-m'"),
    ],
)
def test_cli_unknown_plugin_names_suggest_closest(study_dir, old, new, key, suggestion):
    path = write_study(study_dir)
    path.write_text(path.read_text().replace(old, new, 1))
    result = _cli("validate", "--study", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"{path}: {key}: unknown" in result.stderr.replace("\n", " ")
    assert suggestion in result.stderr
    assert "harness plugins --kind" in result.stderr


def test_cli_validate_ok(study_dir):
    path = write_study(study_dir)
    result = _cli("validate", "--study", str(path))
    assert result.returncode == 0, result.stderr
    assert "ok (1 pair(s), 3 method(s))" in result.stdout


def test_wrong_types_are_not_silently_converted(study_dir):
    path = write_study(study_dir)
    path.write_text(path.read_text().replace("image_size = 16", 'image_size = "16"'))
    with pytest.raises(StudySpecError, match="image_size: .*integer"):
        load_study(str(path))


def test_set_reaches_list_entries_and_explains_mistakes(study_dir):
    path = write_study(study_dir)
    sets = {"methods[1].head": "mlp", "pairs[0].source": "digits-m", "pairs[0].target": "digits"}
    spec = load_study(str(path), sets)
    assert spec.methods[1].head == "mlp" and spec.pairs[0].target == "digits"
    assert spec.overrides == sets
    with pytest.raises(
        StudySpecError, match=r"--set pairs.source: pairs is a list; name an entry, e.g. pairs\[0\]"
    ):
        load_study(str(path), {"pairs.source": "x"})
    with pytest.raises(
        StudySpecError, match=r"methods\[9\] does not exist \(methods has 3 entries\)"
    ):
        load_study(str(path), {"methods[9].head": "mlp"})


@pytest.mark.parametrize("device", ["cudax", "gpu", "cuda:a"])
def test_bad_device_names_are_refused(study_dir, device):
    path = write_study(study_dir, extra_top=f'device = "{device}"')
    with pytest.raises(StudySpecError, match="device: expected"):
        load_study(str(path))


def test_cli_unusable_device_and_storage_are_one_line_errors(study_dir):
    path = write_study(study_dir)
    result = _cli("run", "--study", str(path), "--set", 'device="cuda:7"', cwd=study_dir.parent)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "device" in result.stderr and "CUDA" in result.stderr
    result = _cli("run", "--study", str(path), "--storage", "bogus://nowhere", cwd=study_dir.parent)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot open storage" in result.stderr


def test_cli_bad_dann_schedule_is_one_line_naming_the_key(study_dir):
    path = write_study(study_dir)
    text = path.read_text().replace(
        'strategy = "linear-probe"',
        'strategy = "dann"\nstrategy_options = { schedule = "step" }',
        1,
    )
    path.write_text(text)
    result = _cli("validate", "--study", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    first = result.stderr.strip().splitlines()[0]
    assert (
        str(path) in first
        and "methods[2].strategy_options" in first
        and "schedule must be one of" in first
    )


def _pair(study_dir, source: str, target: str, extra: str = "", datasets: str = ""):
    path = write_study(study_dir)
    text = path.read_text().replace(
        'source = "digits"\ntarget = "digits-m"', f'source = "{source}"\ntarget = "{target}"{extra}'
    )
    path.write_text(text + datasets)
    return path


ALIASES = """
[datasets.plain]
plugin = "digits"

[datasets.mnist]
plugin = "digits"

[datasets.small]
plugin = "digits"
n = 100
"""


@pytest.mark.parametrize(
    ("source", "target", "shown"),
    [
        ("digits", "digits", "('digits')"),
        ("digits", "plain", "('digits' and 'plain')"),  # an alias without options is its plugin
        ("plain", "mnist", "('plain' and 'mnist')"),  # two aliases of one plugin and options
        ("mine/photo", "mine/photo", "('mine/photo')"),  # a sub-domain compared as well
    ],
)
def test_a_pair_of_one_domain_is_refused_naming_the_pair(study_dir, source, target, shown):
    path = _pair(study_dir, source, target, datasets=ALIASES)
    with pytest.raises(StudySpecError) as err:
        load_study(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: pairs[0]: source and target are the same domain {shown}")
    assert "in_domain = true" in message and "\n" not in message


@pytest.mark.parametrize(
    ("source", "target"),
    [("digits", "small"), ("mine/photo", "mine/sketch"), ("plain", "digits-m")],
)
def test_pairs_of_two_domains_pass(study_dir, source, target):
    spec = load_study(str(_pair(study_dir, source, target, datasets=ALIASES)))
    assert not spec.pairs[0].in_domain


def test_an_in_domain_pair_is_allowed_when_said_and_dumped_only_then(study_dir):
    path = _pair(study_dir, "digits", "digits", extra="\nin_domain = true")
    spec = load_study(str(path))
    assert spec.pairs[0].in_domain and spec.pairs[0].key == "digits->digits"
    assert spec.pairs[0].model_dump() == {
        "source": "digits",
        "target": "digits",
        "in_domain": True,
    }
    # the study-file option, or --set, on an existing study: the same key, the same dump as before
    plain = load_study(str(write_study(study_dir, "plain")))
    assert plain.pairs[0].key == "digits->digits-m"
    assert plain.pairs[0].model_dump() == {"source": "digits", "target": "digits-m"}
    assert plain.model_dump(mode="json")["pairs"] == [{"source": "digits", "target": "digits-m"}]
    same = load_study(
        str(write_study(study_dir, "set")),
        {"pairs[0].target": "digits", "pairs[0].in_domain": True},
    )
    assert same.pairs[0].in_domain
    with pytest.raises(StudySpecError, match="in_domain: Input should be a valid boolean"):
        load_study(str(path), {"pairs[0].in_domain": "yes"})


def test_cli_validate_refuses_a_pair_of_one_domain(study_dir):
    path = _pair(study_dir, "digits-m", "digits-m")
    result = _cli("validate", "--study", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    first = result.stderr.strip().splitlines()[0]
    assert f"{path}: pairs[0]: source and target are the same domain" in first
