"""Tests of the domain-generalization datasets: rotated-digits and digit-styles."""

from __future__ import annotations

import pytest
import torch

from harness.api import DatasetError, DomainData
from harness.registry import UnknownPluginError, check_domain, get_registry
from harness_plugins import dg_datasets as dg
from harness_plugins.datasets import _digit_labels

N_DIGITS = 1797
SIZE = 16


def _index(data: DomainData, part: torch.Tensor | None = None) -> torch.Tensor:
    """The domain's rows in its part (its splits are views of it), or in the 1,797 digits when
    ``part`` (the part's indices among them) is given."""
    local = torch.cat([s.index for s in (data.train, data.val, data.test)])
    return local if part is None else part[local]


def _images(data: DomainData) -> torch.Tensor:
    return torch.cat([data.train.x, data.val.x, data.test.x])


def _labels(data: DomainData) -> torch.Tensor:
    return torch.cat([data.train.y, data.val.y, data.test.y])


def _orientation(x: torch.Tensor) -> torch.Tensor:
    """Each image's principal-axis angle in degrees (counter-clockwise, y up), from its second
    moments: an independent measure of how a digit is turned."""
    w = x.float()[:, 0]
    h, wd = w.shape[1:]
    yy, xx = torch.meshgrid(-torch.arange(h).float(), torch.arange(wd).float(), indexing="ij")
    mass = w.sum((1, 2))
    dx = xx - ((w * xx).sum((1, 2)) / mass)[:, None, None]
    dy = yy - ((w * yy).sum((1, 2)) / mass)[:, None, None]
    mu20, mu02, mu11 = (
        (w * dx * dx).sum((1, 2)),
        (w * dy * dy).sum((1, 2)),
        (w * dx * dy).sum((1, 2)),
    )
    return torch.rad2deg(0.5 * torch.atan2(2 * mu11, mu20 - mu02))


@pytest.mark.parametrize(
    ("name", "domains", "build"),
    [
        ("rotated-digits", dg.ANGLES, dg.build_rotated_digits),
        ("digit-styles", dg.STYLES, dg.build_digit_styles),
    ],
)
def test_domains_are_disjoint_parts_sharing_classes(name, domains, build) -> None:
    entry = get_registry().get("dataset", name)
    assert list(entry.meta["domains"]) == list(domains)
    pools = dg.domain_parts(N_DIGITS, len(domains), 0)
    seen: set[int] = set()
    for d, pool in zip(domains, pools, strict=True):
        data = build(d, image_size=SIZE, seed=0)
        data.check(image_size=SIZE)
        assert data.name == f"{name}/{d}"
        assert data.class_names == [str(i) for i in range(10)]
        assert sorted(_labels(data).unique().tolist()) == list(range(10))
        rows = set(_index(data, pool).tolist())
        assert len(rows) == len(pool)  # train, val and test cover the part without overlap
        assert not rows & seen, f"{d} shares digits with another domain"
        seen |= rows
        assert abs(len(rows) - N_DIGITS / len(domains)) <= 1
        # the labels are those of the digits the part holds
        assert torch.equal(_labels(data), _digit_labels()[_index(data, pool)])
    assert seen == set(range(N_DIGITS))  # every digit in exactly one domain


def test_parts_are_deterministic_and_seeded() -> None:
    a = dg.build_rotated_digits("30", image_size=SIZE, seed=0)
    b = dg.build_rotated_digits("30", image_size=SIZE, seed=0)
    assert a.fingerprint == b.fingerprint
    assert torch.equal(_images(a), _images(b))
    other_split = dg.build_rotated_digits("30", image_size=SIZE, seed=1)
    assert torch.equal(
        torch.sort(_images(other_split).flatten(1), 0).values,
        torch.sort(_images(a).flatten(1), 0).values,
    )  # same part: same images
    assert not torch.equal(other_split.test.index, a.test.index)  # split differently
    other_part = dg.build_rotated_digits("30", image_size=SIZE, seed=0, part_seed=1)
    assert other_part.fingerprint != a.fingerprint
    parts = dg.domain_parts(N_DIGITS, 6, 0)
    assert not torch.equal(parts[2], dg.domain_parts(N_DIGITS, 6, 1)[2])
    assert [len(p) for p in parts] == [300, 300, 300, 299, 299, 299]


def test_rotation_rotates() -> None:
    boxed = dg.boxed_strokes(32)
    # a quarter turn is exact: torch.rot90 from the rows towards the columns is counter-clockwise
    assert torch.equal(dg.rotated(boxed, 90.0), torch.rot90(boxed, 1, (-2, -1)))
    assert torch.equal(dg.rotated(boxed, 0.0), boxed)
    for angle in (15, 45, 75):
        turned = _orientation(dg.rotated(boxed, float(angle))) - _orientation(boxed)
        turned = (turned + 90) % 180 - 90
        assert abs(float(turned.median()) - angle) < 1.0
    # the box keeps every digit whole: no ink lost at 45 degrees
    ink = boxed.float().sum((1, 2, 3))
    assert torch.allclose(dg.rotated(boxed, 45.0).float().sum((1, 2, 3)), ink, rtol=0.03)


def test_rotated_domain_holds_its_part_rotated_by_its_angle() -> None:
    data = dg.build_rotated_digits("45", image_size=32, seed=0)
    index = _index(data, dg.domain_parts(N_DIGITS, 6, 0)[3])
    expected = dg.rotated(dg.boxed_strokes(32)[index], 45.0).repeat(1, 3, 1, 1)
    assert torch.equal(_images(data), expected)
    assert torch.equal(_images(data)[:, 0], _images(data)[:, 2])  # grey


def test_styles_differ_as_described() -> None:
    plain = dg.styled("plain", SIZE)
    assert torch.equal(dg.styled("inverted", SIZE), 255 - plain)
    sketch = dg.styled("sketch", SIZE).float()
    assert sketch.amax((1, 2, 3)).eq(255).all()  # each outline scaled to white
    # the outline is bright where the stroke changes, dark inside thick strokes and far outside
    solid = plain[:, 0] > 200
    assert sketch[:, 0][solid].mean() < sketch[:, 0].mean() * 1.5
    photo = dg.styled("photo", SIZE)
    assert not torch.equal(photo[:, 0], photo[:, 1])  # colour
    assert photo.float().std() > plain.float().std() * 0.5


def test_bad_domains_are_refused() -> None:
    with pytest.raises(DatasetError, match="rotated-digits has domains 0, 15"):
        dg.build_rotated_digits(None, image_size=SIZE, seed=0)
    with pytest.raises(DatasetError, match="digit-styles has domains plain"):
        dg.build_digit_styles("cartoon", image_size=SIZE, seed=0)
    with pytest.raises(UnknownPluginError, match="unknown domain"):
        check_domain(get_registry().get("dataset", "rotated-digits"), "90")
    with pytest.raises(DatasetError, match="val_fraction"):
        dg.build_rotated_digits("0", image_size=SIZE, seed=0, val_fraction=0.5, test_fraction=0.5)
