"""The tables of a study file other than its pairs and methods: ``[budget]``, ``[search]``,
``[pretrain]``, ``[tracking]``, ``[data]`` and ``[datasets.NAME]``."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

AUGMENT_POLICIES = ("none", "light", "strong")
#: what ``[search] augment`` chooses among: the presets and the two searched policies
SEARCH_POLICIES = (*AUGMENT_POLICIES, "randaugment", "trivialaugment")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant", "step")
#: the training-recipe settings of ``[search]`` added with issue 20: left out of a study's
#: configuration while unset, so that the configurations of earlier studies read the same
RECIPE_KEYS = (
    "augment_ops",
    "num_ops",
    "magnitude",
    "mixup_alpha",
    "cutmix_alpha",
    "mix_prob",
    "optimizer",
    "schedule",
    "warmup",
    "label_smoothing",
    "drop_path",
    "ema",
    "ema_decay",
    "batch_size",
)
#: the bounds of each numeric recipe setting: (low, high, high excluded, low excluded)
_BOUNDS = {
    "magnitude": (0.0, 30.0, False, False),
    "mixup_alpha": (0.0, math.inf, False, False),
    "cutmix_alpha": (0.0, math.inf, False, False),
    "mix_prob": (0.0, 1.0, False, False),
    "warmup": (0.0, 0.5, True, False),
    "label_smoothing": (0.0, 0.5, True, False),
    "drop_path": (0.0, 0.5, True, False),
    "ema_decay": (0.0, 1.0, True, True),
}


def _interval(key: str) -> str:
    lo, hi, hi_open, lo_open = _BOUNDS[key]
    return f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def _choices(v: list[Any] | Any, allowed: tuple[Any, ...], what: str) -> list[Any] | Any:
    """One of ``allowed``, or a non-empty list of distinct ones to search."""
    values = v if isinstance(v, list) else [v]
    shown = ", ".join(str(a).lower() if isinstance(a, bool) else a for a in allowed)
    if not values:
        raise ValueError(f"expected one {what} or a list of them ({shown}); got an empty list")
    bad = [x for x in values if x not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {bad[0]!r}; allowed: {shown}")
    if len(set(values)) != len(values):
        raise ValueError(f"a {what} is listed twice in {v}")
    return v


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
    #: seed each (pair, method) search with the best configurations of the same method: "pairs"
    #: (the study's pairs whose search finished) or a bundle's best_params.json (relative to the
    #: study file) from a study with the same search space; unset: every search starts cold
    warm_start: str | None = Field(None, min_length=1)
    # the training recipe (README, "The [search] table"): a value pins, [low, high] or a list
    # searches; unset keeps the recipe every earlier study trained with
    #: the operations RandAugment and TrivialAugment draw from (default: all of them)
    augment_ops: list[str] | None = None
    #: RandAugment's operations per image (default 2) and its magnitude on torchvision's 0..30
    #: scale (default 9)
    num_ops: list[int] | int | None = None
    magnitude: list[float] | float | None = None
    #: MixUp's and CutMix's Beta(alpha, alpha) (0 = off) and the share of batches mixed (default 1)
    mixup_alpha: list[float] | float | None = None
    cutmix_alpha: list[float] | float | None = None
    mix_prob: list[float] | float | None = None
    optimizer: list[str] | str | None = None
    schedule: list[str] | str | None = None
    #: share of the steps with a linear learning-rate warm-up
    warmup: list[float] | float | None = None
    label_smoothing: list[float] | float | None = None
    drop_path: list[float] | float | None = None
    #: evaluate an exponential moving average of the weights (decay default 0.999)
    ema: list[bool] | bool | None = None
    ema_decay: list[float] | float | None = None
    #: batch sizes to search (unset: the study's batch_size)
    batch_size: list[int] | int | None = None

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
        optional = ("crop_scale", "warm_start", *RECIPE_KEYS)
        unset = {k for k in optional if getattr(self, k) is None}
        return self.model_dump(exclude=unset)

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
            raise ValueError(f"expected at least one of {', '.join(SEARCH_POLICIES)} (empty list)")
        bad = [p for p in values if p not in SEARCH_POLICIES]
        if bad:
            raise ValueError(f"unknown policy {bad[0]!r}; allowed: {', '.join(SEARCH_POLICIES)}")
        return v

    @field_validator(*_BOUNDS)
    @classmethod
    def _bounded(cls, v: list[float] | float | None, info: ValidationInfo) -> Any:
        """A number or [low, high] within the setting's bounds."""
        if v is None:
            return v
        lo, hi, hi_open, lo_open = _BOUNDS[info.field_name or ""]
        values = v if isinstance(v, list) else [v]
        allowed = (
            f"a number or [low, high] in {_interval(info.field_name or '')}"
            if math.isfinite(hi)
            else f"a number >= {lo:g} or [low, high] of such numbers"
        )
        if isinstance(v, list) and (len(v) != 2 or v[0] > v[1]):
            raise ValueError(f"expected {allowed} with low <= high, got {v}")
        if not all(
            (lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi) for x in values
        ):
            raise ValueError(f"expected {allowed}, got {v}")
        return v

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, v: list[str] | str | None) -> Any:
        return v if v is None else _choices(v, OPTIMIZERS, "optimizer")

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: list[str] | str | None) -> Any:
        return v if v is None else _choices(v, SCHEDULES, "schedule")

    @field_validator("ema")
    @classmethod
    def _ema(cls, v: list[bool] | bool | None) -> Any:
        return v if v is None else _choices(v, (False, True), "value")

    @field_validator("batch_size")
    @classmethod
    def _batch_sizes(cls, v: list[int] | int | None) -> Any:
        values = v if isinstance(v, list) else [] if v is None else [v]
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError(f"expected a list of distinct batch sizes (integers >= 2), got {v}")
        if not all(b >= 2 for b in values):
            raise ValueError(f"expected batch sizes of at least 2, got {v}")
        return v

    @field_validator("augment_ops")
    @classmethod
    def _ops(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            from harness.training.augment import check_ops  # torch: only when the key is set

            check_ops(v)
        return v

    @field_validator("augment_ops", "num_ops", "magnitude", "mix_prob", "ema_decay")
    @classmethod
    def _paired(cls, v: Any, info: ValidationInfo) -> Any:
        """Settings that mean something only beside another one (validated before them)."""
        key, data = info.field_name, info.data
        augment = data.get("augment", [])
        policies = {augment} if isinstance(augment, str) else set(augment)
        needs = {
            "augment_ops": (
                "augment",
                "randaugment or trivialaugment",
                {"randaugment", "trivialaugment"} & policies,
            ),
            "num_ops": ("augment", "randaugment", "randaugment" in policies),
            "magnitude": ("augment", "randaugment", "randaugment" in policies),
            "mix_prob": ("mixup_alpha", "an alpha above 0 (or cutmix_alpha)", _mixes(data)),
            "ema_decay": ("ema", "true", data.get("ema") not in (None, False)),
        }
        other, wanted, ok = needs[str(key)]
        if v is not None and not ok:
            raise ValueError(
                f"applies only when search.{other} has {wanted}; set it or leave {key} out"
            )
        if key == "num_ops" and v is not None:
            ops = data.get("augment_ops")
            top = len(ops) if ops else _op_count()
            values = v if isinstance(v, list) else [v]
            shaped = not isinstance(v, list) or (len(v) == 2 and v[0] <= v[1])
            if not shaped or not all(1 <= n <= top for n in values):
                raise ValueError(
                    f"expected an integer or [low, high] within 1..{top} (the operations "
                    f"searched), got {v}"
                )
        return v

    @property
    def mixes(self) -> bool:
        """Whether the study asks for MixUp or CutMix (an alpha above 0 anywhere in its range)."""
        return _mixes({"mixup_alpha": self.mixup_alpha, "cutmix_alpha": self.cutmix_alpha})


def _mixes(data: dict[str, Any]) -> bool:
    alphas = (data.get("mixup_alpha"), data.get("cutmix_alpha"))
    return any((max(a) if isinstance(a, list) else a) > 0 for a in alphas if a is not None)


def _op_count() -> int:
    from harness.training.augment import AUGMENT_OPS

    return len(AUGMENT_OPS)


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
