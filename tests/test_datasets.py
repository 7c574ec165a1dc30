"""Tests of the built-in dataset plugin: digits, digits-m and folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.api import DatasetError, DomainData, OptionError, stratified_split
from harness.data.domains import as_domain
from harness.options import check_options
from harness.registry import get_registry
from harness_plugins import datasets as ds
from harness_plugins.photos import bundled_photos

N_DIGITS = 1797


def _folder(domain: str | None, **options) -> DomainData:
    """``folder``'s files as the harness makes them a domain (decoded through the cache)."""
    made = ds.build_folder(domain, **options)
    return as_domain(made, options["image_size"], seed=options["seed"])


def _all_images(data: DomainData) -> torch.Tensor:
    return torch.cat([data.train.x, data.val.x, data.test.x])


def _all_labels(data: DomainData) -> torch.Tensor:
    return torch.cat([data.train.y, data.val.y, data.test.y])


def _assert_same(a: DomainData, b: DomainData) -> None:
    assert a.fingerprint == b.fingerprint
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).x, getattr(b, split).x)
        assert torch.equal(getattr(a, split).y, getattr(b, split).y)


# --------------------------------------------------------------------------------------- registry


def test_registers_three_datasets() -> None:
    import pluggy

    from harness import hookspecs

    seen: dict[str, dict] = {}

    def register(name, factory, **meta) -> None:  # noqa: ANN001
        seen[name] = {"factory": factory, **meta}

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(ds)
    pm.hook.register_datasets(register=register)
    assert set(seen) == {"digits", "digits-m", "folder"}
    for entry in seen.values():
        assert entry["tasks"] == ("classification",)
        assert entry["description"]
    assert seen["digits"]["factory"] is ds.build_digits
    assert seen["digits-m"]["factory"] is ds.build_digits_m
    assert seen["folder"]["factory"] is ds.build_folder


# --------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits16() -> DomainData:
    return ds.build_digits(None, image_size=16, seed=0)


@pytest.fixture(scope="module")
def digits_m16() -> DomainData:
    return ds.build_digits_m(None, image_size=16, seed=0)


def test_digits_shapes_and_classes(digits16: DomainData) -> None:
    digits16.check(image_size=16)
    assert digits16.name == "digits"
    assert digits16.task == "classification"
    assert digits16.class_names == [str(i) for i in range(10)]
    assert digits16.meta["hflip"] is False
    x = _all_images(digits16)
    assert x.dtype == torch.uint8 and x.shape == (N_DIGITS, 3, 16, 16)
    assert len(digits16.train) + len(digits16.val) + len(digits16.test) == N_DIGITS
    assert abs(len(digits16.train) - 0.6 * N_DIGITS) < 10
    assert sorted(_all_labels(digits16).unique().tolist()) == list(range(10))
    # grey: the three channels are copies; white strokes on a black background
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert int(x.max()) >= 250
    corners = x[..., [0, 0, -1, -1], [0, -1, 0, -1]].float().mean()
    assert corners < 10 and x.float().mean() > 50


def test_digits_other_size_and_no_domain() -> None:
    assert ds.build_digits(None, image_size=32, seed=0).image_shape == (3, 32, 32)
    with pytest.raises(DatasetError, match="no sub-domains"):
        ds.build_digits("mnist", image_size=16, seed=0)
    with pytest.raises(TypeError):
        ds.build_digits(None, image_size=16, seed=0, bogus=1)


def test_digits_deterministic_and_seeded(digits16: DomainData) -> None:
    _assert_same(digits16, ds.build_digits(None, image_size=16, seed=0))
    other = ds.build_digits(None, image_size=16, seed=1)
    assert not torch.equal(other.test.x, digits16.test.x)
    assert other.fingerprint != digits16.fingerprint
    # the same pool of images, only split differently
    assert _all_images(other).sum() == _all_images(digits16).sum()


