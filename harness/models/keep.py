"""Keeping the final runs' models (``keep_models``): each final run's weights are staged as it ends
(:func:`stage`, the trainer's model in hand); once the leaderboard is known, :func:`finalize` gives
every kept row's seeds a folder with a card (``card.write_model_folder``) and drops the staged
runs no kept row uses.

Staged files are unique per (Optuna study, trial, seed) and written atomically, so worker
processes that run final runs in parallel never write the same file. Rules that pick the same
trial share its runs: their row folders hold the same weights (hard links where possible).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.errors import WeightsError
from harness.fileio import write_json
from harness.models.card import (
    CARD,
    FORMAT,
    MODELS_DIR,
    STAGED_DIR,
    VOID_INDEX,
    WEIGHTS,
    models_root,
    read_card,
    row_folder,
    save_weights,
    sha256_file,
    slug,
    staged_sidecar,
    staged_weights,
    verify,
    write_model_folder,
)
from harness.versions import HARNESS_VERSION as __version__

KEEP_CHOICES = ("best", "all", "none")


def preprocessing(
    task: str, image_size: int, image_shape: tuple[int, ...], meta: dict[str, Any], mean, std
) -> dict[str, Any]:
    """How an image becomes the model's input, as the target's test images were scored: the
    stored size (a side, or [width, height]), the resize rule of files (None for generated
    domains), the evaluation crop, normalization, channel order and scale."""
    h, w = int(image_shape[-2]), int(image_shape[-1])
    stored = meta.get("stored_size") or (h if h == w else [w, h])
    larger = max(h, w) > image_size
    if task == "segmentation":
        evaluation = "sliding-window" if larger else "whole"
    else:
        evaluation = "center-crop" if larger else "whole"
    return {
        "image_size": image_size,
        "stored_size": stored,
        "resize": meta.get("resize"),
        "eval": evaluation,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "channels": "RGB",
        "scale": "uint8/255",
    }


def stage(
    results_dir: Path, study_name: str, trial: int, seed: int, model: Any, sidecar: dict[str, Any]
) -> Path:
    """Write one final run's full state dict and its sidecar (what only the trainer knows) under
    ``models/.staged/``; the weights first, so a sidecar always has its weights."""
    path = staged_weights(models_root(results_dir), study_name, trial, seed)
    save_weights(path, model.state_dict())
    sidecar = {**sidecar, "study_name": study_name, "trial": trial, "seed": seed}
    write_json(staged_sidecar(path), {**sidecar, "sha256": sha256_file(path)})
    return path


# ---------------------------------------------------------------------------- after the board


def kept_rows(board: Any, keep: str) -> list[int]:
    """The board's row positions whose models are kept: for "best" each pair's rank-1 row among
    rows not flagged oracle, for "all" every row with final seeds, for "none" none."""
    if keep == "none" or "best_trial" not in board:
        return []
    rows = board.to_dict("records")
    has_runs = [i for i, r in enumerate(rows) if _number(r.get("best_trial")) is not None]
    if keep == "all":
        return has_runs
    return [
        i
        for i in has_runs
        if not bool(rows[i].get("oracle") or False) and _number(rows[i].get("rank")) == 1
    ]


def _number(v: Any) -> int | None:
    try:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
    except (TypeError, ValueError):
        return None


def finalize(
    results_dir: Path,
    spec: Any,
    board: Any,
    provenance: dict[str, Any],
    log: Callable[[str], None] = lambda line: print(f"warning: {line}", file=sys.stderr),
) -> dict[int, list[dict[str, Any]]]:
    """Give every kept row's staged seeds a folder with a card; return, by the board's row
    position, the row's kept models ({seed, path relative to ``results_dir``, sha256}). For
    "best", staged runs no kept row uses are deleted; nothing a kept row needs ever is. Running it
    again changes nothing (a folder that verifies with the same weights is left as it is)."""
    root = models_root(results_dir)
    keep = getattr(spec, "keep_models", "best")
    if not (root / STAGED_DIR).is_dir() and not root.is_dir():
        return {}
    rows = board.to_dict("records")
    names = _study_names(spec)
    out: dict[int, list[dict[str, Any]]] = {}
    used: set[Path] = set()
    for i in kept_rows(board, keep):
        row = rows[i]
        study = names.get((row["pair"], row["method"]))
        kept = []
        for seed in row.get("seeds") or []:
            folder = row_folder(root, row["pair"], row["method"], row["selection"], int(seed))
            staged = (
                staged_weights(root, study, int(row["best_trial"]), int(seed)) if study else None
            )
            if staged is not None:
                used.add(staged)
            entry = _keep_seed(folder, staged, spec, row, provenance, log)
            if entry is not None:
                kept.append(
                    {"seed": int(seed), "path": str(folder.relative_to(results_dir)), **entry}
                )
        if kept:
            out[i] = kept
        else:
            log(
                f"{row['pair']} | {row['method']} | {row['selection']}: kept row without a kept "
                "model (its final runs' weights were not staged, or were dropped before this "
                "row became the one kept); re-run the study to keep it"
            )
    decided = _decided_pairs(rows)
    done = {slug(n) for (pair, _), n in names.items() if pair in decided}
    kept_folders = {
        root / Path(m["path"]).relative_to(MODELS_DIR) for ms in out.values() for m in ms
    }
    _drop_unused(root, used, done, kept_folders, decided, keep)
    return out


def _decided_pairs(rows: list[dict[str, Any]]) -> set[str]:
    """Pairs whose rows have all their final runs (or none to have): their kept rows will not
    change until the study is run again, so what they do not keep may go."""
    pairs: dict[str, bool] = {}
    for r in rows:
        ok = r.get("status") in ("final", "no completed trial")
        pairs[r["pair"]] = pairs.get(r["pair"], True) and ok
    return {p for p, ok in pairs.items() if ok}


def _study_names(spec: Any) -> dict[tuple[str, str], str]:
    """(pair key, method key) -> the Optuna study's name (``store.schema.optuna_study_name``)."""
    from harness.store.schema import optuna_study_name

    return {(p.key, m.key): optuna_study_name(p, m) for p in spec.pairs for m in spec.methods}


