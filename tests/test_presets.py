"""The benchmark presets on tiny fake trees with the real folder names and layouts."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.api import DatasetError, ImageFiles
from harness.data.domains import as_domain
from harness_plugins import preset_lists as lists
from harness_plugins.datasets import build_folder
from harness_plugins.presets import PRESETS, build_synthia, register_datasets

FOLDER_PRESETS = ("office31", "office-home", "pacs", "vlcs", "terra-incognita")


@pytest.fixture(scope="module")
def factories() -> dict[str, dict]:
    found: dict[str, dict] = {}

    def register(name, factory, description="", **meta):
        found[name] = {"factory": factory, "description": description, **meta}

    register_datasets(register)
    return found


def _image(path: Path, colour: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (colour, 40, 90)).save(path)


def _class_tree(domain_dir: Path, classes) -> None:
    for k, name in enumerate(classes):
        _image(domain_dir / name / f"{k:03d}.jpg", k % 256)


def _build(factories, name, domain, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = factories[name]["factory"](domain, image_size=8, seed=0, **options)
    return files, [str(w.message) for w in caught]


def test_every_preset_is_registered_with_its_options(factories):
    assert set(factories) == {*PRESETS, "synthia"}
    for entry in factories.values():
        assert {"root", "val_fraction", "test_fraction", "skip_bad_files", "resize"} <= set(
            entry["options"]
        )
        assert entry["options"]["root"].default is None
    assert factories["pacs"]["domains"] == ("art_painting", "cartoon", "photo", "sketch")
    assert factories["synthia"]["tasks"] == ("segmentation",)


@pytest.mark.parametrize("name", FOLDER_PRESETS)
def test_folder_preset_reads_the_distributed_layout(factories, tmp_path, name):
    preset = PRESETS[name]
    domain = next(iter(preset.counts))
    below = tmp_path / domain / preset.below if preset.below else tmp_path / domain
    _class_tree(below, preset.classes)
    files, messages = _build(factories, name, domain, root=str(tmp_path))
    assert isinstance(files, ImageFiles) and files.splits is None
    assert files.class_names == sorted(preset.classes) == list(preset.classes)
    assert files.labels == list(range(len(preset.classes)))
    assert [p.parent.name for p in files.paths] == list(preset.classes)
    expected = preset.counts[domain]
    assert messages == [
        f"{name}/{domain}: found {len(preset.classes)} images, expected {expected} (the "
        "distributed dataset); results will not compare with published ones"
    ]


def test_known_class_lists():
    assert len(lists.OFFICE31_CLASSES) == 31 and len(lists.OFFICE_HOME_CLASSES) == 65
    assert len(set(lists.DOMAINNET_CLASSES)) == 345 and len(lists.VISDA_CLASSES) == 12
    assert lists.OFFICE_HOME_CLASSES.index("TV") < lists.OFFICE_HOME_CLASSES.index("Table")


def test_missing_and_unknown_class_folders_are_named(factories, tmp_path):
    _class_tree(tmp_path / "photo", [c for c in lists.PACS_CLASSES if c != "dog"] + ["cat"])
    with pytest.raises(DatasetError, match="missing dog; unknown cat"):
        _build(factories, "pacs", "photo", root=str(tmp_path))


def test_missing_domain_says_where_it_looked(factories, tmp_path):
    _class_tree(tmp_path / "Caltech101", lists.VLCS_CLASSES)
    with pytest.raises(DatasetError) as err:
        _build(factories, "vlcs", "SUN09", root=str(tmp_path))
    assert str(err.value) == (
        f"vlcs: domain folder not found: {tmp_path / 'SUN09'}; domains there: Caltech101"
    )
    with pytest.raises(DatasetError, match="vlcs has domains Caltech101, LabelMe"):
        _build(factories, "vlcs", "caltech", root=str(tmp_path))


def test_office_home_real_world_as_distributed_with_a_space(factories, tmp_path):
    _class_tree(tmp_path / "Real World", lists.OFFICE_HOME_CLASSES)
    files, _ = _build(factories, "office-home", "Real_World", root=str(tmp_path))
    assert files.name == "office-home/Real_World" and len(files.paths) == 65


def test_visda_reads_labels_and_positions_from_its_list(factories, tmp_path):
    rows = []
    for k, name in enumerate(reversed(lists.VISDA_CLASSES)):
        label = lists.VISDA_CLASSES.index(name)
        _image(tmp_path / "validation" / name / f"{k}.jpg")
        rows.append(f"{name}/{k}.jpg {label}")
    (tmp_path / "validation" / "image_list.txt").write_text("\n".join(rows) + "\n")
    files, messages = _build(factories, "visda2017", "validation", root=str(tmp_path))
    assert files.labels == list(range(11, -1, -1)) and files.splits is None
    assert files.class_names == list(lists.VISDA_CLASSES)
    assert files.meta["lists"] == {"train": list(range(12)), "test": list(range(12))}
    assert messages == [
        "visda2017/validation: found 12 images, expected 55388 (the distributed dataset); "
        "results will not compare with published ones"
    ]
    (tmp_path / "validation" / "image_list.txt").write_text("\n".join(rows + ["bus/x.jpg 2"]))
    with pytest.raises(DatasetError, match=r"1 listed file\(s\) not found: .*bus/x.jpg"):
        _build(factories, "visda2017", "validation", root=str(tmp_path))
    (tmp_path / "validation" / "image_list.txt").write_text("\n".join(rows + ["bus/0.jpg 3"]))
    with pytest.raises(DatasetError, match=r"image_list.txt:13: bus/0.jpg is labelled 3 \(car\)"):
        _build(factories, "visda2017", "validation", root=str(tmp_path))
    with pytest.raises(DatasetError, match="list file not found: .*train/image_list.txt"):
        (tmp_path / "train").mkdir()
        _build(factories, "visda2017", "train", root=str(tmp_path))


def test_domainnet_official_lists(factories, tmp_path):
    train, test = [], []
    for label, name in enumerate(lists.DOMAINNET_CLASSES):
        for k, rows in enumerate((train, test)):
            rel = f"sketch/{name}/sketch_{label:03d}_{k}.jpg"
            _image(tmp_path / rel)
            rows.append(f"{rel} {label}")
    (tmp_path / "sketch_train.txt").write_text("\n".join(train[::-1]) + "\n")
    (tmp_path / "sketch_test.txt").write_text("\n".join(test) + "\n")
    files, messages = _build(factories, "domainnet", "sketch", root=str(tmp_path))
    assert files.labels == list(range(344, -1, -1)) + list(range(345))
    assert files.class_names[308] == "The_Eiffel_Tower"
    assert files.paths[344 - 308].parent.name == "The_Eiffel_Tower"
    assert files.meta["lists"] == {"train": list(range(345)), "test": list(range(345, 690))}
    assert messages == [
        "domainnet/sketch: found 690 images, expected 69128 (the distributed dataset); "
        "results will not compare with published ones"
    ]
    (tmp_path / "sketch_test.txt").unlink()
    with pytest.raises(DatasetError, match="list file.*sketch_test.txt; list files there: sketch_"):
        _build(factories, "domainnet", "sketch", root=str(tmp_path))


def test_root_defaults_to_harness_data(factories, tmp_path, monkeypatch):
    _class_tree(tmp_path / "PACS" / "sketch", lists.PACS_CLASSES)
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path))
    files, _ = _build(factories, "pacs", "sketch")
    assert files.meta["root"] == str(tmp_path / "PACS")
    monkeypatch.delenv("HARNESS_DATA")
    with pytest.raises(DatasetError) as err:
        _build(factories, "pacs", "sketch")
    assert str(err.value) == (
        "pacs option root = '$HARNESS_DATA/PACS': environment variable $HARNESS_DATA is not set"
    )


def test_any_root_expands_variables(tmp_path, monkeypatch):
    for domain in ("a",):
        for k, cls in enumerate("xyz" * 1):
            for i in range(5):
                _image(tmp_path / "mine" / domain / cls / f"{i}.png", 50 * k + i)
    monkeypatch.setenv("MY_DATA", str(tmp_path))
    data = build_folder("a", image_size=8, seed=0, root="${MY_DATA}/mine")
    assert data.meta["root"] == str(tmp_path / "mine") and data.class_names == ["x", "y", "z"]
    monkeypatch.delenv("MY_DATA")
    with pytest.raises(DatasetError, match=r"environment variable \$MY_DATA is not set"):
        build_folder("a", image_size=8, seed=0, root="$MY_DATA/mine")


def _png16(path: Path, ids: np.ndarray) -> None:
    """A 16-bit RGB PNG whose first channel is ``ids`` (what PIL cannot write)."""
    h, w = ids.shape
    rgb = np.zeros((h, w, 3), ">u2")
    rgb[..., 0], rgb[..., 1] = ids, 7  # the second channel holds instance ids
    raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )  # fmt: skip


def test_synthia_maps_ids_to_the_cityscapes_subsets(tmp_path):
    ids = np.arange(24 * 24).reshape(24, 24) % 24  # every SYNTHIA id 0..22 and 23 (unknown)
    ids[0, 0] = 300  # out of the table: void
    for k in range(5):
        _image(tmp_path / "RGB" / f"{k:07d}.png", 40 * k)
        Image.open(tmp_path / "RGB" / f"{k:07d}.png").resize((24, 24)).save(
            tmp_path / "RGB" / f"{k:07d}.png"
        )
        _png16(tmp_path / "GT" / "LABELS" / f"{k:07d}.png", ids)
    made = build_synthia(None, image_size=24, seed=0, root=str(tmp_path))
    assert isinstance(made, ImageFiles) and made.task == "segmentation" and len(made.paths) == 5
    data16 = _synthia(made, 24)
    assert data16.class_names == [
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle",
    ]  # fmt: skip
    mask = data16.train.y[0]
    expect16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11,
                8: 12, 19: 13, 12: 14, 11: 15}  # fmt: skip
    for synthia_id in range(24):
        got = set(mask[torch_ids(ids) == synthia_id].tolist())
        assert got == {expect16.get(synthia_id, 255)}, synthia_id
    assert int(mask[0, 0]) == 255
    data13 = _synthia(build_synthia(None, image_size=24, seed=0, root=str(tmp_path), classes=13))
    assert len(data13.class_names) == 13 and "wall" not in data13.class_names
    mask13 = data13.train.y[0]
    assert set(mask13[torch_ids(ids) == 21].tolist()) == {255}  # wall: void with 13 classes
    assert set(mask13[torch_ids(ids) == 11].tolist()) == {12}  # bicycle is the 13th class


def _synthia(made: ImageFiles, size: int | tuple[int, int] = 24):
    """``synthia``'s files as the harness makes them a domain (decoded through the cache)."""
    return as_domain(made, size, seed=0, log=lambda _: None)


