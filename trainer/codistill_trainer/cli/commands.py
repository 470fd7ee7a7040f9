"""The `codistill` command: run a manifest locally, watch a run folder, fetch the data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from codistill import names, spec
from codistill.runfolder import RunFolder
from codistill.storage import Bucket, StorageError

console = Console(width=None if sys.stdout.isatty() else 150)


def _check_task(run: spec.Codistillation) -> None:
    """Fail before any process starts when the task does not import or its data is missing."""
    from ..tasks import resolve

    try:
        task = resolve(run.spec.task.name, run.spec.task.args)
        task.eval_data(run.spec.training.batch_size, 1)
    except FileNotFoundError as e:
        raise spec.SpecError(f"spec.task: {e}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from .launch import RunFailed, run_local

    run = spec.load(args.manifest)
    _check_task(run)
    try:
        folder = run_local(run, Path.cwd(), args.fresh, console)
    except RunFailed as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        return 1
    return _show_report(folder)


def _show_report(folder: RunFolder) -> int:
    from .. import tables

    result = folder.report()
    if result is None:
        console.print(f"no report yet in {folder.where(names.REPORT)}")
        return 1
    console.print(tables.report_table(result))
    console.print(f"curves: {folder.where(names.CURVES_PNG)}")
    return 0


def _open_run(target: str) -> tuple[RunFolder, spec.Codistillation]:
    """A run folder given as a local path or URL."""
    url = target if "://" in target else Path(target).resolve().as_uri()
    folder = RunFolder(Bucket(url))
    run = folder.read_run()
    if run is None:
        raise StorageError(f"{url}: not a run folder (no {names.RUN_JSON})")
    return folder, run


def cmd_status(args: argparse.Namespace) -> int:
    from .. import tables

    folder, run = _open_run(args.run)
    progress = tables.load_progress(folder, run.spec.groups)
    console.print(tables.progress_table(run.metadata.name, progress, run.spec))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import write_report

    folder, run = _open_run(args.run)
    if not write_report(folder, run):
        console.print("not every group has finished yet")
        return 1
    return _show_report(folder)


def cmd_data(args: argparse.Namespace) -> int:
    from .. import datasets

    path = datasets.fetch(Path(args.dest) if args.dest else None)
    console.print(f"data ready in {path}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from ..worker import main as worker_main

    worker_main()
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codistill", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a Codistillation manifest with local processes")
    r.add_argument("manifest", help="YAML file holding one kind: Codistillation")
    r.add_argument("--fresh", action="store_true", help="delete the run folder first")
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("status", help="per-group table of a run folder (path or s3:// URL)")
    s.add_argument("run")
    s.set_defaults(fn=cmd_status)
    rep = sub.add_parser("report", help="(re)write and show the final report of a finished run")
    rep.add_argument("run")
    rep.set_defaults(fn=cmd_report)
    d = sub.add_parser("data", help="datasets of the built-in tasks")
    d.add_argument("action", choices=["fetch"])
    d.add_argument("--dest", help="folder (default: $CODISTILL_DATA or ~/.cache/codistill/data)")
    d.set_defaults(fn=cmd_data)
    w = sub.add_parser("worker", help="trainer entry point inside a pod (reads the env contract)")
    w.set_defaults(fn=cmd_worker)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        code = args.fn(args)
    except (spec.SpecError, StorageError) as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
