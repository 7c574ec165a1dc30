"""The decoded-image cache, index-view splits, the protocols and where a domain lives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.api import DatasetError, ImageFiles
from harness.data import cache
from harness.data.domains import as_domain
from harness.data.placement import decide, place
from harness.data.splits import standard_rows
from harness.errors import CacheError

CLASSES = ("a", "b", "c")


def _tree(root: Path, per_class: int = 6, size: tuple[int, int] = (20, 14)) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for cls in CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / cls / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return paths


def _files(paths: list[Path], **kw) -> ImageFiles:
    labels = [CLASSES.index(p.parent.name) for p in paths]
    return ImageFiles(name="d", class_names=list(CLASSES), paths=paths, labels=labels, **kw)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _load(files: ImageFiles, root: Path, lines: list[str] | None = None, size: int = 8):
    log = (lambda s: lines.append(s)) if lines is not None else (lambda s: None)
    return cache.load_decoded(files, size, "k", log, root)


def test_decoded_once_then_mapped(tmp_path: Path, root: Path) -> None:
    paths = _tree(tmp_path / "d")
    lines: list[str] = []
    first = _load(_files(paths), root, lines)
    assert first.built and any("18 images decoded" in s for s in lines)
    second = _load(_files(paths), root, lines)
    assert not second.built and torch.equal(first.images, second.images)
    assert second.images.shape == (18, 3, 8, 8) and second.digest == first.digest
    # the pixels are the harness's reader's, row by row
    from harness.data.decode import read_image

    pixels, _ = read_image(paths[4], image_size=8)
    assert torch.equal(second.images[4], torch.from_numpy(pixels).permute(2, 0, 1))
    assert sorted(p.suffix for p in root.iterdir()) == [".json", ".lock", ".u8"]


def test_a_changed_added_or_removed_file_rebuilds(tmp_path: Path, root: Path) -> None:
    paths = _tree(tmp_path / "d")
    base = _load(_files(paths), root)
    Image.new("RGB", (20, 14), (255, 0, 0)).save(paths[0])
    os.utime(paths[0], ns=(1, 1))
    changed = _load(_files(paths), root)
    assert changed.built and changed.key != base.key
    assert changed.images[0].float().mean() != base.images[0].float().mean()
    assert _load(_files(paths[1:]), root).built
    extra = tmp_path / "d" / "a" / "new.png"
    Image.new("RGB", (9, 9)).save(extra)
    assert _load(_files([*paths, extra]), root).built
    assert not _load(_files(paths), root).built  # the changed listing is cached under its key


@pytest.mark.parametrize("damage", ["truncate", "json", "format"])
def test_a_corrupt_or_foreign_cache_is_rebuilt_with_one_line(
    tmp_path: Path, root: Path, damage: str
) -> None:
    paths = _tree(tmp_path / "d")
    built = _load(_files(paths), root)
    expected = built.images.clone()
    meta = built.path.with_suffix(".json")
    if damage == "truncate":
        with open(built.path, "r+b") as fh:
            fh.truncate(100)
    elif damage == "json":
        meta.write_text("{not json")
    else:
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": "decoded-v0"}))
    lines: list[str] = []
    again = _load(_files(paths), root, lines)
    assert again.built and torch.equal(again.images, expected)
    said = [s for s in lines if "unusable" in s]
    assert len(said) == 1 and str(built.path) in said[0] and "rebuilding" in said[0]


def test_a_build_killed_midway_leaves_nothing_trusted(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _tree(tmp_path / "d")
    real = cache.read_image
    calls = []

    def dies(path, **kw):
        calls.append(path)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(path, **kw)

    monkeypatch.setattr(cache, "read_image", dies)
    with pytest.raises(KeyboardInterrupt):
        _load(_files(paths), root)
    assert [p.suffix for p in root.iterdir()] == [".lock"]  # no temp file, no description
    monkeypatch.setattr(cache, "read_image", real)
    assert _load(_files(paths), root).built


def test_two_processes_decode_a_domain_once(tmp_path: Path, root: Path) -> None:
    _tree(tmp_path / "d", per_class=40, size=(64, 48))
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from harness.api import ImageFiles
        from harness.data.cache import load_decoded
        paths = sorted(Path({str(tmp_path / "d")!r}).rglob("*.png"))
        files = ImageFiles("d", ["a", "b", "c"], paths, [0] * len(paths))
        got = load_decoded(files, 32, "k", print, Path({str(root)!r}))
        print("BUILT" if got.built else "MAPPED", got.digest)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    finals = [o.strip().splitlines()[-1].split() for o in outs]
    assert sorted(f[0] for f in finals) == ["BUILT", "MAPPED"]
    assert finals[0][1] == finals[1][1]
    assert sum(o.count("images decoded") for o in outs) == 1


def test_unwritable_directory_and_full_disk_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _tree(tmp_path / "d")
    blocked = tmp_path / "a-file"  # a directory cannot be made under a file, even by root
    blocked.write_text("")
    with pytest.raises(CacheError, match=f"cannot write to {blocked / 'c'}") as info:
        _load(_files(paths), blocked / "c")
    assert "HARNESS_CACHE_DIR" in info.value.hint
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _: usage(10, 10, 1000))
    with pytest.raises(CacheError) as info:
        _load(_files(paths), tmp_path / "full")
    assert str(tmp_path / "full") in str(info.value) and "GiB" in str(info.value)
    assert "HARNESS_CACHE_DIR" in info.value.hint
    assert list((tmp_path / "full").glob("*.u8")) == []


def test_bad_files_are_listed_from_the_cache_too(tmp_path: Path, root: Path) -> None:
    paths = _tree(tmp_path / "d")
    paths[2].write_bytes(b"junk")
    paths[9].write_bytes(b"")
    for _ in range(2):  # decoded, then read from the cache's description
        with pytest.raises(DatasetError) as info:
            as_domain(_files(paths), 8, seed=0, log=lambda _: None)
        text = str(info.value)
        assert "2 unreadable" in text and f"{paths[2]}: not an image" in text
        assert f"{paths[9]}: empty file" in text
    with pytest.warns(UserWarning, match="skip_bad_files"):
        data = as_domain(_files(paths, skip_bad_files=True), 8, seed=0, log=lambda _: None)
    rows = torch.cat([data.train.index, data.val.index, data.test.index])
    assert sorted(rows.tolist()) == [i for i in range(18) if i not in (2, 9)]


def test_splits_are_views_of_one_mapped_store(tmp_path: Path) -> None:
    data = as_domain(_files(_tree(tmp_path / "d")), 8, seed=0, log=lambda _: None)
    stores = {id(s.store_x) for s in (data.train, data.val, data.test)}
    assert len(stores) == 1 and data.train.index is not None
    assert data.train.key and data.train.x.shape == (len(data.train), 3, 8, 8)
    # the split and its labels: stratified 60/20/20 over the classes
    assert (len(data.train), len(data.val), len(data.test)) == (12, 3, 3)
    x, y = data.val.take(torch.tensor([2, 0]))
    assert torch.equal(x, data.val.x[[2, 0]]) and torch.equal(y, data.val.y[[2, 0]])
    assert data.meta["stored_size"] == 8


def test_standard_protocol_trains_and_tests_on_every_target_image() -> None:
    good = torch.arange(10)
    labels = torch.tensor([0, 1] * 5)
    train, val, test = standard_rows(good, labels, None, "target", 0.2, 0)
    assert train.tolist() == val.tolist() == test.tolist() == list(range(10))
    train, val, test = standard_rows(good, labels, None, "source", 0.2, 0)
    assert sorted(train.tolist() + val.tolist()) == list(range(10)) and len(val) == 2
    lists = {"train": [0, 1, 2, 3, 4, 5], "test": [6, 7, 8, 9]}
    train, _, test = standard_rows(good, labels, lists, "target", 0.2, 0)
    assert train.tolist() == [0, 1, 2, 3, 4, 5] and test.tolist() == [6, 7, 8, 9]


def test_placement_decides_by_the_share_of_free_device_memory() -> None:
    assert decide(10, None, "auto", 0.5)[0] == "host"  # the CPU: nothing moves
    assert decide(40, 100, "auto", 0.5)[0] == "device"
    where, figures = decide(60, 100, "auto", 0.5)
    assert where == "host" and figures == {
        "bytes": 60,
        "placement": "auto",
        "free_bytes": 100,
        "device_share": 0.5,
    }
    assert decide(60, 100, "device", 0.5)[0] == "device"
    assert decide(1, 100, "stream", 0.5)[0] == "host"


def test_forced_streaming_is_logged_and_recorded(tmp_path: Path) -> None:
    data = as_domain(_files(_tree(tmp_path / "d")), 8, seed=0, log=lambda _: None)
    lines: list[str] = []
    placed = place(data, torch.device("cpu"), "stream", 0.5, lines.append)
    assert placed.meta["placement"]["where"] == "host" and "streamed" in lines[0]
    assert place(data, torch.device("cpu"), "auto", 0.5, lines.append).meta == data.meta


def test_a_run_keeps_its_mapped_copy_when_the_files_or_the_cache_change(
    tmp_path: Path, root: Path
) -> None:
    paths = _tree(tmp_path / "d")
    mapped = _load(_files(paths), root)
    before = mapped.images.clone()
    mapped.path.with_suffix(".json").write_text("{}")  # another process rebuilds the cache file
    rebuilt = _load(_files(paths), root)
    assert rebuilt.built and rebuilt.path == mapped.path  # renamed over the file this run maps
    for path in paths[:5]:
        path.unlink()  # and the dataset root changes under the run
    assert torch.equal(mapped.images, before)  # the run reads what it mapped


def test_a_killed_builds_leftover_is_cleared_by_the_next_build(tmp_path: Path, root: Path) -> None:
    paths = _tree(tmp_path / "d")
    key = cache.cache_key(_files(paths), 8, "k")
    root.mkdir(parents=True)
    orphan = root / f".{key}.u8.abc123.tmp"  # what SIGKILL leaves: allocated, never renamed
    orphan.write_bytes(b"\0" * 4096)
    assert _load(_files(paths), root).built
    assert not orphan.exists()


def test_options_that_only_split_do_not_change_the_cached_pixels_key() -> None:
    from harness.registry import get_registry
    from harness.search.domains import pixels_key
    from harness.search.resolve import DomainRef

    entry = get_registry().get("dataset", "folder")

    def ref(**options) -> DomainRef:
        return DomainRef("mine/a", entry, "a", {"root": "/data", **options})

    assert pixels_key(ref()) == pixels_key(ref(val_fraction=0.3, skip_bad_files=True))
    assert pixels_key(ref()) != pixels_key(ref(resize="pad"))
    assert "transfer-harness" in pixels_key(ref())  # the plugin's distribution and version
