"""``harness export``: a kept model of a leaderboard row, copied out with its card, or the K seeds
of a row as one ensemble folder whose predictions average the members' probabilities.

Rows and their kept models are read from ``leaderboard.json`` (each row's ``models``: seed, path,
sha256); every folder is verified before it is copied and the copy after, and the copy appears
under its final name in one rename, so an interrupted export leaves nothing half written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, WeightsError
from harness.models import card as cards
from harness.models.load import CARD, MEMBERS
from harness.registry import unknown_message


class RowChoiceError(HarnessError):
    """The selectors do not name one row with kept models; ``choices`` lists those that have."""

    def __init__(self, message: str, choices: list[str], hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.choices = choices


@dataclass(frozen=True)
class Selectors:
    """What ``harness export`` was told: each ``None`` selects every row."""

    pair: str | None = None
    method: str | None = None
    rank: int | None = None
    rule: str | None = None


def read_rows(study_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``<study_dir>/leaderboard.json``."""
    path = study_dir / "leaderboard.json"
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["rows"])
    except FileNotFoundError:
        raise HarnessError(f"{path}: no leaderboard (the study has not been run here)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HarnessError(f"{path}: unreadable leaderboard ({type(exc).__name__})") from None


def describe(row: dict[str, Any]) -> str:
    """One line naming a row as the selectors do, with its kept seeds."""
    seeds = [m.get("seed") for m in row.get("models") or []]
    kept = f"seeds {', '.join(map(str, seeds))}" if seeds else "no kept model"
    oracle = ", oracle" if row.get("oracle") else ""
    return (
        f"--pair {row.get('pair')} --method {row.get('method')} --rule {row.get('selection')}"
        f" (rank {row.get('rank')}{oracle}): {kept}"
    )


def choose_row(rows: list[dict[str, Any]], sel: Selectors) -> dict[str, Any]:
    """The one row the selectors name, holding kept models; else ``RowChoiceError`` (or an unknown
    value's error with the closest names)."""
    matched = rows
    for key, field, value in (
        ("pair", "pair", sel.pair),
        ("method", "method", sel.method),
        ("rule", "selection", sel.rule),
    ):
        if value is None:
            continue
        known = sorted({str(r.get(field)) for r in rows})
        hit = [r for r in matched if value in (r.get(field), *_aliases(r, key))]
        if not hit and value not in known:
            raise HarnessError(
                unknown_message(key, value, known), hint=f"{key}s: {', '.join(known)}"
            )
        matched = hit
    if sel.rank is not None:
        matched = [r for r in matched if r.get("rank") == sel.rank]
    choices = [describe(r) for r in rows if r.get("models")]
    hint = "name one row with --pair, --method or --rank, and --rule"
    if not choices:
        raise RowChoiceError(
            "no row of this study kept a model",
            [],
            hint="the study file's keep_models says which rows keep their models",
        )
    if len(matched) != 1:
        what = "no row matches" if not matched else f"{len(matched)} rows match"
        raise RowChoiceError(f"{what}; rows with kept models:", choices, hint)
    row = matched[0]
    if not row.get("models"):
        raise RowChoiceError(
            f"row {describe(row)}; rows with kept models:",
            choices,
            'keep_models = "all" keeps every row',
        )
    return row


def _aliases(row: dict[str, Any], key: str) -> tuple[str, ...]:
    """Other names a row answers to: a pair by its target alone."""
    return (str(row.get("target")),) if key == "pair" else ()


def model_folders(study_dir: Path, row: dict[str, Any]) -> dict[int, Path]:
    """The kept folder of each seed of ``row`` (paths relative to the study's results folder)."""
    out = {}
    for m in row["models"]:
        path = Path(m["path"])
        out[int(m["seed"])] = path if path.is_absolute() else study_dir / path
    return out


def checked_member(folder: Path, recorded: str | None) -> None:
    """``folder`` verifies, and its weights are the ones the row recorded scoring."""
    cards.verify(folder)
    weights = cards.read_card(folder)["files"][cards.WEIGHTS]
    if recorded and recorded != weights:
        raise WeightsError(
            f"{folder / cards.WEIGHTS}: not the weights the leaderboard row scored (sha256 differs)"
        )


def export_model(
    study_dir: Path, row: dict[str, Any], out: Path, seed: int | None = None
) -> tuple[Path, int]:
    """Copy the kept model of ``row`` (``seed``, by default its first) to ``out``."""
    folders, recorded = model_folders(study_dir, row), _recorded(row)
    seed = next(iter(folders)) if seed is None else seed
    if seed not in folders:
        raise HarnessError(
            f"--seed {seed}: row {row.get('method')} kept seeds {', '.join(map(str, folders))}"
        )
    checked_member(folders[seed], recorded.get(seed))
    with _staged(out) as tmp:
        shutil.copytree(folders[seed], tmp, dirs_exist_ok=True)
        cards.verify(tmp)
    return out, seed


def export_ensemble(study_dir: Path, row: dict[str, Any], out: Path) -> tuple[Path, list[int]]:
    """One folder holding every kept seed of ``row`` (``members/seed-<s>/``) and a card with
    ``ensemble: [seeds]``: ``load_model`` on it averages the members' probabilities."""
    folders, recorded = model_folders(study_dir, row), _recorded(row)
    if len(folders) < 2:
        raise HarnessError(f"row {row.get('method')}: an ensemble needs 2 or more kept seeds")
    for seed, folder in folders.items():
        checked_member(folder, recorded.get(seed))
    seeds = sorted(folders)
    with _staged(out) as tmp:
        for seed in seeds:
            shutil.copytree(folders[seed], tmp / MEMBERS / f"seed-{seed}")
        write_ensemble_card(tmp, seeds)
    return out, seeds


def write_ensemble_card(folder: Path, seeds: list[int]) -> None:
    """The ensemble's card (the first member's, with ``ensemble``, each member's test metrics,
    every member file's hash), its README and ``SHA256SUMS``."""
    members = {s: cards.read_card(folder / MEMBERS / f"seed-{s}") for s in seeds}
    card = {k: v for k, v in members[seeds[0]].items() if k not in ("timm", "files")}
    card |= {"ensemble": seeds, "seed": None, "test": None}
    card["members"] = {
        str(s): {"test": c.get("test"), "files": c["files"]} for s, c in members.items()
    }
    files = {
        p.relative_to(folder).as_posix(): cards.sha256_file(p)
        for p in sorted((folder / MEMBERS).rglob("*"))
        if p.is_file()
    }
    card["files"] = files
    (folder / CARD).write_text(json.dumps(card, indent=2, default=str) + "\n", encoding="utf-8")
    pair = card.get("pair") or {}
    (folder / cards.README).write_text(
        f"# {card.get('study')}: {pair.get('source')} -> {pair.get('target')}, "
        f"ensemble of seeds {', '.join(map(str, seeds))}\n\n"
        "Predictions average the members' probabilities (per pixel for segmentation). Each member "
        f"under `{MEMBERS}/` is a kept model with its own card and test metrics.\n",
        encoding="utf-8",
    )
    sums = {CARD: cards.sha256_file(folder / CARD), **files}
    (folder / cards.SUMS).write_text(
        "".join(f"{h}  {name}\n" for name, h in sorted(sums.items())), encoding="utf-8"
    )


def _recorded(row: dict[str, Any]) -> dict[int, str | None]:
    return {int(m["seed"]): m.get("sha256") for m in row["models"]}


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` in one rename when the block ends."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HarnessError(f"--out {out}: already exists; remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders; a model is for sharing
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
