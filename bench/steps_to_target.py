"""Section 1: when codistillation pays, and which factor holds it back.

Every arm trains the real trainer in lockstep (`bench/sim.py`) on one task, with the same seeds,
the same learning-rate rule and the same fixed eval set:

    sync      one model at 2B: what synchronous SGD over the two groups' examples computes
    one       one model at B on all the data
    indep     2 groups at B on disjoint shards, no distillation (burnInSteps = steps): the control
    codist-w  the same 2 groups, seeds, shards and batches, distilling with weight w
    ensemble  the mean of indep's two softmaxes: what distilling could give each model at best

Steps to a common target (the worst of the arms' best smoothed eval losses, per seed, so every
arm reaches it) make the headline a product whose factors say what holds it back:

    codist / sync = [codist / indep]  x  [indep / one]  x  [one / sync]
                     distillation term    the half shard    how far below the batch plateau

Beside it, per weight: the final eval loss against the paired control (Delta), and the fraction
of the ensemble's gain the term transferred. Seed 0 also runs sync at 4B (the plateau at this
budget) and the learning-rate rule's neighbours (x 1/sqrt 2, x sqrt 2) at B and 2B.

    python -m bench.steps_to_target [--quick] [--jobs 2] [--settings lm,lm-large] [--device cuda]
    python -m bench.steps_to_target --settings lm-ngram --out bench/results/ngram
    python -m bench.steps_to_target --replot
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bench import common, sim

SMOOTH = 3  # eval points in the moving average applied to every curve before comparing
WARMUP = 50
GROUPS = 2
LR_STEP = math.sqrt(2)  # the rule's neighbours checked on seed 0: lr / sqrt 2 and lr x sqrt 2
SCHEMA: common.Schema = {"settings": {"*": {
    "setting": {}, "lr": {"rule": {}, "check": {}},
    "plateau": {"batches": {}, "steps": {}, "doubling": {}},
    "factors": {"distillation": {}, "shard": {}, "plateau": {}, "product": {},
                "ensemble_bound": {}},
    "final": {}, "delta": {}, "transferred": {}, "per_seed": {}, "curves": {},
}}}


@dataclass(frozen=True)
class Setting:
    """One comparison; `lr` is the rule's value at batch `lr_batch`, scaled by sqrt(b / lr_batch)
    for a batch b (the square-root rule, for every arm alike)."""

    task: str
    args: dict[str, Any]
    batch: int  # B, per group
    steps: int  # the budget of every arm
    seeds: int
    burn_in: int  # >= 2 exchange periods: the first teacher is at least one period trained
    exchange: int  # exchangeEverySteps = reloadEverySteps
    weights: tuple[float, ...]
    eval_size: tuple[int, int]  # fixed eval set: (batch size, batches)
    evals: int  # eval points per run
    lr: float = common.LR
    lr_batch: int = common.LR_BATCH
    checks: bool = True  # seed 0's plateau (sync at 4B) and learning-rate neighbours

    def lr_at(self, batch: int) -> float:
        return common.lr_for(batch, self.lr, self.lr_batch)


TINY = {"seq_len": 32, "embed": 32, "hidden": 64}
LARGE = {"seq_len": 64, "embed": 64, "hidden": 256}
FULL = {
    "lm": Setting("lm", TINY, batch=64, steps=4000, seeds=2, burn_in=100, exchange=50,
                  weights=(0.25, 0.5, 1.0), eval_size=(256, 4), evals=30),
    "lm-large": Setting("lm", LARGE, batch=16, steps=2500, seeds=1, burn_in=250, exchange=50,
                        weights=(0.25, 1.0), eval_size=(128, 4), evals=25, checks=False),
    # QUICK's `lm` on text sampled afresh at every step (tasks/ngram.py): the term on data that
    # never repeats, against the same setting on the corpus
    "lm-ngram": Setting("lm", {**TINY, "ngram": 6}, batch=64, steps=2000, seeds=1, burn_in=100,
                        exchange=50, weights=(0.25, 1.0), eval_size=(256, 4), evals=20,
                        checks=False),
}
DEFAULT = ("lm", "lm-large")  # what a plain full run measures; lm-ngram would pass 45 minutes
QUICK = {
    "lm": Setting("lm", TINY, batch=64, steps=2000, seeds=1, burn_in=100, exchange=50,
                  weights=(0.25, 1.0), eval_size=(256, 4), evals=20, checks=False),
}


def spec_doc(s: Setting, groups: int, batch: int, seed: int, weight: float = 1.0,
             distill: bool = True, lr_scale: float = 1.0) -> dict[str, Any]:
    """A run of `s`: the loop's own eval and checkpoints are pushed to the end (the bench
    evaluates on its fixed eval set itself)."""
    return {
        "groups": groups,
        "task": {"name": s.task, "args": s.args},
        "training": {"steps": s.steps, "batchSize": batch, "seed": seed,
                     "evalEverySteps": s.steps, "evalBatches": 1, "checkpointEverySteps": s.steps,
                     "optimizer": {"lr": s.lr_at(batch) * lr_scale, "warmupSteps": WARMUP}},
        "distillation": {"weight": weight, "burnInSteps": s.burn_in if distill else s.steps,
                         "exchangeEverySteps": s.exchange, "reloadEverySteps": s.exchange,
                         "maxStalenessSteps": 4 * s.exchange, "pollIntervalSeconds": sim.PARKED},
    }


Key = tuple[str, float, int]  # (arm, parameter, seed): the weight, the batch or the lr scale


def arms(s: Setting) -> dict[Key, sim.Job]:
    """Every run of a setting, keyed (arm, parameter, seed)."""
    b = s.batch
    runs: dict[Key, dict[str, Any]] = {}
    for seed in range(s.seeds):
        runs["sync", 2 * b, seed] = spec_doc(s, 1, 2 * b, seed)
        runs["one", b, seed] = spec_doc(s, 1, b, seed)
        runs["indep", 0, seed] = spec_doc(s, GROUPS, b, seed, distill=False)
        for w in s.weights:
            runs["codist", w, seed] = spec_doc(s, GROUPS, b, seed, weight=w)
    if s.checks:
        runs["sync", 4 * b, 0] = spec_doc(s, 1, 4 * b, 0)
        for scale in (1 / LR_STEP, LR_STEP):
            runs["lr-one", scale, 0] = spec_doc(s, 1, b, 0, lr_scale=scale)
            runs["lr-sync", scale, 0] = spec_doc(s, 1, 2 * b, 0, lr_scale=scale)
    every = max(s.steps // s.evals, 1)
    return {key: sim.Job(f"{s.task}-b{b}-{name(key)}", doc, every, s.eval_size)
            for key, doc in runs.items()}


def name(key: Key) -> str:
    arm, param, seed = key  # a run's name is a DNS label: 0.25 -> 0p25
    return f"{arm}-{param:g}-s{seed}".replace(".", "p")


def cost(job: sim.Job) -> float:
    """Relative CPU cost, to start the longest runs first (2 at a time, the last one alone)."""
    d, t = job.spec["distillation"], job.spec["training"]
    distills = job.spec["groups"] > 1 and d["burnInSteps"] < t["steps"]
    return job.spec["groups"] * t["batchSize"] * (1.5 if distills else 1.0)


def run_arms(s: Setting, workers: int, on: str) -> dict[Key, sim.Outcome]:
    jobs = sorted(arms(s).items(), key=lambda kv: -cost(kv[1]))
    return dict(zip([k for k, _ in jobs], sim.run_all([j for _, j in jobs], workers, on)))


def model_curve(o: sim.Outcome) -> list[tuple[float, float]]:
    """A run's eval curve, smoothed: the mean of its groups' curves (one model per group)."""
    return common.smooth(common.mean_curve(list(o.curves.values())), SMOOTH)


def per_seed(s: Setting, out: dict[Key, sim.Outcome], seed: int) -> dict[str, Any]:
    """The factors, deltas and transfer of one seed (every arm of it is paired)."""
    curves = {"sync": model_curve(out["sync", 2 * s.batch, seed]),
              "one": model_curve(out["one", s.batch, seed]),
              "indep": model_curve(out["indep", 0, seed]),
              "ensemble": common.smooth(out["indep", 0, seed].ensemble, SMOOTH),
              **{f"codist-{w:g}": model_curve(out["codist", w, seed]) for w in s.weights}}
    target = max(common.best(c) for arm, c in curves.items() if arm != "ensemble")
    steps = {arm: common.steps_to_target(c, target) for arm, c in curves.items()}
    final = {arm: c[-1][1] for arm, c in curves.items()}
    gain = final["indep"] - final["ensemble"]  # what an ideal transfer could take off each model
    return {
        "target": target, "steps": steps, "final": final,
        "factors": {
            "distillation": {f"{w:g}": steps[f"codist-{w:g}"] / steps["indep"] for w in s.weights},
            "shard": steps["indep"] / steps["one"],
            "plateau": steps["one"] / steps["sync"],
            "product": {f"{w:g}": steps[f"codist-{w:g}"] / steps["sync"] for w in s.weights},
            "ensemble_bound": steps["ensemble"] / steps["indep"],
        },
        "delta": {f"{w:g}": final[f"codist-{w:g}"] - final["indep"] for w in s.weights},
        "transferred": {f"{w:g}": (final["indep"] - final[f"codist-{w:g}"]) / gain
                        for w in s.weights},
    }


def over_seeds(seeds: list[dict[str, Any]], *path: str) -> Any:
    """common.summary over seeds of the value at `path`, or a mapping of them when it maps."""
    def at(doc: dict[str, Any]) -> Any:
        for p in path:
            doc = doc[p]
        return doc

    first = at(seeds[0])
    if isinstance(first, dict):
        return {k: over_seeds(seeds, *path, k) for k in first}
    return common.summary(at(doc) for doc in seeds)


def plateau(s: Setting, out: dict[Key, sim.Outcome]) -> dict[str, Any]:
    """Seed 0's batch-scaling at this budget: steps to the worst best loss of B, 2B, 4B."""
    batches = [s.batch, 2 * s.batch] + ([4 * s.batch] if s.checks else [])
    curves = [model_curve(out["one" if b == s.batch else "sync", b, 0]) for b in batches]
    target = max(common.best(c) for c in curves)
    steps = [common.steps_to_target(c, target) for c in curves]
    return {"batches": batches, "steps": steps, "target": target,
            "doubling": [b / a for a, b in zip(steps, steps[1:])]}


