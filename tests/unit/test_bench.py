"""The benchmarks' maths and result files (the benchmarks themselves run with `make bench`)."""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from bench import (
    churn,
    common,
    exchange_io,
    operator_load,
    overhead,
    requests,
    sim,
    steps_to_target,
)
from codistill.storage import Bucket
from tests.support.datafixtures import make_tiny_data

ROOT = Path(__file__).resolve().parents[2]

SCHEMAS = {"steps_to_target": steps_to_target.SCHEMA, "churn": churn.SCHEMA,
           "overhead": overhead.SCHEMA, "exchange_io": exchange_io.SCHEMA,
           "operator_load": operator_load.SCHEMA, "requests": requests.SCHEMA}


def test_steps_to_target_interpolates_the_first_crossing():
    curve = [(0, 4.0), (100, 3.0), (200, 2.0), (300, 2.5), (400, 1.0)]
    assert common.steps_to_target(curve, 2.5) == 150.0  # halfway from 3.0 to 2.0
    assert common.steps_to_target(curve, 2.0) == 200.0
    assert common.steps_to_target(curve, 5.0) == 0.0  # already there at the start
    assert common.steps_to_target(curve, 0.5) is None  # never reached


def test_compare_reports_ratio_and_censors_a_run_that_never_reaches_the_target():
    baseline = [(0, 3.0), (100, 2.0), (200, 1.0), (300, 1.2)]
    faster = [(0, 3.0), (100, 1.0), (200, 0.9), (300, 0.9)]
    r = common.compare(baseline, faster)
    assert (r["target"], r["baseline_steps"], r["codistill_steps"]) == (1.0, 200.0, 100.0)
    assert r["ratio"] == 0.5 and r["reached"]
    slower = [(0, 3.0), (100, 2.5), (200, 1.5), (300, 1.1)]
    r = common.compare(baseline, slower)
    assert not r["reached"] and r["codistill_steps"] == 300.0 and r["ratio"] == 1.5


def test_plateau_is_where_doubling_stops_paying_for_good():
    perfect_then_flat = [(16, 1000), (32, 500), (64, 260), (128, 240), (256, 230)]
    assert common.plateau(perfect_then_flat, 0.8) == 64
    noisy_early = [(16, 1000), (32, 900), (64, 450), (128, 420), (256, 410)]
    assert common.plateau(noisy_early, 0.8) == 64  # the early 0.9 does not end the curve
    assert common.plateau([(16, 1000), (32, 500), (64, 250)], 0.8) is None
    with pytest.raises(ValueError, match="must double"):
        common.plateau([(16, 1000), (48, 500)], 0.8)


def test_smooth_and_mean_curve():
    curve = [(0, 3.0), (10, 1.0), (20, 2.0), (30, 0.0)]
    assert common.smooth(curve, 3) == [(0, 2.0), (10, 2.0), (20, 1.0), (30, 1.0)]
    assert common.smooth(curve, 1) == curve
    assert common.mean_curve([[(0, 1.0), (5, 3.0)], [(0, 3.0), (5, 1.0)]]) == [(0, 2.0), (5, 2.0)]
    with pytest.raises(ValueError, match="share their steps"):
        common.mean_curve([[(0, 1.0)], [(1, 1.0)]])


def test_summary_and_quantile():
    s = common.summary([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 1.0, 3.0, 3)
    assert common.summary([5.0])["std"] == 0.0
    values = [float(i) for i in range(1, 101)]
    assert common.quantile(values, 0.5) == 50.5
    assert common.quantile(values, 0.99) == pytest.approx(99.01)
    assert common.quantile([3.0], 0.99) == 3.0


def test_check_names_the_missing_key():
    schema = {"tasks": {"*": {"ratio": {}, "groups": {"*": {"baseline_steps": {}}}}}}
    common.check({"tasks": {"lm": {"ratio": 1, "groups": {"2": {"baseline_steps": 3}}}}},
                 schema, "r")
    with pytest.raises(ValueError, match=r"r\.tasks\.lm\.groups\.4: missing key 'baseline_steps'"):
        common.check({"tasks": {"lm": {"ratio": 1, "groups": {"4": {}}}}}, schema, "r")
    with pytest.raises(ValueError, match="at least one entry"):
        common.check({"tasks": {}}, schema, "r")


RESULTS = [(n, f) for f in ("", "quick") for n in sorted(SCHEMAS)] + [("steps_to_target", "ngram")]


@pytest.mark.parametrize(("name", "folder"), RESULTS)
def test_committed_results_match_their_schema(name, folder):
    path = ROOT / "bench" / "results" / folder / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path} not written yet (make bench, make bench-quick)")
    doc = json.loads(path.read_text())
    common.check(doc, SCHEMAS[name], name)
    common.check(doc, {"provenance": {"command": {}, "date": {}, "git": {"commit": {}},
                                      "machine": {"loadavg_start": {}, "cpus": {}}}}, name)
    assert (path.with_suffix(".png")).exists()


