"""The tables of a study file other than its pairs and methods: ``[budget]``, ``[search]``,
``[pretrain]``, ``[tracking]``, ``[data]`` and ``[datasets.NAME]``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
)

AUGMENT_POLICIES = ("none", "light", "strong")


class StrictModel(BaseModel):
    # strict: a string where a number belongs is an error, not a silent conversion
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Budget(StrictModel):
    trials: int = Field(8, ge=1)
    max_epochs: int = Field(10, ge=1)
    timeout_s: float | None = Field(None, gt=0)


class SearchSpace(StrictModel):
    sampler: Literal["tpe", "random"] = "tpe"
    #: "asha" (successive halving: with m = a sixth of the epochs, at least 2, a trial is judged
    #: once epoch m + 1 is reported and again at epoch 3m + 1; only the top third at each rung goes
    #: on, by comparison with trials there, so the first trial to reach a rung stops at it; while
    #: no trial has completed, the budget's last trial is not pruned; none is judged at its last
    #: epoch),
    #: "median" (pruned when below the median of earlier trials at the same epoch, from a third
    #: of the epochs on, after ``startup_trials`` trials), "hyperband", "none".
    #: Measured in benchmarks/README.md.
    pruner: Literal["median", "asha", "hyperband", "none"] = "asha"
    startup_trials: int = Field(3, ge=0)
    freeze_depth: Literal["auto"] | list[int] | int = "auto"
    backbone_lr: list[float] | float = Field(default_factory=lambda: [1e-4, 3e-2])
    head_lr: list[float] | float = Field(default_factory=lambda: [1e-4, 3e-2])
    weight_decay: list[float] | float = Field(default_factory=lambda: [1e-6, 1e-2])
    augment: list[str] | str = Field(default_factory=lambda: list(AUGMENT_POLICIES))
    #: layer-wise learning-rate decay: each backbone stage learns this many times slower than the
    #: next one (1 = off); [low, high] searches it for every method that trains the backbone
    layer_decay: list[float] | float = 1.0
    #: random resized crops for training where images are stored larger than image_size: the
    #: smallest share of the stored image's area a crop may take, or [low, high] to search it
    #: (unset: a plain random crop of image_size, as the adaptation literature trains)
    crop_scale: list[float] | float | None = None

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale(cls, v: list[float] | float | None) -> list[float] | float | None:
        values = v if isinstance(v, list) else [] if v is None else [v]
        if isinstance(v, list) and (len(v) != 2 or v[0] > v[1]):
            raise ValueError(f"expected [low, high] with low <= high, or one number, got {v}")
        if not all(0 < x <= 1 for x in values):
            raise ValueError(f"expected shares of the image's area in (0, 1], got {v}")
        return v

    def config(self) -> dict[str, Any]:
        """The search space as a study's configuration records it (settings added since the
        first published studies appear only when set, so those configurations read the same)."""
        return self.model_dump(exclude={"crop_scale"} if self.crop_scale is None else set())

    @field_validator("backbone_lr", "head_lr", "weight_decay")
    @classmethod
    def _range(cls, v: list[float] | float) -> list[float] | float:
        if isinstance(v, list):
            if len(v) != 2:
                raise ValueError(f"expected [low, high] or one number, got {v}")
            lo, hi = v
            if not (0 < lo <= hi):
                raise ValueError(
                    f"expected [low, high] with 0 < low <= high, got {v} (empty range)"
                )
        elif v <= 0:
            raise ValueError(f"expected a positive number, got {v}")
        return v

    @field_validator("layer_decay")
    @classmethod
    def _decay(cls, v: list[float] | float) -> list[float] | float:
        values = v if isinstance(v, list) else [v]
        if isinstance(v, list) and (len(v) != 2 or v[0] > v[1]):
            raise ValueError(f"expected [low, high] with low <= high, or one number, got {v}")
        if not all(0 < x <= 1 for x in values):
            raise ValueError(f"expected values in (0, 1] (1 = no decay), got {v}")
        return v

    @field_validator("freeze_depth")
    @classmethod
    def _depth(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) != 2 or not (0 <= v[0] <= v[1]):
                raise ValueError(f'expected [low, high] with 0 <= low <= high, or "auto", got {v}')
        elif isinstance(v, int) and v < 0:
            raise ValueError(f"expected a non-negative stage count, got {v}")
        return v

    @field_validator("augment")
    @classmethod
    def _augment(cls, v: list[str] | str) -> list[str] | str:
        values = [v] if isinstance(v, str) else v
        if not values:
            raise ValueError(f"expected at least one of {', '.join(AUGMENT_POLICIES)} (empty list)")
        bad = [p for p in values if p not in AUGMENT_POLICIES]
        if bad:
            raise ValueError(f"unknown policy {bad[0]!r}; allowed: {', '.join(AUGMENT_POLICIES)}")
        return v


class Pretrain(StrictModel):
    """Recipe for ``weights = "source"``: a backbone + linear head trained on source labels."""

    epochs: int = Field(15, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    augment: str = "light"

    @field_validator("augment")
    @classmethod
    def _augment(cls, v: str) -> str:
        if v not in AUGMENT_POLICIES:
            raise ValueError(f"unknown policy {v!r}; allowed: {', '.join(AUGMENT_POLICIES)}")
        return v


class Tracking(StrictModel):
    """Experiment tracking through Optuna's integration callbacks; off unless a URI is given."""

    mlflow_uri: str | None = Field(None, min_length=1)


class DataSettings(StrictModel):
    """``[data]``: the protocol that splits the domains, the size images are stored at, and where
    a domain's images live during a run."""

    protocol: Literal["held-out", "standard"] = "held-out"
    #: the size images are stored at, a square's side or (segmentation) [width, height]; training
    #: takes random crops of image_size from it; evaluation takes the center crop
    #: (classification) or scores the whole image, by sliding windows of image_size where it is
    #: larger (segmentation). Default: 8/7 of image_size (256 for 224) for classification
    #: datasets read from files, image_size otherwise
    stored_size: int | list[int] | None = None
    #: "auto": a domain goes to the device whole when it fits device_share of the free device
    #: memory, else batches stream from the host; "device" and "stream" force one way
    placement: Literal["auto", "device", "stream"] = "auto"
    device_share: float = Field(0.5, gt=0, le=1)


class DatasetAlias(BaseModel):
    """``[datasets.NAME] plugin = "folder", root = "..."``: binds a dataset plugin to options."""

    model_config = ConfigDict(extra="allow", frozen=True)
    plugin: str
    #: this dataset's stored size, where it differs from ``data.stored_size`` (GTA5 at
    #: [1280, 720] beside Cityscapes at [1024, 512]); the harness's, not an option of the plugin
    stored_size: int | list[int] | None = None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})