def lr_check(s: Setting, out: dict[Key, sim.Outcome]) -> dict[str, Any]:
    """Seed 0's final smoothed loss at the rule's lr and its two neighbours, at B and at 2B."""
    if not s.checks:
        return {}
    found = {}
    for arm, batch in (("one", s.batch), ("sync", 2 * s.batch)):
        finals = {1.0: model_curve(out[arm, batch, 0])[-1][1]}
        finals |= {scale: model_curve(out[f"lr-{arm}", scale, 0])[-1][1]
                   for scale in (1 / LR_STEP, LR_STEP)}
        found[str(batch)] = {f"{s.lr_at(batch) * k:.3g}": v for k, v in sorted(finals.items())}
    return found


def analyse(key: str, s: Setting, out: dict[Key, sim.Outcome]) -> dict[str, Any]:
    seeds = [per_seed(s, out, seed) for seed in range(s.seeds)]
    result = {
        "setting": {**asdict(s), "warmup_steps": WARMUP, "groups": GROUPS},
        "lr": {"rule": f"{s.lr:g} x sqrt(batch / {s.lr_batch})", "check": lr_check(s, out)},
        "plateau": plateau(s, out),
        "factors": over_seeds(seeds, "factors"),
        "final": over_seeds(seeds, "final"),
        "delta": over_seeds(seeds, "delta"),
        "transferred": over_seeds(seeds, "transferred"),
        "per_seed": seeds,
        "curves": {name(k): {"groups": {str(g): rounded(c) for g, c in o.curves.items()},
                             "ensemble": rounded(o.ensemble)} for k, o in out.items()},
    }
    show(key, s, result)
    return result


