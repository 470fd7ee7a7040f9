"""Section 1: steps to a target eval loss, synchronous SGD against codistillation.

First the batch-scaling curve of synchronous SGD (`groups: 1`): steps to a common target for
batches B0, 2 B0, 4 B0, ..., each run given at least a fixed number of examples and at least the
comparison budget of steps; the target is the worst of their best eval losses, so every batch
reaches it.
The plateau batch B is the smallest beyond which no doubling cuts the steps below PLATEAU times.
Then, at equal examples per step and over several seeds, synchronous SGD at G x B against G-way
codistillation (G groups at B on disjoint shards), G = 2 and 4; target = the best eval loss the
baseline reaches in its budget. Controls (G = 2): the groups on the *same* data, and other
exchange periods (staleness).

    python -m bench.steps_to_target [--quick] [--jobs 2] [--replot]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bench import common, sim

PLATEAU = 0.8  # a doubling that leaves more than 80 % of the steps no longer pays
SMOOTH = 3  # eval points in the moving average applied to every curve before comparing
WARMUP = 50
SCHEMA: common.Schema = {"tasks": {"*": {
    "scan": {"batches": {}, "steps": {}, "target": {}, "plateau_batch": {}},
    "batch": {},
    "groups": {"*": {"baseline_steps": {}, "codistill_steps": {}, "ratio": {}}},
    "controls": {"shared_data": {"ratio": {}}, "exchange_every": {}},
}}}


@dataclass(frozen=True)
class Setting:
    """How one task is run; the same optimizer and distillation settings in every arm."""

    task: str
    args: dict[str, Any]
    scan: tuple[int, ...]  # batches of the scaling curve, each twice the previous
    scan_examples: int  # a scan run trains max(scan_examples // batch, steps) steps
    steps: int  # budget of every comparison run
    seeds: int
    burn_in: int
    exchange: int  # exchangeEverySteps = reloadEverySteps
    staleness: tuple[int, ...]  # further exchange periods for the staleness control
    eval_size: tuple[int, int]  # fixed eval set: (batch size, batches)
    evals: int  # eval points per comparison run
    groups: tuple[int, ...] = (2, 4)
    lr: float = 3e-3  # Adam(W), constant after warm-up: the same for every batch size


LM = {"seq_len": 32, "embed": 32, "hidden": 64}
FULL = {
    "lm": Setting("lm", LM, scan=(16, 32, 64, 128, 256, 512), scan_examples=96_000, steps=1500,
                  seeds=3, burn_in=100, exchange=50, staleness=(10, 200), eval_size=(256, 4),
                  evals=30),
    "ctr": Setting("ctr", {}, scan=(16, 32, 64, 128, 256, 512, 1024, 2048),
                   scan_examples=100_000, steps=600, seeds=5, burn_in=100, exchange=25,
                   staleness=(5, 100), eval_size=(1024, 10), evals=60),
}
QUICK = {
    "lm": Setting("lm", LM, scan=(32, 64, 128, 256), scan_examples=32_000, steps=500, seeds=3,
                  burn_in=100, exchange=50, staleness=(), eval_size=(256, 4), evals=20,
                  groups=(2,)),
    "ctr": Setting("ctr", {}, scan=(128, 256, 512, 1024), scan_examples=100_000, steps=600,
                   seeds=3, burn_in=100, exchange=25, staleness=(100,), eval_size=(1024, 10),
                   evals=60),
}


def spec_doc(s: Setting, groups: int, batch: int, seed: int, steps: int,
             sharding: str = "disjoint", exchange: int | None = None) -> dict[str, Any]:
    """A run of `s`: the loop's own eval and checkpoints are pushed to the end (the bench
    evaluates on its fixed eval set itself)."""
    k = exchange or s.exchange
    return {
        "groups": groups,
        "task": {"name": s.task, "args": s.args},
        "training": {"steps": steps, "batchSize": batch, "seed": seed, "dataSharding": sharding,
                     "evalEverySteps": steps, "evalBatches": 1, "checkpointEverySteps": steps,
                     "optimizer": {"lr": s.lr, "warmupSteps": WARMUP}},
        "distillation": {"burnInSteps": s.burn_in, "exchangeEverySteps": k, "reloadEverySteps": k,
                         "maxStalenessSteps": 4 * k, "pollIntervalSeconds": sim.PARKED},
    }


def job(s: Setting, name: str, steps: int, **kw: Any) -> sim.Job:
    return sim.Job(f"{s.task}-{name}", spec_doc(s, steps=steps, **kw),
                   eval_every=max(steps // s.evals, 1), eval_size=s.eval_size)


def scan(s: Setting, workers: int, on: str) -> tuple[dict[str, Any], dict[int, list]]:
    """The batch-scaling curve of synchronous SGD and its plateau batch."""
    jobs = [job(s, f"scan-b{b}", max(s.scan_examples // b, s.steps), groups=1, batch=b, seed=0)
            for b in s.scan]
    curves = {b: o.curves[0] for b, o in zip(s.scan, sim.run_all(jobs, workers, on))}
    smoothed = {b: common.smooth(c, SMOOTH) for b, c in curves.items()}
    target = max(common.best(c) for c in smoothed.values())  # a loss every batch reaches
    steps = [common.steps_to_target(smoothed[b], target) for b in s.scan]
    batch = common.plateau(list(zip(s.scan, steps)), PLATEAU)
    common.show(f"{s.task}: steps to eval loss {target:.4f} (synchronous SGD)",
                [(b, n, round(n * b)) for b, n in zip(s.scan, steps)],
                ["batch", "steps", "examples"])
    return {"batches": list(s.scan), "steps": steps, "target": target, "threshold": PLATEAU,
            "plateau_batch": batch, "plateau_reached": batch is not None}, curves


def arms(s: Setting, batch: int) -> dict[tuple[str, int, int], sim.Job]:
    """Every comparison run, keyed (arm, parameter, seed)."""
    found = {}
    for seed in range(s.seeds):
        for g in s.groups:
            found["baseline", g, seed] = job(s, f"sync-{g}x{batch}-s{seed}", s.steps, groups=1,
                                             batch=g * batch, seed=seed)
            found["codistill", g, seed] = job(s, f"codist-{g}x{batch}-s{seed}", s.steps,
                                              groups=g, batch=batch, seed=seed)
        found["alone", 1, seed] = job(s, f"alone-1x{batch}-s{seed}", s.steps, groups=1,
                                      batch=batch, seed=seed)
        found["shared", 2, seed] = job(s, f"shared-2x{batch}-s{seed}", s.steps, groups=2,
                                       batch=batch, seed=seed, sharding="shared")
        for k in s.staleness:
            found["stale", k, seed] = job(s, f"codist-2x{batch}-k{k}-s{seed}", s.steps, groups=2,
                                          batch=batch, seed=seed, exchange=k)
    return found


def summarize(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of each side's steps and of the ratio codistill / baseline."""
    return {
        **{k: common.summary(p[k] for p in pairs)
           for k in ("baseline_steps", "codistill_steps", "ratio", "target", "codistill_best")},
        "censored": sum(not p["reached"] for p in pairs),
        "per_seed": pairs,
    }


