"""Study files: TOML under ``benchmarks/`` -> a validated ``StudySpec``.

Every problem ends as one ``StudySpecError`` naming the file, the key and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from harness.errors import HarnessError, StudySpecError
from harness.hookspecs import NAME_PATTERN, NAME_RULE
from harness.study_pairs import (  # noqa: F401 - importable from here too
    LEAVE_ONE_OUT,
    Pair,
    expand_leave_one_out,
    pair_domain_problem,
)
from harness.study_tables import (  # noqa: F401 - the tables are importable from here too
    AUGMENT_POLICIES,
    Budget,
    DatasetAlias,
    DataSettings,
    Pretrain,
    SearchSpace,
    StrictModel,
    Tracking,
)

#: "auto": target-val for methods that train on target labels, source-val for the others; any
#: other rule is a registered validator (checked against the plugins before anything runs)
AUTO_RULE = "auto"


class Method(StrictModel):
    backbone: str = Field(min_length=1)
    head: str = "linear"
    strategy: str = Field(min_length=1)
    weights: str = "none"
    head_options: dict[str, Any] = Field(default_factory=dict)
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    name: str | None = None

    @property
    def key(self) -> str:
        if self.name:
            return self.name
        weights = self.weights if self.weights in ("none", "imagenet", "source") else "file"
        opts = "".join(f",{k}={v}" for k, v in sorted(self.strategy_options.items()))
        return f"{self.backbone}({weights})+{self.head}+{self.strategy}{opts}"


class StudySpec(StrictModel):
    description: str = ""
    #: disclosures shown with the results (leaderboard, report, index): how the study came to be
    #: as it is; it decides nothing, so it is not part of a study's configuration
    notes: str = ""
    #: metrics the final runs report, behind the task's primary one (registered metric names)
    metrics: list[str] = Field(default_factory=list)
    task: Literal["classification", "segmentation"] = "classification"
    image_size: int = Field(32, ge=8, le=1024)
    batch_size: int = Field(64, ge=2)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp32-channels_last", "bf16-channels_last"] = "auto"
    seed: int = 0
    final_seeds: int = Field(3, ge=1)
    #: trials of a method share one backbone module, reset in place to the weights (harness.training.reset);
    #: false builds it through its plugin for every trial, as the harness did before
    reuse_backbone: bool = True
    #: one rule, or several: the first drives the search (sampler, pruner); each gets its own rows
    selection: str | list[str] = "auto"
    #: which final runs keep their trained model (``results/<study>/models/``): "best" the rank-1
    #: row of each pair among rows not flagged oracle, "all" every row, "none" nothing; not part
    #: of a study's frozen configuration (it decides no trial)
    keep_models: Literal["best", "all", "none"] = "best"
    pairs: list[Pair] = Field(min_length=1)
    methods: list[Method] = Field(min_length=1)
    budget: Budget = Field(default_factory=Budget)
    search: SearchSpace = Field(default_factory=SearchSpace)
    pretrain: Pretrain = Field(default_factory=Pretrain)
    tracking: Tracking = Field(default_factory=Tracking)
    data: DataSettings = Field(default_factory=DataSettings)
    datasets: dict[str, DatasetAlias] = Field(default_factory=dict)

    #: each pair's key in the file, where ``leave_one_out`` tables were expanded
    _pair_keys: list[str] = PrivateAttr(default_factory=list)

    # filled in by load_study, not by the file
    name: str = ""
    path: str = ""
    file_hash: str = ""
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f'expected "auto", "cpu" or "cuda[:N]", got {v!r}')
        return v

    @field_validator("selection")
    @classmethod
    def _selection(cls, v: str | list[str]) -> str | list[str]:
        values = [v] if isinstance(v, str) else v
        if not values:
            raise ValueError(
                "expected a rule or a list of rules (`harness plugins --kind validator` lists "
                "them), got an empty list"
            )
        bad = [r for r in values if r != AUTO_RULE and not NAME_PATTERN.match(r)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a rule name: names are {NAME_RULE}")
        if len(set(values)) != len(values):
            raise ValueError(f"a rule is listed twice in {values}")
        return v

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if not NAME_PATTERN.match(m)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a metric name: names are {NAME_RULE}")
        if len(set(v)) != len(v):
            raise ValueError(f"a metric is listed twice in {v}")
        return v

    @property
    def selection_rules(self) -> list[str]:
        return [self.selection] if isinstance(self.selection, str) else list(self.selection)

    @model_validator(mode="after")
    def _unique(self) -> StudySpec:
        keys = [m.key for m in self.methods]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise ValueError(
                f"two methods share the key {sorted(dup)[0]!r}; give one a distinct `name`"
            )
        return self

    @model_validator(mode="after")
    def _mixing_task(self) -> StudySpec:
        """MixUp and CutMix mix class labels: classification only."""
        for key in ("mixup_alpha", "cutmix_alpha", "mix_prob"):
            if self.task != "classification" and getattr(self.search, key) is not None:
                raise ValueError(
                    f"search.{key}: MixUp/CutMix mix class labels, for classification only; "
                    f"this study's task is {self.task} (leave {key} out)"
                )
        return self

    @model_validator(mode="after")
    def _stored_size(self) -> StudySpec:
        sizes = {"data.stored_size": self.data.stored_size}
        sizes |= {f"datasets.{k}.stored_size": a.stored_size for k, a in self.datasets.items()}
        for key, stored in sizes.items():
            if stored is None:
                continue
            sides = [stored] if isinstance(stored, int) else stored
            if isinstance(stored, list) and (len(stored) != 2 or self.task != "segmentation"):
                raise ValueError(
                    f"{key} {stored}: [width, height] is for segmentation; "
                    "classification stores squares (one number)"
                )
            if not all(self.image_size <= s <= 8192 for s in sides):
                raise ValueError(
                    f"{key} {stored}: each side must be at least image_size "
                    f"({self.image_size}) and at most 8192"
                )
        return self

    def dump(self) -> dict[str, Any]:
        """The resolved study as JSON (settings added since the first published studies appear
        only when set, so their bundles read the same)."""
        out = self.model_dump(mode="json")
        out["search"] = self.search.config()
        if self.keep_models == "best":
            del out["keep_models"]
        if not self.notes:
            del out["notes"]
        if not self.metrics:
            del out["metrics"]
        if self.data == DataSettings():
            del out["data"]
        for alias in out["datasets"].values():
            if alias.get("stored_size") is None:
                alias.pop("stored_size", None)
        return out

    def stored_size(
        self, from_files: bool, own: int | list[int] | None = None
    ) -> int | tuple[int, int]:
        """The size images are stored at, a side or ``(width, height)``: the dataset's ``own``,
        else ``data.stored_size``, else 8/7 of image_size for classification files (256 for
        224), image_size otherwise."""
        stored = own if own is not None else self.data.stored_size
        if stored is not None:
            return stored if isinstance(stored, int) else (stored[0], stored[1])
        grown = from_files and self.task == "classification"
        return round(self.image_size * 8 / 7) if grown else self.image_size

    @model_validator(mode="wrap")
    @classmethod
    def _expand_pairs(cls, data: Any, handler: Any) -> StudySpec:
        """``leave_one_out`` tables become their pairs before validation; afterwards each pair's
        domains are checked to be distinct, naming the table of the file they came from."""
        where = None
        if isinstance(data, dict) and isinstance(data.get("pairs"), list):
            pairs, where = expand_leave_one_out(data["pairs"])
            data = {**data, "pairs": pairs}
        spec = handler(data)
        if where is not None:
            spec._pair_keys = where
        spec._check_domains()
        return spec

    def pair_where(self, i: int, side: str = "") -> str:
        """The key of pair ``i`` in the study file (``pairs[2].leave_one_out`` for an expanded
        one), with ``side`` ("source", "target") appended for a pair written out."""
        key = self._pair_keys[i] if i < len(self._pair_keys) else f"pairs[{i}]"
        return f"{key}.{side}" if side and not key.endswith("leave_one_out") else key

    def _check_domains(self) -> None:
        sizes = self.search.batch_size
        key = "batch_size" if sizes is None else "search.batch_size"
        smallest = min(
            [self.batch_size] if sizes is None else [sizes] if isinstance(sizes, int) else sizes
        )
        for i, p in enumerate(self.pairs):
            problem = pair_domain_problem(
                p, self.domain_identity, self.pair_where(i), self.datasets
            )
            if problem is None and len(p.sources) > smallest:
                problem = (
                    f"{key}: a step of {smallest} images cannot draw from each of the "
                    f"{len(p.sources)} sources of {self.pair_where(i)} (equal shares per source); "
                    f"allowed: at least {len(p.sources)}"
                )
            if problem is not None:
                raise ValueError(problem)

    def domain_identity(self, text: str) -> tuple[str, str, str]:
        """What a pair's ``source`` or ``target`` names: the dataset plugin (through an alias of
        ``datasets``), its options and the sub-domain; two names with one identity are one domain."""
        name, _, sub = text.partition("/")
        alias = self.datasets.get(name)
        if alias is None:
            return name, "{}", sub
        return alias.plugin, json.dumps(alias.options, sort_keys=True, default=str), sub


# ------------------------------------------------------------------------------------ loading


def find_study(name_or_path: str, root: Path | None = None) -> Path:
    """``quickstart`` -> ``benchmarks/quickstart.toml``; a path is taken as it is."""
    p = Path(name_or_path).expanduser()
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise StudySpecError(f"{p}: study file not found")
        return p
    base = (root or Path.cwd()) / "benchmarks"
    candidate = base / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    known = sorted(f.stem for f in base.glob("*.toml")) if base.is_dir() else []
    from harness.registry import unknown_message

    raise StudySpecError(
        unknown_message("study", name_or_path, known).replace(
            "unknown study", f"no study file {candidate}: study"
        ),
        hint=f"studies here: {', '.join(known) or 'none'}; a path to a .toml file also works",
    )


def load_study(
    name_or_path: str, overrides: dict[str, Any] | None = None, root: Path | None = None
) -> StudySpec:
    path = find_study(name_or_path, root)
    if not any(c.isalnum() for c in path.stem):  # `..` would name a folder outside the results
        raise StudySpecError(
            f"{path}: the study is named after its file, and {path.stem!r} has no letter or "
            "digit; the name must contain a letter or digit"
        )
    raw_bytes = path.read_bytes()
    try:
        data = tomllib.loads(raw_bytes.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise StudySpecError(f"{path}: not valid TOML: {exc}") from None
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise StudySpecError(_first_error(path, exc)) from None
    try:
        shown = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        shown = path
    return spec.model_copy(
        update={
            "name": path.stem,
            "path": str(shown),
            "file_hash": hashlib.sha256(raw_bytes).hexdigest()[:16],
            "overrides": dict(overrides or {}),
        }
    )


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``budget.trials`` or ``methods[1].head``: set one value in the parsed TOML, in place."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        match = re.fullmatch(r"([A-Za-z_][\w-]*)\[(\d+)\]", part)
        if not isinstance(node, dict):
            raise StudySpecError(
                f"--set {key}: {'.'.join(parts[:i])} is not a table", hint=_SET_HINT
            )
        if match:
            name, index = match.group(1), int(match.group(2))
            items = node.get(name)
            if not isinstance(items, list) or index >= len(items):
                size = len(items) if isinstance(items, list) else 0
                raise StudySpecError(
                    f"--set {key}: {where} does not exist ({name} has {size} entries)",
                    hint=_SET_HINT,
                )
            if last:
                items[index] = value
            else:
                node = items[index]
        elif last:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if isinstance(node, list):
                raise StudySpecError(
                    f"--set {key}: {where} is a list; name an entry, e.g. {part}[0]", hint=_SET_HINT
                )


_SET_HINT = "examples: --set budget.trials=4, --set methods[0].head=mlp, --set 'pairs[0].target=\"digits-m\"'"


def _first_error(path: Path, exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = _format_loc(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = err["loc"][:-1]
        allowed = _allowed_keys(parent)
        return f"{path}: unknown key {loc!r}; allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{path}: {loc}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # a check of the whole study: its message names the key
        return f"{path}: {msg}"
    if kind == "literal_error":
        msg = msg.replace("Input should be", "expected")
    got = err.get("input")
    if kind not in ("value_error",) and not isinstance(got, dict | list):
        msg = f"{msg} (got {got!r})"
    return f"{path}: {loc}: {msg}"


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not isinstance(part, str) or part.startswith(
            ("function-", "list[", "literal[", "int", "float", "str")
        ):
            continue  # union branches pydantic adds to the path
        else:
            out += f".{part}" if out else part
    return out


def _allowed_keys(parent: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = StudySpec
    for part in parent:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        nxt = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            break
        model = nxt
    hidden = {"name", "path", "file_hash", "overrides"} if model is StudySpec else set()
    extra = [LEAVE_ONE_OUT] if model is Pair else []  # a table of its own, expanded into pairs
    return [k for k in model.model_fields if k not in hidden] + extra


def spec_error(spec: StudySpec, key: str, error: HarnessError | str) -> StudySpecError:
    """Re-word an error found while resolving a spec so that it names the file and the key."""
    message = str(error)
    hint = error.hint if isinstance(error, HarnessError) else None
    return StudySpecError(f"{spec.path}: {key}: {message}", hint=hint)
