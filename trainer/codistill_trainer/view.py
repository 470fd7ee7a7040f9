"""Terminal tables (rich): live per-group progress and the final report.

Torch-free, so `codistill status RUN` starts fast. Progress files are written by running trainers
while this reads them, so a missing, half-written or odd file becomes a row saying so, never a
crash.
"""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from . import layout
from .spec import Codistillation, Spec
from .storage import Bucket, StorageError

WAITING = "waiting"
UNREADABLE = "unreadable"  # the `state` of a progress file that exists but cannot be read
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


def load_progress(bucket: Bucket, groups: int) -> dict[int, dict | None]:
    """Every group's progress.json: None when not written yet.

    A file that exists but is not a JSON object (half-written on a local disk, corrupt, or the
    bucket failing) reads as `{"group": g, "state": "unreadable", "warnings": [why]}`, so the
    display can say so rather than crash or pretend the group has not started.
    """
    found: dict[int, dict | None] = {}
    for g in range(groups):
        rel = layout.progress_file(g)
        try:
            doc = bucket.get_json(rel)
        except (ValueError, StorageError) as e:  # JSONDecodeError and UnicodeDecodeError too
            doc = _unreadable(g, f"{rel}: {type(e).__name__}: {e}")
        if doc is not None and not isinstance(doc, dict):
            doc = _unreadable(g, f"{rel}: expected a JSON object, got {type(doc).__name__}")
        found[g] = doc
    return found


def _unreadable(group: int, why: str) -> dict[str, Any]:
    return {"group": group, "state": UNREADABLE, "warnings": [why]}


def num(x: Any, digits: int = 3) -> str:
    """A float for a cell; '-' for a missing value."""
    if x is None:
        return NONE
    x = float(x)
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


def percent(x: Any) -> str:
    return NONE if x is None else f"{100 * float(x):.1f}%"


def short(text: str, limit: int = WARNING_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def warnings_cell(warnings: list[str] | None) -> str:
    """The newest warning, shortened, and how many more there are."""
    if not warnings:
        return ""
    more = f" (+{len(warnings) - 1})" if len(warnings) > 1 else ""
    return short(str(warnings[-1])) + more


def step_cell(step: Any, steps: Any) -> str:
    if step is None:
        return NONE
    if not steps:
        return str(int(step))
    return f"{int(step)}/{int(steps)} {100 * int(step) / int(steps):.0f}%"


def progress_row(group: int, p: dict[str, Any] | None, steps: int) -> list[str]:
    """The cells of one group's row; a group with no progress yet is 'waiting'."""
    if p is None:
        return [str(group), WAITING, step_cell(0, steps)] + [NONE] * 9 + [""]
    teachers = p.get("teachers") or {}
    staleness = [int(s) for s in (p.get("staleness") or {}).values()]
    return [
        str(group),
        str(p.get("state", NONE)),
        step_cell(p.get("step"), p.get("steps") or steps),
        num(p.get("loss")),
        num(p.get("taskLoss")),
        num(p.get("distillLoss")),
        num(p.get("evalLoss")),
        ", ".join(f"{peer}:{int(teachers[peer])}" for peer in sorted(teachers, key=int)) or NONE,
        str(max(staleness)) if staleness else NONE,
        NONE if p.get("lastPublished") is None else str(int(p["lastPublished"])),
        num(p.get("examplesPerSec"), 0),
        NONE if p.get("resumedFrom") is None else str(int(p["resumedFrom"])),
        warnings_cell(p.get("warnings")),
    ]


def safe_row(group: int, p: Any, steps: int) -> list[str]:
    """`progress_row`, or an 'unreadable' row when the file's fields have unexpected types."""
    try:
        if p is not None and not isinstance(p, dict):
            raise TypeError(f"expected a JSON object, got {type(p).__name__}")
        return progress_row(group, p, steps)
    except (TypeError, ValueError, AttributeError) as e:
        return progress_row(group, _unreadable(group, f"{type(e).__name__}: {e}"), steps)


def progress_table(
    run_name: str, progress: dict[int, dict | None], spec: Spec | Codistillation
) -> Table:
    """One row per group of the run (`codistill status` and the live view of `codistill run`)."""
    spec = spec.spec if isinstance(spec, Codistillation) else spec
    steps = spec.training.steps
    table = Table(title=f"{run_name}: {spec.groups} group(s), {steps} steps", title_justify="left",
                  box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for name in PROGRESS_HEADER:
        left = name in ("group", "state", "warnings")
        table.add_column(name, justify="left" if left else "right", no_wrap=name != "warnings")
    for g in range(spec.groups):
        # Text, not markup: a warning like "[s3] timeout" must print as written.
        *cells, warnings = safe_row(g, progress.get(g), steps)
        table.add_row(*map(Text, cells), Text(warnings, style="yellow"),
                      style=STATE_STYLES.get(cells[1], ""))
    return table


def report_rows(result: dict[str, Any]) -> list[list[str]]:
    """Rows under REPORT_HEADER: each group, the ensemble, each pair's churn and the mean churn.

    Shared by the terminal table and report/summary.md so the two always agree.
    """
    rows = [
        [f"group {g['group']}", num(g["loss"], 4), percent(g["accuracy"]), NONE, NONE]
        for g in result["groups"]
    ]
    if result.get("ensemble"):
        e = result["ensemble"]
        rows.append(["ensemble", num(e["loss"], 4), percent(e["accuracy"]), NONE, NONE])
    if result.get("churn"):
        for c in result["churn"]["pairs"]:
            rows.append([f"churn {c['a']} vs {c['b']}", NONE, NONE, percent(c["flip"]),
                         num(c["mad"], 4)])
        mean = result["churn"]["mean"]
        rows.append(["churn (mean)", NONE, NONE, percent(mean["flip"]), num(mean["mad"], 4)])
    return rows


def report_table(result: dict[str, Any]) -> Table:
    """The final report: per-group eval loss and accuracy, the ensemble, and churn."""
    table = Table(title=f"Final evaluation ({result['examples']} examples)", title_justify="left")
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