def analyse(s: Setting, curves: dict[tuple[str, int, int], Any]) -> dict[str, Any]:
    def versus(arm: str, param: int, groups: int) -> dict[str, Any]:
        return summarize([
            common.compare(common.smooth(curves["baseline", groups, seed][0], SMOOTH),
                           common.smooth(common.mean_curve(list(curves[arm, param, seed].values())),
                                         SMOOTH))
            for seed in range(s.seeds)
        ])

    result = {
        "groups": {str(g): versus("codistill", g, g) for g in s.groups},
        "controls": {"shared_data": versus("shared", 2, 2),
                     "exchange_every": {str(s.exchange): versus("codistill", 2, 2),
                                        **{str(k): versus("stale", k, 2) for k in s.staleness}}},
        "reference": {"one_group_alone": versus("alone", 1, 2)},
    }
    rows = [(f"{g}-way vs sync {g}x", *stats(result["groups"][str(g)])) for g in s.groups]
    rows.append(("2-way, same data", *stats(result["controls"]["shared_data"])))
    rows += [(f"2-way, exchange every {k}", *stats(v))
             for k, v in result["controls"]["exchange_every"].items()]
    rows.append(("1 group alone vs sync 2x", *stats(result["reference"]["one_group_alone"])))
    common.show(f"{s.task}: steps to the baseline's best eval loss (mean over {s.seeds} seeds)",
                rows, ["comparison", "baseline", "codistill", "ratio", "+-", "not reached",
                       "target loss", "codistill best"])
    return result


def stats(r: dict[str, Any]) -> tuple[float, ...]:
    return (r["baseline_steps"]["mean"], r["codistill_steps"]["mean"], r["ratio"]["mean"],
            r["ratio"]["std"], r["censored"], r["target"]["mean"], r["codistill_best"]["mean"])