def test_digits_splits_are_disjoint(digits16: DomainData) -> None:
    labels = torch.from_numpy(ds._digits_raw()[1])
    parts = stratified_split(labels, (0.6, 0.2, 0.2), 0)
    sets = [set(i.tolist()) for i in parts]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert len(sets[0] | sets[1] | sets[2]) == N_DIGITS
    pool = ds.build_digits(None, image_size=16, seed=0)
    strokes = ds._digit_strokes(16)
    for split, idx in zip(("train", "val", "test"), parts, strict=True):
        assert torch.equal(getattr(pool, split).y, labels[idx])
        assert torch.equal(getattr(pool, split).x[:, :1], strokes[idx])
        assert len(getattr(digits16, split)) == len(idx)


# --------------------------------------------------------------------------------------- digits-m


def test_digits_m_matches_digits_labels_and_splits(
    digits16: DomainData, digits_m16: DomainData
) -> None:
    digits_m16.check(image_size=16)
    assert digits_m16.name == "digits-m"
    assert digits_m16.class_names == digits16.class_names
    assert digits_m16.meta["hflip"] is False
    for split in ("train", "val", "test"):
        a, b = getattr(digits16, split), getattr(digits_m16, split)
        assert len(a) == len(b)
        assert torch.equal(a.y, b.y)
        assert not torch.equal(a.x, b.x)
    assert digits_m16.fingerprint != digits16.fingerprint


def test_digits_m_is_colourful_and_reproducible(digits_m16: DomainData) -> None:
    x = _all_images(digits_m16)
    assert x.dtype == torch.uint8 and x.shape == (N_DIGITS, 3, 16, 16)
    x = x.float()
    channel_gap = (x[:, 0] - x[:, 1]).abs().mean() + (x[:, 1] - x[:, 2]).abs().mean()
    assert channel_gap > 10
    # backgrounds vary from image to image (crops of different photos)
    assert x.mean(dim=(1, 2, 3)).std() > 10
    _assert_same(digits_m16, ds.build_digits_m(None, image_size=16, seed=0))
    _assert_same(digits_m16, ds.build_digits_m(None, image_size=16, seed=0, photo_seed=1234))


def test_digits_m_photo_seed(digits_m16: DomainData) -> None:
    other = ds.build_digits_m(None, image_size=16, seed=0, photo_seed=7)
    assert other.fingerprint != digits_m16.fingerprint
    assert not torch.equal(other.train.x, digits_m16.train.x)
    assert torch.equal(other.train.y, digits_m16.train.y)
    with pytest.raises(DatasetError):
        ds.build_digits_m("x", image_size=16, seed=0)


def test_digits_m_uses_several_real_photos() -> None:
    photos = bundled_photos()
    assert len(photos) >= 5
    for p in photos:
        assert p.dtype == torch.uint8 and p.shape[0] == 3 and min(p.shape[1:]) >= 200


def test_digits_do_not_transfer_to_digits_m() -> None:
    from sklearn.linear_model import LogisticRegression

    src = ds.build_digits(None, image_size=8, seed=0)
    tgt = ds.build_digits_m(None, image_size=8, seed=0)

    def features(x: torch.Tensor) -> np.ndarray:
        return x.flatten(1).float().numpy() / 255.0

    clf = LogisticRegression(max_iter=300).fit(features(src.train.x), src.train.y.numpy())
    src_acc = clf.score(features(src.test.x), src.test.y.numpy())
    tgt_acc = clf.score(features(tgt.test.x), tgt.test.y.numpy())
    assert src_acc > 0.9
    assert tgt_acc < 0.6


# --------------------------------------------------------------------------------------- folder

DOMAINS = ("photo", "sketch")
CLASSES = ("cat", "dog", "fish")


