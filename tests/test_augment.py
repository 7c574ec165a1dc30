"""Tests for the batched augmentation in ``harness.training.augment``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.training.augment import (
    POLICIES,
    Policy,
    _affine_grid,
    _affine_theta,
    augment,
    get_policy,
)

LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
GEO = Policy(name="geo", rotate=30.0, translate=0.2, scale=(0.8, 1.2))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 8, c: int = 3, h: int = 32, w: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=_gen(seed))


def _block_mask(n: int, h: int, w: int) -> torch.Tensor:
    """A 3x3 grid of classes 0..8 per image, rolled differently in each image."""
    rows = torch.arange(h).view(h, 1) * 3 // h
    cols = torch.arange(w).view(1, w) * 3 // w
    base = rows * 3 + cols
    return torch.stack([(base + i) % 9 for i in range(n)])


def test_builtin_policies_exist() -> None:
    assert {"none", "light", "strong"} <= set(POLICIES)
    assert get_policy("strong") is POLICIES["strong"]
    assert POLICIES["none"].is_identity
    assert not POLICIES["light"].is_identity


def test_unknown_policy_lists_known_names() -> None:
    with pytest.raises(ValueError, match="none, strong") as info:
        get_policy("medium")
    assert "light" in str(info.value)
    with pytest.raises(ValueError, match="medium"):
        augment(_images(), "medium")


def test_invalid_policy_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="hflip"):
        Policy(name="bad", hflip=1.5)
    with pytest.raises(ValueError, match="rotate"):
        Policy(name="bad", rotate=-1.0)
    with pytest.raises(ValueError, match="scale"):
        Policy(name="bad", scale=(1.2, 0.8))


def test_none_returns_the_same_objects() -> None:
    x = _images()
    mask = _block_mask(8, 32, 32)
    assert augment(x, "none") is x
    assert augment(x, Policy(name="zero")) is x
    out, out_mask = augment(x, POLICIES["none"], mask=mask)
    assert out is x and out_mask is mask
    # A flip-only policy is the identity when flips are not allowed.
    assert augment(x, Policy(name="f", hflip=1.0), allow_flip=False) is x


@pytest.mark.parametrize("name", ["light", "strong"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_dtype_device_and_range(name: str, dtype: torch.dtype) -> None:
    x = _images(h=24, w=40).to(dtype)
    before = x.clone()
    out = augment(x, name, generator=_gen())
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    assert torch.equal(x, before), "the input must not be modified in place"


def test_single_channel_images() -> None:
    x = _images(c=1)
    out = augment(x, "strong", generator=_gen())
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)


def test_parameters_are_drawn_per_image() -> None:
    x = _images(n=1).expand(16, -1, -1, -1).contiguous()
    out = augment(x, "strong", generator=_gen())
    flat = out.flatten(1)
    distances = torch.cdist(flat, flat)
    off_diagonal = distances[~torch.eye(16, dtype=torch.bool)]
    assert (off_diagonal > 1e-3).all(), "two copies of one image were augmented identically"


def test_reproducible_with_a_seeded_generator() -> None:
    x = _images()
    mask = _block_mask(8, 32, 32)
    a, mask_a = augment(x, "strong", generator=_gen(7), mask=mask)
    b, mask_b = augment(x, "strong", generator=_gen(7), mask=mask)
    c, _ = augment(x, "strong", generator=_gen(8), mask=mask)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(("h", "w"), [(64, 64), (48, 80)])
def test_mask_moves_with_its_image(h: int, w: int) -> None:
    n = 8
    mask = _block_mask(n, h, w)
    x = torch.zeros(n, 3, h, w)
    x[:, 0] = mask / 10
    out, out_mask = augment(x, GEO, generator=_gen(3), mask=mask)
    assert out_mask.dtype == torch.int64 and out_mask.shape == mask.shape
    valid = out_mask != 255
    assert (~valid).any(), "a 20% translation should bring in pixels from outside the image"
    assert not torch.equal(out_mask, mask)
    assert set(out_mask.unique().tolist()) <= set(range(9)) | {255}
    labels = (out[:, 0] * 10).round().long()
    # Bilinear and nearest sampling only disagree on class boundaries (about one pixel wide),
    # so require near-perfect agreement where the 3x3 neighbourhood has a single label.
    as_float = out_mask.unsqueeze(1).float()
    uniform = F.max_pool2d(as_float, 3, 1, 1) == -F.max_pool2d(-as_float, 3, 1, 1)
    interior = uniform.squeeze(1) & valid
    assert interior.float().mean() > 0.3
    assert (labels[interior] == out_mask[interior]).float().mean() > 0.999
    assert (labels[valid] == out_mask[valid]).float().mean() > 0.93
    # Control: a mask transformed with other random parameters does not match.
    _, other_mask = augment(x, GEO, generator=_gen(4), mask=mask)
    other_valid = other_mask != 255
    assert (labels[other_valid] == other_mask[other_valid]).float().mean() < 0.8


def test_photometric_policy_leaves_the_mask_alone() -> None:
    photometric = Policy(
        name="photo", brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, invert=0.5, noise=0.05
    )
    x = _images()
    mask = _block_mask(8, 32, 32)
    out, out_mask = augment(x, photometric, generator=_gen(), mask=mask)
    assert torch.equal(out_mask, mask)
    assert not torch.equal(out, x)


def test_custom_ignore_index() -> None:
    mask = _block_mask(4, 32, 32)
    _, out_mask = augment(_images(n=4), GEO, generator=_gen(), mask=mask, ignore_index=-1)
    assert (out_mask == -1).any()
    assert not (out_mask == 255).any()


def test_hflip_fast_path_is_exact_and_respects_allow_flip() -> None:
    x = _images()
    mask = _block_mask(8, 32, 32)
    flip = Policy(name="f", hflip=1.0)
    out, out_mask = augment(x, flip, generator=_gen(), mask=mask)
    assert torch.equal(out, x.flip(-1))
    assert torch.equal(out_mask, mask.flip(-1))
    assert torch.equal(augment(x, flip, generator=_gen(), allow_flip=False), x)


def test_hflip_through_the_affine_grid() -> None:
    # A negligible rotation forces the grid_sample path, which must reproduce an exact flip.
    x = _images(h=24, w=40)
    mask = _block_mask(8, 24, 40)
    flip = Policy(name="f", hflip=1.0, rotate=1e-6)
    out, out_mask = augment(x, flip, generator=_gen(), mask=mask)
    torch.testing.assert_close(out, x.flip(-1), atol=1e-5, rtol=0)
    assert torch.equal(out_mask, mask.flip(-1))
    kept = augment(x, flip, generator=_gen(), allow_flip=False)
    torch.testing.assert_close(kept, x, atol=1e-5, rtol=0)


def test_rotation_and_flip_are_rigid_on_non_square_images() -> None:
    h, w = 30, 90
    policy = Policy(name="r", rotate=45.0)
    theta = _affine_theta(policy, 0.5, 64, h, w, _gen(), torch.device("cpu"))
    # Back to pixel units: diag(W/2, H/2) @ linear @ diag(2/W, 2/H) must be orthogonal.
    to_pixels = torch.tensor([w / 2, h / 2])
    linear = theta[:, :, :2] * to_pixels.view(1, 2, 1) / to_pixels.view(1, 1, 2)
    identity = torch.eye(2).expand(64, 2, 2)
    torch.testing.assert_close(linear @ linear.transpose(1, 2), identity, atol=1e-5, rtol=0)
    assert linear[:, 0, 1].abs().max() > 0.3, "45-degree rotations were expected"
    flipped = torch.linalg.det(linear) < 0
    assert 0 < flipped.sum() < 64


def test_translation_is_in_output_pixels() -> None:
    # A bright square at the centre lands at most `translate` of the size away from the centre,
    # whatever the rotation and zoom.
    n, h, w = 64, 48, 64
    x = torch.zeros(n, 1, h, w)
    x[:, :, h // 2 - 2 : h // 2 + 2, w // 2 - 2 : w // 2 + 2] = 1.0
    policy = Policy(name="t", rotate=45.0, translate=0.15, scale=(0.5, 2.0))
    out = augment(x, policy, generator=_gen())[:, 0]
    weight = out.sum((1, 2))
    cy = (out * torch.arange(h).view(1, h, 1)).sum((1, 2)) / weight - (h - 1) / 2
    cx = (out * torch.arange(w).view(1, 1, w)).sum((1, 2)) / weight - (w - 1) / 2
    assert (cx.abs() <= 0.15 * w + 0.5).all() and (cy.abs() <= 0.15 * h + 0.5).all()
    assert cx.abs().max() > 0.1 * w and cy.abs().max() > 0.1 * h


def test_invert_with_probability_one() -> None:
    x = _images()
    out = augment(x, Policy(name="i", invert=1.0), generator=_gen())
    torch.testing.assert_close(out, 1 - x, atol=1e-6, rtol=0)


def test_grayscale_with_probability_one() -> None:
    x = _images()
    out = augment(x, Policy(name="g", grayscale=1.0), generator=_gen())
    expected = (x * LUMA).sum(1, keepdim=True).expand_as(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def _chroma(x: torch.Tensor) -> torch.Tensor:
    i = 0.596 * x[:, 0] - 0.274 * x[:, 1] - 0.322 * x[:, 2]
    q = 0.211 * x[:, 0] - 0.523 * x[:, 1] + 0.312 * x[:, 2]
    return torch.sqrt(i**2 + q**2)


def test_hue_rotates_chroma_and_saturation_scales_it() -> None:
    # Mid-grey inputs with little colour, so that no channel is clamped.
    x = 0.4 + 0.2 * _images()
    luma = (x * LUMA).sum(1)
    out = augment(x, Policy(name="h", hue=0.5), generator=_gen())
    torch.testing.assert_close((out * LUMA).sum(1), luma, atol=1e-5, rtol=0)
    torch.testing.assert_close(_chroma(out), _chroma(x), atol=1e-5, rtol=0)
    assert (out - x).abs().amax((1, 2, 3)).min() > 1e-3
    out = augment(x, Policy(name="s", saturation=0.5), generator=_gen())
    torch.testing.assert_close((out * LUMA).sum(1), luma, atol=1e-5, rtol=0)
    ratio = _chroma(out) / _chroma(x)
    assert (ratio.amax((1, 2)) - ratio.amin((1, 2))).max() < 1e-3
    assert ratio[:, 0, 0].std() > 0.01


def test_contrast_keeps_mean_luma_and_brightness_scales() -> None:
    x = 0.3 + 0.4 * _images()
    out = augment(x, Policy(name="c", contrast=0.5), generator=_gen())
    torch.testing.assert_close(
        (out * LUMA).sum(1).mean((1, 2)), (x * LUMA).sum(1).mean((1, 2)), atol=1e-5, rtol=0
    )
    inverted = augment(x, Policy(name="ci", contrast=0.5, invert=1.0), generator=_gen())
    torch.testing.assert_close(inverted, 1 - out, atol=1e-5, rtol=0)
    out = augment(x, Policy(name="b", brightness=0.4), generator=_gen())
    ratio = out / x
    assert (ratio.amax((1, 2, 3)) - ratio.amin((1, 2, 3))).max() < 1e-4
    assert ratio.flatten(1)[:, 0].std() > 0.01, "brightness factors should vary per image"


def test_cutout_zeroes_one_square() -> None:
    x = 0.5 + 0.5 * _images()  # strictly positive, so zeros can only come from the cutout
    out = augment(x, Policy(name="c", cutout=1.0), generator=_gen())
    zeros = (out == 0).all(1)
    assert (zeros.sum((1, 2)) == 8 * 8).all()
    kept = ~zeros.unsqueeze(1).expand_as(x)
    assert torch.equal(out[kept], x[kept])


def test_blur_and_noise() -> None:
    x = _images()
    blurred = augment(x, Policy(name="b", blur=1.0), generator=_gen())
    taps = torch.tensor([0.25, 0.5, 0.25])
    kernel = (taps[:, None] * taps[None, :]).expand(3, 1, 3, 3)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    torch.testing.assert_close(blurred, expected, atol=1e-6, rtol=0)
    assert blurred.std() < x.std() * 0.8
    # The blur keeps a constant image constant, borders included.
    flat = torch.full((2, 3, 16, 16), 0.5)
    torch.testing.assert_close(augment(flat, Policy(name="b", blur=1.0)), flat)
    flat = torch.full((4, 3, 64, 64), 0.5)
    noisy = augment(flat, Policy(name="n", noise=0.05), generator=_gen())
    assert 0.04 < (noisy - 0.5).std() < 0.06
    assert (flat == 0.5).all()  # noise alone adds into a new tensor, not into the input


@pytest.mark.parametrize("shape", [(32, 32), (17, 40), (1, 5)])
def test_the_sampling_grid_is_torchs_affine_grid(shape) -> None:
    h, w = shape
    theta = _affine_theta(POLICIES["strong"], 0.5, 16, h, w, _gen(), torch.device("cpu"))
    expected = F.affine_grid(theta, [16, 3, h, w], align_corners=False)
    assert torch.equal(
        _affine_grid(theta, h, w), expected
    )  # the same floats: augmented numbers do not move
    identity = torch.eye(2, 3).expand(16, 2, 3).contiguous()
    assert torch.equal(
        _affine_grid(identity, h, w), F.affine_grid(identity, [16, 3, h, w], align_corners=False)
    )


def test_mask_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="mask"):
        augment(_images(), GEO, mask=torch.zeros(8, 1, 32, 32, dtype=torch.long))