def tiny_job(tmp_path, groups: int, steps: int = 24) -> sim.Job:
    data = make_tiny_data(tmp_path / "data")
    return sim.Job("tiny", {
        "groups": groups,
        "task": {"name": "lm", "args": {"data_dir": str(data), "seq_len": 8, "embed": 8,
                                        "hidden": 16}},
        "training": {"steps": steps, "batchSize": 4, "evalEverySteps": steps, "evalBatches": 1,
                     "checkpointEverySteps": steps, "optimizer": {"lr": 0.01}},
        "distillation": {"burnInSteps": 4, "exchangeEverySteps": 4, "reloadEverySteps": 4,
                         "maxStalenessSteps": 16, "pollIntervalSeconds": sim.PARKED},
    }, eval_every=8, eval_size=(4, 2), predictions=(steps,))


def test_lockstep_codistillation_is_deterministic_and_distills(tmp_path):
    torch.set_num_threads(1)
    job = tiny_job(tmp_path, groups=2)
    a, b = sim.run(job), sim.run(job)
    assert a.curves == b.curves  # teacher swaps do not depend on thread timing
    assert [s for s, _ in a.curves[0]] == [0, 8, 16, 24]
    assert all(torch.equal(a.probs[24][g], b.probs[24][g]) for g in (0, 1))
    # groups differ from a run where they never distill (weight 0) from step 8 on
    spec = copy.deepcopy(job.spec)
    spec["distillation"]["weight"] = 0.0
    alone = sim.Job(job.name, spec, job.eval_every, job.eval_size)
    c = sim.run(alone)
    assert c.curves[0][1] == a.curves[0][1] and c.curves[0][2] != a.curves[0][2]


def test_teachers_k_holds_and_fetches_only_each_periods_draw_through_a_run(tmp_path):
    torch.set_num_threads(1)
    job = tiny_job(tmp_path, groups=4)
    job.spec["distillation"]["teachers"] = 1
    run = sim.manifest("k1", job.spec)
    with sim.loops(run, Bucket((tmp_path / "b").as_uri())) as group_loops:
        seen = set()
        for step in range(24):
            for loop in group_loops:
                loop.step(step)
            sim.boundary(group_loops, step + 1)
            if (step + 1) % 4 == 0 and step + 1 > 4:  # a reload boundary after the first publish
                for loop in group_loops:
                    drawn = loop.teachers.draw.at(step + 1)
                    assert len(drawn) == 1 and loop.w.group not in drawn
                    assert set(loop.teachers.models) == set(drawn)
                    held = {p for p, s in loop.teachers.poller.newest().items() if s >= 0}
                    assert held <= loop.teachers.draw.ahead(step + 1)
                    seen.add(drawn[0])
        assert len(seen) > 1  # the draw moves between periods
        assert all(loop.progress.step == 24 for loop in group_loops)


def test_counting_bucket_counts_calls_and_teacher_bytes(tmp_path):
    bucket = common.CountingBucket((tmp_path / "b").as_uri())
    bucket.put("groups/0/teacher/4.safetensors", b"x" * 100)
    bucket.put("groups/0/teacher/LATEST.json", b"{}")
    bucket.put("groups/0/progress.json", b"y" * 50)
    assert bucket.get("groups/0/teacher/4.safetensors", limit=101) == b"x" * 100
    bucket.get("groups/0/progress.json")
    assert bucket.get_json("groups/1/progress.json") is None  # a request all the same
    assert bucket.sent == {"safetensors": 100, "json": 2}
    assert bucket.received == {"safetensors": 100}
    assert bucket.taken() == {"put": 3, "get": 3} and bucket.taken() == {}


def test_request_rates_follow_the_counted_calls():
    """One pointer read per peer per poll, a HEAD and a GET per new version: what the real
    poller does, counted. Rank 0 alone polling keeps 64 groups within one S3 prefix's GETs;
    every rank polling (8 a group) did not."""
    counts = requests.counted(peers=3, rounds=4)
    assert counts["poll"] == {"get": 1.0} and counts["fetch"] == {"get": 1.0, "size": 1.0}
    assert counts["publish"]["put"] == 2.0  # the blob, then its pointer
    g64 = requests.rates(counts, 64, ranks=8, step_s=1.0)
    assert g64["get_per_s"] < requests.S3_GET_PER_S < g64["get_per_s_every_rank"]
    assert g64["put_per_s"] < requests.S3_PUT_PER_S
    pointer_reads = 64 * 63 / g64["poll_interval_s"]
    assert pointer_reads == pytest.approx(2750)  # the floor poll_interval set


