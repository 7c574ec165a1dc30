"""Predictions of a loaded model, with the preprocessing its card records.

Files are read by the harness's one image reader (EXIF, every PIL mode) at the card's stored size
and resize rule, then go through the same step to model input as evaluation
(``training.inputs.model_input``: a classifier sees the center crop of its input size, a segmenter
whole images in sliding windows, ``training.evaluate.forward``). A segmentation mask is mapped
back onto the image's own size (nearest), void (255) where the stored image did not reach.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from harness.data.decode import decode_failure, open_rgb, to_square
from harness.errors import DatasetError
from harness.training.evaluate import forward
from harness.training.inputs import model_input

if TYPE_CHECKING:
    from harness.models.load import LoadedModel

VOID = 255


@dataclass(frozen=True)
class Preprocessing:
    """What the card says a file goes through: read at ``stored`` ``(w, h)`` by ``resize``."""

    image_size: int
    stored: tuple[int, int]
    resize: str

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> Preprocessing:
        prep = card["preprocessing"]
        size = int(prep["image_size"])
        stored = prep.get("stored_size") or size
        wh = (
            (int(stored), int(stored))
            if isinstance(stored, int)
            else (int(stored[0]), int(stored[1]))
        )
        return cls(size, wh, prep.get("resize") or "center-crop")

    def read(self, path: Path) -> tuple[Tensor, tuple[int, int]]:
        """``path`` as uint8 ``(3, h, w)`` at the stored size, and the image's own ``(w, h)``
        (upright); raises ``DatasetError`` naming the file when it cannot be read."""
        try:
            rgb = open_rgb(path)
        except Exception as exc:  # noqa: BLE001 - any decoding failure makes the file unreadable
            raise DatasetError(f"{path}: {decode_failure(path, exc)}") from None
        size = self.stored[0] if self.stored[0] == self.stored[1] else self.stored
        pixels = np.asarray(to_square(rgb, size, Image.Resampling.BILINEAR, self.resize))
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1), rgb.size


@dataclass
class Prediction:
    """Predictions for N images: for a classifier ``probabilities`` ``(N, K)``, ``classes``
    ``(N,)`` and (one model, not an ensemble) ``logits``; for segmentation ``masks``, one uint8
    ``(H, W)`` array per image at its own size. ``paths`` when read from files."""

    task: str
    class_names: list[str]
    probabilities: Tensor | None = None
    classes: Tensor | None = None
    logits: Tensor | None = None
    masks: list[np.ndarray] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """The predicted class names (classification)."""
        return [] if self.classes is None else [self.class_names[i] for i in self.classes.tolist()]


@dataclass
class ImageResult:
    """One file's outcome: its prediction (a row of probabilities, or a mask) or why it failed."""

    path: str
    probabilities: Tensor | None = None
    mask: np.ndarray | None = None
    error: str | None = None


@torch.no_grad()
def outputs(loaded: LoadedModel, x_uint8: Tensor) -> tuple[Tensor, Tensor | None]:
    """Probabilities ``(N, K)`` (per pixel ``(N, K, H, W)`` for segmentation) for a batch of
    stored uint8 images, averaged over an ensemble's members; with one model also its logits."""
    probs, logits = None, None
    for member in loaded.members:
        x = model_input(x_uint8, member, loaded.precision.channels_last, loaded.device)
        with loaded.precision.autocast(loaded.device):
            logits = forward(member, x)
        p = logits.float().softmax(1)
        probs = p if probs is None else probs + p
    assert probs is not None and logits is not None
    if len(loaded.members) > 1:
        return probs / len(loaded.members), None
    return probs, logits.float()


def predict_images(
    loaded: LoadedModel, images: Tensor | str | Path | Sequence[str | Path], batch_size: int
) -> Prediction:
    """See ``LoadedModel.predict``."""
    if isinstance(images, Tensor):
        return _predict_tensor(loaded, images, batch_size)
    paths = [images] if isinstance(images, str | Path) else list(images)
    results = list(iter_files(loaded, [Path(p) for p in paths], batch_size, strict=True))
    out = Prediction(loaded.task, loaded.class_names, paths=[r.path for r in results])
    if loaded.task == "segmentation":
        out.masks = [r.mask for r in results]  # type: ignore[misc]
    elif results:
        out.probabilities = torch.stack([r.probabilities for r in results])  # type: ignore[misc]
        out.classes = out.probabilities.argmax(1)
    return out


