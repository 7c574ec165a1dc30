"""Presets for the standard domain-adaptation and domain-generalization benchmarks, read in the
layouts they are distributed in: Office-31, Office-Home, PACS, VLCS, TerraIncognita (DomainBed's
folders), VisDA-2017 and DomainNet (with their official lists), and SYNTHIA-RAND-CITYSCAPES.

Each domain is checked against the known class list (a missing or unknown class folder stops the
run) and image count (a different count is one warning: a partial copy still runs, but its numbers
do not compare with published ones). ``root`` defaults to ``$HARNESS_DATA/<DomainBed's folder
name>``. Classification presets return :class:`harness.api.ImageFiles`, which the harness decodes
once into its cache; so does ``synthia`` (image/label pairs, read like ``gta5``'s).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_png

from harness import hookimpl
from harness.api import IGNORE_INDEX, DatasetError, ImageFiles, Option, Register
from harness_plugins import preset_lists as lists
from harness_plugins.datasets import RESIZE_OPTION, split_options
from harness_plugins.images import (
    check_options,
    check_resize,
    class_files,
    dataset_root,
    no_domain,
    orientation,
    split_fractions,
    subfolders,
    visible_files,
)
from harness_plugins.preset_lists import ALIASES, PRESETS, Preset
from harness_plugins.seg_files import (
    decode_pair_file,
    files_key,
    raise_problems,
    require_pairs,
    stem_pairs,
    street_classes,
)

__all__ = ["PRESETS", "Preset", "build_synthia", "default_root", "register_datasets"]

#: the environment variable under which a preset's default root folder lies
DATA_ENV = "HARNESS_DATA"
#: how many missing files an error lists
SHOWN = 5


SYNTHIA_FOLDER = "RAND_CITYSCAPES"
_SYNTHIA_LAYOUT = "root/RGB/<id>.png and root/GT/LABELS/<id>.png"


def _preset_options(preset: str, layout: str) -> dict[str, Option]:
    return {
        "root": Option(
            str,
            default=None,
            help=f"the folder laid out as {layout} (default: ${DATA_ENV}/{preset})",
        ),
        **split_options(),
        "skip_bad_files": Option(
            bool,
            default=False,
            help="leave unreadable images out with a warning instead of stopping",
        ),
        "resize": RESIZE_OPTION,
    }


@hookimpl
def register_datasets(register: Register) -> None:
    """Register the classification presets and ``synthia``."""
    for p in PRESETS.values():
        n = len(p.classes)
        register(
            p.name,
            _classification_factory(p),
            description=f"{p.title} ({', '.join(p.counts)}; {n} classes), as distributed",
            tasks=("classification",),
            domains=tuple(p.counts),
            options=_preset_options(p.folder, p.layout),
        )
    register(
        "synthia",
        build_synthia,
        description="SYNTHIA-RAND-CITYSCAPES (RGB, GT/LABELS) mapped to 16 or 13 Cityscapes classes",
        tasks=("segmentation",),
        options={
            **_preset_options(SYNTHIA_FOLDER, _SYNTHIA_LAYOUT),
            "classes": Option(
                int, choices=(16, 13), default=16, help="the 16- or 13-class benchmark"
            ),
            "max_images": Option(
                int,
                min=1,
                default=None,
                help="keep the first N images in sorted order (default: all)",
            ),
        },
    )


def default_root(folder: str, root: str | None) -> str:
    """``root`` itself, or ``$HARNESS_DATA/<folder>`` when it is not given."""
    return f"${DATA_ENV}/{folder}" if root is None else root


# --------------------------------------------------------------------------------------- classification


def _classification_factory(p: Preset) -> Callable[..., ImageFiles]:
    """The factory of preset ``p`` (its options are those of ``_preset_options``)."""

    def build(
        domain: str | None,
        *,
        image_size: int,
        seed: int,
        root: str | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        skip_bad_files: bool = False,
        resize: str = "center-crop",
    ) -> ImageFiles:
        check_options(image_size)
        check_resize(resize)
        fractions = split_fractions(p.name, val_fraction, test_fraction)
        root_path = dataset_root(default_root(p.folder, root), p.name, p.layout)
        domain = _known_domain(p, root_path, domain)
        if p.lists == "visda":
            paths, labels, official = _visda_files(p, root_path, domain)
        elif p.lists == "domainnet":
            paths, labels, official = _domainnet_files(p, root_path, domain)
        else:
            paths, labels, official = *_folder_files(p, root_path, domain), None
        _check_count(p, domain, len(paths))
        meta = {"hflip": True, "root": str(root_path), "resize": resize, "preset": p.name}
        if official is not None:
            meta["lists"] = official
        return ImageFiles(
            name=f"{p.name}/{domain}",
            class_names=list(p.classes),
            paths=paths,
            labels=labels,
            splits=None,
            fractions=fractions,
            resize=resize,
            skip_bad_files=skip_bad_files,
            key=f"{p.name}/{domain}",
            meta=meta,
        )

    build.__name__ = build.__qualname__ = f"build_{p.name.replace('-', '_')}"
    build.__doc__ = f"One domain of {p.title} laid out as {p.layout}, checked against its classes."
    return build


def _known_domain(p: Preset, root_path: Path, domain: str | None) -> str:
    """``domain`` when it is one of the preset's, or a DatasetError naming them."""
    if domain in p.counts:
        return domain  # type: ignore[return-value]
    known = ", ".join(p.counts)
    got = "no domain" if domain is None else f"{p.name}/{domain}"
    raise DatasetError(
        f"{p.name} has domains {known}; got {got} (root {root_path})",
        hint=f"name a domain as {p.name}/<domain>",
    )