def test_overhead_parts_add_up_to_the_iteration():
    sw = overhead.Stopwatch()
    sw.seconds = {"step": 10.0, "after_step": 2.0, "forward": 5.0, "teacher_forward": 3.0,
                  "distill": 0.5, "publish": 0.2, "refresh": 0.3}
    r = overhead.breakdown(sw, group_steps=10)
    parts = r["parts_s"]
    assert parts["student_forward"] == pytest.approx(0.2)
    assert parts["teacher_forward"] == pytest.approx(0.3)
    assert parts["exchange_on_thread"] == pytest.approx(0.05)
    assert sum(parts.values()) == pytest.approx(r["iteration_s"]) == pytest.approx(1.2)


def test_pair_churn_compares_the_right_runs():
    same = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    other = torch.tensor([[0.4, 0.6], [0.2, 0.8]])
    probs = {("baseline", i): {0: same if i % 2 == 0 else other} for i in range(4)}
    probs |= {("codistill", 0): {0: same, 1: other}, ("codistill", 1): {0: same, 1: same}}
    probs |= {("control", 0): {0: other, 1: same}, ("control", 1): {0: same, 1: other}}
    r = churn.pair_churn(probs, 0)
    assert r["control_churn"] == r["baseline_churn"]  # group 0 of control 0 vs of control 1
    assert r["baseline_churn"] == {"flip": 0.5, "mad": pytest.approx(0.25)}
    assert r["codistill_churn"] == {"flip": 0.0, "mad": 0.0}  # group 0 of run 0 vs of run 1
    assert r["within_run_churn"]["flip"] == 0.5  # the two groups of run 0