def _make_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for domain in DOMAINS:
        for cls in CLASSES:
            d = root / domain / cls
            d.mkdir(parents=True)
            for i in range(5):
                arr = rng.integers(0, 256, size=(15, 20, 3), dtype=np.uint8)
                ext = ".png" if i % 2 else ".JPG"
                Image.fromarray(arr).save(
                    d / f"img{i}{ext}", format="PNG" if ext == ".png" else "JPEG"
                )
    (root / "photo" / "cat" / "notes.txt").write_text("not an image")
    (root / "photo" / ".hidden").mkdir()
    (root / ".cache").mkdir()
    return root


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    return _make_folder(tmp_path / "data")


def test_folder_reads_domain(folder_root: Path) -> None:
    data = _folder("photo", image_size=16, seed=0, root=str(folder_root))
    data.check(image_size=16)
    assert data.class_names == list(CLASSES)
    assert data.meta == {
        "hflip": True,
        "root": str(folder_root),
        "resize": "center-crop",
        "stored_size": 16,
    }
    x, y = _all_images(data), _all_labels(data)
    assert x.dtype == torch.uint8 and x.shape == (15, 3, 16, 16)
    assert sorted(y.tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 3)
    _assert_same(data, _folder("photo", image_size=16, seed=0, root=str(folder_root)))
    other = _folder("sketch", image_size=16, seed=0, root=str(folder_root))
    assert other.fingerprint != data.fingerprint


def test_folder_resize_and_center_crop(tmp_path: Path) -> None:
    # a 40x20 image: left quarter red, middle half green, right quarter blue
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :10, 0] = 255
    arr[:, 10:30, 1] = 255
    arr[:, 30:, 2] = 255
    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(arr).save(tmp_path / "d" / cls / f"{i}.png")
    data = _folder("d", image_size=8, seed=0, root=str(tmp_path))
    x = _all_images(data)
    assert x.shape == (10, 3, 8, 8)
    # the center crop keeps the green middle (edge columns may blend when resampling)
    inner = x[..., 1:-1]
    assert int(inner[:, 1].min()) == 255
    assert int(inner[:, 0].max()) == 0 and int(inner[:, 2].max()) == 0