def _domain_dir(p: Preset, root_path: Path, domain: str) -> Path:
    """The folder of ``domain`` (one of its distributed names), or a DatasetError saying where
    it looked and which of the preset's domains are there."""
    for name in ALIASES.get((p.name, domain), (domain,)):
        if (root_path / name).is_dir():
            return root_path / name
    looked = " or ".join(str(root_path / n) for n in ALIASES.get((p.name, domain), (domain,)))
    there = [
        d for d in p.counts if any((root_path / n).is_dir() for n in ALIASES.get((p.name, d), (d,)))
    ]
    raise DatasetError(
        f"{p.name}: domain folder not found: {looked}; domains there: {', '.join(there) or 'none'}",
        hint=f"set root to the folder laid out as {p.layout}",
    )


def _check_classes(p: Preset, where: Path, found: Sequence[str]) -> None:
    """A DatasetError naming the missing and the unknown class folders, if there are any."""
    missing = [c for c in p.classes if c not in set(found)]
    unknown = sorted(set(found) - set(p.classes))
    if missing or unknown:
        raise DatasetError(
            f"{p.name}: class folders of {where} differ from {p.title}'s {len(p.classes)} classes: "
            f"missing {', '.join(missing) or 'none'}; unknown {', '.join(unknown) or 'none'}",
            hint="use the dataset as distributed (its folder names), or the folder plugin",
        )


def _check_count(p: Preset, domain: str, n: int) -> None:
    """One warning line when a domain does not hold its known number of images."""
    expected = p.counts[domain]
    if n != expected:
        warnings.warn(
            f"{p.name}/{domain}: found {n} images, expected {expected} (the distributed dataset); "
            "results will not compare with published ones",
            stacklevel=3,
        )


def _folder_files(p: Preset, root_path: Path, domain: str) -> tuple[list[Path], list[int]]:
    """Every image of a domain laid out as ``<domain>/[below/]<class>/``, labelled by class."""
    class_dir = _domain_dir(p, root_path, domain)
    class_dir = class_dir / p.below if p.below else class_dir
    if not class_dir.is_dir():
        raise DatasetError(
            f"{p.name}: folder not found: {class_dir}", hint=f"lay it out as {p.layout}"
        )
    _check_classes(p, class_dir, subfolders(class_dir))
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(p.classes):
        files, _ = class_files(class_dir / name)
        paths += files
        labels += [label] * len(files)
    return paths, labels


