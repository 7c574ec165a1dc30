"""Real colour photographs bundled with scikit-learn and scikit-image, and seeded crops of them.

``digits-m`` blends its digits with these crops and ``seg-photo`` cuts its shapes and backgrounds
from them: real texture with no download.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from harness.api import DatasetError

__all__ = ["SKIMAGE_PHOTOS", "bundled_photos", "photo_crops"]

#: colour photographs bundled in scikit-image's data directory (read from disk, never fetched)
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
)


@functools.lru_cache(maxsize=1)
def bundled_photos() -> tuple[Tensor, ...]:
    """Real colour photographs shipped by scikit-learn and scikit-image, as uint8 ``(3, H, W)``.

    A scikit-image file that is missing, unreadable or not RGB is passed over, not reported: the
    photos are only a source of texture."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [
        torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        for img in load_sample_images().images
        if img.ndim == 3 and img.shape[2] == 3
    ]
    data_dir = Path(os.path.dirname(skimage.data.__file__))
    for name in SKIMAGE_PHOTOS:
        path = data_dir / name
        if not path.is_file():
            continue
        try:
            with Image.open(path) as im:
                if im.mode != "RGB":
                    continue
                arr = np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError):
            continue
        photos.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())
    if not photos:
        raise DatasetError("digits-m found no bundled colour photographs to blend with")
    return tuple(photos)


def photo_crops(n: int, image_size: int, photo_seed: int) -> Tensor:
    """``n`` seeded random square crops of the photos, resized to ``image_size``: uint8 (n,3,S,S)."""
    photos = bundled_photos()
    rng = np.random.default_rng(photo_seed)
    which = rng.integers(0, len(photos), size=n)
    sizes = rng.integers(image_size, 4 * image_size + 1, size=n)
    tops, lefts = rng.random(n), rng.random(n)
    out = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
    for i in range(n):
        photo = photos[which[i]]
        h, w = photo.shape[1:]
        c = int(min(sizes[i], h, w))
        top, left = int(tops[i] * (h - c + 1)), int(lefts[i] * (w - c + 1))
        crop = photo[:, top : top + c, left : left + c].unsqueeze(0).float()
        if c != image_size:
            crop = F.interpolate(
                crop,
                size=(image_size, image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        out[i] = crop[0].round().clamp(0, 255).to(torch.uint8)
    return out
