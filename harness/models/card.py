"""A kept model's folder: its paths and names, the card (``model.json``), the weights written
atomically as safetensors, the README rendered from the card, the hashes, and the checks a loader
runs before it trusts any of it.

Layout under a study's results directory::

    models/.staged/<study-slug>/trial-<t>-seed-<s>.safetensors   (+ .json sidecar)
    models/<pair-slug>/<method-slug>/<rule>/seed-<seed>/
        model.safetensors  model.json  README.md  SHA256SUMS  [timm/config.json timm/model.safetensors]
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.errors import WeightsError
from harness.fileio import atomic_path, write_json, write_text

#: the card's format; a loader refuses any other (a newer harness's card among them)
FORMAT = "harness-model/1"
FORMAT_PREFIX = "harness-model/"
MODELS_DIR = "models"
STAGED_DIR = ".staged"
WEIGHTS = "model.safetensors"
CARD = "model.json"
README = "README.md"
SUMS = "SHA256SUMS"
TIMM_DIR = "timm"
TIMM_CONFIG = f"{TIMM_DIR}/config.json"
TIMM_WEIGHTS = f"{TIMM_DIR}/model.safetensors"
#: the void index of segmentation masks (ignored in training and scoring)
VOID_INDEX = 255
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def slug(text: str) -> str:
    """A filesystem-safe, deterministic name for ``text``: the text itself where it is safe, else
    a readable prefix and a short hash of the whole text (so two texts never share a slug)."""
    safe = _UNSAFE.sub("-", text).strip("-.")[:60]
    if safe == text and safe:
        return safe
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return f"{safe}-{digest}" if safe else digest


def models_root(results_dir: str | Path) -> Path:
    """Where a study's kept models live: ``<results_dir>/models``."""
    return Path(results_dir) / MODELS_DIR


def row_folder(
    models_root: str | Path, pair_key: str, method_key: str, rule: str, seed: int
) -> Path:
    """The folder of one kept seed of a leaderboard row (pair, method, selection rule)."""
    return Path(models_root) / slug(pair_key) / slug(method_key) / slug(rule) / f"seed-{seed}"


def staged_weights(models_root: str | Path, study_name: str, trial: int, seed: int) -> Path:
    """The staged weights of one final run (one per optuna study, trial and seed)."""
    folder = Path(models_root) / STAGED_DIR / slug(study_name)
    return folder / f"trial-{trial}-seed-{seed}.safetensors"


def staged_sidecar(weights: Path) -> Path:
    """The JSON beside staged weights: what only the trainer knows (see ``keep.stage``)."""
    return weights.with_suffix(".json")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_weights(path: str | Path, state_dict: Mapping[str, Any]) -> None:
    """Write a state dict as safetensors, atomically (tensors copied to the CPU, contiguous;
    tensors sharing memory are cloned so safetensors accepts them)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "harness": FORMAT})


def _place(src: Path, dest: Path) -> None:
    """``dest`` becomes ``src``'s bytes: a hard link where the filesystem allows, else a copy;
    either way under a temporary name first, so ``dest`` is never half written."""
    with atomic_path(dest) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def write_model_folder(
    folder: str | Path, state_dict: Mapping[str, Any] | str | Path, card: dict[str, Any]
) -> None:
    """Write a kept model: weights (a state dict, or the path of a safetensors file to link or
    copy), the timm layout where ``card["timm"]`` says it applies, the card with every file's
    hash, ``README.md`` and ``SHA256SUMS``. Each file is written atomically; the card and the
    sums come last, so a folder that verifies is complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS
    if isinstance(state_dict, (str, Path)):
        if Path(state_dict).resolve() != weights.resolve():
            _place(Path(state_dict), weights)
    else:
        save_weights(weights, state_dict)
    files = {WEIGHTS: sha256_file(weights)}
    timm_info = card.get("timm")
    if timm_info:
        from harness.models.timm_layout import timm_files

        state, config = timm_files(weights, card)
        save_weights(folder / TIMM_WEIGHTS, state)
        write_json(folder / TIMM_CONFIG, config)
        files |= {name: sha256_file(folder / name) for name in (TIMM_CONFIG, TIMM_WEIGHTS)}
    else:
        shutil.rmtree(folder / TIMM_DIR, ignore_errors=True)
    card = {**card, "format": card.get("format", FORMAT), "files": files}
    write_json(folder / CARD, card)
    write_text(folder / README, render_readme(card))
    sums = {CARD: sha256_file(folder / CARD), **files}
    write_text(folder / SUMS, "".join(f"{h}  {name}\n" for name, h in sorted(sums.items())))


