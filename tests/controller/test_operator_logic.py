"""The operator's pure parts: rendered jobs vs Kubeflow's CRD, the reconcile plan, validation
beyond the schema, status aggregation and the events its transitions produce, options."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest

from codistill import names
from codistill.runfolder import Progress
from codistill.spec import SpecError, parse
from codistill_operator import __main__ as cli
from codistill_operator import children, metrics, validate
from codistill_operator.settings import Config
from codistill_operator.status import observe
from codistill_operator.status.schema import GroupStatus, RunStatus
from tests.support.crdschema import assert_meets_webhook, kubeflow
from tests.support.kube import manifest

URL = "s3://bucket/runs/default/demo"
BODY_META = {"uid": "1234-abcd", "generation": 1}


def body(**spec: Any) -> dict[str, Any]:
    doc = manifest("demo", "http://minio:9000", **spec)
    doc["metadata"].update(BODY_META)
    return doc


def jobs_of(doc: dict[str, Any], backend: str = "pytorchjob") -> list[dict[str, Any]]:
    return children.desired(parse(doc), doc, URL, backend)


SPECS = {
    "plain": {},
    "workers": {"workersPerGroup": 4, "nprocPerWorker": 8},
    "queue and policy": {"runPolicy": {"queueName": "team-a", "backoffLimit": 3, "suspend": True,
                                       "schedulingPolicy": {"minAvailable": 2}}},
    "template": {"template": {
        "metadata": {"labels": {"team": "a"}},
        "spec": {"nodeSelector": {"gpu": "h100"}, "containers": [
            {"name": "pytorch", "resources": {"limits": {"nvidia.com/gpu": 8}},
             "env": [{"name": "NCCL_DEBUG", "value": "INFO"}]},
            {"name": "sidecar", "image": "busybox"},
        ]},
    }},
}


@pytest.mark.parametrize("name", SPECS)
def test_rendered_jobs_meet_kubeflows_crd_and_webhook(name: str) -> None:
    doc = body(**SPECS[name])
    jobs = jobs_of(doc)
    assert [j["metadata"]["name"] for j in jobs] == ["demo-g0", "demo-g1"]
    for job in jobs:
        kubeflow().validate(job)
        assert_meets_webhook(job)
        (owner,) = job["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "codistill.io/v1alpha1", "kind": "Codistillation",
                         "name": "demo", "uid": "1234-abcd", "controller": True}


@pytest.mark.parametrize("name", SPECS)
def test_rendered_pods_meet_pod_security_restricted(name: str) -> None:
    for job in jobs_of(body(**SPECS[name])):
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            pod = replica["template"]["spec"]
            # at pod level, so the Training Operator's injected init container inherits them
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] == 10001
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["automountServiceAccountToken"] is False
            assert pod["enableServiceLinks"] is False
            trainer = next(c for c in pod["containers"] if c["name"] == "pytorch")
            assert trainer["securityContext"]["allowPrivilegeEscalation"] is False
            assert trainer["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_jobs_carry_the_env_contract_and_only_secret_references() -> None:
    (job, _) = jobs_of(body())
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env[names.ENV_RUN_URL]["value"] == URL
    assert env[names.ENV_GROUP]["value"] == "0" and env[names.ENV_GROUPS]["value"] == "2"
    assert env[names.ENV_ENDPOINT]["value"] == "http://minio:9000"
    for key in names.CREDENTIAL_KEYS:
        reference = {"secretKeyRef": {"name": "s3-creds", "key": key}}
        assert env[key] == {"name": key, "valueFrom": reference}
    assert job["metadata"]["labels"][names.LABEL_RUN] == "demo"


def test_queue_label_is_passed_through() -> None:
    (job, _) = jobs_of(body(runPolicy={"queueName": "team-a"}))
    assert job["metadata"]["labels"][names.LABEL_QUEUE] == "team-a"


def test_plan_creates_patches_and_deletes_only_what_differs() -> None:
    want = jobs_of(body())
    assert children.plan(want, []).create == want
    assert children.plan(want, copy.deepcopy(want)) == children.Plan([], [], [])

    stale = copy.deepcopy(want[1])
    stale["spec"]["runPolicy"]["suspend"] = True
    stale["metadata"]["annotations"]["someone.else/note"] = "kept"
    stale["metadata"]["annotations"][children.SPEC_HASH] = "old"
    stray = copy.deepcopy(want[0])
    stray["metadata"]["name"] = "demo-g7"
    plan = children.plan(want, [want[0], stale, stray])
    assert plan.create == [] and plan.delete == ["demo-g7"]
    ((name, ops),) = plan.update
    patched = jsonpatch.apply_patch(stale, ops)
    assert name == "demo-g1" and patched["spec"] == want[1]["spec"]
    assert patched["metadata"]["annotations"]["someone.else/note"] == "kept"
    assert children.plan(want, [want[0], patched]).update == []


def admitted_by_kueue(job: dict[str, Any], suspend: bool) -> dict[str, Any]:
    """A job as Kueue leaves it: suspended until admitted, then with its flavor's placement."""
    live = copy.deepcopy(job)
    live["spec"]["runPolicy"]["suspend"] = suspend
    live["metadata"]["labels"]["kueue.x-k8s.io/extra"] = "x"
    for replica in live["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]
        pod["spec"]["nodeSelector"] = {"cloud.google.com/gke-accelerator": "h100"}
        pod["spec"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists"}]
        pod["metadata"].setdefault("labels", {})["kueue.x-k8s.io/podset"] = "master"
    return live


@pytest.mark.parametrize("suspend", [True, False])
def test_an_update_never_undoes_what_kueue_set(suspend: bool) -> None:
    """Row 20: a changed spec patches the job, keeping Kueue's suspend and its placement."""
    (old, _) = jobs_of(body(runPolicy={"queueName": "team-a"}))
    live = admitted_by_kueue(old, suspend)
    (new, _) = jobs_of(body(runPolicy={"queueName": "team-a"}, image="example.com/trainer:2"))
    ((_, ops),) = children.plan([new], [live]).update
    patched = jsonpatch.apply_patch(live, ops)
    assert patched["spec"]["runPolicy"]["suspend"] is suspend  # Kueue's to lift, not ours
    assert patched["metadata"]["labels"]["kueue.x-k8s.io/extra"] == "x"
    master = patched["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert master["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "h100"}
    assert master["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert master["metadata"]["labels"]["kueue.x-k8s.io/podset"] == "master"
    assert master["spec"]["containers"] == new["spec"]["pytorchReplicaSpecs"]["Master"][
        "template"]["spec"]["containers"]  # and the change itself is applied
    assert children.plan([new], [patched]).update == []  # converged: no patch loop
    (stop, _) = jobs_of(body(runPolicy={"queueName": "team-a", "suspend": True}, image="example.com/trainer:2"))
    ((_, ops),) = children.plan([stop], [patched]).update
    assert jsonpatch.apply_patch(patched, ops)["spec"]["runPolicy"]["suspend"] is True


def test_a_changed_spec_changes_the_hash_and_nothing_else_does() -> None:
    base = jobs_of(body())[0]
    assert children.spec_hash(base) == children.spec_hash(jobs_of(body())[0])
    assert children.spec_hash(base) != children.spec_hash(jobs_of(body(image="other:1"))[0])


@pytest.mark.parametrize("storage, message", [
    ({}, "spec.storage.url: required"),
    ({"url": "file:///tmp/x"}, "spec.storage.url: file:// is for local runs only"),
    ({"url": "memory://x"}, "spec.storage.url: memory:// is for local runs only"),
    ({"url": "nosuch://x"}, "spec.storage.url: storage protocol 'nosuch' is unknown"),
])
def test_storage_a_cluster_cannot_use_is_refused(storage: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        validate.check(body(storage=storage))


def test_credentials_come_from_the_secret_or_name_what_is_missing() -> None:
    keys = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "other": "c"}
    assert validate.credentials("s", keys, "ns") == {k: keys[k] for k in names.CREDENTIAL_KEYS}
    assert validate.credentials(None, None, "ns") == {}
    with pytest.raises(validate.MissingSecret, match="credentialsSecret: Secret ns/s not found"):
        validate.credentials("s", None, "ns")
    with pytest.raises(validate.MissingSecret, match="lacks AWS_SECRET_ACCESS_KEY"):
        validate.credentials("s", {"AWS_ACCESS_KEY_ID": "a"}, "ns")


def test_an_unreachable_bucket_fails_fast_with_a_storage_error() -> None:
    from codistill.net import free_port
    from codistill.storage import StorageError
    from codistill_operator.bucket import open_folder

    keys = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    bucket = open_folder("s3://nowhere/runs", f"http://127.0.0.1:{free_port()}", keys).bucket
    assert bucket.fs.retries == 1 and bucket.attempts == 1
    with pytest.raises(StorageError, match="nowhere"):
        bucket.rm("")


def test_immutable_fields_are_named_with_old_and_new_values() -> None:
    applied = validate.frozen(parse(body()))
    assert validate.changed(applied, parse(body(image="x:2", training={"steps": 5}))) == []
    changed = validate.changed(applied, parse(body(groups=3, task={"name": "ctr"})))
    assert changed == [
        "spec.groups: 2 -> 3",
        "spec.task: {'name': 'lm', 'args': {'hidden': 32}} -> {'name': 'ctr', 'args': {}}",
    ]
    # as the API server stores it: a merge patch drops the null members
    stored = {k: v for k, v in validate.frozen(parse(body(storage={"url": "s3://b"}))).items()
              if v is not None}
    later = parse(body(storage={"url": "s3://b", "endpoint": "http://x:1"}))
    assert validate.changed(stored, later) == ["spec.storage.endpoint: None -> 'http://x:1'"]


def job(*conditions: tuple[str, str], suspend: bool = False, message: str = "") -> dict:
    found = [{"type": t, "status": s, "message": message} for t, s in conditions]
    return {"spec": {"runPolicy": {"suspend": suspend}}, "status": {"conditions": found}}


@pytest.mark.parametrize("conditions, suspend, phase", [
    ((), False, "Pending"),
    ((), True, "Suspended"),
    ((("Created", "True"),), False, "Created"),
    ((("Created", "True"), ("Running", "True")), False, "Running"),
    ((("Running", "False"), ("Restarting", "True")), False, "Restarting"),
    ((("Running", "False"), ("Suspended", "True")), True, "Suspended"),
    ((("Failed", "True"), ("Running", "True")), False, "Failed"),  # anywhere, not only last
    ((("Running", "False"), ("Succeeded", "True")), False, "Succeeded"),
])
def test_job_phase_from_kubeflow_conditions(conditions, suspend, phase) -> None:
    assert observe.job_phase(job(*conditions, suspend=suspend))[0] == phase
    assert observe.job_phase(None)[0] == "Missing"


RUNNING = job(("Created", "True"), ("Running", "True"))


def seen(jobs: dict, progress: dict | None, groups: int = 2,
         burn_in: int = 0) -> observe.Observed:
    """What the status loop sees; `progress` as the files' JSON, parsed as the operator does."""
    parsed = None if progress is None else {g: Progress.parse(doc, g) for g, doc in progress.items()}
    return observe.Observed(name="demo", generation=3, groups=groups, jobs=jobs,
                            progress=parsed, max_staleness=100, burn_in=burn_in)


def progress(step: int, loss: float, **extra: Any) -> dict[str, Any]:
    return {"group": 0, "step": step, "steps": 1000, "state": "training", "loss": loss,
            "taskLoss": loss, "distillLoss": None, "time": 1.8e9, **extra}


def test_status_from_running_groups() -> None:
    status = observe.observe(RunStatus(), seen(
        {0: RUNNING, 1: RUNNING},
        {0: progress(120, 2.0, teachers={"1": 100}, staleness={"1": 20}), 1: progress(80, 3.0)},
    ))
    assert status.phase == "Running" and status.step == 80 and status.loss == 2.5
    assert status.groups_ready == "2/2"
    assert status.groups[0].teachers == {"1": 100} and status.groups[0].progress_time.endswith("Z")
    conditions = {c.type: (c.status, c.reason) for c in status.conditions}
    assert conditions["Running"] == ("True", "GroupsRunning")
    assert conditions["Distilling"] == ("True", "Distilling")
    assert conditions["Degraded"] == ("False", "Healthy")
    assert all(c.observed_generation == 3 for c in status.conditions)


def test_one_failed_group_degrades_the_run_and_all_done_decides_it() -> None:
    failed = job(("Running", "False"), ("Failed", "True"), message="OOMKilled")
    done = job(("Running", "False"), ("Succeeded", "True"))
    degraded = observe.observe(RunStatus(), seen({0: RUNNING, 1: failed}, {}))
    assert degraded.phase == "Degraded"
    assert degraded.condition("Degraded").reason == "GroupFailed"
    assert "OOMKilled" in degraded.condition("Degraded").message
    assert observe.observe(degraded, seen({0: done, 1: failed}, {})).phase == "Failed"
    assert observe.observe(RunStatus(), seen({0: done, 1: done}, {})).phase == "Succeeded"


def pod(name: str, waiting: str = "", message: str = "", unschedulable: bool = False) -> dict:
    status: dict[str, Any] = {"containerStatuses": [
        {"name": "trainer", "state": {"waiting": {"reason": waiting, "message": message}}
         if waiting else {"running": {}}}]}
    if unschedulable:
        status = {"conditions": [{"type": "PodScheduled", "status": "False",
                                  "reason": "Unschedulable", "message": message}]}
    return {"metadata": {"name": name}, "status": status}


def test_pods_that_cannot_start_say_why_in_the_group_and_degrade_the_run() -> None:
    """A job whose pod pulls a missing image stays "Created": the pods tell the cause."""
    assert observe.pod_problem(pod("p", "ErrImagePull", 'image "x" not found')) == (
        'pod p: ErrImagePull: image "x" not found')
    assert observe.pod_problem(pod("p", unschedulable=True, message="0/3 nodes: gpu")) == (
        "pod p: Unschedulable: 0/3 nodes: gpu")
    assert observe.pod_problem(pod("p", "ContainerCreating")) is None
    assert observe.pod_problem(pod("p")) is None
    created = job(("Created", "True"))
    why = observe.pod_problem(pod("demo-g1-master-0", "ImagePullBackOff", "back-off"))
    stuck = seen({0: RUNNING, 1: created}, {})._replace(pods={1: why})
    status = observe.observe(RunStatus(), stuck)
    assert status.groups[1].message == why and not status.groups[0].message
    degraded = status.condition("Degraded")
    assert (degraded.status, degraded.reason) == ("True", "PodsNotStarting")
    assert degraded.message == f"group 1: {why}"
    events = observe.transitions(RunStatus(), status)
    assert ("Warning", "RunDegraded", f"group 1: {why}") in events
    healthy = observe.observe(status, seen({0: RUNNING, 1: RUNNING}, {}))
    assert healthy.condition("Degraded").status == "False" and not healthy.groups[1].message


def test_restarts_count_transitions_not_observations() -> None:
    restarting = job(("Running", "False"), ("Restarting", "True"))
    status = RunStatus()
    for jobs in ({0: restarting}, {0: restarting}, {0: RUNNING}, {0: restarting}):
        status = observe.observe(status, seen(jobs, {}, groups=1))
    assert status.groups[0].restarts == 2


def test_restarts_the_trainer_counted_are_shown_even_if_never_seen_restarting() -> None:
    status = observe.observe(RunStatus(), seen({0: RUNNING}, {0: progress(5, 1.0, restarts=3)},
                                               groups=1))
    assert status.groups[0].restarts == 3


def test_unreadable_bucket_keeps_the_last_progress_and_bad_files_are_reported() -> None:
    before = observe.observe(RunStatus(), seen({0: RUNNING}, {0: progress(50, 1.5)}, groups=1))
    after = observe.observe(before, seen({0: RUNNING}, None, groups=1))
    assert after.groups[0].step == 50 and after.groups[0].loss == 1.5
    garbage = observe.observe(RunStatus(), seen({0: RUNNING}, {0: {"step": "many"}}, groups=1))
    assert garbage.groups[0].step == 0
    assert garbage.groups[0].warnings == ["progress.json unreadable (1 errors)"]


def test_distilling_explains_why_not() -> None:
    reasons = [
        observe.observe(RunStatus(), seen({0: RUNNING}, {0: progress(5, 1.0)}, groups=1)),
        observe.observe(RunStatus(), seen({0: RUNNING, 1: RUNNING},
                                            {0: progress(5, 1.0)}, burn_in=10)),
        observe.observe(RunStatus(), seen({0: RUNNING, 1: RUNNING}, {0: progress(50, 1.0)})),
        observe.observe(RunStatus(), seen({}, {})),
    ]
    assert [s.condition("Distilling").reason for s in reasons] == [
        "SingleGroup", "BurnIn", "WaitingForPeers", "NotRunning"]


def test_transitions_become_events_once() -> None:
    start = observe.observe(RunStatus(), seen({0: RUNNING, 1: RUNNING}, {}))
    first = observe.transitions(RunStatus(), start)
    assert [e.reason for e in first] == ["GroupStarted", "GroupStarted"]
    lagging = {0: progress(900, 1.0, teachers={"1": 400}, staleness={"1": 500})}
    stale = observe.observe(start, seen({0: RUNNING, 1: RUNNING}, lagging))
    events = observe.transitions(start, stale)
    assert [e.reason for e in events] == ["PeersStale", "DistillationStarted", "RunDegraded"]
    still = {0: progress(901, 1.0, teachers={"1": 400}, staleness={"1": 501})}
    again = observe.observe(stale, seen({0: RUNNING, 1: RUNNING}, still))
    assert observe.transitions(stale, again) == []  # still stale: no second event
    done = job(("Succeeded", "True"))
    end = observe.observe(stale, seen({0: done, 1: done}, {}))
    reasons = [e.reason for e in observe.transitions(stale, end)]
    assert reasons.count("GroupSucceeded") == 2 and "RunSucceeded" in reasons


def test_ready_changes_are_announced_with_their_message() -> None:
    old, new = RunStatus(), RunStatus()
    observe.set_condition(new, "Ready", False, "InvalidSpec", "spec.groups: too many", 2)
    (event,) = observe.transitions(old, new)
    assert event == observe.Event("Warning", "InvalidSpec", "spec.groups: too many")
    assert observe.transitions(new, new.model_copy(deep=True)) == []


def test_status_round_trips_through_its_schema() -> None:
    from codistill_operator import crd
    from tests.support.crdschema import validator

    status = observe.observe(RunStatus(), seen({0: RUNNING}, {0: progress(5, 1.0)}, groups=1))
    doc = body()
    doc["status"] = status.dump()
    validator().validate(doc)
    assert RunStatus.model_validate(doc["status"]) == status
    assert crd.model_schema(GroupStatus)["properties"]["stalePeers"]["type"] == "array"


def test_options_from_flags_and_environment() -> None:
    options = cli.parse([], {"WATCH_NAMESPACES": "a, b"})
    assert options.namespaces == ("a", "b") and options.liveness_port == 8080
    assert not options.config.scanning  # namespaced: no cluster-scoped watches
    assert cli.parse([], {}).config.scanning
    assert options.config.metrics_port == 9090
    assert cli.parse(["-n", "x", "-n", "y"], {"WATCH_NAMESPACES": "a"}).namespaces == ("x", "y")
    assert cli.parse(["--all-namespaces"], {"WATCH_NAMESPACES": "a"}).namespaces == ()
    tuned = cli.parse(["--metrics-port", "0"], {"CODISTILL_OPERATOR_STATUS_INTERVAL": "2.5"})
    assert tuned.config.metrics_port == 0 and tuned.config.status_interval == 2.5
    with pytest.raises(SystemExit):
        cli.parse(["-n", "x", "--all-namespaces"], {})
    with pytest.raises(ValueError, match="CODISTILL_OPERATOR_DELETE_ATTEMPTS: expected int"):
        Config.from_env({"CODISTILL_OPERATOR_DELETE_ATTEMPTS": "many"})
    assert Config.from_env({"CODISTILL_OPERATOR_SCANNING": "false"}).scanning is False
    with pytest.raises(ValueError, match="SCANNING: expected bool"):
        Config.from_env({"CODISTILL_OPERATOR_SCANNING": "perhaps"})


def test_metrics_count_outcomes_errors_and_phases() -> None:
    before = metrics.RECONCILES.labels("test", "applied")._value.get()
    assert metrics.measure("test", lambda: "applied") == "applied"
    assert metrics.RECONCILES.labels("test", "applied")._value.get() == before + 1
    errors = metrics.ERRORS.labels("test")._value.get()
    with pytest.raises(KeyError):
        metrics.measure("test", lambda: {}["x"])
    assert metrics.ERRORS.labels("test")._value.get() == errors + 1
    metrics.count_phases(["Running", "Running", "Failed"])
    assert metrics.RUNS.labels("Running")._value.get() == 2
    assert metrics.RUNS.labels("Pending")._value.get() == 0


def test_a_group_whose_job_went_after_it_finished_stays_succeeded() -> None:
    done = job(("Succeeded", "True"))
    seen_done = observe.observe(RunStatus(), seen({0: done}, {0: progress(9, 1.0)}, groups=1))
    assert observe.observe(seen_done, seen({}, {}, groups=1)).groups[0].phase == "Succeeded"
    # removed before the status loop ever saw it finish: its trainer said so
    finished = progress(9, 1.0, state="finished")
    gone = observe.observe(RunStatus(), seen({}, {0: finished}, groups=1))
    assert gone.groups[0].phase == "Succeeded" and gone.phase == "Succeeded"


def test_pods_share_their_cpu_limit_and_get_a_memory_shm_with_several_processes() -> None:
    (one, _) = jobs_of(body())
    (many, _) = jobs_of(body(nprocPerWorker=4))
    for job, shm in ((one, False), (many, True)):
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        trainer = pod["containers"][0]
        cpus = next(e for e in trainer["env"] if e["name"] == names.ENV_CPUS)
        assert cpus["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
        mounts = {m["mountPath"] for m in trainer.get("volumeMounts", [])}
        assert ("/dev/shm" in mounts) is shm
        assert any(v.get("emptyDir", {}).get("medium") == "Memory"
                   for v in pod.get("volumes", [])) is shm


def test_reconciles_of_one_run_never_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's deletion event reconciles its run by name while kopf may be reconciling the run
    created again under that name: the two must take turns (they share the run folder)."""
    import threading
    import time

    from codistill_operator import handlers, reconcile
    from codistill_operator.runtime import State

    inside, overlaps = [], []

    def slow(state: State, namespace: str, name: str) -> str:
        inside.append(name)
        overlaps.append(len(inside))
        time.sleep(0.05)
        inside.remove(name)
        return "applied"

    monkeypatch.setattr(reconcile, "reconcile", slow)
    state = State(Config(metrics_port=0))
    threads = [threading.Thread(target=handlers._reconcile, args=(state, "ns", "demo"))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1, 1]


class ReplacedRun:
    """An API whose run `demo` was deleted and created again (another uid) mid-reconcile."""

    def __init__(self) -> None:
        self.patches: list[dict] = []
        self.events: list[str] = []

    def get_run(self, namespace: str, name: str) -> dict:
        return {"metadata": {"namespace": namespace, "name": name, "uid": "second"}}

    def patch_status(self, namespace: str, name: str, patch: dict,
                     resource_version: str | None = None) -> None:
        self.patches.append(patch)

    def post_event(self, body: dict, kind: str, reason: str, message: str) -> None:
        self.events.append(reason)


def test_a_reconcile_never_records_its_outcome_on_a_run_created_again() -> None:
    from codistill_operator import reconcile
    from codistill_operator.runtime import State

    state = State(Config(metrics_port=0))
    state._api = api = ReplacedRun()
    first = {"metadata": {"namespace": "ns", "name": "demo", "uid": "first", "generation": 1}}
    assert reconcile.record(state, first, True, "Applied", "2 PyTorchJobs") is False
    assert api.patches == [] and api.events == []
    second = dict(first, metadata=dict(first["metadata"], uid="second"))
    assert reconcile.record(state, second, True, "Applied", "2 PyTorchJobs") is True
    ready = next(c for c in api.patches[0]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["reason"] == "Applied"


def test_a_run_without_spec_image_runs_the_operators_trainer_image(monkeypatch) -> None:
    """The chart sets CODISTILL_TRAINER_IMAGE on the operator (its trainerImage, what `make
    images` built): a run that omits spec.image runs that, never a public name nobody here owns.
    The CRD has no default for it, so the API server leaves the field absent for the operator."""
    from codistill import spec
    from codistill_operator import crd

    def image(doc: dict[str, Any]) -> str:
        pod = jobs_of(doc)[0]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        return pod["containers"][0]["image"]

    (version,) = crd.crd()["spec"]["versions"]
    field = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["image"]
    assert "default" not in field
    monkeypatch.setenv(spec.TRAINER_IMAGE_ENV, "registry.example.com/me/codistill/trainer:1.2")
    assert image(body()) == "registry.example.com/me/codistill/trainer:1.2"
    assert image(body(image="mine:1")) == "mine:1"
    monkeypatch.delenv(spec.TRAINER_IMAGE_ENV)
    assert image(body()) == spec.LOCAL_TRAINER_IMAGE == "localhost:5000/codistill/trainer:0.1.0"


def test_an_unreadable_store_degrades_the_run_and_keeps_the_last_progress() -> None:
    lagging = {0: progress(900, 1.0, teachers={"1": 400}, staleness={"1": 500})}
    stale = observe.observe(RunStatus(), seen({0: RUNNING, 1: RUNNING}, lagging))
    assert stale.condition("Degraded").reason == "PeersStale"
    error = f"store {URL} unreachable: read {URL}/groups/0/progress.json: ReadTimeoutError: x"
    down = observe.observe(stale, seen({0: RUNNING, 1: RUNNING}, None)._replace(store_error=error))
    degraded = down.condition("Degraded")
    assert (degraded.status, degraded.reason, degraded.message) == ("True", "StoreUnreachable",
                                                                    error)
    assert down.groups[0].step == 900 and down.groups[0].loss == 1.0 and down.step == 0
    # Degraded was already True: its new reason is announced all the same, and only once
    assert observe.transitions(stale, down) == [observe.Event("Warning", "RunDegraded", error)]
    still = observe.observe(down, seen({0: RUNNING, 1: RUNNING}, None)._replace(store_error=error))
    assert observe.transitions(down, still) == []
    back = observe.observe(still, seen({0: RUNNING, 1: RUNNING}, {0: progress(950, 0.9)}))
    assert back.condition("Degraded").reason == "Healthy" and back.groups[0].step == 950


class StoreDown:
    """An API with one applied run, whose store is not there."""

    def __init__(self, endpoint: str) -> None:
        self.patches: list[dict] = []
        self.events: list[tuple[str, str, str]] = []
        fields = {"groups": 1, "storage.credentialsSecret": "keys", "storage.endpoint": endpoint}
        before = GroupStatus(group=0, job="demo-g0", phase="Running", state="training", step=50,
                             loss=1.5)
        status = RunStatus(phase="Running", bucket=URL, groups=[before],
                           applied={"generation": 1, "fields": fields})
        self.run = {"metadata": {"namespace": "ns", "name": "demo", "uid": "u", "generation": 1},
                    "status": status.dump()}

    def get_run(self, namespace: str, name: str) -> dict:
        return self.run

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "AKIAKEYID", "AWS_SECRET_ACCESS_KEY": "secret-value"}

    def list_jobs(self, kind: Any, namespace: str, run: dict) -> list[dict]:
        return [{**RUNNING, "metadata": {"labels": {names.LABEL_GROUP: "0"}}}]

    def list_pods(self, namespace: str, run: str) -> list[dict]:
        return []

    def patch_status(self, namespace: str, name: str, patch: dict,
                     resource_version: str | None = None) -> None:
        self.patches.append(patch)

    def post_event(self, body: dict, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))


def test_a_store_that_refuses_the_status_read_shows_in_the_conditions() -> None:
    from codistill.net import free_port
    from codistill_operator.runtime import State
    from codistill_operator.status import write

    state = State(Config(metrics_port=0))
    state._api = api = StoreDown(f"http://127.0.0.1:{free_port()}")
    assert write.refresh(state, "ns", "demo") == "ok"
    (patch,) = api.patches
    degraded = next(c for c in patch["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "StoreUnreachable"
    message = degraded["message"]
    assert message.startswith(f"store {URL} unreachable: read {URL}/groups/0/progress.json: ")
    assert "\n" not in message and "127.0.0.1" in message, message
    after = RunStatus.model_validate({**api.run["status"], **patch})
    assert after.groups[0].step == 50 and after.groups[0].loss == 1.5  # progress kept
    assert ("Warning", "RunDegraded", message) in api.events
    everything = repr((api.patches, api.events))
    assert "AKIAKEYID" not in everything and "secret-value" not in everything
