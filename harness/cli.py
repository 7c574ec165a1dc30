"""The ``harness`` command line. Errors are caught once, here, and printed as one line plus a hint."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from harness.cli_models import register as register_model_commands
from harness.cli_rank import register as register_rank_command
from harness.console import console, out, plugins_table, print_board, run_header
from harness.errors import HarnessError, StudySpecError
from harness.registry import BUILTIN_COMMANDS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Benchmark which backbone, head, adaptation strategy and recipe transfers best between image domains.",
)

StudyOpt = Annotated[
    str,
    typer.Option("--study", "-s", help="study name under benchmarks/ or a path to a .toml file"),
]
_WHERE = "default: results/, beside the study file for one outside benchmarks/"
ResultsOpt = Annotated[
    Path | None, typer.Option("--results-dir", help=f"where <study>/ goes ({_WHERE})")
]
_INDEX = "regenerate README.md, the index beside <study>/ (default: for benchmarks/ studies)"
IndexOpt = Annotated[bool | None, typer.Option("--index/--no-index", help=_INDEX)]
ReportOpt = Annotated[
    bool,
    typer.Option(
        "--report/--no-report",
        help="also write index.html with plots, the reproducible bundle/ and results/README.md",
    ),
]
StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Optuna storage URL, e.g. postgresql://user@host/db shared by several machines "
        "(default: the journal file results/<study>/optuna.journal, or the optuna.db a study was begun in)",
    ),
]


def _log(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {escape(msg)}", soft_wrap=True)


def _quiet_libraries() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _parse_sets(values: list[str] | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise StudySpecError(f"--set {item!r}: expected key=value, e.g. --set budget.trials=4")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        overrides[key.strip()] = value
    return overrides


SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a study field: --set budget.trials=4"),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="only print the leaderboard")]
WorkersOpt = Annotated[
    int,
    typer.Option(
        "--workers",
        "-w",
        min=1,
        help="worker processes on this machine sharing the studies (CPU threads divided, one GPU each)",
    ),
]


@app.command()
def run(
    study: StudyOpt,
    storage: StorageOpt = None,
    results_dir: ResultsOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    report: ReportOpt = True,
    index: IndexOpt = None,
    workers: WorkersOpt = 1,
    worker_rank: Annotated[int | None, typer.Option("--worker-rank", hidden=True)] = None,
) -> None:
    """Search every pair x method of a study, run the final seeds, and write the leaderboard.

    Example: harness run --study quickstart --workers 2

    Running the same command again resumes: completed trials are kept and the budget is topped up.
    Several machines share a study through one database: harness run --study NAME --storage postgresql://...
    """
    from harness.publish.location import results_root
    from harness.registry import get_registry
    from harness.search import RunOptions, build_driver
    from harness.search.outcome import check_outcome
    from harness.search.workers import install_preemption_handler
    from harness.study import load_study

    install_preemption_handler()  # SIGTERM (pre-emption) stops like Ctrl-C: the running trial is marked
    # a lone run, or the parent of workers: it checks, reports and publishes
    lead = worker_rank is None
    if not lead:
        _worker_threads()
    spec = load_study(study, _parse_sets(set_))
    _quiet_libraries()
    results_dir = results_root(spec, results_dir)
    target_dir = results_dir / spec.name
    started = time.perf_counter()
    log = _run_log(quiet, worker_rank)
    options = RunOptions(
        results_dir=target_dir, storage=storage, log=log, workers=max(workers, 1), rank=worker_rank
    )
    driver = build_driver(spec, get_registry(), options)
    if lead:
        log(run_header(driver))
    try:
        if workers > 1 and lead:
            _run_workers(driver, study, results_dir, set_ or [], quiet, workers, log)
        else:
            driver.run()
    except BaseException as exc:
        _stopped(driver, target_dir, lead, exc)
        raise
    if lead:
        _write_board(spec, driver.storage_url, target_dir, quiet=False, report=report, index=index)
        log(f"done in {time.perf_counter() - started:.0f}s")
        # every trial of a method failed: exit 1, the leaderboard written
        check_outcome(spec, driver.storage, target_dir / "trials.csv")


def _worker_threads() -> None:
    """A worker's share of the CPU threads, as its parent set it."""
    import torch

    torch.set_num_threads(int(os.environ.get("HARNESS_NUM_THREADS", torch.get_num_threads())))


def _run_log(quiet: bool, worker_rank: int | None) -> Any:
    if quiet:
        return lambda msg: None
    return _log if worker_rank is None else lambda msg: _log(f"[worker {worker_rank}] {msg}")