def bench_task(s: Setting, workers: int, on: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(result for the JSON, curves for the plot) of one task."""
    scanned, scan_curves = scan(s, workers, on)
    batch = scanned["plateau_batch"] or s.scan[-1]
    jobs = arms(s, batch)
    outcomes = dict(zip(jobs, sim.run_all(list(jobs.values()), workers, on)))
    curves = {key: o.curves for key, o in outcomes.items()}
    result = {"setting": {**s.__dict__, "warmup_steps": WARMUP}, "scan": scanned, "batch": batch,
              **analyse(s, curves),
              "curves": {"scan": {str(b): rounded(c) for b, c in scan_curves.items()},
                         "runs": {o.job.name: {str(g): rounded(c) for g, c in o.curves.items()}
                                  for o in outcomes.values()}}}
    return result, {"runs": curves}


def rounded(curve: list[tuple[int, float]]) -> list[list[float]]:
    """A raw eval curve for the result file (unsmoothed, 5 decimals)."""
    return [[step, round(loss, 5)] for step, loss in curve]


def plot(results: dict[str, Any], curves: dict[str, Any]) -> Figure:
    """Per task: the scaling curve, seed 0's eval curves, and the ratios with their spread."""
    fig = common.figure(cols=3, rows=len(results))
    for i, (task, r) in enumerate(results.items()):
        row = fig.axes[3 * i : 3 * i + 3]
        plot_scan(row[0], task, r["scan"])
        plot_curves(row[1], task, r, curves[task]["runs"])
        plot_ratios(row[2], task, r)
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return fig


def plot_scan(ax: Any, task: str, sc: dict[str, Any]) -> None:
    ax.loglog(sc["batches"], sc["steps"], "o-", label="synchronous SGD")
    ideal = [sc["steps"][0] * sc["batches"][0] / b for b in sc["batches"]]
    ax.loglog(sc["batches"], ideal, ":", color="grey", label="perfect scaling")
    ax.set_xticks(sc["batches"], [str(b) for b in sc["batches"]])
    ax.minorticks_off()
    if sc["plateau_batch"]:
        ax.axvline(sc["plateau_batch"], color="C3", alpha=0.5, label="plateau batch")
    ax.set(title=f"{task}: steps to eval loss {sc['target']:.3f}", xlabel="batch", ylabel="steps")


def plot_curves(ax: Any, task: str, r: dict[str, Any], runs: dict[tuple, Any]) -> None:
    for color, g in enumerate(r["setting"]["groups"]):
        codist = common.mean_curve(list(runs["codistill", g, 0].values()))
        ax.plot(*zip(*runs["baseline", g, 0][0]), color=f"C{color}", label=f"sync {g}x{r['batch']}")
        ax.plot(*zip(*codist), "--", color=f"C{color}", label=f"{g}-way codistill (mean of groups)")
    shared = common.mean_curve(list(runs["shared", 2, 0].values()))
    ax.plot(*zip(*shared), ":", color="C0", label="2-way, same data")
    ax.plot(*zip(*runs["alone", 1, 0][0]), "-.", color="grey",
            label=f"1 group at {r['batch']}, alone")
    ax.set_ylim(top=min(c[1] for c in runs["baseline", 2, 0][0]) * 1.25)
    ax.set(title=f"{task}: eval loss (seed 0)", xlabel="step")


def plot_ratios(ax: Any, task: str, r: dict[str, Any]) -> None:
    entries = bar_entries(r)
    bars = ax.bar([e[0] for e in entries], [e[1]["ratio"]["mean"] for e in entries],
                  yerr=[e[1]["ratio"]["std"] for e in entries], color="C2", alpha=0.7)
    for bar, (_, v) in zip(bars, entries):
        if v["censored"]:  # some seeds never reached the target: the ratio is a lower bound
            bar.set_hatch("//")
    ax.bar_label(bars, labels=[f">= ({v['censored']}/{v['ratio']['n']} not reached)"
                               if v["censored"] else "" for _, v in entries],
                 label_type="center", rotation=90, fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.5, color="C3", linestyle="--", label="paper (about 0.5)")
    ax.set(title=f"{task}: steps ratio codistill / sync", ylabel="ratio")
    ax.tick_params(axis="x", labelrotation=30)


def bar_entries(r: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, summarized comparison) of every bar in the ratio panel."""
    entries = [(f"{g}-way", v) for g, v in r["groups"].items()]
    entries.append(("same data", r["controls"]["shared_data"]))
    entries += [(f"K={k}", v) for k, v in r["controls"]["exchange_every"].items()]
    entries.append(("1 group\nalone", r["reference"]["one_group_alone"]))
    return entries


def replot(path: Path) -> None:
    """Redraw `<name>.png` from a result file's curves (job names follow from its settings)."""
    doc = json.loads(path.read_text())
    curves = {}
    for task, r in doc["tasks"].items():
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in r["setting"].items()
                  if k != "warmup_steps"}
        runs = r["curves"]["runs"]
        curves[task] = {"runs": {key: {int(g): [tuple(p) for p in c]
                                       for g, c in runs[j.name].items()}
                                 for key, j in arms(Setting(**fields), r["batch"]).items()}}
    plot(doc["tasks"], curves).savefig(path.with_suffix(".png"), dpi=90)
    print(f"wrote {path.with_suffix('.png')}")


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    common.add_device(p)
    p.add_argument("--tasks", default="lm,ctr", help="comma-separated tasks")
    p.add_argument("--replot", action="store_true", help="only redraw the plot of <out>'s result")
    args = p.parse_args()
    if args.replot:
        replot(args.out / "steps_to_target.json")
        return
    bench = common.Bench("steps_to_target")
    settings = QUICK if args.quick else FULL
    results, curves = {}, {}
    for task in args.tasks.split(","):
        results[task], curves[task] = bench_task(settings[task], args.jobs, args.device)
    bench.write(args.out, {"quick": args.quick, "device": args.device, "tasks": results}, SCHEMA, plot(results, curves))


if __name__ == "__main__":
    main()
