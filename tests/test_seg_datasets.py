"""Tests of the built-in segmentation datasets: seg-synthetic, seg-photo, segfolder, gta5, cityscapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.api import IGNORE_INDEX, DatasetError, DomainData, ImageFiles, OptionError
from harness.data.domains import as_domain
from harness.options import check_options
from harness.registry import get_registry
from harness_plugins import seg_datasets as sd
from harness_plugins import shapes

S = 32
N = 40


def _domain(made: ImageFiles, size: int | tuple[int, int] = S) -> DomainData:
    """A files-form dataset as the harness makes it a domain (decoded through the cache)."""
    assert isinstance(made, ImageFiles) and made.task == "segmentation"
    return as_domain(made, size, seed=0, log=lambda _: None)


def _segfolder(domain: str | None, **options) -> DomainData:
    return _domain(sd.build_segfolder(domain, **options), options["image_size"])


def _gta5(size: int | tuple[int, int] = S, **options) -> DomainData:
    return _domain(sd.build_gta5(None, image_size=S, seed=0, **options), size)


def _cityscapes(domain: str | None = None, **options) -> DomainData:
    return _domain(sd.build_cityscapes(domain, image_size=S, seed=0, **options))


def _all_images(data: DomainData) -> torch.Tensor:
    return torch.cat([data.train.x, data.val.x, data.test.x])


def _all_masks(data: DomainData) -> torch.Tensor:
    return torch.cat([data.train.y, data.val.y, data.test.y])


def _assert_same(a: DomainData, b: DomainData) -> None:
    assert a.fingerprint == b.fingerprint
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).x, getattr(b, split).x)
        assert torch.equal(getattr(a, split).y, getattr(b, split).y)


def _miou(pred: torch.Tensor, y: torch.Tensor, k: int) -> float:
    ious = []
    for c in range(k):
        union = ((pred == c) | (y == c)).sum().item()
        if union:
            ious.append(((pred == c) & (y == c)).sum().item() / union)
    return sum(ious) / len(ious)


# --------------------------------------------------------------------------------------- registry


def test_registers_five_segmentation_datasets() -> None:
    import pluggy

    from harness import hookspecs

    seen: dict[str, dict] = {}

    def register(name, factory, **meta) -> None:  # noqa: ANN001
        seen[name] = {"factory": factory, **meta}

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(sd)
    pm.hook.register_datasets(register=register)
    assert set(seen) == {"seg-synthetic", "seg-photo", "segfolder", "gta5", "cityscapes"}
    for entry in seen.values():
        assert entry["tasks"] == ("segmentation",)
        assert entry["description"]
    assert seen["cityscapes"]["domains"] == ("train", "val")
    assert seen["seg-photo"]["factory"] is sd.build_seg_photo
    assert seen["segfolder"]["factory"] is sd.build_segfolder


# --------------------------------------------------------------------------------------- shapes


@pytest.fixture(scope="module")
def synthetic() -> DomainData:
    return sd.build_seg_synthetic(None, image_size=S, seed=0, n=N)


@pytest.fixture(scope="module")
def photo() -> DomainData:
    return sd.build_seg_photo(None, image_size=S, seed=0, n=N)


@pytest.mark.parametrize("which", ["synthetic", "photo"])
def test_shapes_contract(which: str, request: pytest.FixtureRequest) -> None:
    data: DomainData = request.getfixturevalue(which)
    data.check(image_size=S)
    assert data.name == f"seg-{which}"
    assert data.task == "segmentation"
    assert data.class_names == ["background", "square", "disc", "triangle", "bar"]
    assert data.meta == {"hflip": True}
    x, y = _all_images(data), _all_masks(data)
    assert x.dtype == torch.uint8 and x.shape == (N, 3, S, S)
    assert y.dtype == torch.int64 and y.shape == (N, S, S)
    assert (len(data.train), len(data.val), len(data.test)) == (24, 8, 8)
    assert sorted(y.unique().tolist()) == [0, 1, 2, 3, 4]
    # every image shows at least one object and some background
    per_image = y.flatten(1)
    assert bool(((per_image > 0).any(1) & (per_image == 0).any(1)).all())


def test_shapes_deterministic_and_seeded(synthetic: DomainData, photo: DomainData) -> None:
    shapes.render_scenes.cache_clear()
    _assert_same(synthetic, sd.build_seg_synthetic(None, image_size=S, seed=0, n=N))
    _assert_same(photo, sd.build_seg_photo(None, image_size=S, seed=0, n=N))
    other = sd.build_seg_synthetic(None, image_size=S, seed=1, n=N)
    assert other.fingerprint != synthetic.fingerprint
    assert not torch.equal(other.test.y, synthetic.test.y)
    # the same pool of scenes, split differently
    assert _all_images(other).sum() == _all_images(synthetic).sum()
    scenes = sd.build_seg_synthetic(None, image_size=S, seed=0, n=N, scene_seed=5)
    assert not torch.equal(_all_masks(scenes), _all_masks(synthetic))
    with pytest.raises(DatasetError, match="no sub-domains"):
        sd.build_seg_photo("x", image_size=S, seed=0, n=N)
    with pytest.raises(DatasetError, match="n >= 5"):
        sd.build_seg_synthetic(None, image_size=S, seed=0, n=2)


def test_photo_layouts_differ_from_synthetic(synthetic: DomainData, photo: DomainData) -> None:
    assert not torch.equal(_all_masks(synthetic), _all_masks(photo))


def test_synthetic_mask_matches_drawing(synthetic: DomainData) -> None:
    x = _all_images(synthetic).permute(0, 2, 3, 1).reshape(-1, 3).long()
    y = _all_masks(synthetic).flatten()
    r, g, b = x.unbind(1)
    bg = y == 0
    assert torch.equal(r[bg], g[bg]) and torch.equal(g[bg], b[bg])  # grey background
    assert int(r[bg].min()) >= 130
    square, disc, triangle, bar = (y == 1), (y == 2), (y == 3), (y == 4)
    assert bool(((r > g + 20) & (r > b + 20))[square].all())  # red-ish
    assert bool(((g > r + 20) & (g > b + 20))[disc].all())  # green-ish
    assert bool(((b > r + 20) & (b > g + 20))[triangle].all())  # blue-ish
    assert bool(((r > b + 20) & (g > b + 20))[bar].all())  # yellow-ish


def test_photo_objects_are_textured(synthetic: DomainData, photo: DomainData) -> None:
    def inside_variance(data: DomainData) -> float:
        x, y = _all_images(data).float(), _all_masks(data)
        out = []
        for img, mask in zip(x, y, strict=True):
            for c in mask.unique().tolist():
                if c:
                    out.append(img[:, mask == c].var(dim=1, unbiased=False).mean().item())
        return float(np.mean(out))

    assert inside_variance(photo) > 10 * max(inside_variance(synthetic), 1.0)
    assert _all_images(photo).float().mean(dim=(1, 2, 3)).std() > 10  # backgrounds differ


def test_colour_cues_do_not_transfer(synthetic: DomainData, photo: DomainData) -> None:
    def pixels(split) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        return split.x.permute(0, 2, 3, 1).reshape(-1, 3).float(), split.y.flatten()

    px, py = pixels(synthetic.train)
    centroids = torch.stack([px[py == c].mean(0) for c in range(5)])

    def score(data: DomainData) -> float:
        x, y = pixels(data.test)
        return _miou(torch.cdist(x, centroids).argmin(1), y, 5)

    assert score(synthetic) > 0.9
    assert score(photo) < 0.4


# --------------------------------------------------------------------------------------- segfolder

CLASSES = ("sky", "road", "car")


def _save_pair(images: Path, masks: Path, name: str, rng: np.random.Generator, mask_hw=(20, 24)):
    arr = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    Image.fromarray(arr).save(images / f"{name}.png")
    mask = rng.integers(0, 3, size=mask_hw, dtype=np.uint8)
    mask[:3] = IGNORE_INDEX  # a void band at the top
    Image.fromarray(mask, mode="L").save(masks / f"{name}.png")


def _make_segfolder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for domain in ("day", "night"):
        images, masks = root / domain / "images", root / domain / "masks"
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(6):
            _save_pair(images, masks, f"frame{i}", rng)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / ".cache").mkdir()
    return root


@pytest.fixture
def seg_root(tmp_path: Path) -> Path:
    return _make_segfolder(tmp_path / "segdata")


def test_segfolder_reads_domain(seg_root: Path) -> None:
    made = sd.build_segfolder("day", image_size=S, seed=0, root=str(seg_root))
    assert made.name == "day" and made.class_names == list(CLASSES) and len(made.paths) == 6
    data = _domain(made)
    data.check(image_size=S)
    assert data.class_names == list(CLASSES)
    assert data.task == "segmentation"
    assert data.meta == {
        "hflip": True,
        "root": str(seg_root),
        "resize": "center-crop",
        "stored_size": S,
    }
    x, y = _all_images(data), _all_masks(data)
    assert x.shape == (6, 3, S, S) and y.shape == (6, S, S) and y.dtype == torch.int64
    # nearest resizing: only values that were in the masks, void preserved
    assert set(y.unique().tolist()) == {0, 1, 2, IGNORE_INDEX}
    assert bool((y[:, :3] == IGNORE_INDEX).all())  # top band 3/20 of 32 px rows, >= 4 rows
    assert (len(data.train), len(data.val), len(data.test)) == (4, 1, 1)
    _assert_same(data, _segfolder("day", image_size=S, seed=0, root=str(seg_root)))
    other = _segfolder("night", image_size=S, seed=0, root=str(seg_root))
    assert other.fingerprint != data.fingerprint


def test_segfolder_resize_keeps_image_and_mask_aligned(tmp_path: Path) -> None:
    # 40x20: left quarter class 1 / red, middle half class 2 / green, right quarter class 0 / blue
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    mask = np.zeros((20, 40), dtype=np.uint8)
    arr[:, :10, 0], mask[:, :10] = 255, 1
    arr[:, 10:30, 1], mask[:, 10:30] = 255, 2
    arr[:, 30:, 2] = 255
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(arr).save(tmp_path / "d" / "images" / f"{i}.jpg", quality=95)
        Image.fromarray(mask).save(tmp_path / "d" / "masks" / f"{i}.png")
    data = _segfolder("d", image_size=8, seed=0, root=str(tmp_path))
    assert data.class_names == ["0", "1", "2"]  # K = 1 + largest index
    assert bool((_all_masks(data) == 2).all())  # the center crop keeps the middle
    data = _segfolder("d", image_size=8, seed=0, root=str(tmp_path), num_classes=4)
    assert data.class_names == ["0", "1", "2", "3"]


def _colour_pairs(folder: Path, n: int = 5) -> None:
    """``n`` pairs of 40x30 images of coloured blocks whose mask is the block's colour index."""
    colours = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], np.uint8)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir(parents=True)
    for i in range(n):
        mask = np.zeros((30, 40), np.uint8)
        mask[:, 10:20], mask[:, 20:30], mask[:, 30:] = 1, 2, 3
        mask[:15] = (mask[:15] + i) % 4  # top half: shifted classes, differs per image
        Image.fromarray(colours[mask]).save(folder / "images" / f"{i}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{i}.png")