def test_the_bench_emulator_honours_equality_label_selectors(tmp_path):
    cluster = operator_load.SelectingCluster(tmp_path)
    try:
        for i, run in enumerate(["a", "a", "b"]):
            cluster.create(operator_load.JOBS, {
                "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                "metadata": {"name": f"j{i}", "labels": {"codistill.io/run": run}}})
        path = cluster.path(operator_load.JOBS, "default")
        for query, names in (("?labelSelector=codistill.io%2Frun%3Da", {"j0", "j1"}),
                             ("?labelSelector=codistill.io%2Frun%3D%3Db", {"j2"}),
                             ("?labelSelector=codistill.io%2Frun", {"j0", "j1", "j2"}), ("", None)):
            items = cluster.request("GET", path + query)["items"]
            assert {o["metadata"]["name"] for o in items} == (names or {"j0", "j1", "j2"})
    finally:
        cluster.close()


def test_a_device_this_machine_lacks_is_refused_in_one_line_before_any_job() -> None:
    assert sim.device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit, match=r"^--device nonsense: "):
        sim.device("nonsense")
    if not torch.cuda.is_available():  # this project's machines: the bench never falls back
        with pytest.raises(SystemExit, match="^--device cuda: torch sees no CUDA device"):
            sim.run_all([], workers=1, on="cuda")


def test_bf16_codistillation_trains_under_autocast_with_float32_master_weights(tmp_path):
    torch.set_num_threads(1)
    job = tiny_job(tmp_path, groups=2)
    spec = copy.deepcopy(job.spec)
    spec["training"]["precision"] = "bf16"
    bf16, fp32 = sim.run(sim.Job(job.name, spec, job.eval_every, job.eval_size)), sim.run(job)
    losses = [loss for _, loss in bf16.curves[0]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert bf16.curves[0][1:] != fp32.curves[0][1:]  # the forward really ran in bfloat16


def test_the_overhead_benchmarks_gpu_path_runs_on_a_cpu_in_bf16(tmp_path):
    """The smoke version of `bench.overhead --device cuda --precision bf16 --size gpu`: the same
    code on a tiny model on the CPU. Teachers are held in bfloat16: 2 bytes a parameter."""
    torch.set_num_threads(1)
    data = make_tiny_data(tmp_path / "data")
    task = {"name": "lm", "args": {"data_dir": str(data), "seq_len": 8, "embed": 8, "hidden": 16}}
    found = overhead.measure((1, 2), batch=4, steps=2, rounds=1,
                             setup=overhead.Setup(task, "cpu", "bf16"))
    assert set(found) == {"1", "2"} and found["2"]["parts_s"]["teacher_forward"] > 0
    params = sum(p.numel() for p in sim.shared_task("lm", task["args"]).model().parameters())
    assert found["2"]["teacher_bytes_per_peer"] == 2 * params
    assert found["1"]["teacher_bytes_per_peer"] is None
    assert found["2"]["resident_device_bytes"] is None  # measured on a GPU only


def test_the_steps_headline_is_the_product_of_its_three_factors(tmp_path):
    """The whole section-1 pipeline on a micro setting (the real trainer, 5 arms, 24 steps):
    every arm of a seed reaches the common target, the factors multiply to the headline, the
    transferred fraction and the deltas follow from the finals, and the result has its schema."""
    torch.set_num_threads(1)
    data = make_tiny_data(tmp_path / "data")
    s = steps_to_target.Setting(
        "lm", {"data_dir": str(data), "seq_len": 8, "embed": 8, "hidden": 16}, batch=4, steps=24,
        seeds=1, burn_in=8, exchange=4, weights=(0.5,), eval_size=(4, 2), evals=6, lr=0.01,
        lr_batch=4, checks=True)
    jobs = steps_to_target.arms(s)
    assert jobs["indep", 0, 0].spec["distillation"]["burnInSteps"] == 24  # never distills
    assert jobs["sync", 8, 0].spec["training"]["optimizer"]["lr"] == pytest.approx(0.01 * 2**0.5)
    out = {key: sim.run(job) for key, job in jobs.items()}
    result = steps_to_target.analyse("micro", s, out)
    seed = result["per_seed"][0]
    f = seed["factors"]
    assert f["product"]["0.5"] == pytest.approx(
        f["distillation"]["0.5"] * f["shard"] * f["plateau"])
    assert seed["target"] == max(common.best(steps_to_target.model_curve(o)) for k, o in out.items()
                                 if k[0] in ("sync", "one", "indep", "codist") and k[1] != 16)
    final = seed["final"]
    assert final["ensemble"] <= final["indep"]  # the ensemble of two is never worse (Jensen)
    assert seed["delta"]["0.5"] == pytest.approx(final["codist-0.5"] - final["indep"])
    assert seed["transferred"]["0.5"] == pytest.approx(
        (final["indep"] - final["codist-0.5"]) / (final["indep"] - final["ensemble"]))
    assert result["plateau"]["batches"] == [4, 8, 16] and len(result["lr"]["check"]["8"]) == 3
    common.check({"settings": {"micro": result}}, steps_to_target.SCHEMA, "micro")
    steps_to_target.plot({"micro": result})  # draws from the result alone, as --replot does


def test_an_ensembles_curve_is_recorded_for_a_run_of_several_groups(tmp_path):
    torch.set_num_threads(1)
    two, one = sim.run(tiny_job(tmp_path, groups=2)), sim.run(tiny_job(tmp_path, groups=1))
    assert [s for s, _ in two.ensemble] == [s for s, _ in two.curves[0]] and not one.ensemble
    members = [statistics.fmean(two.curves[g][i][1] for g in (0, 1)) for i in range(4)]
    assert all(e <= m + 1e-9 for (_, e), m in zip(two.ensemble, members))


def test_churn_is_measured_at_each_length_from_the_same_runs(tmp_path):
    """The section-2 pipeline on a micro setting: predictions kept at a quarter, half and all of
    the budget, every churn and ratio at each, and the result has its schema."""
    torch.set_num_threads(1)
    data = make_tiny_data(tmp_path / "data")
    s = churn.Setting("lm", {"data_dir": str(data), "seq_len": 8, "embed": 8, "hidden": 16},
                      batch=4, steps=24, pairs=1, eval_size=(4, 2), burn_in=8, exchange=4)
    found = churn.jobs(s)
    assert found["control", 1].spec["distillation"]["burnInSteps"] == 24  # never distills
    outcomes = {key: sim.run(job) for key, job in found.items()}
    assert all(set(o.probs) == {6, 12, 24} for o in outcomes.values())
    result = churn.analyse(s, outcomes)
    assert list(result["lengths"]) == ["6", "12", "24"]
    at_end = result["lengths"]["24"]
    pair = at_end["per_pair"][0]
    assert at_end["ratio_to_control"]["flip"]["mean"] == pytest.approx(
        pair["codistill_churn"]["flip"] / pair["control_churn"]["flip"])
    assert at_end["quality"]["control"]["eval_loss"]["n"] == 4  # 2 runs x 2 groups
    common.check({"tasks": {"lm": result}}, churn.SCHEMA, "churn")
    churn.plot({"lm": result})