def _predict_tensor(loaded: LoadedModel, images: Tensor, batch_size: int) -> Prediction:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise DatasetError(
            f"images: expected a uint8 tensor (N, 3, H, W), got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    out = Prediction(loaded.task, loaded.class_names)
    probs, logits = [], []
    for start in range(0, len(images), batch_size):
        p, lg = outputs(loaded, images[start : start + batch_size])
        if loaded.task == "segmentation":
            out.masks += list(_labels(p).cpu().numpy())
        else:
            probs.append(p.cpu())
            if lg is not None:
                logits.append(lg.cpu())
    if loaded.task != "segmentation" and probs:
        out.probabilities = torch.cat(probs)
        out.classes = out.probabilities.argmax(1)
        out.logits = torch.cat(logits) if logits else None
    return out


def iter_files(
    loaded: LoadedModel, paths: Sequence[Path], batch_size: int, strict: bool = False
) -> Iterator[ImageResult]:
    """One result per file, in order, batched on the device; a file that cannot be read is a
    result with its ``error`` (with ``strict``, a ``DatasetError`` at once)."""
    prep = loaded.preprocessing
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        read: list[tuple[int, Tensor, tuple[int, int]]] = []
        results = [ImageResult(str(p)) for p in chunk]
        for i, path in enumerate(chunk):
            try:
                pixels, own = prep.read(path)
            except DatasetError as exc:
                if strict:
                    raise
                results[i].error = str(exc).removeprefix(f"{path}: ")
                continue
            read.append((i, pixels, own))
        if read:
            probs, _ = outputs(loaded, torch.stack([r[1] for r in read]))
            if loaded.task == "segmentation":
                for (i, _, own), mask in zip(read, _labels(probs).cpu().numpy(), strict=True):
                    results[i].mask = to_own_size(mask, own, prep)
            else:
                for (i, _, _), row in zip(read, probs.cpu(), strict=True):
                    results[i].probabilities = row
        yield from results


def _labels(probs: Tensor) -> Tensor:
    """Per-pixel classes as uint8 (class indices fit: a palette PNG holds 256)."""
    return probs.argmax(1).to(torch.uint8)


def to_own_size(mask: np.ndarray, own: tuple[int, int], prep: Preprocessing) -> np.ndarray:
    """A mask predicted on the stored image, mapped back onto the image's own ``(w, h)``: the
    inverse of the reader's geometry, nearest; void where the stored image has no pixel of it."""
    (w, h), (sw, sh) = own, prep.stored
    im = Image.fromarray(mask)
    if prep.resize == "pad":
        scale = min(sw / w, sh / h)
        nw, nh = min(sw, max(1, round(w * scale))), min(sh, max(1, round(h * scale)))
        left, top = (sw - nw) // 2, (sh - nh) // 2
        im = im.crop((left, top, left + nw, top + nh))
    else:  # center-crop: the stored image is the centre of the image resized to cover it
        scale = max(sw / w, sh / h)
        nw, nh = max(sw, round(w * scale)), max(sh, round(h * scale))
        if (nw, nh) != (sw, sh):
            canvas = Image.new("L", (nw, nh), VOID)
            canvas.paste(im, ((nw - sw) // 2, (nh - sh) // 2))
            im = canvas
    if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(im, dtype=np.uint8)


def palette() -> list[int]:
    """256 distinct colours (the PASCAL VOC colour map, class 0 black), 255 (void) white."""
    colours = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours += [r, g, b]
    colours[3 * VOID : 3 * VOID + 3] = [255, 255, 255]
    return colours


def mask_image(mask: np.ndarray) -> Image.Image:
    """A mask of class indices as a palette PNG image (index = class, 255 = void)."""
    im = Image.fromarray(mask.astype(np.uint8))  # "L"; a palette makes it "P"
    im.putpalette(palette())
    return im


def looks_like_masks(paths: Sequence[Path], num_classes: int) -> bool:
    """Whether every file is a label mask rather than an image: one channel (an index mode) whose
    values are class indices of this model (some above 0) and void. A photo, even in grayscale,
    has more values; the first file that is not a mask ends the check."""
    from harness.data.decode import INDEX_MODES

    allowed = set(range(num_classes)) | {VOID}
    for path in paths:
        try:
            with Image.open(path) as im:
                if im.mode not in INDEX_MODES:
                    return False
                values = set(np.unique(np.asarray(im)).tolist())
        except Exception:  # noqa: BLE001 - an unreadable file is reported where it is predicted
            return False
        if not values <= allowed or not values - {0, VOID}:
            return False
    return bool(paths)