def show(key: str, s: Setting, r: dict[str, Any]) -> None:
    f = r["factors"]
    common.show(f"{key}: steps to a common target, {s.seeds} seed(s), mean (std)",
                [(f"w {w}", ms(f["distillation"][w]), ms(f["shard"]), ms(f["plateau"]),
                  ms(f["product"][w]), ms(r["delta"][w]), ms(r["transferred"][w]))
                 for w in f["product"]],
                ["weight", "codist/indep", "indep/one", "one/sync", "codist/sync",
                 "delta vs indep", "ensemble gain transferred"])
    p = r["plateau"]
    common.show(f"{key}: the batch plateau at {s.steps} steps (seed 0, to loss {p['target']:.4f})",
                list(zip(p["batches"], p["steps"], [None, *p["doubling"]])),
                ["batch", "steps", "x previous"])
    for batch, finals in r["lr"]["check"].items():
        common.show(f"{key}: final eval loss at batch {batch} by lr (seed 0)",
                    list(finals.items()), ["lr", "loss"])


def ms(v: dict[str, Any]) -> str:
    return f"{v['mean']:.3f} ({v['std']:.3f})"


def rounded(curve: list[tuple[int, float]]) -> list[list[float]]:
    """A raw eval curve for the result file (unsmoothed, 5 decimals)."""
    return [[step, round(loss, 5)] for step, loss in curve]