def _stopped(driver: Any, target_dir: Path, lead: bool, exc: BaseException) -> None:
    """A run ends early: publish what is finished (the storage keeps every trial either way); an
    interrupt exits with 130."""
    if driver.started and lead:
        try:
            _write_board(driver.spec, driver.storage_url, target_dir, quiet=True)
        except Exception as write_exc:  # noqa: BLE001
            console.print(
                f"[yellow]could not write the partial leaderboard[/]: {escape(str(write_exc))}"
            )
    if isinstance(exc, KeyboardInterrupt):
        if lead:
            console.print(
                "[yellow]interrupted[/]: finished trials are kept; run the same command again to resume"
            )
        raise typer.Exit(130) from None


def _run_workers(
    driver: Any,
    study: str,
    results_dir: Path,
    sets: list[str],
    quiet: bool,
    workers: int,
    log: Any,
) -> None:
    """Check the study once here, then let ``workers`` processes share it; a dead worker's trial is
    marked failed at once and queued again for the others."""
    from harness.search.workers import run_workers

    driver.preflight()  # a broken study fails once, before any worker starts; source weights are cached
    argv = [
        "--study",
        study,
        "--storage",
        driver.storage_url,
        "--results-dir",
        str(results_dir),
        "--workers",
        str(workers),
    ]
    argv += [a for s in sets for a in ("--set", s)] + (["--quiet"] if quiet else [])

    def on_exit(rank: int, code: int) -> None:
        if code != 0:
            log(
                f"worker {rank} ended with {'signal ' + str(-code) if code < 0 else 'status ' + str(code)}"
            )
            driver.reap_all()

    codes = run_workers(argv, workers, driver.spec.device, on_exit, log)
    if any(c in (130, -2, -15) for c in codes):
        raise KeyboardInterrupt
    bad = [c for c in codes if c != 0]
    if bad:
        log(
            f"{len(bad)} of {workers} workers failed; finished trials are kept, run the same command again to go on"
        )
        raise typer.Exit(bad[0] if bad[0] > 0 else 1)


@app.command("leaderboard")
def leaderboard_cmd(
    study: StudyOpt,
    storage: StorageOpt = None,
    results_dir: ResultsOpt = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="the same overrides the run was given")
    ] = None,
    report: ReportOpt = True,
    index: IndexOpt = None,
) -> None:
    """Rebuild results/<study>/ leaderboard files from the storage, without training.

    Example: harness leaderboard --study quickstart
    """
    from harness.publish.location import results_root, run_command
    from harness.store.backends import embedded_storage
    from harness.study import load_study

    spec = load_study(study, _parse_sets(set_))
    _quiet_libraries()
    target_dir = results_root(spec, results_dir) / spec.name
    url = storage or embedded_storage(target_dir)
    if storage is None and not any(
        (target_dir / f).is_file() for f in ("optuna.db", "optuna.journal")
    ):
        raise HarnessError(
            f"no results storage for study {spec.name!r} in {target_dir} (optuna.db or optuna.journal)",
            hint=f"run `{run_command(spec, results_dir)}` first, or pass --storage URL",
        )
    _write_board(spec, url, target_dir, quiet=False, report=report, index=index)


def _write_board(
    spec: Any, url: str, target_dir: Path, quiet: bool, report: bool = False, index: Any = None
) -> None:
    """The leaderboard files; with ``report`` the page, the bundle and (for a study under
    benchmarks/, or as ``index`` says) the published index."""
    from harness.publish.outputs import write_outputs

    board, paths, failed = write_outputs(spec, url, target_dir, report, index)
    if failed:
        console.print(
            f"[yellow]warning:[/] the leaderboard is written but the report is not: {escape(failed)}"
        )
    if not quiet:
        print_board(spec, board)
        console.print(f"wrote {', '.join(str(p) for p in paths)}", soft_wrap=True)


@app.command()
def plugins(
    kind: Annotated[
        str | None,
        typer.Option(
            "--kind", help="list every name of one kind: backbone, head, dataset, strategy"
        ),
    ] = None,
) -> None:
    """List plugins: distribution, version, what each registered, and load errors.

    Example: harness plugins --kind strategy
    """
    from harness.registry import KINDS, get_registry

    registry = get_registry()
    if kind is not None:
        if kind not in KINDS:
            from harness.registry import unknown_message

            raise HarnessError(
                unknown_message("kind", kind, list(KINDS)), hint=f"kinds: {', '.join(KINDS)}"
            )
        for name in registry.names(kind):
            e = registry.entries[kind][name]
            out.print(f"{name}\t{e.plugin} ({e.dist})\t{e.description}")
        return
    out.print(plugins_table(registry))
    if registry.errors:
        console.print(f"[red]{len(registry.errors)} plugin(s) failed to load[/]; the others work")


