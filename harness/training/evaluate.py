"""Model outputs over a whole split, in eval mode: for scoring and for label-free validators."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from harness.api import Split
from harness.training import crops
from harness.training import features as feat
from harness.training.device import Precision
from harness.training.inputs import image_batches, model_input
from harness.training.model import TransferModel


@torch.no_grad()
def predict(
    model: TransferModel,
    split: Split,
    batch_size: int,
    device: torch.device,
    precision: Precision,
    cache: feat.FeatureCache | None = feat.FEATURE_CACHE,
) -> Tensor:
    """Outputs for every image of ``split``, in eval mode, on the CPU: float32 logits for
    classification, predicted labels per pixel for segmentation (logits would not fit).

    With a fully frozen backbone the split's features come from ``cache`` (computed once, keyed by
    the backbone's weights and buffers, the images and the preprocessing); only the head runs."""
    was_training = model.training
    model.eval()
    out = []
    frozen = (
        cache is not None
        and model.task == "classification"
        and not model.head_takes_images
        and isinstance(model.backbone, nn.Module)
        and not any(p.requires_grad for p in model.backbone.parameters())
    )
    if frozen:
        key = feat.feature_key(model, split, precision, device)
        features = cache.get_or_compute(
            key, lambda: feat.compute_features(model, split, precision, device, batch_size)
        )
        for start in range(0, len(features), batch_size):
            with precision.autocast(device):
                logits = model.head(features[start : start + batch_size])
            out.append(logits.float().cpu())
        model.train(was_training)
        return torch.cat(out)
    for images in image_batches(split, batch_size):
        x = model_input(images, model, precision.channels_last, device)
        with precision.autocast(device):
            logits = forward(model, x)
        out.append(labels(logits) if logits.ndim == 4 else logits.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def labels(logits: Tensor) -> Tensor:
    """Per-pixel predicted classes on the CPU, as uint8 where the classes fit (an eighth of the
    memory of int64 for whole validation splits)."""
    pred = logits.argmax(1)
    return (pred.to(torch.uint8) if logits.shape[1] <= 255 else pred).cpu()


def forward(model: TransferModel, x: Tensor) -> Tensor:
    """``model``'s logits for whole images ``x``: one call, or for segmentation images larger
    than the model's input size (the training crop), the mean over windows of that size that
    overlap by a third."""
    size = getattr(model, "input_size", None)
    if model.task != "segmentation" or size is None or max(x.shape[-2:]) <= size:
        return model(x)
    return crops.sliding_window(model, x, size, max(1, math.ceil(size * 2 / 3)))


@torch.no_grad()
def unlabelled_logits(
    model: TransferModel,
    split: Split,
    batch_size: int,
    device: torch.device,
    precision: Precision,
    pixels_per_image: int = 64,
    seed: int = 0,
) -> Tensor:
    """Logits of shape (rows, classes) for label-free validators, read from images only: one
    row per image for classification, ``pixels_per_image`` seeded pixels per image for
    segmentation (the same pixels for every model, so that trials compare)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out = []
    for images in image_batches(split, batch_size):
        x = model_input(images, model, precision.channels_last, device)
        with precision.autocast(device):
            logits = forward(model, x)
        logits = logits.float()
        if logits.ndim == 4:
            b, c, h, w = logits.shape
            flat = logits.permute(0, 2, 3, 1).reshape(b, h * w, c)
            idx = torch.randint(0, h * w, (b, pixels_per_image), generator=g).to(flat.device)
            logits = torch.gather(flat, 1, idx[..., None].expand(-1, -1, c)).reshape(-1, c)
        out.append(logits.cpu())
    model.train(was_training)
    return torch.cat(out)
