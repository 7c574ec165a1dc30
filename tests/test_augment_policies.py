"""Searched augmentation policies (RandAugment, TrivialAugment) and MixUp/CutMix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.training import augment_policies
from harness.training.augment import (
    AUGMENT_OPS,
    MAX_MAGNITUDE,
    SearchedPolicy,
    augment,
    check_ops,
    get_policy,
    rand_policy,
    randaugment_policy,
    trivialaugment_policy,
)
from harness.training.mixing import mix

GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y", "zoom", "hflip")
NOT_GEOMETRIC = tuple(op for op in AUGMENT_OPS if op not in (*GEOMETRIC, "identity"))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 16, c: int = 3, h: int = 32, w: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=_gen(seed))


def _block_mask(n: int, k: int = 4, h: int = 32, w: int = 32) -> torch.Tensor:
    """A k x k grid of classes 0..k*k-1 per image, rolled differently in each image."""
    rows = torch.arange(h).view(h, 1) * k // h
    cols = torch.arange(w).view(1, w) * k // w
    return torch.stack([(rows * k + cols + i) % (k * k) for i in range(n)])


@pytest.mark.parametrize("kind", ["randaugment", "trivialaugment"])
@pytest.mark.parametrize("op", [op for op in AUGMENT_OPS if op != "identity"])
def test_every_op_changes_images_and_keeps_shape_dtype_range(op: str, kind: str) -> None:
    x = _images()
    policy = rand_policy(kind, 1, 20.0, [op])
    out = augment(x, policy, generator=_gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    changed = (out - x).abs().flatten(1).amax(1) > 1e-4
    assert changed.float().mean() >= 0.5, f"{op} left most images unchanged"


def test_half_precision_input_keeps_its_dtype() -> None:
    x = _images().to(torch.bfloat16)
    out = augment(x, randaugment_policy(3, 15.0), generator=_gen())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_identity_op_and_disallowed_flip_return_the_inputs() -> None:
    x, mask = _images(), _block_mask(16)
    assert augment(x, randaugment_policy(1, 30.0, ["identity"]), generator=_gen()) is x
    out, m = augment(
        x, trivialaugment_policy(["hflip"]), generator=_gen(), allow_flip=False, mask=mask
    )
    assert out is x and m is mask


@pytest.mark.parametrize("op", GEOMETRIC)
def test_masks_move_with_geometric_ops(op: str) -> None:
    mask = _block_mask(16, k=2)  # the image encodes the same pattern: class / 3
    x = (mask.float() / 3.0).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    out, moved = augment(x, randaugment_policy(1, 30.0, [op]), generator=_gen(), mask=mask)
    valid = moved != 255
    # away from block edges (a 3x3 neighbourhood of one class), bilinear and nearest agree
    m = moved.float().unsqueeze(1)
    inside = (F.max_pool2d(m, 3, 1, 1) == -F.max_pool2d(-m, 3, 1, 1)).squeeze(1) & valid
    aligned = ((out[:, 0] - moved.float() / 3.0).abs() < 0.02) & inside
    share = aligned.sum() / inside.sum()
    assert share > 0.98, f"{op}: image and mask disagree on {1 - share:.0%} of inner pixels"
    stale = ((out[:, 0] - mask.float() / 3.0).abs() < 0.02).float().mean()
    assert stale < 0.85, f"{op} should have moved the pixels"
    if op in ("translate_x", "translate_y"):
        assert (~valid).any(), "a translation brings in void pixels from outside"
        assert out[:, 0][~valid].mean() < 0.1, "pixels from outside are zeros in the image"


def test_non_geometric_ops_never_touch_masks() -> None:
    mask = _block_mask(16)
    policy = randaugment_policy(3, 25.0, NOT_GEOMETRIC)
    out, same = augment(_images(), policy, generator=_gen(), mask=mask)
    assert torch.equal(same, mask)
    assert not torch.equal(out, _images())


def test_each_image_draws_its_own_op() -> None:
    x = torch.full((64, 3, 8, 8), 0.2)
    out = augment(x, trivialaugment_policy(["identity", "invert"]), generator=_gen())
    inverted = (out - 0.8).abs().flatten(1).amax(1) < 1e-6
    kept = (out - 0.2).abs().flatten(1).amax(1) < 1e-6
    assert torch.all(inverted | kept)
    assert 10 < inverted.sum() < 54, "each image should draw its own op"


def test_signed_ops_take_a_random_sign_per_image() -> None:
    x = torch.full((64, 3, 4, 4), 0.4)
    out = augment(x, randaugment_policy(1, 15.0, ["brightness"]), generator=_gen())
    factor = out[:, 0, 0, 0] / 0.4  # 1 +- 0.9 * 15 / 30
    assert torch.all(((factor - 1.45).abs() < 1e-5) | ((factor - 0.55).abs() < 1e-5))
    assert 10 < (factor > 1).sum() < 54


def test_same_seed_same_output_and_other_seed_differs() -> None:
    x, policy = _images(), randaugment_policy(3, 15.0)
    a, b = augment(x, policy, generator=_gen(5)), augment(x, policy, generator=_gen(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, augment(x, policy, generator=_gen(6)))


def test_device_path_matches_cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The masked path (every group on the whole batch, as on CUDA, where asking how many images
    chose a group would synchronise) gives the CPU path's images and masks. Noise is left out:
    the CPU path draws it for the chosen images only."""
    ops = [op for op in AUGMENT_OPS if op != "noise"]
    x, mask = _images(32), _block_mask(32)
    for policy in (randaugment_policy(3, 17.0, ops), trivialaugment_policy(ops)):
        sorted_out, sorted_mask = augment(x, policy, generator=_gen(3), mask=mask)
        with monkeypatch.context() as m:
            m.setattr(augment_policies, "_sparse", lambda t: False)
            masked_out, masked_mask = augment(x, policy, generator=_gen(3), mask=mask)
        assert torch.equal(sorted_mask, masked_mask)
        torch.testing.assert_close(sorted_out, masked_out, atol=1e-5, rtol=0)


