"""Section 2: prediction churn, the paper's reproducibility claim.

Churn between two models = how differently they predict the same eval examples: `mad`, the mean
absolute difference of predicted probabilities, and `flip`, the fraction of examples whose
predicted class differs (report.churn, the same maths as the run report). Compared, over several
pairs of seeds:
- two independently trained baselines (`groups: 1`, seeds a and b);
- two independently trained ensembles of two baselines (the paper's comparison row);
- group 0 of two independent 2-way codistillation runs (seeds a and b): the paper's claim;
- the two groups of one codistillation run.

    python -m bench.churn [--quick] [--jobs 2]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from matplotlib.figure import Figure

from bench import common, sim
from codistill_trainer import report

SCHEMA: common.Schema = {"tasks": {"*": {
    "baseline_churn": {"mad": {}, "flip": {}},
    "codistill_churn": {"mad": {}, "flip": {}},
    "ratio": {"mad": {}, "flip": {}},
}}}
KINDS = ("baseline_churn", "ensemble_churn", "codistill_churn", "within_run_churn")


@dataclass(frozen=True)
class Setting:
    task: str
    args: dict[str, Any]
    batch: int
    steps: int
    pairs: int  # independent pairs of runs per arm
    eval_size: tuple[int, int]
    lr: float = 3e-3
    burn_in: int = 100
    exchange: int = 50


FULL = {
    "ctr": Setting("ctr", {}, batch=256, steps=1500, pairs=5, eval_size=(1024, 10)),
    "lm": Setting("lm", {"seq_len": 32, "embed": 32, "hidden": 64}, batch=128, steps=1500,
                  pairs=3, eval_size=(256, 4)),
}
QUICK = {"ctr": Setting("ctr", {}, batch=256, steps=600, pairs=3, eval_size=(1024, 10))}


def spec_doc(s: Setting, groups: int, seed: int) -> dict[str, Any]:
    return {
        "groups": groups,
        "task": {"name": s.task, "args": s.args},
        "training": {"steps": s.steps, "batchSize": s.batch, "seed": seed,
                     "evalEverySteps": s.steps, "evalBatches": 1, "checkpointEverySteps": s.steps,
                     "optimizer": {"lr": s.lr, "warmupSteps": 50}},
        "distillation": {"burnInSteps": s.burn_in, "exchangeEverySteps": s.exchange,
                         "reloadEverySteps": s.exchange, "maxStalenessSteps": 4 * s.exchange,
                         "pollIntervalSeconds": sim.PARKED},
    }


def jobs(s: Setting) -> dict[tuple[str, int], sim.Job]:
    """Four baselines and two codistillation runs per pair: seeds 4i..4i+3 and 2i, 2i+1."""
    found = {}
    for seed in range(4 * s.pairs):
        found["baseline", seed] = sim.Job(f"{s.task}-base-s{seed}", spec_doc(s, 1, seed),
                                          s.steps, s.eval_size, predictions=True)
    for seed in range(2 * s.pairs):
        found["codistill", seed] = sim.Job(f"{s.task}-codist-s{seed}", spec_doc(s, 2, seed),
                                           s.steps, s.eval_size, predictions=True)
    return found


def pair_churn(probs: dict[tuple[str, int], dict[int, torch.Tensor]], i: int) -> dict[str, Any]:
    """The four churns of pair i."""
    base = [probs["baseline", 4 * i + j][0] for j in range(4)]
    a, b = probs["codistill", 2 * i], probs["codistill", 2 * i + 1]
    return {
        "baseline_churn": report.churn(base[0], base[1]),
        "ensemble_churn": report.churn(report.ensemble(base[:2]), report.ensemble(base[2:])),
        "codistill_churn": report.churn(a[0], b[0]),
        "within_run_churn": report.churn(a[0], a[1]),
    }


def analyse(s: Setting, outcomes: dict[tuple[str, int], sim.Outcome]) -> dict[str, Any]:
    probs = {key: o.probs for key, o in outcomes.items()}
    pairs = [pair_churn(probs, i) for i in range(s.pairs)]
    result: dict[str, Any] = {
        kind: {m: common.summary(p[kind][m] for p in pairs) for m in ("mad", "flip")}
        for kind in KINDS
    }
    result["ratio"] = {m: common.summary(p["codistill_churn"][m] / p["baseline_churn"][m]
                                         for p in pairs) for m in ("mad", "flip")}
    result["quality"] = {arm: quality(outcomes, arm) for arm in ("baseline", "codistill")}
    result["setting"] = s.__dict__
    result["per_pair"] = pairs
    common.show(f"{s.task}: churn on {len(next(iter(probs.values()))[0])} eval predictions, "
                f"mean over {s.pairs} pairs",
                [(k, result[k]["mad"]["mean"], result[k]["flip"]["mean"]) for k in KINDS]
                + [("ratio codistill/baseline", result["ratio"]["mad"]["mean"],
                    result["ratio"]["flip"]["mean"])],
                ["between", "mad", "flip"])
    return result


def quality(outcomes: dict[tuple[str, int], sim.Outcome], arm: str) -> dict[str, Any]:
    """Final eval loss and accuracy of every model of an arm: churn is only worth comparing
    between models of similar quality."""
    runs = [o for (a, _), o in outcomes.items() if a == arm]
    return {"eval_loss": common.summary(c[-1][1] for o in runs for c in o.curves.values()),
            "accuracy": common.summary(acc for o in runs for acc in o.accuracy.values())}


def plot(results: dict[str, Any]) -> Figure:
    fig = common.figure(cols=2, rows=len(results), size=(5.0, 3.6))
    labels = ["2 baselines", "2 ensembles\nof 2", "2 codistill\nruns", "groups of\none run"]
    for i, (task, r) in enumerate(results.items()):
        for ax, metric in zip(fig.axes[2 * i : 2 * i + 2], ("mad", "flip")):
            ax.bar(labels, [r[k][metric]["mean"] for k in KINDS],
                   yerr=[r[k][metric]["std"] for k in KINDS], color=["C0", "C1", "C2", "C4"])
            name = "mean |p_a - p_b|" if metric == "mad" else "fraction of flipped decisions"
            ax.set(title=f"{task}: churn, {name}")
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(alpha=0.3, axis="y")
    return fig


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    common.add_device(p)
    args = p.parse_args()
    bench = common.Bench("churn")
    results = {}
    for task, s in (QUICK if args.quick else FULL).items():
        found = jobs(s)
        outcomes = dict(zip(found, sim.run_all(list(found.values()), args.jobs, args.device)))
        results[task] = analyse(s, outcomes)
    bench.write(args.out, {"quick": args.quick, "device": args.device, "tasks": results}, SCHEMA, plot(results))


if __name__ == "__main__":
    main()
