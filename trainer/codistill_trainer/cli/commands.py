"""The `codistill` command: run a manifest locally, watch a run folder, fetch the data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

from codistill import names, spec, validation
from codistill.runfolder import RunFolder
from codistill.storage import Bucket, StorageError

# No markup: what is printed holds user text and log tails ("[/__w/pytorch/...]" from gloo),
# which rich would read as markup and fail on. Styles are given as Text instead.
console = Console(width=None if sys.stdout.isatty() else 150, markup=False, highlight=False)


def error(e: Exception) -> Text:
    return Text.assemble(("error: ", "red"), str(e))


def _check_task(run: spec.Codistillation) -> None:
    """Fail before any process starts when the task does not import or its data is missing."""
    from ..tasks import resolve

    try:
        task = resolve(run.spec.task.name, run.spec.task.args, allow=(run.spec.task.name,))
        task.eval_data(run.spec.training.batch_size, 1)
    except FileNotFoundError as e:
        raise spec.SpecError(f"spec.task: {e}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from .launch import RunFailed, check_capacity, run_local

    run = spec.load(args.manifest)
    check_capacity(run, getattr(args, "force", False))
    _check_task(run)
    try:
        folder = run_local(run, Path.cwd(), args.fresh, console)
    except RunFailed as e:
        console.print(error(e))
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


def _open_run(target: str, view: bool = False) -> tuple[RunFolder, spec.Codistillation]:
    """A run folder given as a local path or URL; `view`: read as a viewer (one short attempt
    per call, see `tables.viewer_folder`), for a command that only looks."""
    from .. import tables

    url = target if "://" in target else Path(target).resolve().as_uri()
    folder = tables.viewer_folder(url) if view else RunFolder(Bucket(url))
    run = folder.read_run()
    if run is None:
        raise StorageError(f"{url}: not a run folder (no {names.RUN_JSON})")
    return folder, run


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0: the table of every group; 1: the table, but the store failed to give some
    groups' progress (their rows say so, the line under the title names the store); 2: no table
    (not a run folder, or run.json unreadable)."""
    from .. import tables

    folder, run = _open_run(args.run, view=True)
    view = tables.read_view(folder, run.spec.groups)
    console.print(tables.progress_table(run.metadata.name, view, run.spec))
    return 0 if view.error is None else 1


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import write_report

    folder, run = _open_run(args.run)
    if not write_report(folder, run):
        console.print("not every group has finished yet")
        return 1
    return _show_report(folder)


def cmd_validate(args: argparse.Namespace) -> int:
    """Exit 0: runs locally and on a cluster; 1: only locally; 2: not at all (the error)."""
    run = spec.load(args.manifest)
    shape = (f"{run.spec.groups} group(s) x {run.spec.workers_per_group} pod(s) x "
             f"{run.spec.nproc_per_worker} process(es), {run.spec.training.steps} steps")
    try:
        validation.check(spec.read(args.manifest), args.manifest)
    except spec.SpecError as e:
        why = str(e).removeprefix(f"{args.manifest}: ")
        console.print(f"{args.manifest}: valid for `codistill run` ({shape}); not for a cluster: "
                      f"{why}", soft_wrap=True)
        return 0 if args.local else 1
    from codistill.jobs import unsupported

    cannot = "; ".join(unsupported(run, "trainjob"))
    if cannot and run.spec.backend == "trainjob":
        console.print(f"{args.manifest}: valid for `codistill run` ({shape}); not for a cluster: "
                      f"backend trainjob: {cannot}", soft_wrap=True, highlight=False)
        return 0 if args.local else 1
    console.print(f"{args.manifest}: valid, locally and on a cluster ({shape})", highlight=False,
                  soft_wrap=True)
    if cannot and run.spec.backend == "auto":  # on a cluster with Trainer v2, auto means TrainJob
        console.print(f"where Kubeflow Trainer v2 is installed only with spec.backend: "
                      f"pytorchjob: a TrainJob cannot carry {cannot}", highlight=False,
                      soft_wrap=True)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    """The jobs the operator creates for a manifest, as YAML (ownerReferences are added on the
    cluster, once the resource exists)."""
    import yaml

    from codistill.jobs import RENDER, unsupported

    doc = spec.read(args.manifest)
    if args.namespace:
        doc = {**doc, "metadata": {**doc.get("metadata", {}), "namespace": args.namespace}}
    run = validation.check(doc, args.manifest)
    backend = args.backend or run.spec.backend
    header = f"# {run.metadata.namespace}/{run.metadata.name}"
    if backend == "auto":  # the operator decides on the cluster; show one, say how to see the other
        header += ("\n# spec.backend auto: TrainJobs where Kubeflow Trainer v2 (>= 2.2) is "
                   "installed, else these PyTorchJobs (--backend trainjob shows the TrainJobs)")
        backend = "pytorchjob"
    cannot = unsupported(run, backend)
    if cannot:
        raise spec.SpecError(f"{args.manifest}: backend {backend}: {'; '.join(cannot)}")
    url = names.run_url(run.spec.storage.url, run.metadata.namespace, run.metadata.name)
    header += f"\n# run folder {url}\n"
    sys.stdout.write(header + yaml.safe_dump_all(RENDER[backend](run, url), sort_keys=False))
    return 0


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
    r.add_argument("--force", action="store_true",
                   help="start more processes than 4 per CPU core")
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("status", help="per-group table of a run folder (path or s3:// URL)")
    s.add_argument("run")
    s.set_defaults(fn=cmd_status)
    rep = sub.add_parser("report", help="(re)write and show the final report of a finished run")
    rep.add_argument("run")
    rep.set_defaults(fn=cmd_report)
    v = sub.add_parser("validate", help="check a manifest, for a local run and for a cluster")
    v.add_argument("manifest")
    v.add_argument("--local", action="store_true", help="only for `codistill run`")
    v.set_defaults(fn=cmd_validate)
    rn = sub.add_parser("render", help="print the Kubernetes jobs the operator would create")
    rn.add_argument("manifest")
    rn.add_argument("--namespace", "-n", help="the namespace it will be applied to")
    rn.add_argument("--backend", choices=["trainjob", "pytorchjob"],
                    help="the jobs of this backend (default: the manifest's spec.backend)")
    rn.set_defaults(fn=cmd_render)
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
        console.print(error(e), soft_wrap=True)  # one line, however long: never wrapped
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
