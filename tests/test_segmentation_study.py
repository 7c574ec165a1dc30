from __future__ import annotations

import json

import pytest
from test_search import registry_with

from harness.errors import StudySpecError
from harness.publish import leaderboard
from harness.search import RunOptions, build_driver
from harness.study import load_study

SEG_STUDY = """
task = "segmentation"
image_size = 32
batch_size = 8
final_seeds = 2

[datasets.synth]
plugin = "seg-synthetic"
n = 40

[datasets.photo]
plugin = "seg-photo"
n = 40

[[pairs]]
source = "synth"
target = "photo"

[[methods]]
backbone = "test_resnet"
weights = "source"
head = "unet"
strategy = "source-only"

[[methods]]
backbone = "test_resnet"
weights = "none"
head = "fpn"
strategy = "finetune"

[[methods]]
backbone = "test_resnet"
weights = "none"
head = "deeplabv3plus"
strategy = "linear-probe"

[budget]
trials = 2
max_epochs = 1

[search]
startup_trials = 1

[pretrain]
epochs = 1
"""


@pytest.mark.slow
def test_segmentation_study_end_to_end(tmp_path):
    path = tmp_path / "seg.toml"
    path.write_text(SEG_STUDY)
    spec = load_study(str(path))
    runner = build_driver(
        spec, registry_with(), RunOptions(results_dir=tmp_path / "results", log=lambda m: None)
    )
    runner.run()
    board, trials, prov = leaderboard.collect(spec, runner.storage_url)
    assert list(board["status"]) == ["final"] * 3
    assert (
        board["test_miou"].between(0, 1).all() and board["test_pixel_accuracy"].between(0, 1).all()
    )
    assert all(len(v) == 5 for v in board["test_per_class_iou"])
    assert set(board["selection"]) == {"source-val", "target-val"}
    paths = leaderboard.write(tmp_path / "out", spec, board, trials, prov)
    data = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    assert all(len(r["test_per_class_iou"]) == 5 for r in data["rows"])
    # per-image intersections and unions give each row a bootstrap interval around its mean
    for r in data["rows"]:
        assert r["test_miou_ci_low"] <= r["test_miou"] <= r["test_miou_ci_high"]
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "test mIoU %" in md and "pixel acc" in md
    assert len(paths) == 4


def test_head_and_task_mismatch_is_refused_before_training(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(SEG_STUDY.replace('head = "fpn"', 'head = "linear"'))
    with pytest.raises(
        StudySpecError,
        match=r"methods\[1\].head: head 'linear' supports classification, not segmentation",
    ):
        build_driver(
            load_study(str(path)),
            registry_with(),
            RunOptions(results_dir=tmp_path / "r", log=lambda m: None),
        )
    path.write_text(
        SEG_STUDY.replace('task = "segmentation"', 'task = "classification"').replace(
            'head = "fpn"', 'head = "linear"'
        )
    )
    with pytest.raises(StudySpecError, match="head 'unet' supports segmentation"):
        build_driver(
            load_study(str(path)),
            registry_with(),
            RunOptions(results_dir=tmp_path / "r", log=lambda m: None),
        )


def test_backbone_that_cannot_feed_a_decoder_fails_before_training(tmp_path):
    path = tmp_path / "vit.toml"
    path.write_text(
        SEG_STUDY.replace(
            'weights = "none"\nhead = "fpn"', 'weights = "none"\nhead = "fpn"'
        ).replace(
            'backbone = "test_resnet"\nweights = "none"\nhead = "fpn"',
            'backbone = "test_vit"\nweights = "none"\nhead = "fpn"',
        )
    )
    runner = build_driver(
        load_study(str(path)),
        registry_with(),
        RunOptions(results_dir=tmp_path / "r", log=lambda m: None),
    )
    with pytest.raises(
        StudySpecError, match=r"methods\[1\]: head 'fpn' cannot be built on backbone 'test_vit'"
    ):
        runner.preflight()