def test_magnitudes_map_like_torchvision() -> None:
    x = _images()
    # RandAugment's solarize at magnitude 15 inverts values at or above 1 - 15/30 = 0.5
    out = augment(x, randaugment_policy(1, 15.0, ["solarize"]), generator=_gen())
    torch.testing.assert_close(out, torch.where(x >= 0.5, 1 - x, x))
    # at magnitude 30 posterize keeps 4 bits: multiples of 16 / 255
    out = augment(x, randaugment_policy(1, 30.0, ["posterize"]), generator=_gen())
    levels = out * 255 / 16
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    # magnitude 0 leaves a signed op at its identity
    out = augment(x, randaugment_policy(1, 0.0, ["brightness"]), generator=_gen())
    torch.testing.assert_close(out, x)


def _shift_share(policy, size: int) -> torch.Tensor:
    """How far each image of ones moved, as a share of its width: with bilinear sampling and
    zeros from outside, the lost mass is exactly the shift."""
    out = augment(torch.ones(64, 3, size, size), policy, generator=_gen(4))
    return 1 - out[:, 0].mean((1, 2))


def test_translations_are_shares_of_the_image_size() -> None:
    """RandAugment moves by 150/331 of the size at magnitude 30 (torchvision's); TrivialAugment
    by up to 32/224 of it (TrivialAugmentWide's 32 px at ImageNet's 224), so a 32 px image
    moves by at most 4.6 px, not 32, at any size the same share."""
    ra = _shift_share(randaugment_policy(1, 30.0, ["translate_x"]), 32)
    torch.testing.assert_close(ra, torch.full_like(ra, 150 / 331), atol=1e-4, rtol=0)
    ta = trivialaugment_policy(["translate_x", "translate_y"])
    small, large = _shift_share(ta, 32), _shift_share(ta, 224)
    assert small.max() <= 32 / 224 + 1e-5 and small.max() > 0.1
    torch.testing.assert_close(small, large, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("name", "flip", "sums", "mask_sum", "pixel"),
    [
        ("light", True, (16508.9863, 17708.8086), 306645, 0.531412),
        ("light", False, (16473.0449, 17742.4512), 306568, 0.531412),
        ("strong", True, (15253.7998, 14978.1318), 637599, 0.372339),
        ("strong", False, (15194.6338, 14943.5811), 637562, 0.372339),
    ],
)
def test_presets_give_the_outputs_they_gave_before(name, flip, sums, mask_sum, pixel) -> None:
    """Figures taken from the preset code before the searched policies were added."""
    x = torch.rand(16, 3, 24, 32, generator=_gen(1))
    mask = torch.randint(0, 5, (16, 24, 32), generator=_gen(2))
    g = _gen(3)
    a = augment(x, name, generator=g, allow_flip=flip)
    b, moved = augment(x, name, generator=g, allow_flip=flip, mask=mask)
    assert a.sum().item() == pytest.approx(sums[0], abs=0.05)
    assert b.sum().item() == pytest.approx(sums[1], abs=0.05)
    assert int(moved.sum()) == mask_sum
    assert a[3, 1, 5, 7].item() == pytest.approx(pixel, abs=1e-5)