# --------------------------------------------------------------------------------------- official lists


def _read_list(p: Preset, list_file: Path) -> list[tuple[str, int, int]]:
    """``(relative path, label, line number)`` of each line ``<path> <label>`` of a list file."""
    try:
        text = list_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{p.name}: cannot read list file {list_file}: {exc}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        label = int(parts[1]) if len(parts) == 2 and parts[1].lstrip("-").isdigit() else None
        if label is None or not 0 <= label < len(p.classes):
            raise DatasetError(
                f"{list_file}:{number}: expected '<path> <label>' with a label 0..{len(p.classes) - 1}, "
                f"got {line.strip()!r}",
                hint="use the official list files (the test list of VisDA-2017 has no labels)",
            )
        entries.append((parts[0], label, number))
    return entries


def _check_entries(
    p: Preset, list_file: Path, entries: list[tuple[str, int, int]], class_part: int
) -> None:
    """Refuse a line whose path's class folder (component ``class_part``) is another class than
    the one its label names."""
    for rel, label, number in entries:
        parts = rel.split("/")
        name = parts[class_part] if len(parts) > class_part + 1 else None
        if name in p.classes and name != p.classes[label]:
            raise DatasetError(
                f"{list_file}:{number}: {rel} is labelled {label} ({p.classes[label]}) but lies "
                f"in class folder {name}",
                hint=f"the label ids must be {p.title}'s official ones",
            )


def _check_coverage(p: Preset, where: str, labels: Sequence[int]) -> None:
    """Refuse lists that name no image of some class."""
    seen = set(labels)
    missing = [c for i, c in enumerate(p.classes) if i not in seen]
    if missing:
        raise DatasetError(
            f"{p.name}: {where} name(s) no image of class(es) {', '.join(missing[:SHOWN])}"
            + (f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""),
            hint="use the official list files, complete",
        )


def _existing(p: Preset, base: Path, rels: Sequence[str]) -> list[Path]:
    """``base / rel`` for each listed file, or a DatasetError naming the first missing ones."""
    paths = [base / rel for rel in rels]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        shown = ", ".join(str(m) for m in missing[:SHOWN])
        more = f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
        raise DatasetError(
            f"{p.name}: {len(missing)} listed file(s) not found: {shown}{more}",
            hint="extract the whole domain archive under root",
        )
    return paths


def _visda_files(p: Preset, root_path: Path, domain: str) -> tuple[list[Path], list[int], dict]:
    """A VisDA-2017 domain from ``root/<domain>/image_list.txt``; one list, so train = test."""
    domain_dir = _domain_dir(p, root_path, domain)
    list_file = domain_dir / "image_list.txt"
    if not list_file.is_file():
        raise DatasetError(
            f"{p.name}: list file not found: {list_file}", hint=f"lay the data out as {p.layout}"
        )
    entries = _read_list(p, list_file)
    _check_entries(p, list_file, entries, 0)
    _check_coverage(p, str(list_file), [label for _, label, _ in entries])
    paths = _existing(p, domain_dir, [rel for rel, _, _ in entries])
    every = list(range(len(paths)))
    return paths, [label for _, label, _ in entries], {"train": every, "test": list(every)}


def _domainnet_files(p: Preset, root_path: Path, domain: str) -> tuple[list[Path], list[int], dict]:
    """A DomainNet domain from the official ``root/<domain>_train.txt`` and ``_test.txt``."""
    domain_dir = _domain_dir(p, root_path, domain)
    _check_classes(p, domain_dir, subfolders(domain_dir))
    files = {split: root_path / f"{domain}_{split}.txt" for split in ("train", "test")}
    absent = [str(f) for f in files.values() if not f.is_file()]
    if absent:
        there = sorted(f.name for f in visible_files(root_path) if f.suffix == ".txt")
        raise DatasetError(
            f"{p.name}: list file(s) not found: {', '.join(absent)}; list files there: "
            f"{', '.join(there) or 'none'}",
            hint="put the official <domain>_train.txt and <domain>_test.txt beside the domain folders",
        )
    entries = {split: _read_list(p, f) for split, f in files.items()}
    for split, f in files.items():
        _check_entries(p, f, entries[split], 1)
    every = entries["train"] + entries["test"]
    _check_coverage(p, f"{files['train']} and {files['test']}", [label for _, label, _ in every])
    paths = _existing(p, root_path, [rel for rel, _, _ in every])
    n_train = len(entries["train"])
    official = {"train": list(range(n_train)), "test": list(range(n_train, len(every)))}
    return paths, [label for _, label, _ in every], official


