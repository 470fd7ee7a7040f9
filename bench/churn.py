"""Section 2: prediction churn, the paper's reproducibility claim, at three training lengths.

Churn between two models = how differently they predict the same eval examples: `mad`, the mean
absolute difference of predicted probabilities, and `flip`, the fraction of examples whose
predicted class differs (report.churn, the same maths as the run report). Compared, over several
pairs of seeds, at a quarter, half and all of the budget (the same runs, predictions kept at
those steps):
- two independently trained baselines (`groups: 1`, seeds a and b);
- two independently trained ensembles of two baselines (the paper's comparison row);
- group 0 of two runs of the control: 2 groups on disjoint shards that never distill (seeds a, b);
- group 0 of two independent 2-way codistillation runs (seeds a and b): the paper's claim;
- the two groups of one codistillation run.
Every model trains at the learning rate of one rule (`common.lr_for`). Codistilled / baseline is
the paper's ratio; codistilled / control is the distillation term's own part of it.

    python -m bench.churn [--quick] [--jobs 2]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from matplotlib.figure import Figure

from bench import common, sim
from codistill_trainer import report

SCHEMA: common.Schema = {"tasks": {"*": {
    "lengths": {"*": {
        "baseline_churn": {"mad": {}, "flip": {}},
        "codistill_churn": {"mad": {}, "flip": {}},
        "control_churn": {"mad": {}, "flip": {}},
        "ratio": {"mad": {}, "flip": {}},
        "ratio_to_control": {"mad": {}, "flip": {}},
        "quality": {},
    }},
    "setting": {},
}}}
KINDS = ("baseline_churn", "ensemble_churn", "control_churn", "codistill_churn",
         "within_run_churn")
ARMS = ("baseline", "control", "codistill")
FRACTIONS = (4, 2, 1)  # churn measured after steps // 4, steps // 2 and all the steps


@dataclass(frozen=True)
class Setting:
    task: str
    args: dict[str, Any]
    batch: int
    steps: int
    pairs: int  # independent pairs of runs per arm
    eval_size: tuple[int, int]
    burn_in: int = 100
    exchange: int = 50

    def lengths(self) -> tuple[int, ...]:
        return tuple(self.steps // k for k in FRACTIONS)


FULL = {
    "ctr": Setting("ctr", {}, batch=256, steps=1500, pairs=4, eval_size=(1024, 10)),
    "lm": Setting("lm", {"seq_len": 32, "embed": 32, "hidden": 64}, batch=128, steps=1500,
                  pairs=2, eval_size=(256, 4)),
}
QUICK = {"ctr": Setting("ctr", {}, batch=256, steps=600, pairs=3, eval_size=(1024, 10))}


def spec_doc(s: Setting, groups: int, seed: int, distill: bool = True) -> dict[str, Any]:
    return {
        "groups": groups,
        "task": {"name": s.task, "args": s.args},
        "training": {"steps": s.steps, "batchSize": s.batch, "seed": seed,
                     "evalEverySteps": s.steps, "evalBatches": 1, "checkpointEverySteps": s.steps,
                     "optimizer": {"lr": common.lr_for(s.batch), "warmupSteps": 50}},
        "distillation": {"burnInSteps": s.burn_in if distill else s.steps,
                         "exchangeEverySteps": s.exchange, "reloadEverySteps": s.exchange,
                         "maxStalenessSteps": 4 * s.exchange, "pollIntervalSeconds": sim.PARKED},
    }


def jobs(s: Setting) -> dict[tuple[str, int], sim.Job]:
    """Per pair i: four baselines (seeds 4i..4i+3), two controls and two codistillation runs
    (seeds 2i, 2i+1: a control and a codistillation run of one seed share init and shards)."""
    every, keep = s.steps // FRACTIONS[0], s.lengths()

    def job(arm: str, groups: int, seed: int, distill: bool = True) -> sim.Job:
        return sim.Job(f"{s.task}-{arm}-s{seed}", spec_doc(s, groups, seed, distill), every,
                       s.eval_size, predictions=keep)

    found = {("baseline", seed): job("base", 1, seed) for seed in range(4 * s.pairs)}
    for seed in range(2 * s.pairs):
        found["control", seed] = job("control", 2, seed, distill=False)
        found["codistill", seed] = job("codist", 2, seed)
    return found


Probs = dict[tuple[str, int], dict[int, torch.Tensor]]  # (arm, seed) -> group -> probabilities


def pair_churn(probs: Probs, i: int) -> dict[str, Any]:
    """The five churns of pair i."""
    base = [probs["baseline", 4 * i + j][0] for j in range(4)]
    a, b = probs["codistill", 2 * i], probs["codistill", 2 * i + 1]
    return {
        "baseline_churn": report.churn(base[0], base[1]),
        "ensemble_churn": report.churn(report.ensemble(base[:2]), report.ensemble(base[2:])),
        "control_churn": report.churn(probs["control", 2 * i][0], probs["control", 2 * i + 1][0]),
        "codistill_churn": report.churn(a[0], b[0]),
        "within_run_churn": report.churn(a[0], a[1]),
    }


def at_length(s: Setting, outcomes: dict[tuple[str, int], sim.Outcome], step: int) -> dict[str, Any]:
    """Every churn, both ratios and the models' quality after `step` steps."""
    probs = {key: o.probs[step] for key, o in outcomes.items()}
    pairs = [pair_churn(probs, i) for i in range(s.pairs)]
    metrics = ("mad", "flip")
    result: dict[str, Any] = {kind: {m: common.summary(p[kind][m] for p in pairs) for m in metrics}
                              for kind in KINDS}
    for name, below in (("ratio", "baseline_churn"), ("ratio_to_control", "control_churn")):
        result[name] = {m: common.summary(p["codistill_churn"][m] / p[below][m] for p in pairs)
                        for m in metrics}
    result["quality"] = {arm: quality(outcomes, arm, step) for arm in ARMS}
    result["per_pair"] = pairs
    return result