def test_builders_and_names() -> None:
    assert MAX_MAGNITUDE == 30 and len(AUGMENT_OPS) == len(set(AUGMENT_OPS))
    assert {"solarize", "posterize", "autocontrast", "equalize", "sharpness"} <= set(AUGMENT_OPS)
    assert {"shear_x", "shear_y", "translate_x", "translate_y"} <= set(AUGMENT_OPS)
    ra = randaugment_policy(2, 15.0, ["rotate", "invert"])
    assert ra == SearchedPolicy("randaugment", 2, 15.0, ("rotate", "invert"))
    assert ra.ops == ("rotate", "invert") and ra.name == "randaugment"
    assert trivialaugment_policy().num_ops == 1 and trivialaugment_policy().ops == AUGMENT_OPS
    assert get_policy("randaugment") == rand_policy("randaugment")
    assert get_policy("trivialaugment").kind == "trivialaugment"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: check_ops(["solarise"]), "did you mean 'solarize'"),
        (lambda: check_ops(["nope"]), "allowed: identity, rotate"),
        (lambda: check_ops([]), "at least one op"),
        (lambda: check_ops("rotate"), "list of op names"),
        (lambda: check_ops(["rotate", "rotate"]), "listed twice"),
        (lambda: randaugment_policy(2, 31.0), "magnitude must be a number in [0, 30]"),
        (lambda: randaugment_policy(2, -1.0), "magnitude must be a number in [0, 30]"),
        (lambda: randaugment_policy(0, 9.0), "num_ops must be in 1..22"),
        (lambda: randaugment_policy(3, 9.0, ["rotate", "zoom"]), "num_ops must be in 1..2"),
        (lambda: rand_policy("trivialaugment", 2), "num_ops must be in 1..1"),
        (lambda: rand_policy("autoaugment"), "allowed: randaugment, trivialaugment"),
        (lambda: randaugment_policy(2, 9.0, ["shear"]), "did you mean 'shear_"),
    ],
)
def test_bad_names_and_magnitudes_raise_with_what_is_allowed(make, message: str) -> None:
    with pytest.raises(ValueError, match=None) as err:
        make()
    assert message in str(err.value)


# --- MixUp / CutMix ---------------------------------------------------------------------------


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i / n; its class is i."""
    x = (torch.arange(n, dtype=torch.float32) / n).view(n, 1, 1, 1).expand(n, 3, 16, 16)
    return x.contiguous(), torch.arange(n)


def test_prob_zero_is_the_identity_with_one_hot_targets() -> None:
    x, y = _batch()
    out, t = mix(x, y, 10, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0, generator=_gen())
    assert out is x
    assert torch.equal(t, torch.nn.functional.one_hot(y, 10).float())


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_targets_are_float_rows_summing_to_one(smoothing: float) -> None:
    x, y = _batch()
    for seed in range(5):
        _, t = mix(
            x, y, 10, mixup_alpha=0.4, cutmix_alpha=1.0, prob=1.0, generator=_gen(seed),
            smoothing=smoothing,
        )  # fmt: skip
        assert t.shape == (8, 10) and t.dtype == torch.float32
        torch.testing.assert_close(t.sum(1), torch.ones(8))
        assert t.min() >= 0


def test_cutmix_lambda_matches_the_pixel_shares() -> None:
    x, y = _batch()
    for seed in range(6):
        out, t = mix(x, y, 8, mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, generator=_gen(seed))
        own = (out == x).all(1).float().mean((1, 2))  # share of each image's own pixels
        torch.testing.assert_close(t[torch.arange(8), y], own)
        torch.testing.assert_close(t[torch.arange(8), y.flip(0)], 1 - own)


def test_mixup_blends_images_as_the_targets_say() -> None:
    x, y = _batch()
    out, t = mix(x, y, 8, mixup_alpha=0.4, cutmix_alpha=0.0, prob=1.0, generator=_gen(2))
    lam = t[0, 0]
    assert 0 < lam < 1
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0))


def test_both_alphas_switch_between_mixup_and_cutmix() -> None:
    x, y = _batch()
    kinds = set()
    for seed in range(20):
        out, _ = mix(x, y, 8, mixup_alpha=1.0, cutmix_alpha=1.0, prob=1.0, generator=_gen(seed))
        kinds.add("cutmix" if (out == x).all(1).any() else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_mix_is_reproducible_from_the_generator() -> None:
    x, y = _batch()
    kw = dict(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.5)
    for seed in range(4):
        a, ta = mix(x, y, 8, generator=_gen(seed), **kw)
        b, tb = mix(x, y, 8, generator=_gen(seed), **kw)
        assert torch.equal(a, b) and torch.equal(ta, tb)


@pytest.mark.parametrize(
    ("y", "kw", "message"),
    [
        (torch.zeros(8, 16, 16, dtype=torch.long), {}, "classification only"),
        (torch.zeros(8, dtype=torch.long), {"mixup_alpha": -1.0}, "mixup_alpha must be"),
        (torch.zeros(8, dtype=torch.long), {"prob": 1.5}, "prob must be in [0, 1]"),
        (torch.zeros(8, dtype=torch.long), {"smoothing": 1.0}, "smoothing must be in [0, 1)"),
    ],
)
def test_mix_refuses_masks_and_bad_settings(y, kw, message: str) -> None:
    x, _ = _batch()
    args = dict(mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0, generator=_gen()) | kw
    with pytest.raises(ValueError) as err:
        mix(x, y, 8, **args)
    assert message in str(err.value)
