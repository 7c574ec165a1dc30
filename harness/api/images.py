"""The harness's image reader, for dataset plugins: how a file becomes uint8 RGB pixels (EXIF
orientation first, every PIL mode converted faithfully) and how it is resized to a square or a
rectangle. The same functions read the files the decoded-image cache stores, so a plugin that uses
them sees the pixels the harness would."""

from harness.data.decode import (
    BACKGROUND,
    IMAGE_EXTENSIONS,
    INDEX_MODES,
    PAD_COLOUR,
    RESIZE_MODES,
    SIXTEEN_BIT_MODES,
    composite,
    decode_failure,
    open_index_image,
    open_rgb,
    orientation,
    read_image,
    resize_center_crop,
    resize_pad,
    scale_to_uint8,
    to_rgb,
    to_square,
    upright,
)

__all__ = [
    "BACKGROUND",
    "IMAGE_EXTENSIONS",
    "INDEX_MODES",
    "PAD_COLOUR",
    "RESIZE_MODES",
    "SIXTEEN_BIT_MODES",
    "composite",
    "decode_failure",
    "open_index_image",
    "open_rgb",
    "orientation",
    "read_image",
    "resize_center_crop",
    "resize_pad",
    "scale_to_uint8",
    "to_rgb",
    "to_square",
    "upright",
]