def analyse(s: Setting, outcomes: dict[tuple[str, int], sim.Outcome]) -> dict[str, Any]:
    lengths = {str(step): at_length(s, outcomes, step) for step in s.lengths()}
    examples = len(next(iter(outcomes.values())).probs[s.steps][0])
    common.show(f"{s.task}: churn on {examples} eval predictions, mean over {s.pairs} pairs "
                f"(mad / flip)",
                [(k, *(f"{r[k]['mad']['mean']:.4f} / {r[k]['flip']['mean']:.4f}"
                       for r in lengths.values()))
                 for k in (*KINDS, "ratio", "ratio_to_control")],
                ["between", *(f"after {step} steps" for step in lengths)])
    return {"lengths": lengths, "setting": asdict(s)}


def quality(outcomes: dict[tuple[str, int], sim.Outcome], arm: str, step: int) -> dict[str, Any]:
    """Eval loss of every model of an arm after `step` steps: churn is only worth comparing
    between models of similar quality."""
    losses = [dict(c)[step] for (a, _), o in outcomes.items() if a == arm for c in o.curves.values()]
    return {"eval_loss": common.summary(losses)}


def plot(results: dict[str, Any]) -> Figure:
    """Per task: each churn against training length, and the two ratios against it."""
    fig = common.figure(cols=2, rows=len(results), size=(5.0, 3.6))
    labels = {"baseline_churn": "2 baselines", "ensemble_churn": "2 ensembles of 2",
              "control_churn": "2 controls (no distillation)",
              "codistill_churn": "2 codistill runs", "within_run_churn": "groups of one run"}
    for i, (task, r) in enumerate(results.items()):
        churn_ax, ratio_ax = fig.axes[2 * i : 2 * i + 2]
        steps = [int(k) for k in r["lengths"]]
        per = list(r["lengths"].values())
        for kind, label in labels.items():
            churn_ax.errorbar(steps, [x[kind]["flip"]["mean"] for x in per],
                              yerr=[x[kind]["flip"]["std"] for x in per], marker="o", label=label)
        churn_ax.set(title=f"{task}: fraction of flipped decisions", xlabel="training steps")
        for name, style, below in (("ratio", "-", "baseline"),
                                   ("ratio_to_control", "--", "control")):
            for metric, color in (("mad", "C0"), ("flip", "C1")):
                ratio_ax.errorbar(steps, [x[name][metric]["mean"] for x in per],
                                  yerr=[x[name][metric]["std"] for x in per], linestyle=style,
                                  color=color, marker="o",
                                  label=f"codistilled / {below}, {metric}")
        ratio_ax.axhline(1.0, color="black", linewidth=0.8)
        ratio_ax.axhline(0.66, color="C3", linestyle=":", label="paper (mad, Criteo)")
        ratio_ax.set(title=f"{task}: churn ratios", xlabel="training steps", ylabel="ratio")
        for ax in (churn_ax, ratio_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
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