def test_synthia_problems_and_rectangles(tmp_path):
    ids = np.full((12, 16), 3)  # road
    ids[:, 8:] = 11  # bicycle on the right half
    for k in range(5):
        Image.new("RGB", (16, 12), (200, 10, 10)).save(_mkdir(tmp_path / "RGB") / f"{k:07d}.png")
        _png16(tmp_path / "GT" / "LABELS" / f"{k:07d}.png", ids)
    data = _synthia(build_synthia(None, image_size=24, seed=0, root=str(tmp_path)), (8, 6))
    y = data.train.y
    assert y.shape[1:] == (6, 8)
    assert bool((y[:, :, :4] == 0).all()) and bool((y[:, :, 4:] == 15).all())
    (tmp_path / "RGB" / "9999999.png").write_bytes(b"x")  # an image without a label
    with pytest.raises(DatasetError, match="image without a mask"):
        build_synthia(None, image_size=24, seed=0, root=str(tmp_path))
    with pytest.warns(UserWarning, match="1 bad pair"):
        made = build_synthia(None, image_size=24, seed=0, root=str(tmp_path), skip_bad_files=True)
    assert len(made.paths) == 5
    _png16(tmp_path / "GT" / "LABELS" / "0000001.png", ids[:6])  # a label of another size
    made = build_synthia(None, image_size=24, seed=0, root=str(tmp_path), skip_bad_files=True)
    with pytest.warns(UserWarning, match=r"0000001\.png: mask is 16x6 px but its image"):
        data = _synthia(made, 8)  # decoded: the pair is listed and left out
    assert sum(len(s) for s in (data.train, data.val, data.test)) == 4


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def torch_ids(ids: np.ndarray):
    import torch

    return torch.from_numpy(ids)
