"""Terminal tables (rich): live per-group progress and the final report.

Torch-free, so `codistill status RUN` starts fast. Progress files are written by running trainers
while this reads them, so a missing, half-written or odd file becomes a row saying so (see
`runfolder.Progress.parse`), never a crash.
"""

from __future__ import annotations

import math

from rich import box
from rich.table import Table
from rich.text import Text

from codistill import names
from codistill.runfolder import UNREADABLE, Progress, Report, RunFolder
from codistill.spec import Spec
from codistill.storage import StorageError

WAITING = "waiting"
STATE_STYLES = {
    "finished": "green",
    "failed": "bold red",
    "starting": "yellow",
    WAITING: "dim",
    UNREADABLE: "red",
}
# Short headers: thirteen columns must fit a 120-column terminal.
PROGRESS_HEADER = [
    "group", "state", "step", "loss", "task", "distill", "eval",
    "distills from", "stale", "published", "ex/s", "resumed", "warnings",
]
REPORT_HEADER = ["model", "eval loss", "accuracy", "churn flip", "churn mad"]
WARNING_CHARS = 40
NONE = "-"


def load_progress(folder: RunFolder, groups: int) -> dict[int, Progress | None]:
    """Every group's progress: None when not written yet; a file that cannot be read (torn,
    corrupt, or the bucket failing) is an 'unreadable' Progress saying why, so the display can
    show it rather than crash or pretend the group has not started."""
    found: dict[int, Progress | None] = {}
    for g in range(groups):
        try:
            found[g] = folder.progress(g)
        except StorageError as e:
            found[g] = Progress.unreadable(g, f"{names.progress_file(g)}: StorageError: {e}")
    return found


def num(x: float | None, digits: int = 3) -> str:
    """A float for a cell; '-' for a missing value."""
    if x is None:
        return NONE
    x = float(x)
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


def percent(x: float | None) -> str:
    return NONE if x is None else f"{100 * float(x):.1f}%"


def short(text: str, limit: int = WARNING_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def warnings_cell(warnings: list[str] | None) -> str:
    """The newest warning, shortened, and how many more there are."""
    if not warnings:
        return ""
    more = f" (+{len(warnings) - 1})" if len(warnings) > 1 else ""
    return short(str(warnings[-1])) + more


def step_cell(step: int, steps: int | None) -> str:
    if not steps:
        return str(step)
    return f"{step}/{steps} {100 * step / steps:.0f}%"


def progress_row(group: int, p: Progress | None, steps: int) -> list[str]:
    """The cells of one group's row; a group with no progress yet is 'waiting'."""
    if p is None:
        return [str(group), WAITING, step_cell(0, steps)] + [NONE] * 9 + [""]
    return [
        str(group),
        p.state or NONE,
        step_cell(p.step, p.steps or steps),
        num(p.loss),
        num(p.task_loss),
        num(p.distill_loss),
        num(p.eval_loss),
        ", ".join(f"{peer}:{p.teachers[peer]}" for peer in sorted(p.teachers, key=int)) or NONE,
        str(max(p.staleness.values())) if p.staleness else NONE,
        NONE if p.last_published is None else str(p.last_published),
        num(p.examples_per_sec, 0),
        NONE if p.resumed_from is None else str(p.resumed_from),
        warnings_cell(p.warnings),
    ]


def progress_table(run_name: str, progress: dict[int, Progress | None], spec: Spec) -> Table:
    """One row per group of the run (`codistill status` and the live view of `codistill run`)."""
    steps = spec.training.steps
    table = Table(title=f"{run_name}: {spec.groups} group(s), {steps} steps", title_justify="left",
                  box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for name in PROGRESS_HEADER:
        left = name in ("group", "state", "warnings")
        table.add_column(name, justify="left" if left else "right", no_wrap=name != "warnings")
    for g in range(spec.groups):
        # Text, not markup: a warning like "[s3] timeout" must print as written.
        *cells, warnings = progress_row(g, progress.get(g), steps)
        table.add_row(*map(Text, cells), Text(warnings, style="yellow"),
                      style=STATE_STYLES.get(cells[1], ""))
    return table


def report_rows(result: Report) -> list[list[str]]:
    """Rows under REPORT_HEADER: each group, the ensemble, each pair's churn and the mean churn.

    Shared by the terminal table and report/summary.md so the two always agree.
    """
    rows = [
        [f"group {g.group}", num(g.loss, 4), percent(g.accuracy), NONE, NONE]
        for g in result.groups
    ]
    if result.ensemble:
        e = result.ensemble
        rows.append(["ensemble", num(e.loss, 4), percent(e.accuracy), NONE, NONE])
    if result.churn:
        for c in result.churn.pairs:
            rows.append([f"churn {c.a} vs {c.b}", NONE, NONE, percent(c.flip), num(c.mad, 4)])
        mean = result.churn.mean
        rows.append(["churn (mean)", NONE, NONE, percent(mean.flip), num(mean.mad, 4)])
    return rows


def report_table(result: Report) -> Table:
    """The final report: per-group eval loss and accuracy, the ensemble, and churn."""
    table = Table(title=f"Final evaluation ({result.examples} examples)", title_justify="left")
    for i, name in enumerate(REPORT_HEADER):
        table.add_column(name, justify="left" if i == 0 else "right")
    previous = ""
    for row in report_rows(result):
        if row[0].startswith("churn") and not previous.startswith("churn"):
            table.add_section()  # a rule between the models and the churn between them
        style = "bold" if row[0] in ("ensemble", "churn (mean)") else ""
        table.add_row(*map(Text, row), style=style)
        previous = row[0]
    return table
