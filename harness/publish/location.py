"""Where a study's results go, and whether they are published: a study file under ``benchmarks/``
writes to ``results/<study>/`` and regenerates ``results/README.md``, the published index; any
other study file writes beside itself (``<its folder>/results/<study>/``), never among the
published studies, unless ``--results-dir`` says where."""

from __future__ import annotations

from pathlib import Path

from harness.study import StudySpec


def published(spec: StudySpec) -> bool:
    """Whether the study file is one of ``benchmarks/`` in the working folder."""
    return Path(spec.path).resolve().parent == (Path.cwd() / "benchmarks").resolve()


def results_root(spec: StudySpec, results_dir: Path | None) -> Path:
    """The folder that holds ``<study>/``: ``results_dir`` when given, else ``results/`` for a
    study under ``benchmarks/``, else ``results/`` beside the study file."""
    if results_dir is not None:
        return results_dir
    return Path("results") if published(spec) else Path(spec.path).parent / "results"


def run_command(spec: StudySpec, results_dir: Path | None) -> str:
    """The ``harness run`` command that writes where ``harness leaderboard`` reads: a bare name
    resolves only for a study under ``benchmarks/``, any other by its path."""
    command = f"harness run --study {spec.name if published(spec) else spec.path}"
    return command + (f" --results-dir {results_dir}" if results_dir is not None else "")
