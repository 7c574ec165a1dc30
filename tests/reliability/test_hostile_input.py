"""Bad and hostile input: a pickle with a payload, broken plugins, unreadable image files."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from conftest import write_study
from PIL import Image
from test_registry import _fake_distribution
from test_search import make_runner, registry_with

from harness import hookimpl
from harness.api import Strategy, load_weights_file
from harness.errors import HarnessError, PluginContractError, WeightsError
from harness.registry import PluginInfo
from harness.study import load_study
from harness_plugins.timm_backbones import build_timm_backbone


class _Payload:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def test_pickle_payload_is_never_executed(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(sentinel)}, path)
    assert not sentinel.exists()
    with pytest.raises(WeightsError, match="weights_only"):
        load_weights_file(path)
    with pytest.raises(WeightsError):
        build_timm_backbone("test_resnet", weights=str(path))
    # a study naming the file stops before training, the payload still not run
    spec = load_study(str(write_study(tmp_path, weights=str(path))))
    with pytest.raises(HarnessError, match="weights_only"):
        make_runner(tmp_path, spec).preflight()
    assert not sentinel.exists()


class _NotAStrategy:
    pass


def test_broken_plugins_are_reported_by_name_and_a_study_using_one_fails_before_training(
    tmp_path, monkeypatch
):
    site = tmp_path / "site"
    _fake_distribution(
        site,
        "broken-plugin",
        {"broken": "broken_mod"},
        {"broken_mod": "raise ImportError('needs a missing library')\n"},
    )
    monkeypatch.syspath_prepend(str(site))
    reg = registry_with(("wrong-kind", lambda **kw: _NotAStrategy()))
    reg.load_entry_points(only=["broken"])

    @hookimpl
    def register_strategie(register):  # misspelt hook
        register("typo", Strategy)

    reg.add_plugin(
        types.SimpleNamespace(register_strategie=register_strategie),
        PluginInfo("typo", "typo-dist", "0", "x"),
    )
    errors = {p.name: p.error for p in reg.errors}
    assert set(errors) == {"broken", "typo"}
    assert "needs a missing library" in errors["broken"] and "unknown hook" in errors["typo"]
    assert reg.get("strategy", "finetune") and reg.get("backbone", "test_resnet")  # the others work

    body = write_study(tmp_path).read_text()
    spec = load_study(
        str(
            write_study(
                tmp_path,
                "uses_broken",
                body=body.replace('strategy = "finetune"', 'strategy = "from-broken"'),
            )
        )
    )
    with pytest.raises(HarnessError) as err:
        make_runner(tmp_path, spec, reg)
    assert (
        "from-broken" in str(err.value)
        and "broken (broken-plugin)" in err.value.hint
        and "needs a missing library" in err.value.hint
    )
    spec = load_study(
        str(
            write_study(
                tmp_path,
                "wrong_kind",
                body=body.replace('strategy = "finetune"', 'strategy = "wrong-kind"'),
            )
        )
    )
    with pytest.raises(PluginContractError) as err:
        make_runner(tmp_path, spec, reg)
    assert "'testing'" in str(err.value) and "_NotAStrategy" in str(err.value)
    assert (
        not (tmp_path / "results" / "uses_broken").exists()
        and not (tmp_path / "results" / "wrong_kind").exists()
    )


def _image_folder(root, bad: bool):
    rng = np.random.default_rng(0)
    for domain in ("photo", "sketch"):
        for cls in ("cat", "dog"):
            d = root / domain / cls
            d.mkdir(parents=True)
            for k in range(10):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    d / f"{k}.png"
                )
    if not bad:
        return []
    good = (root / "sketch" / "cat" / "0.png").read_bytes()
    truncated, empty, text = (
        root / "sketch" / "cat" / "cut.png",
        root / "sketch" / "dog" / "empty.jpg",
        root / "sketch" / "dog" / "notes.png",
    )
    truncated.write_bytes(good[: len(good) // 2])
    empty.write_bytes(b"")
    text.write_text("not an image")
    return [truncated, empty, text]


@pytest.mark.parametrize("skip", [False, True])
def test_unreadable_images_stop_the_run_before_training_unless_the_study_skips_them(tmp_path, skip):
    bad = _image_folder(tmp_path / "data", bad=True)
    option = "\nskip_bad_files = true" if skip else ""
    body = (
        write_study(tmp_path)
        .read_text()
        .replace('source = "digits"', 'source = "mine/photo"')
        .replace('target = "digits-m"', 'target = "mine/sketch"')
    )
    body = f'[datasets.mine]\nplugin = "folder"\nroot = "{tmp_path / "data"}"{option}\n\n' + body
    # the [datasets] table has to follow the top-level keys
    top, _, rest = body.partition("[[pairs]]")
    head, _, keys = top.partition("\n\n")
    path = tmp_path / "folders.toml"
    path.write_text(keys + "\n" + head + "\n\n[[pairs]]" + rest)
    spec = load_study(str(path))
    spec = spec.model_copy(update={"methods": spec.methods[1:2]})
    runner = make_runner(tmp_path, spec)
    if not skip:
        with pytest.raises(HarnessError) as err:
            runner.preflight()
        assert "3 unreadable" in str(err.value)
        for p in bad:
            assert str(p) in str(err.value)
        return
    with pytest.warns(UserWarning) as caught:
        runner.preflight()
    text = "\n".join(str(w.message) for w in caught)
    for p in bad:
        assert str(p) in text
    _, target = runner.domains.pair_data(0)
    assert (
        len(target.train) + len(target.val) + len(target.test) == 20
    )  # the good ones, all of them


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        ({"search.freeze_depth": 99}, "search.freeze_depth: 99 is past test_resnet's 5 stages"),
        ({"search.freeze_depth": [0, 42]}, "search.freeze_depth: [0, 42] is past test_resnet's"),
        ({"pairs[0].source": "digits-m"}, "pairs[0]: source and target are the same domain"),
    ],
)
def test_settings_that_would_change_without_a_word_are_refused_before_training(tmp_path, sets, key):
    from harness.errors import StudySpecError

    path = write_study(tmp_path)
    with pytest.raises(StudySpecError) as err:
        make_runner(tmp_path, load_study(str(path), sets)).run()
    assert str(err.value).startswith(f"{path}: {key}"), str(err.value)
    assert "\n" not in str(err.value)