@pytest.mark.parametrize("resize", ["center-crop", "pad"])
def test_rectangular_stored_size_keeps_masks_aligned(tmp_path: Path, resize: str) -> None:
    _colour_pairs(tmp_path / "d")
    made = sd.build_segfolder("d", image_size=S, seed=0, root=str(tmp_path), resize=resize)
    data = _domain(made, (24, 16))  # (width, height)
    data.check((24, 16))
    x, y = _all_images(data).long(), _all_masks(data)
    assert x.shape[1:] == (3, 16, 24) and y.shape[1:] == (16, 24)
    assert data.meta["stored_size"] == [24, 16]
    colours = torch.tensor([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)])
    # pixels whose 3x3 neighbourhood is one class: bilinear and nearest agree there exactly
    inner = y[:, 1:-1, 1:-1]
    interior = (inner != IGNORE_INDEX) & torch.stack(
        [y[:, 1 + dr : y.shape[1] - 1 + dr, 1 + dc : y.shape[2] - 1 + dc] == inner
         for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
    ).all(0)  # fmt: skip
    assert int(interior.sum()) > 0.25 * inner.numel()
    expected = colours[inner.clamp(max=3)].permute(0, 3, 1, 2)  # the colour each mask pixel names
    near = (x[:, :, 1:-1, 1:-1] - expected).abs().amax(1) <= 2
    assert bool(near[interior].all())
    if resize == "pad":  # 40x30 fits 21x16: void columns at the sides, black there
        assert bool((y[:, :, 0] == IGNORE_INDEX).all()) and bool((x[:, :, :, 0] == 0).all())


def test_segfolder_class_file_per_domain(seg_root: Path) -> None:
    (seg_root / "night" / "classes.txt").write_text("a\nb\nc\n")
    made = sd.build_segfolder("night", image_size=S, seed=0, root=str(seg_root))
    assert made.class_names == ["a", "b", "c"]
    with pytest.raises(DatasetError, match="num_classes=5"):
        sd.build_segfolder("night", image_size=S, seed=0, root=str(seg_root), num_classes=5)


def test_segfolder_reports_layout_then_pixel_problems(seg_root: Path) -> None:
    rng = np.random.default_rng(1)
    images, masks = seg_root / "day" / "images", seg_root / "day" / "masks"
    lonely_image = images / "lonely.png"
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(lonely_image)
    lonely_mask = masks / "orphan.png"
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(lonely_mask)
    _save_pair(images, masks, "wrongsize", rng, mask_hw=(10, 12))
    _save_pair(images, masks, "outofrange", rng)
    bad = np.zeros((20, 24), np.uint8)
    bad[5, 5], bad[6, 6] = 7, 9
    Image.fromarray(bad).save(masks / "outofrange.png")
    (masks / "broken.png").write_bytes(b"not a png")
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / "broken.png")
    # the factory sees the pairing before any pixel is decoded: every such problem at once
    with pytest.raises(DatasetError) as info:
        sd.build_segfolder("day", image_size=S, seed=0, root=str(seg_root))
    msg = str(info.value)
    assert "2 problem(s)" in msg and str(seg_root / "day") in msg
    assert f"{lonely_image}: image without a mask" in msg
    assert f"{lonely_mask}: mask without an image" in msg
    assert info.value.hint
    lonely_image.unlink()
    lonely_mask.unlink()
    # the pixels' problems are the decoded files', listed by the harness with the masks named
    made = sd.build_segfolder("day", image_size=S, seed=0, root=str(seg_root))
    with pytest.raises(DatasetError) as info:
        _domain(made)
    msg = str(info.value)
    assert "3 unreadable image file(s) in domain day" in msg
    assert (
        f"{masks / 'wrongsize.png'}: mask is 12x10 px but its image wrongsize.png is 24x20" in msg
    )
    assert f"{images / 'outofrange.png'}: {masks / 'outofrange.png'}: class index 7, 9" in msg
    assert f"{masks / 'broken.png'}: not an image" in msg
    _segfolder("night", image_size=S, seed=0, root=str(seg_root))  # unaffected


