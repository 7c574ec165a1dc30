"""The commands that use kept models: ``harness export`` and ``harness predict``.

``register(app)`` adds them to the command line; the work is ``harness.models``'s.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from harness.console import console
from harness.errors import DatasetError, HarnessError

#: the names ``register`` adds (``harness.registry.BUILTIN_COMMANDS`` lists them too)
COMMANDS = ("export", "predict")

ModelOpt = Annotated[
    Path, typer.Option("--model", "-m", help="a kept model folder (harness export writes one)")
]
ImagesArg = Annotated[
    list[Path], typer.Argument(help="image files, or folders of them (searched recursively)")
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="classification: a .csv or .json file (default: CSV on stdout); "
        "segmentation: the folder for the mask PNGs",
    ),
]


def predict_cmd(
    model: ModelOpt,
    images: ImagesArg,
    out: OutOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="images per batch")] = 32,
    strict: Annotated[bool, typer.Option("--strict", help="stop at the first bad file")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1")] = "auto",
) -> None:
    """Predict with a kept model: a row per image (path, class, probabilities) for a classifier,
    a palette PNG mask per image at its own size for segmentation.

    Example: harness predict --model winner/ photos/ --out labels.csv
    """
    from harness.models.load import load_model
    from harness.models.predict import iter_files, looks_like_masks

    paths = collect_images(images)
    loaded = load_model(model, device=device)
    check_out(loaded.task, out, model)
    if looks_like_masks(paths, len(loaded.class_names)):
        raise DatasetError(
            f"every file in {', '.join(map(str, images))} is a label mask (one channel of class "
            "indices), not an image: give the images the masks label"
        )
    results = iter_files(loaded, paths, batch_size, strict=strict)
    if loaded.task == "segmentation":
        assert out is not None
        bad = write_masks(results, mask_names(images, paths, out), out)
    else:
        rows: list[Any] = []
        bad = 0
        for r in results:
            if r.error is not None:
                bad += 1
                _skipped(r.path, r.error)
                continue
            rows.append(r)
        write_table(rows, loaded.class_names, out)
    if bad:
        console.print(f"[yellow]{bad} of {len(paths)} file(s) skipped[/]")
        raise typer.Exit(1)


def _skipped(path: str, error: str) -> None:
    console.print(f"skipped {escape(path)}: {escape(error)}", soft_wrap=True)


def collect_images(args: list[Path]) -> list[Path]:
    """Files as given, folders' image files recursively in sorted order; none at all is an error."""
    from harness.data.decode import IMAGE_EXTENSIONS

    paths: list[Path] = []
    for arg in args:
        if arg.is_dir():
            paths += sorted(
                p for p in arg.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
        elif arg.exists():
            paths.append(arg)
        else:
            raise DatasetError(f"{arg}: no such file or folder")
    if not paths:
        where = ", ".join(str(a) for a in args)
        raise DatasetError(
            f"no image files in {where}",
            hint=f"image files end in {', '.join(sorted(IMAGE_EXTENSIONS))}",
        )
    return paths


def check_out(task: str, out: Path | None, model: Path) -> None:
    """``--out`` must be what the model's task writes: a table file, or a folder of masks."""
    table = out is not None and out.suffix.lower() in (".csv", ".json")
    if task == "segmentation" and (out is None or table or out.is_file()):
        raise HarnessError(
            f"{model} is a segmentation model: --out must be a folder for the mask PNGs"
            + (f", not {out}" if out is not None else "")
        )
    if task != "segmentation" and out is not None and not table:
        raise HarnessError(
            f"{model} is a {task} model: --out must be a .csv or .json file, not {out}",
            hint="segmentation models write a folder of masks",
        )


def write_table(rows: list[Any], class_names: list[str], out: Path | None) -> None:
    """One row per image: path, predicted class, a probability per class (CSV or JSON)."""
    from harness.fileio import write_text

    def label(r: Any) -> str:
        return class_names[int(r.probabilities.argmax())]

    if out is not None and out.suffix.lower() == ".json":
        records = [
            {
                "path": r.path,
                "prediction": label(r),
                "probabilities": dict(zip(class_names, r.probabilities.tolist(), strict=True)),
            }
            for r in rows
        ]
        text = json.dumps({"class_names": class_names, "rows": records}, indent=2) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        clash = {"path", "prediction"} & set(class_names)
        writer.writerow(["path", "prediction", *(f"p_{c}" if clash else c for c in class_names)])
        for r in rows:
            writer.writerow([r.path, label(r), *(repr(p) for p in r.probabilities.tolist())])
        text = buf.getvalue()
    if out is None:
        sys.stdout.write(text)
    else:
        write_text(out, text)
        console.print(f"wrote {escape(str(out))} ({len(rows)} image(s))")


def mask_names(args: list[Path], paths: list[Path], out: Path) -> list[Path]:
    """Where each image's mask goes: ``out/<its path under the folder given>.png``, or
    ``out/<name>.png`` for a file given by itself; two images may not share one."""
    folders = [a for a in args if a.is_dir()]
    names = []
    for p in paths:
        base = next((f for f in folders if p.is_relative_to(f)), None)
        rel = p.relative_to(base) if base is not None else Path(p.name)
        names.append(out / rel.with_suffix(".png"))
    seen: dict[Path, Path] = {}
    for p, n in zip(paths, names, strict=True):
        if n in seen:
            raise HarnessError(f"{seen[n]} and {p} would both write {n}; predict them apart")
        seen[n] = p
    return names


def write_masks(results: Any, names: list[Path], out: Path) -> int:
    """Each mask as a palette PNG (class indices, void 255); returns how many files were bad."""
    from harness.fileio import atomic_path
    from harness.models.predict import mask_image

    bad = written = 0
    for r, name in zip(results, names, strict=True):
        if r.error is not None:
            bad += 1
            _skipped(r.path, r.error)
            continue
        with atomic_path(name) as tmp:
            mask_image(r.mask).save(tmp, format="PNG")
        written += 1
    console.print(f"wrote {written} mask(s) under {escape(str(out))}")
    return bad


def export_cmd(
    study: Annotated[str, typer.Option("--study", "-s", help="study name or .toml path")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the folder to write (must not exist)")],
    pair: Annotated[
        str | None, typer.Option("--pair", help="source->target, or the target")
    ] = None,
    method: Annotated[str | None, typer.Option("--method", help="the row's method")] = None,
    rank: Annotated[int | None, typer.Option("--rank", min=1, help="the row's rank")] = None,
    rule: Annotated[str | None, typer.Option("--rule", help="the selection rule")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="which kept seed")] = None,
    ensemble: Annotated[
        bool, typer.Option("--ensemble", help="every kept seed, averaging probabilities")
    ] = False,
    results_dir: Annotated[
        Path | None, typer.Option("--results-dir", help="where <study>/ is, as for leaderboard")
    ] = None,
) -> None:
    """Copy a kept model of a leaderboard row, with its card, to a folder (or its K seeds as an
    ensemble); without a clear row, list the rows that kept models.

    Example: harness export --study quickstart --rank 1 --rule target-val --out winner/
    """
    from harness.models import export
    from harness.publish.location import results_root
    from harness.study import load_study

    if method is not None and rank is not None:
        raise HarnessError("--method and --rank both name a row: give one of them")
    if ensemble and seed is not None:
        raise HarnessError("--ensemble uses every kept seed: leave out --seed")
    spec = load_study(study)
    study_dir = results_root(spec, results_dir) / spec.name
    rows = export.read_rows(study_dir)
    try:
        row = export.choose_row(rows, export.Selectors(pair, method, rank, rule))
    except export.RowChoiceError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        for line in exc.choices:
            console.print(f"  {escape(line)}", soft_wrap=True)
        if exc.hint:
            console.print(f"[dim]hint:[/] {escape(exc.hint)}", soft_wrap=True)
        raise typer.Exit(2) from None
    if ensemble:
        path, seeds = export.export_ensemble(study_dir, row, out)
        console.print(f"wrote {escape(str(path))}: ensemble of seeds {seeds}")
    else:
        path, chosen = export.export_model(study_dir, row, out, seed)
        console.print(f"wrote {escape(str(path))}: seed {chosen} of {export.describe(row)}")


def register(app: typer.Typer) -> None:
    """Add ``export`` and ``predict`` to ``app``."""
    app.command("export")(export_cmd)
    app.command("predict")(predict_cmd)