def _keep_seed(
    folder: Path,
    staged: Path | None,
    spec: Any,
    row: dict[str, Any],
    provenance: dict[str, Any],
    log: Callable[[str], None],
) -> dict[str, str] | None:
    """The kept seed's folder, made from its staged run where it is not already there."""
    sidecar_path = staged_sidecar(staged) if staged is not None else None
    if sidecar_path is None or not sidecar_path.is_file() or not staged.is_file():
        if _intact(folder) and _scored_row(read_card(folder), row):
            return {"sha256": read_card(folder)["files"][WEIGHTS]}  # staged files since dropped
        return None  # a study run before models were kept, or with keep_models = "none"
    sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    card = make_card(spec, row, sidecar, provenance)
    if _intact(folder) and _same(read_card(folder), card, sidecar["sha256"]):
        return {"sha256": sidecar["sha256"]}  # kept already: its card keeps its provenance
    if sidecar.get("sha256") != sha256_file(staged):
        log(f"{staged}: sha256 differs from its sidecar; not kept")
        return None
    write_model_folder(folder, staged, card)
    return {"sha256": sidecar["sha256"]}


def _scored_row(card: dict[str, Any], row: dict[str, Any]) -> bool:
    """Whether a kept folder's card is of the trial the row scored now (a resumed study may have
    picked another trial since the folder was kept)."""
    return _number(row.get("best_trial")) == card.get("trial") and card.get("selection", {}).get(
        "rule"
    ) == row.get("selection")


def _same(old: dict[str, Any], new: dict[str, Any], sha256: str) -> bool:
    """Whether a kept folder already holds these weights for the same row (provenance aside:
    its time of writing changes with every leaderboard)."""
    if old["files"].get(WEIGHTS) != sha256:
        return False
    return all(old.get(k) == v for k, v in new.items() if k not in ("provenance", "files"))


def _intact(folder: Path) -> bool:
    try:
        verify(folder)
    except WeightsError:
        return False
    return True


def make_card(
    spec: Any, row: dict[str, Any], sidecar: dict[str, Any], provenance: dict[str, Any]
) -> dict[str, Any]:
    """The card of one kept seed: the row it scored in and what its final run's trainer knew."""
    return {
        "format": FORMAT,
        "harness_version": __version__,
        "study": spec.name,
        "task": sidecar["task"],
        "class_names": list(sidecar["class_names"]),
        "void_index": VOID_INDEX if sidecar["task"] == "segmentation" else None,
        "backbone": sidecar["backbone"],
        "head": sidecar["head"],
        "strategy": sidecar["strategy"],
        "params": sidecar["params"],
        "trial": sidecar["trial"],
        "seed": sidecar["seed"],
        "precision": sidecar.get("precision"),
        "preprocessing": sidecar["preprocessing"],
        "pair": {"source": row["source"], "target": row["target"]},
        "selection": {"rule": row["selection"], "oracle": bool(row.get("oracle") or False)},
        "method": row["method"],
        "test": sidecar["test"],
        "provenance": provenance,
        "timm": sidecar.get("timm"),
    }


def _drop_unused(
    root: Path, used: set[Path], done: set[str], kept: set[Path], decided: set[str], keep: str
) -> None:
    """For decided pairs only: with "best", delete the staged runs (weights and sidecar) no kept
    row uses; with any setting, delete row folders of rows no longer kept (another row became
    rank 1). Emptied folders go too. Nothing a kept row uses is touched."""
    staged_root = root / STAGED_DIR
    if keep == "best" and staged_root.is_dir():
        for path in staged_root.glob("*/*.safetensors"):
            if path.parent.name in done and path not in used:
                staged_sidecar(path).unlink(missing_ok=True)
                path.unlink(missing_ok=True)
    for pair in decided:
        pair_dir = root / slug(pair)
        for seed_dir in pair_dir.glob("*/*/seed-*") if pair_dir.is_dir() else []:
            if seed_dir not in kept and (seed_dir / CARD).is_file():
                shutil.rmtree(seed_dir)
    for folder in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