def test_segfolder_lists_every_problem(seg_root: Path) -> None:
    for i in range(13):
        (seg_root / "night" / "masks" / f"extra{i:02d}.png").write_bytes(b"junk")
    with pytest.raises(DatasetError) as info:
        sd.build_segfolder("night", image_size=S, seed=0, root=str(seg_root))
    msg = str(info.value)
    assert "13 problem(s)" in msg and "more" not in msg
    assert all(f"extra{i:02d}.png" in msg for i in range(13))


def test_segfolder_colour_mask_rejected(seg_root: Path) -> None:
    path = seg_root / "day" / "masks" / "frame0.png"
    Image.new("RGB", (24, 20)).save(path)
    made = sd.build_segfolder("day", image_size=S, seed=0, root=str(seg_root))
    with pytest.raises(DatasetError, match="single-channel") as info:
        _domain(made)
    assert str(path) in str(info.value)


def test_segfolder_layout_errors(seg_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        sd.build_segfolder("day", image_size=S, seed=0, root=str(tmp_path / "missing"))
    with pytest.raises(DatasetError) as info:
        sd.build_segfolder("dusk", image_size=S, seed=0, root=str(seg_root))
    msg = str(info.value)
    assert str(seg_root / "dusk") in msg and "day, night" in msg and ".cache" not in msg
    with pytest.raises(DatasetError, match="day, night"):
        sd.build_segfolder(None, image_size=S, seed=0, root=str(seg_root))
    (seg_root / "empty" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="masks"):
        sd.build_segfolder("empty", image_size=S, seed=0, root=str(seg_root))
    (seg_root / "empty" / "masks").mkdir()
    with pytest.raises(DatasetError, match="no image/mask pairs"):
        sd.build_segfolder("empty", image_size=S, seed=0, root=str(seg_root))
    with pytest.raises(DatasetError, match="val_fraction"):
        sd.build_segfolder("day", image_size=S, seed=0, root=str(seg_root), val_fraction=0.9)
    with pytest.raises(TypeError):
        sd.build_segfolder("day", image_size=S, seed=0, root=str(seg_root), bogus=1)


def test_decoded_once_then_read_from_the_cache(seg_root: Path) -> None:
    made = sd.build_segfolder("day", image_size=S, seed=0, root=str(seg_root))
    calls: list[int] = []
    decode = made.decode

    def counted(i: int, size: tuple[int, int]):  # noqa: ANN202
        calls.append(i)
        return decode(i, size)

    made.decode = counted
    first = _domain(made, (20, 12))
    assert sorted(calls) == list(range(6))
    again = sd.build_segfolder("day", image_size=S, seed=0, root=str(seg_root))
    again.decode = counted
    _assert_same(first, _domain(again, (20, 12)))
    assert len(calls) == 6  # the second domain is the mapped cache: nothing decoded
    _domain(again, (12, 20))  # another stored size is decoded anew
    assert len(calls) == 12


# --------------------------------------------------------------------------------------- gta5 / cityscapes

#: label ids in the test masks' four quadrants and the train ids they must become
LABEL_IDS = (7, 26, 0, 33)
TRAIN_IDS = (0, 13, IGNORE_INDEX, 18)
#: the same with the 16 or 13 classes SYNTHIA shares (car and bicycle at their positions there)
SUBSET_IDS = {16: (0, 12, IGNORE_INDEX, 15), 13: (0, 9, IGNORE_INDEX, 12)}


def _label_image(values: tuple[int, int, int, int], h: int = 16, w: int = 16) -> np.ndarray:
    arr = np.empty((h, w), np.uint8)
    arr[: h // 2, : w // 2], arr[: h // 2, w // 2 :] = values[0], values[1]
    arr[h // 2 :, : w // 2], arr[h // 2 :, w // 2 :] = values[2], values[3]
    return arr


def _quadrants(y: torch.Tensor) -> list[int]:
    """The value at the centre of each quadrant of every mask, checked to be the same for all."""
    h, w = y.shape[1:]
    points = [
        (h // 4, w // 4),
        (h // 4, 3 * w // 4),
        (3 * h // 4, w // 4),
        (3 * h // 4, 3 * w // 4),
    ]
    values = torch.stack([y[:, r, c] for r, c in points], dim=1)
    assert bool((values == values[:1]).all())
    return values[0].tolist()


def _make_gta5(root: Path, n: int = 5) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            root / "images" / f"{i:05d}.png"
        )
        label = Image.fromarray(_label_image(LABEL_IDS), mode="L").convert("P")
        label.save(root / "labels" / f"{i:05d}.png")  # GTA5 labels are palette PNGs
    return root


def test_gta5_maps_label_ids(tmp_path: Path) -> None:
    root = _make_gta5(tmp_path / "gta5")
    made = sd.build_gta5(None, image_size=S, seed=0, root=str(root))
    assert made.meta == {"hflip": True, "root": str(root), "classes": 19}
    data = _domain(made)
    data.check(image_size=S)
    assert data.name == "gta5" and data.task == "segmentation"
    assert len(data.class_names) == 19 and data.class_names[13] == "car"
    y = _all_masks(data)
    assert y.shape == (5, S, S)
    assert _quadrants(y) == list(TRAIN_IDS)
    assert set(y.unique().tolist()) == {0, 13, 18, IGNORE_INDEX}
    assert len(_all_masks(_gta5(root=str(root), max_images=4))) == 4
    assert len(sd.build_gta5(None, image_size=S, seed=0, root=str(root), max_images=4).paths) == 4
    wide = _gta5((32, 18), root=str(root))  # a rectangle, as papers store GTA5 (1280x720)
    assert _all_masks(wide).shape == (5, 18, 32) and _quadrants(_all_masks(wide)) == list(TRAIN_IDS)
    with pytest.raises(DatasetError, match="no sub-domains"):
        sd.build_gta5("x", image_size=S, seed=0, root=str(root))


@pytest.mark.parametrize("classes", [16, 13])
def test_gta5_and_cityscapes_synthia_subsets(tmp_path: Path, classes: int) -> None:
    from harness_plugins.presets import synthia_classes

    names = synthia_classes(classes)[0]
    gta = _gta5(root=str(_make_gta5(tmp_path / "gta5")), classes=classes)
    cs = _cityscapes(root=str(_make_cityscapes(tmp_path / "cs")), classes=classes)
    cs_train_ids = _cityscapes(
        root=str(_make_cityscapes(tmp_path / "cs2", train_ids=True)), classes=classes
    )
    for data in (gta, cs):
        assert data.class_names == names and len(names) == classes
        assert _quadrants(_all_masks(data)) == list(SUBSET_IDS[classes])
    # train ids 1, 2, 3 (sidewalk, building, wall): wall is void with 13 classes
    expect = [1, 2, 3 if classes == 16 else IGNORE_INDEX, IGNORE_INDEX]
    assert _quadrants(_all_masks(cs_train_ids)) == expect
    # a SYNTHIA -> Cityscapes pair has one class list
    assert "terrain" not in names and "train" not in names and "truck" not in names


def test_gta5_problems(tmp_path: Path) -> None:
    root = _make_gta5(tmp_path / "gta5")
    (root / "labels" / "00001.png").unlink()
    Image.fromarray(_label_image(LABEL_IDS, 8, 8)).save(root / "labels" / "00002.png")
    Image.fromarray(_label_image(LABEL_IDS)).save(root / "labels" / "99999.png")
    with pytest.raises(DatasetError) as info:
        sd.build_gta5(None, image_size=S, seed=0, root=str(root))
    msg = str(info.value)
    assert "2 problem(s)" in msg
    assert f"{root / 'images' / '00001.png'}: image without a mask" in msg
    assert f"{root / 'labels' / '99999.png'}: mask without an image" in msg
    # max_images takes the first sorted ids: the problems beyond them are not looked at
    with pytest.raises(DatasetError, match="split empty"):
        _gta5(root=str(root), max_images=1)
    (root / "labels" / "99999.png").unlink()
    (root / "images" / "00001.png").unlink()
    with pytest.raises(DatasetError) as info:
        _gta5(root=str(root))
    assert f"{root / 'labels' / '00002.png'}: mask is 8x8 px" in str(info.value)
    with pytest.raises(DatasetError, match="not found"):
        sd.build_gta5(None, image_size=S, seed=0, root=str(tmp_path / "nowhere"))


def _make_cityscapes(root: Path, *, train_ids: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for split, cities in (("train", ("aachen", "bremen")), ("val", ("lindau",))):
        for city in cities:
            img_dir = root / "leftImg8bit" / split / city
            gt_dir = root / "gtFine" / split / city
            img_dir.mkdir(parents=True)
            gt_dir.mkdir(parents=True)
            for i in range(4):
                stem = f"{city}_{i:06d}_000019"
                Image.fromarray(rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)).save(
                    img_dir / f"{stem}_leftImg8bit.png"
                )
                Image.fromarray(_label_image(LABEL_IDS, 16, 32)).save(
                    gt_dir / f"{stem}_gtFine_labelIds.png"
                )
                Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(
                    gt_dir / f"{stem}_gtFine_color.png"
                )
                if train_ids:
                    Image.fromarray(_label_image((1, 2, 3, IGNORE_INDEX), 16, 32)).save(
                        gt_dir / f"{stem}_gtFine_labelTrainIds.png"
                    )
    return root


def test_cityscapes_label_ids(tmp_path: Path) -> None:
    root = _make_cityscapes(tmp_path / "cs")
    data = _cityscapes(root=str(root))
    data.check(image_size=S)
    assert data.name == "cityscapes" and len(data.class_names) == 19
    assert data.class_names[0] == "road" and data.class_names[18] == "bicycle"
    y = _all_masks(data)
    assert y.shape == (12, S, S)
    assert _quadrants(y) == list(TRAIN_IDS)
    train = _cityscapes("train", root=str(root))
    assert train.name == "cityscapes/train" and len(_all_masks(train)) == 8
    assert len(_all_masks(_cityscapes("val", root=str(root)))) == 4
    assert len(_all_masks(_cityscapes(root=str(root), max_images=5))) == 5
    lists = sd.build_cityscapes(None, image_size=S, seed=0, root=str(root)).meta["lists"]
    assert len(lists["train"]) == 8 and len(lists["test"]) == 4  # for protocol = "standard"
    assert set(lists["train"]).isdisjoint(lists["test"])
    with pytest.raises(DatasetError, match="available: train, val"):
        sd.build_cityscapes("test", image_size=S, seed=0, root=str(root))


def test_cityscapes_train_ids_variant(tmp_path: Path) -> None:
    root = _make_cityscapes(tmp_path / "cs", train_ids=True)
    data = _cityscapes(root=str(root))
    data.check(image_size=S)
    assert _quadrants(_all_masks(data)) == [1, 2, 3, IGNORE_INDEX]
    bad = root / "gtFine" / "val" / "lindau" / "lindau_000001_000019_gtFine_labelTrainIds.png"
    Image.fromarray(_label_image((1, 2, 19, 40), 16, 32)).save(bad)
    lonely = root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    lonely.unlink()
    with pytest.raises(DatasetError) as info:
        sd.build_cityscapes(None, image_size=S, seed=0, root=str(root))
    msg = str(info.value)
    assert "1 problem(s)" in msg
    assert "aachen_000000_000019_gtFine_labelTrainIds.png: mask without an image" in msg
    for name in ("labelTrainIds", "labelIds"):
        (lonely.parent.parent.parent.parent / "gtFine" / "train" / "aachen").joinpath(
            f"aachen_000000_000019_gtFine_{name}.png"
        ).unlink()
    made = sd.build_cityscapes(None, image_size=S, seed=0, root=str(root))
    with pytest.raises(DatasetError) as info:
        _domain(made)
    msg = str(info.value)
    assert "1 unreadable image file(s)" in msg
    image = root / "leftImg8bit" / "val" / "lindau" / "lindau_000001_000019_leftImg8bit.png"
    assert f"{image}: {bad}: class index 19, 40 out of range" in msg


def test_segfolder_resize_pad_pads_masks_with_void(seg_root: Path) -> None:
    data = _segfolder("day", image_size=S, seed=0, root=str(seg_root), resize="pad")
    assert data.meta["resize"] == "pad"
    y = _all_masks(data)  # 24x20 images at 32 px: 32x27, 2 void rows above, 3 below
    assert bool((y[:, :2] == IGNORE_INDEX).all()) and bool((y[:, -3:] == IGNORE_INDEX).all())
    assert not bool((y[:, 2:-3] == IGNORE_INDEX).all())
    assert bool((_all_images(data)[:, :, :2] == 0).all())


# --------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("seg-synthetic", {"n": 4}, "n must be an int >= 5, got 4"),
        ("seg-photo", {"scene_seed": 1.5}, "scene_seed must be an int, got 1.5"),
        ("segfolder", {"root": "r", "num_classes": 0}, "num_classes must be an int from 1 to 255"),
        (
            "segfolder",
            {"root": "r", "num_classes": 256},
            "num_classes must be an int from 1 to 255",
        ),
        ("segfolder", {"root": "r", "resize": "fit"}, "resize must be one of 'center-crop', 'pad'"),
        ("gta5", {"root": "r", "max_images": 0}, "max_images must be an int >= 1, got 0"),
        ("cityscapes", {"root": "r", "val_fraction": 1}, "val_fraction must be a number > 0 < 1"),
        ("cityscapes", {"max_images": 2}, "missing option 'root' of dataset 'cityscapes'"),
        ("gta5", {"root": "r", "classes": 15}, "classes must be one of"),
    ],
)
def test_declared_options_refuse_a_bad_value(name: str, options: dict, message: str) -> None:
    with pytest.raises(OptionError) as err:
        check_options(get_registry().get("dataset", name), options)
    assert message in str(err.value)


def test_declared_options_accept_what_the_factories_accept() -> None:
    registry = get_registry()
    check_options(registry.get("dataset", "seg-synthetic"), {"n": 5, "scene_seed": -3})
    check_options(registry.get("dataset", "seg-photo"), {"n": 400, "scene_seed": 0})
    segfolder = {"root": "r", "num_classes": 255, "resize": "pad", "val_fraction": 0.1}
    check_options(registry.get("dataset", "segfolder"), segfolder)
    check_options(registry.get("dataset", "segfolder"), {"root": "r", "num_classes": None})
    for name in ("gta5", "cityscapes"):
        check_options(registry.get("dataset", name), {"root": "r", "max_images": 1})
        for classes in (19, 16, 13):
            check_options(registry.get("dataset", name), {"root": "r", "classes": classes})