def read_card(folder: str | Path) -> dict[str, Any]:
    """The card of a kept model's folder; refuses a missing or unreadable card and a format this
    harness does not know (a newer harness's). Hashes are :func:`verify`'s."""
    path = Path(folder) / CARD
    if not path.is_file():
        raise WeightsError(f"{path}: no model card (not a kept model's folder)")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: unreadable model card ({type(exc).__name__})") from None
    fmt = card.get("format") if isinstance(card, dict) else None
    if fmt != FORMAT:
        newer = isinstance(fmt, str) and fmt.startswith(FORMAT_PREFIX)
        why = "a newer harness's card; upgrade the harness" if newer else "unknown format"
        raise WeightsError(f"{path}: format {fmt!r} is not {FORMAT!r} ({why})")
    return card


def _sums(folder: Path) -> dict[str, str]:
    path = folder / SUMS
    if not path.is_file():
        raise WeightsError(f"{path}: missing (the folder's hashes)")
    sums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        if line.strip():
            sums[name.strip()] = digest.strip()
    return sums


def _check_safetensors(path: Path) -> None:
    """Refuse a weights file that is not safetensors (a pickle among others) before any load."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    size = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
    if len(head) < 9 or head[8:9] != b"{" or size > path.stat().st_size:
        raise WeightsError(f"{path}: not a safetensors file (refused; nothing was loaded)")


def verify(folder: str | Path) -> None:
    """Check a kept model's folder before anything in it is used: a card of this format, every
    file the card and ``SHA256SUMS`` list present with its hash, weights that are safetensors.
    Raises :class:`~harness.errors.WeightsError` with one line naming the file."""
    folder = Path(folder)
    card = read_card(folder)
    sums = _sums(folder)
    files = card.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise WeightsError(f"{folder / CARD}: lists no {WEIGHTS} hash")
    for name, digest in {**files, CARD: sums.get(CARD)}.items():
        path = folder / name
        if digest is None or sums.get(name) != digest:
            raise WeightsError(f"{folder / SUMS}: does not agree with the card about {name}")
        if not path.is_file():
            raise WeightsError(f"{path}: missing")
        if sha256_file(path) != digest:
            raise WeightsError(f"{path}: sha256 mismatch (changed since it was written)")
    for name in files:
        if name.endswith(".safetensors"):
            _check_safetensors(folder / name)


def _metrics_line(test: dict[str, Any]) -> str:
    shown = {k: v for k, v in test.items() if isinstance(v, (int, float))}
    return ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
    )


def render_readme(card: dict[str, Any]) -> str:
    """A short human summary of a card."""
    bb, head, strat, pre = card["backbone"], card["head"], card["strategy"], card["preprocessing"]
    pair, sel = card["pair"], card["selection"]
    names = card.get("class_names") or []
    shown = ", ".join(map(str, names[:20])) + (", ..." if len(names) > 20 else "")
    lines = [
        f"# {card['study']}: {pair['source']} -> {pair['target']}, seed {card['seed']}",
        "",
        f"A {card['task']} model kept by the transfer-learning harness ({card['format']}).",
        "",
        f"- backbone: `{bb['name']}` (weights {bb['weights']}; plugin {bb['plugin']}, "
        f"{bb['distribution']})",
        f"- head: `{head['name']}` {json.dumps(head.get('options') or {}, sort_keys=True)}",
        f"- strategy: `{strat['name']}` {json.dumps(strat.get('options') or {}, sort_keys=True)}",
        f"- selection: rule `{sel['rule']}`{' (oracle)' if sel.get('oracle') else ''}, "
        f"trial {card['trial']}",
        f"- target test: {_metrics_line(card.get('test') or {})}",
        f"- classes ({len(names)}): {shown}"
        + (f"; void index {card['void_index']}" if card.get("void_index") is not None else ""),
        f"- input: {pre['channels']} {pre['scale']}, stored at {pre['stored_size']} "
        f"(resize {pre['resize']}), evaluated {pre['eval']} at {pre['image_size']}, "
        f"normalized with mean {pre['mean']} and std {pre['std']}",
        "",
        "Check before use: `sha256sum -c SHA256SUMS`. Every parameter of the trial, the "
        "provenance of the study and the files' hashes are in `model.json`.",
    ]
    if card.get("timm"):
        lines += [
            "",
            "Without the harness (timm): "
            f"`timm.create_model('local-dir:{TIMM_DIR}', pretrained=True)`.",
        ]
    return "\n".join(lines) + "\n"