# --------------------------------------------------------------------------------------- synthia


def synthia_classes(classes: int) -> tuple[list[str], np.ndarray]:
    """The class names of the 16- or 13-class benchmark (Cityscapes' names, in train-id order)
    and the table SYNTHIA id -> class index (255 = void) for ids 0..65535."""
    names, train_lut = street_classes(classes)
    lut = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
    for synthia_id, train_id in lists.SYNTHIA_TO_TRAIN_ID.items():
        lut[synthia_id] = train_lut[train_id]
    return names, lut


def build_synthia(
    domain: str | None,
    *,
    image_size: int,
    seed: int,
    root: str | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    skip_bad_files: bool = False,
    resize: str = "center-crop",
    classes: int = 16,
    max_images: int | None = None,
) -> ImageFiles:
    """SYNTHIA-RAND-CITYSCAPES: ``root/RGB/<id>.png`` with ``root/GT/LABELS/<id>.png``, whose
    first (16-bit) channel is the SYNTHIA class id, mapped to the 16 (or 13) classes it shares
    with Cityscapes; every other id is void (255). The pairs are listed here and decoded once by
    the harness into its cache. A lone image or label, or an unreadable pair, stops the run
    unless ``skip_bad_files`` leaves it out with a warning."""
    no_domain("synthia", domain)
    check_options(image_size, max_images)
    check_resize(resize)
    if classes not in (16, 13):
        raise DatasetError(f"synthia classes must be 16 or 13, got {classes}")
    fractions = split_fractions("synthia", val_fraction, test_fraction)
    root_path = dataset_root(default_root(SYNTHIA_FOLDER, root), "synthia", _SYNTHIA_LAYOUT)
    images_dir, labels_dir = root_path / "RGB", root_path / "GT" / "LABELS"
    if not (images_dir.is_dir() and labels_dir.is_dir()):
        raise DatasetError(
            f"synthia: folder not found: {images_dir if not images_dir.is_dir() else labels_dir}",
            hint=f"set root to the folder laid out as {_SYNTHIA_LAYOUT}",
        )
    names, lut = synthia_classes(classes)
    pairs, problems = stem_pairs(images_dir, labels_dir, "label", max_images)
    if problems and skip_bad_files:
        warnings.warn(f"synthia: {len(problems)} bad pair(s) left out: {problems[0]}", stacklevel=2)
        problems = []
    raise_problems(root_path, problems)
    require_pairs(pairs, root_path)
    read_label = functools.partial(_synthia_label, lut)
    return ImageFiles(
        name="synthia",
        class_names=names,
        paths=[image for image, _ in pairs],
        fractions=fractions,
        resize=resize,
        skip_bad_files=skip_bad_files,
        key=files_key(["synthia", classes], [label for _, label in pairs]),
        meta={"hflip": True, "root": str(root_path), "classes": classes},
        task="segmentation",
        decode=functools.partial(decode_pair_file, pairs, read_label, resize),
    )


def _synthia_label(lut: np.ndarray, path: Path) -> tuple[Image.Image, Image.Transpose | None]:
    """A label's first channel mapped by ``lut`` and its own EXIF orientation (PIL reads 16-bit
    colour PNGs as 8 bits, so the ids are decoded by torchvision, which keeps all 16)."""
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    ids = decode_png(data, mode=ImageReadMode.UNCHANGED)[0].numpy().astype(np.int64)
    with Image.open(path) as im:
        own = orientation(im)
    return Image.fromarray(lut[ids], mode="L"), own