def test_folder_options(folder_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _folder(
        "photo", image_size=16, seed=0, root=str(folder_root), val_fraction=0.4, test_fraction=0.2
    )
    assert (len(data.train), len(data.val), len(data.test)) == (6, 6, 3)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _folder("photo", image_size=16, seed=0, root="~/data").meta["root"] == str(folder_root)
    with pytest.raises(TypeError):
        _folder("photo", image_size=16, seed=0, root=str(folder_root), bogus=1)
    with pytest.raises(DatasetError, match="val_fraction"):
        _folder("photo", image_size=16, seed=0, root=str(folder_root), val_fraction=0.9)


def test_folder_reports_every_bad_file(folder_root: Path) -> None:
    cat, dog = folder_root / "photo" / "cat", folder_root / "photo" / "dog"
    good = (cat / "img1.png").read_bytes()
    truncated = cat / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    empty = dog / "empty.jpg"
    empty.write_bytes(b"")
    text = dog / "x.png"
    text.write_text("hello, I am not a PNG")
    with pytest.raises(DatasetError) as info:
        _folder("photo", image_size=16, seed=0, root=str(folder_root))
    msg = str(info.value)
    assert "3 unreadable" in msg
    assert str(folder_root / "photo") in msg
    for path in (truncated, empty, text):
        assert str(path) in msg
    assert f"{empty}: empty file" in msg
    assert f"{truncated}: OSError" in msg  # PIL notices the truncation only when decoding
    assert "notes.txt" not in msg
    assert info.value.hint
    # the other domain is unaffected
    _folder("sketch", image_size=16, seed=0, root=str(folder_root))


def test_folder_lists_every_bad_file_one_per_line(folder_root: Path) -> None:
    bad = [folder_root / "sketch" / "fish" / f"bad{i:02d}.png" for i in range(13)]
    for path in bad:
        path.write_bytes(b"junk")
    with pytest.raises(DatasetError) as info:
        _folder("sketch", image_size=16, seed=0, root=str(folder_root))
    lines = str(info.value).splitlines()
    assert lines[0].startswith("13 unreadable")
    assert [line.split(": ")[0].strip() for line in lines[1:]] == [str(p) for p in bad]
    assert "more" not in str(info.value)


def test_folder_names_every_file_it_leaves_out_for_lack_of_an_image_extension(
    folder_root: Path,
) -> None:
    fish = folder_root / "sketch" / "fish"
    shutil.copy(next(fish.glob("*.png")), fish / "photo_without_extension")
    (fish / "labels.csv").write_text("a,b\n")
    (fish / ".DS_Store").write_bytes(b"\0")  # hidden: skipped without a word
    with pytest.warns(UserWarning) as caught:
        data = _folder("sketch", image_size=16, seed=0, root=str(folder_root))
    messages = [str(w.message) for w in caught if "left out" in str(w.message)]
    assert len(messages) == 1
    lines = messages[0].splitlines()
    assert lines[0].startswith("2 file(s) without an image extension") and ".png" in lines[0]
    assert lines[1:] == [f"  {fish / 'labels.csv'}", f"  {fish / 'photo_without_extension'}"]
    assert len(_all_labels(data)) == 15  # the images, and only them
    # the fixture's photo/cat/notes.txt is named too
    with pytest.warns(UserWarning, match="notes.txt"):
        _folder("photo", image_size=16, seed=0, root=str(folder_root))


def test_folder_layout_errors(folder_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found") as info:
        _folder("photo", image_size=16, seed=0, root=str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(info.value)

    with pytest.raises(DatasetError) as info:
        _folder("clipart", image_size=16, seed=0, root=str(folder_root))
    msg = str(info.value)
    assert str(folder_root / "clipart") in msg and "photo, sketch" in msg and ".cache" not in msg

    with pytest.raises(DatasetError, match="photo, sketch"):
        _folder(None, image_size=16, seed=0, root=str(folder_root))

    (folder_root / "empty_domain").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        _folder("empty_domain", image_size=16, seed=0, root=str(folder_root))

    (folder_root / "sketch" / "zebra").mkdir()
    (folder_root / "sketch" / "zebra" / "readme.txt").write_text("no images")
    with pytest.raises(DatasetError, match="no images") as info:
        _folder("sketch", image_size=16, seed=0, root=str(folder_root))
    assert str(folder_root / "sketch" / "zebra") in str(info.value)


def test_folder_too_few_images(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "d" / cls / "only.png")
    with pytest.raises(DatasetError, match="split empty"):
        _folder("d", image_size=8, seed=0, root=str(tmp_path))


def _images(folder: Path, n: int, size: tuple[int, int] = (12, 10)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (40 * i, 0, 0)).save(folder / f"{i}.png")


def test_folder_accounts_for_every_file(tmp_path: Path) -> None:
    _images(tmp_path / "d" / "a", 3)
    _images(tmp_path / "d" / "a" / "2024" / "june", 2)  # deeper: still class a
    _images(tmp_path / "d" / "b", 5)
    (tmp_path / "d" / "a" / "2024" / "notes.txt").write_text("x")
    _images(tmp_path / "d", 1)  # an image loose at the domain's top level
    (tmp_path / "d" / "readme.md").write_text("x")
    with pytest.warns(UserWarning) as caught:
        data = _folder("d", image_size=8, seed=0, root=str(tmp_path))
    assert sorted(_all_labels(data).tolist()) == [0] * 5 + [1] * 5
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    no_ext, loose = (m.splitlines() for m in messages)
    assert loose[0].startswith("2 file(s) in domain folder") and "in no class folder" in loose[0]
    assert loose[1:] == [f"  {tmp_path / 'd' / '0.png'}", f"  {tmp_path / 'd' / 'readme.md'}"]
    assert no_ext[1:] == [f"  {tmp_path / 'd' / 'a' / '2024' / 'notes.txt'}"]


def test_folder_class_names_compared_in_nfc(tmp_path: Path) -> None:
    from harness.search.domains import class_difference

    nfc, nfd = "caf\u00e9", "cafe\u0301"
    for domain, name in (("mac", nfd), ("linux", nfc)):
        _images(tmp_path / domain / name, 5)
        _images(tmp_path / domain / "fish", 5)
        _images(tmp_path / domain / "egg", 5)
    mac = _folder("mac", image_size=8, seed=0, root=str(tmp_path))
    linux = _folder("linux", image_size=8, seed=0, root=str(tmp_path))
    assert mac.class_names == linux.class_names == [nfc, "egg", "fish"]  # sorted in NFC
    assert torch.equal(_all_labels(mac), _all_labels(linux))
    assert (
        class_difference(["cat", nfc], [nfc, "dog"])
        == "only in source: 'cat'; only in target: 'dog'"
    )
    assert "another order" in class_difference(["a", "b"], ["b", "a"])
    _images(tmp_path / "mac" / nfc, 5)  # the same name written both ways in one domain
    with pytest.raises(DatasetError, match="two Unicode forms"):
        _folder("mac", image_size=8, seed=0, root=str(tmp_path))


def test_folder_resize_pad_keeps_the_whole_image(tmp_path: Path) -> None:
    arr = np.full((8, 32, 3), 255, dtype=np.uint8)  # a white 32x8 strip
    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(arr).save(tmp_path / "d" / cls / f"{i}.png")
    data = _folder("d", image_size=8, seed=0, root=str(tmp_path), resize="pad")
    assert data.meta["resize"] == "pad"
    x = _all_images(data)
    assert bool((x[:, :, 3:5] == 255).all())  # the whole strip, 8 x 2 px, in the middle rows
    assert bool((x[:, :, :3] == 0).all()) and bool((x[:, :, 5:] == 0).all())  # padding
    with pytest.raises(DatasetError, match="resize must be one of"):
        _folder("d", image_size=8, seed=0, root=str(tmp_path), resize="stretch")


# --------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("digits", {"photo_seed": 1}, "unknown option 'photo_seed' of dataset 'digits' (it takes"),
        ("digits-m", {"photo_seed": -1}, "photo_seed must be an int >= 0, got -1"),
        ("digits-m", {"photo_seed": 1.5}, "photo_seed must be an int >= 0, got 1.5"),
        ("folder", {"root": 3}, "root must be a string, got 3"),
        (
            "folder",
            {"root": "r", "resize": "stretch"},
            "resize must be one of 'center-crop', 'pad'",
        ),
        ("folder", {"root": "r", "skip_bad_files": "yes"}, "skip_bad_files must be true or false"),
        (
            "folder",
            {"root": "r", "val_fraction": 0},
            "val_fraction must be a number > 0 < 1, got 0",
        ),
        ("folder", {"root": "r", "test_fraction": 1.5}, "test_fraction must be a number > 0 < 1"),
        ("folder", {}, "missing option 'root' of dataset 'folder'"),
    ],
)
def test_declared_options_refuse_a_bad_value(name: str, options: dict, message: str) -> None:
    with pytest.raises(OptionError) as err:
        check_options(get_registry().get("dataset", name), options)
    assert message in str(err.value)


def test_declared_options_accept_what_the_factories_accept() -> None:
    registry = get_registry()
    check_options(registry.get("dataset", "digits"), {})
    check_options(registry.get("dataset", "digits-m"), {"photo_seed": 0})
    folder = {"root": "~/data", "val_fraction": 0.5, "test_fraction": 0.3}
    check_options(registry.get("dataset", "folder"), {**folder, "resize": "pad"})
    check_options(registry.get("dataset", "folder"), {"root": "r", "skip_bad_files": True})