def plot(results: dict[str, Any]) -> Figure:
    """Per setting: seed 0's eval curves, the factors with their spread, and the paired delta."""
    fig = common.figure(cols=3, rows=len(results))
    for i, (key, r) in enumerate(results.items()):
        row = fig.axes[3 * i : 3 * i + 3]
        plot_curves(row[0], key, r)
        plot_factors(row[1], key, r)
        plot_delta(row[2], key, r)
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return fig


def seed0(r: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Seed 0's smoothed model curves by arm label (and the ensemble's), from the result file."""
    s, runs = r["setting"], r["curves"]

    def curve(key: Key) -> list[tuple[float, float]]:
        groups = [[tuple(p) for p in c] for c in runs[name(key)]["groups"].values()]
        return common.smooth(common.mean_curve(groups), SMOOTH)

    b = s["batch"]
    found = {f"sync 1x{2 * b}": curve(("sync", 2 * b, 0)), f"one 1x{b}": curve(("one", b, 0)),
             f"indep 2x{b}": curve(("indep", 0, 0))}
    found |= {f"codist 2x{b}, w {w:g}": curve(("codist", w, 0)) for w in s["weights"]}
    found["ensemble of indep"] = common.smooth(
        [tuple(p) for p in runs[name(("indep", 0, 0))]["ensemble"]], SMOOTH)
    return found


def plot_curves(ax: Any, key: str, r: dict[str, Any]) -> None:
    curves = seed0(r)
    for i, (label, c) in enumerate(curves.items()):
        ax.plot(*zip(*c), ":" if label.startswith("ensemble") else "-", color=f"C{i}", label=label)
    ax.set_ylim(top=min(c[len(c) // 4][1] for c in curves.values()) * 1.05)
    ax.set(title=f"{key}: eval loss (seed 0, smoothed)", xlabel="step")


def plot_factors(ax: Any, key: str, r: dict[str, Any]) -> None:
    f = r["factors"]
    bars = [(f"codist/indep\nw {w}", v) for w, v in f["distillation"].items()]
    bars += [("ensemble/indep\n(bound)", f["ensemble_bound"]), ("indep/one\n(shard)", f["shard"]),
             ("one/sync\n(plateau)", f["plateau"])]
    bars += [(f"codist/sync\nw {w}", v) for w, v in f["product"].items()]
    ax.bar([b[0] for b in bars], [b[1]["mean"] for b in bars],
           yerr=[b[1]["std"] for b in bars], color="C2", alpha=0.7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.5, color="C3", linestyle="--", label="paper, codist/sync (about 0.5)")
    ax.set(title=f"{key}: steps ratios to a common target", ylabel="ratio")
    ax.tick_params(axis="x", labelrotation=60, labelsize=6)


def plot_delta(ax: Any, key: str, r: dict[str, Any]) -> None:
    curves = seed0(r)
    b = r["setting"]["batch"]
    control = curves[f"indep 2x{b}"]
    for i, w in enumerate(r["setting"]["weights"]):
        c = curves[f"codist 2x{b}, w {w:g}"]
        ax.plot([p[0] for p in c], [p[1] - q[1] for p, q in zip(c, control)], color=f"C{i + 3}",
                label=f"codist w {w:g} - indep")
    e = curves["ensemble of indep"]
    ax.plot([p[0] for p in e], [p[1] - q[1] for p, q in zip(e, control)], ":", color="grey",
            label="ensemble - indep (the bound)")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylim(-0.06, 0.06)
    ax.set(title=f"{key}: eval loss against the paired control (seed 0)", xlabel="step",
           ylabel="nats (negative: better)")


def replot(path: Path) -> None:
    """Redraw `<name>.png` from a result file."""
    doc = json.loads(path.read_text())
    plot(doc["settings"]).savefig(path.with_suffix(".png"), dpi=90)
    print(f"wrote {path.with_suffix('.png')}")


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    common.add_device(p)
    p.add_argument("--settings", help="comma-separated settings (default: all of the size)")
    p.add_argument("--replot", action="store_true", help="only redraw the plot of <out>'s result")
    args = p.parse_args()
    if args.replot:
        replot(args.out / "steps_to_target.json")
        return
    bench = common.Bench("steps_to_target")
    table = QUICK if args.quick else FULL
    chosen = args.settings.split(",") if args.settings else list(QUICK if args.quick else DEFAULT)
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; expected some of {sorted(table)}")
    results = {k: analyse(k, table[k], run_arms(table[k], args.jobs, args.device)) for k in chosen}
    bench.write(args.out, {"quick": args.quick, "device": args.device, "settings": results},
                SCHEMA, plot(results))


if __name__ == "__main__":
    main()