@app.command()
def validate(
    study: StudyOpt, storage: StorageOpt = None, results_dir: ResultsOpt = None, set_: SetOpt = None
) -> None:
    """Check a study as `harness run` does before training, writing no results: plugins, options,
    device, datasets (decoded into the image cache as a run would), weights, a batch per model.

    Example: harness validate --study quickstart
    """
    from harness.publish.location import results_root
    from harness.registry import get_registry
    from harness.search import RunOptions, build_driver
    from harness.study import load_study

    spec = load_study(study, _parse_sets(set_))
    _quiet_libraries()
    options = RunOptions(results_root(spec, results_dir) / spec.name, storage, _log)
    driver = build_driver(spec, get_registry(), options, check_only=True)
    for note in driver.validate():
        console.print(f"[dim]note:[/] {escape(note)}", soft_wrap=True)
    out.print(f"{spec.path}: ok ({len(spec.pairs)} pair(s), {len(spec.methods)} method(s))")


@app.command("check-plugin")
def check_plugin_cmd(
    name: Annotated[
        str, typer.Argument(help="plugin (entry-point) name, as `harness plugins` lists it")
    ],
) -> None:
    """Run the contract checks of harness.testing on every entry of one plugin and print what failed.

    Example: harness check-plugin strategies
    """
    from harness.registry import get_registry, unknown_message
    from harness.testing import check_plugin

    _quiet_libraries()
    registry = get_registry()
    if name not in registry.plugins:
        raise HarnessError(
            unknown_message("plugin", name, sorted(registry.plugins)),
            hint="`harness plugins` lists them",
        )
    results = check_plugin(registry, name)
    failed = 0
    for entry, checks in results.items():
        bad = [c for c in checks if not c.passed]
        failed += len(bad)
        mark = "[green]ok[/]" if not bad else f"[red]{len(bad)} failed[/]"
        out.print(f"{escape(entry)}: {mark} ({len(checks)} checks)")
        for c in bad:
            out.print(f"  [red]x[/] {escape(c.name)}: {escape(c.detail)}")
    if failed:
        console.print(f"[red]{failed} check(s) failed[/] in plugin {name!r}")
        raise typer.Exit(1)
    console.print(f"plugin {name!r} passes every check")


@app.command("index")
def index_cmd(results_dir: ResultsOpt = Path("results")) -> None:
    """Regenerate results/README.md: every published study with its headline row.

    Example: harness index
    """
    from harness.publish.index import write_results_index

    console.print(f"wrote {write_results_index(results_dir)}")


@app.command("ls")
def ls_cmd(results_dir: ResultsOpt = Path("results")) -> None:
    """List the studies under benchmarks/ and their state: not started, partial or published.

    Example: harness ls
    """
    from harness.publish.index import study_state

    base = Path.cwd() / "benchmarks"
    studies = sorted(base.glob("*.toml")) if base.is_dir() else []
    if not studies:
        raise HarnessError(f"no study files in {base}", hint="a study is benchmarks/<name>.toml")
    table = Table(title="studies")
    for col in ("study", "state", "rows", "description"):
        table.add_column(col, overflow="fold")
    for path in studies:
        table.add_row(path.stem, *study_state(path, results_dir / path.stem))
    out.print(table)


def add_plugin_commands(target: typer.Typer = app) -> list[str]:
    """Add the subcommands plugins register (``register_commands``); returns their names."""
    from harness.registry import get_registry

    added = []
    registry = get_registry()
    for name in registry.names("command"):
        entry = registry.entries["command"][name]
        if name in BUILTIN_COMMANDS:
            info = registry.plugins.get(entry.plugin)
            if info is not None:
                info.error = f"command {name!r} is a built-in command; not added"
            continue
        help_text = entry.description or (entry.factory.__doc__ or "").strip() or None
        target.command(name, help=help_text)(entry.factory)
        added.append(name)
    return added


register_model_commands(app)  # export, predict (harness/cli_models.py), after the others in --help
register_rank_command(app, _parse_sets)  # rank (harness/cli_rank.py)


def main() -> None:
    # Plugin commands need the plugins loaded; built-in commands start without that cost.
    if len(sys.argv) < 2 or sys.argv[1] not in BUILTIN_COMMANDS:
        # a failure is reported by `harness plugins`; the built-in commands still work
        with contextlib.suppress(HarnessError):
            add_plugin_commands()
    try:
        app()
    except HarnessError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        if exc.hint:
            console.print(f"[dim]hint:[/] {escape(exc.hint)}", soft_wrap=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
