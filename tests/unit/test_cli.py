"""Bad input to `codistill run`: one line naming the file/field, exit 2, no process started."""

from __future__ import annotations

import pytest
import yaml

from codistill_trainer.cli import commands as cli
from tests.support.datafixtures import make_tiny_data
from tests.support.localrun import workers_of


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    out = capsys.readouterr()
    return e.value.code, " ".join((out.out + out.err).split())


def write(tmp_path, doc) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


def manifest(tmp_path, **spec) -> dict:
    data = make_tiny_data(tmp_path / "data")
    base = {"task": {"name": "lm", "args": {"data_dir": str(data), "seq_len": 8}}}
    return {"apiVersion": "codistill.io/v1alpha1", "kind": "Codistillation",
            "metadata": {"name": "bad"}, "spec": {**base, **spec}}


@pytest.mark.parametrize("case, expected", [
    ("malformed", "malformed YAML"),
    ("unknown", "spec.trainingg: unknown field"),
    ("groups0", "spec.groups: Input should be greater than or equal to 1"),
    ("no_module", "spec.task.name"),
    ("no_data", "codistill data fetch"),
    ("bad_arg", "spec.task.args"),
    ("unreachable", "read s3://nowhere/default/bad/run.json: EndpointConnectionError"),
    ("markup", "metadata.name"),  # "[/x]" in the message: printed as text, never as markup
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, monkeypatch, case, expected):
    monkeypatch.chdir(tmp_path)
    doc = manifest(tmp_path)
    if case == "malformed":
        doc = "apiVersion: codistill.io/v1alpha1\nkind: Codistillation\nspec: {groups: [1}\n"
    elif case == "unknown":
        doc["spec"]["trainingg"] = {}
    elif case == "groups0":
        doc["spec"]["groups"] = 0
    elif case == "no_module":
        doc["spec"]["task"] = {"name": "no_such_pkg.models:make"}
    elif case == "no_data":
        doc["spec"]["task"]["args"]["data_dir"] = str(tmp_path / "empty")
    elif case == "bad_arg":
        doc["spec"]["task"]["args"]["layerz"] = 3
    elif case == "markup":
        doc["metadata"]["name"] = "[/x]"
    elif case == "unreachable":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        doc["spec"]["storage"] = {"url": "s3://nowhere", "endpoint": "http://127.0.0.1:9"}
    code, out = run_cli(capsys, "run", write(tmp_path, doc))
    assert code == 2, out
    assert out.startswith("error:") and expected in out, out
    assert case != "markup" or "[/x]" in out
    assert "run.yaml" in out or case in ("no_module", "no_data", "bad_arg", "unreachable")
    assert not (tmp_path / "runs").exists() or case == "unreachable"
    assert not workers_of((tmp_path / "runs" / "default" / "bad").as_uri())


def test_a_crash_report_with_log_lines_prints_as_written(tmp_path, capsys, monkeypatch):
    """gloo's log lines look like rich markup closing tags: the report must print them."""
    from codistill_trainer.cli import launch

    def crash(*_):
        raise launch.RunFailed("bad-g0-master-0 exited with code 1; its log ends:\n"
                               "[/__w/pytorch/pytorch/third_party/gloo/pair.cc:537] Read error")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch, "run_local", crash)
    code = cli.cmd_run(type("Args", (), {"manifest": write(tmp_path, manifest(tmp_path)),
                                         "fresh": False})())
    out = capsys.readouterr().out
    assert code == 1 and "[/__w/pytorch/pytorch/third_party/gloo/pair.cc:537] Read error" in out


def test_status_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    code, out = run_cli(capsys, "status", str(tmp_path))
    assert code == 2 and "not a run folder" in out


def test_status_of_a_black_holed_store_is_one_line_within_seconds(tmp_path, capsys, monkeypatch):
    """run.json cannot be read, so there is no table: one error line, exit 2, no traceback."""
    import time

    from tests.unit.test_tables import blackhole

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with blackhole() as (endpoint, _):
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        started = time.monotonic()
        code, out = run_cli(capsys, "status", "s3://b/default/demo")
    assert code == 2 and out.startswith("error: read s3://b/default/demo/run.json: "), out
    assert "Timeout" in out and "Traceback" not in out, out
    assert time.monotonic() - started < 20  # not the trainers' 4 attempts x 30 s


def test_status_shows_the_table_and_names_the_store_when_progress_cannot_be_read(
        tmp_path, capsys, monkeypatch):
    from codistill import names, spec
    from codistill.storage import Bucket
    from codistill_trainer.cli import launch

    run = spec.parse(manifest(tmp_path))
    bucket = Bucket(launch.local_run_url(run, tmp_path))
    launch.prepare(run, bucket, fresh=False)
    bucket.put_json(names.progress_file(0), {"group": 0, "step": 7, "steps": 100,
                                             "state": "training", "time": 1.0})
    bucket.fs.makedirs(bucket.path(names.progress_file(1)))  # reading it fails: a store error
    code, out = run_cli(capsys, "status", bucket.url)
    assert code == 1, out
    assert f"store {bucket.url} unreachable (read {bucket.url}/groups/1/progress.json: " in out
    assert "7/100 7%" in out and "unreadable" in out, out


def test_a_crashed_worker_stops_the_run_while_the_store_hangs(tmp_path, monkeypatch):
    """Progress is read on a thread: a read hung on a black-holed store does not delay the
    crash report (it took the read's timeouts before)."""
    import io
    import sys
    import time

    from rich.console import Console

    from codistill import spec
    from codistill_trainer import tables
    from codistill_trainer.cli import launch
    from tests.unit.test_tables import blackhole

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    # The worker lives 2 s before crashing, so the table has its moment: a worker that exits
    # at once is reported before any table, which is right, but not what this test is about.
    crash = launch.Replica("bad-g0-master-0",
                           [sys.executable, "-c", "import time; time.sleep(2); raise SystemExit(3)"],
                           {}, tmp_path / "bad.log")
    console = Console(file=io.StringIO(), width=150)
    monkeypatch.setattr(tables, "VIEW_TIMEOUT_S", 120.0)  # a read that hangs for 2 minutes
    with blackhole() as (endpoint, _):
        folder = tables.viewer_folder("s3://b/default/bad", endpoint)
        launch.start([crash])
        started = time.monotonic()
        with pytest.raises(launch.RunFailed, match="bad-g0-master-0 exited with code 3"):
            launch.supervise([crash], folder, spec.parse(manifest(tmp_path)), console)
        assert time.monotonic() - started < 60  # reported long before the read gives up
    assert "waiting" in console.file.getvalue()  # the table was shown meanwhile


def test_run_folder_refuses_a_different_spec(tmp_path, capsys, monkeypatch):
    from codistill import spec
    from codistill.storage import Bucket
    from codistill_trainer.cli import launch

    monkeypatch.chdir(tmp_path)
    run = spec.parse(manifest(tmp_path))
    bucket = Bucket(launch.local_run_url(run, tmp_path))
    launch.prepare(run, bucket, fresh=False)
    other = spec.parse({**manifest(tmp_path), "spec": {**manifest(tmp_path)["spec"], "groups": 3}})
    with pytest.raises(spec.SpecError, match="different spec; use --fresh"):
        launch.prepare(other, bucket, fresh=False)
    launch.prepare(other, bucket, fresh=True)
    assert bucket.get_json("run.json")["spec"]["groups"] == 3


def test_worker_refuses_a_job_that_disagrees_with_the_run_folder(tmp_path, monkeypatch):
    from codistill import names, spec
    from codistill.storage import Bucket
    from codistill_trainer import worker
    from codistill_trainer.cli import launch

    run = spec.parse(manifest(tmp_path))  # groups: 2 by default
    bucket = Bucket(launch.local_run_url(run, tmp_path))
    launch.prepare(run, bucket, fresh=False)
    monkeypatch.setenv(names.ENV_RUN_URL, bucket.url)
    monkeypatch.setenv(names.ENV_GROUP, "0")
    monkeypatch.setenv(names.ENV_GROUPS, "3")
    with pytest.raises(SystemExit, match="CODISTILL_GROUPS=3 but .* has groups 2"):
        worker.main()


def test_validate_says_where_a_manifest_can_run(tmp_path, capsys):
    from tests.support.helm import ROOT

    local = str(ROOT / "examples" / "quickstart.yaml")
    code, out = run_cli(capsys, "validate", local)
    assert code == 1 and "valid for `codistill run`" in out
    assert "not for a cluster: spec.storage.url: required on a cluster" in out
    assert run_cli(capsys, "validate", "--local", local)[0] == 0
    code, out = run_cli(capsys, "validate", str(ROOT / "manifests" / "samples" / "codistillation.yaml"))
    assert code == 0 and "valid, locally and on a cluster (2 group(s)" in out
    code, out = run_cli(capsys, "validate", write(tmp_path, manifest(tmp_path, groups=0)))
    assert code == 2 and "spec.groups" in out


def test_render_prints_the_jobs_the_operator_creates(capsys):
    from tests.support.crdschema import assert_meets_webhook, kubeflow
    from tests.support.helm import ROOT

    sample = str(ROOT / "manifests" / "samples" / "codistillation.yaml")
    with pytest.raises(SystemExit) as exited:
        cli.main(["render", "--namespace", "team-a", sample])
    assert exited.value.code == 0
    jobs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [j["metadata"]["name"] for j in jobs] == ["sample-g0", "sample-g1"]
    for job in jobs:
        kubeflow().validate(job)
        assert_meets_webhook(job)
        assert job["metadata"]["namespace"] == "team-a"
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["CODISTILL_RUN_URL"]["value"].endswith("/team-a/sample")
        assert "valueFrom" in env["AWS_SECRET_ACCESS_KEY"] and pod["securityContext"]["runAsNonRoot"]


def test_render_and_validate_speak_for_either_backend(tmp_path, capsys):
    from tests.support.crdschema import TRAINER_RELEASES, trainjob
    from tests.support.helm import ROOT

    def render(*argv: str) -> str:
        with pytest.raises(SystemExit) as exited:
            cli.main(["render", *argv])
        assert exited.value.code == 0
        return capsys.readouterr().out

    sample = ROOT / "manifests" / "samples" / "codistillation.yaml"
    jobs = list(yaml.safe_load_all(render("--backend", "trainjob", str(sample))))
    assert [j["kind"] for j in jobs] == ["TrainJob", "TrainJob"]
    for job in jobs:
        for release in TRAINER_RELEASES:
            trainjob(release).validate(job)
    out = render(str(sample))  # auto: says which it shows, and how to see the other
    assert "--backend trainjob shows the TrainJobs" in out
    assert {j["kind"] for j in yaml.safe_load_all(out)} == {"PyTorchJob"}
    doc = yaml.safe_load(sample.read_text())
    doc["spec"]["runPolicy"] = {"backoffLimit": 2}
    for backend, code_wanted, said in (
            ("auto", 0, "only with spec.backend: pytorchjob: a TrainJob cannot carry "
                        "spec.runPolicy.backoffLimit"),
            ("trainjob", 1, "not for a cluster: backend trainjob: spec.runPolicy.backoffLimit")):
        doc["spec"]["backend"] = backend
        path = tmp_path / f"{backend}.yaml"
        path.write_text(yaml.safe_dump(doc))
        code, out = run_cli(capsys, "validate", str(path))
        assert code == code_wanted and said in out, out
    code, out = run_cli(capsys, "render", str(path))
    assert code == 2 and "error:" in out and "spec.runPolicy.backoffLimit" in out


@pytest.mark.parametrize("case, expected", [
    ("env", "spec.template.spec.containers[0].env: must be a list of mappings"),
    ("alias", "malformed YAML: aliases (*a) are not allowed"),
    ("binary", "not UTF-8/UTF-16 YAML text"),
    ("newline", "metadata.name"),
    ("namespace", "metadata.namespace"),
    ("word", "spec.runPolicy.suspend: Input should be a valid boolean"),
])
def test_run_refuses_what_a_cluster_refuses_in_one_line(tmp_path, capsys, monkeypatch, case,
                                                        expected):
    monkeypatch.chdir(tmp_path)
    doc = manifest(tmp_path)
    if case == "env":
        doc["spec"]["template"] = {"spec": {"containers": [{"name": "pytorch", "env": "x"}]}}
    elif case == "newline":
        doc["metadata"]["name"] = "bad\n"
    elif case == "namespace":
        doc["metadata"]["namespace"] = "../../../../x"
    elif case == "word":
        doc["spec"]["runPolicy"] = {"suspend": "yes"}
    path = write(tmp_path, doc)
    if case == "alias":
        (tmp_path / "run.yaml").write_text(
            yaml.safe_dump(doc) + "x: &a [1, 2]\ny: [*a, *a]\n")
    elif case == "binary":
        (tmp_path / "run.yaml").write_bytes(b"kind: \x81\x80\x00" * 10)
    code, out = run_cli(capsys, "run", path)
    assert code == 2 and out.startswith("error:") and "run.yaml" in out, out
    assert expected in out, out
    assert not (tmp_path / "runs").exists() and not list(tmp_path.parent.glob("x"))


def test_run_refuses_more_processes_than_the_machine_holds(tmp_path, capsys, monkeypatch):
    import os

    from codistill_trainer.cli import launch

    started = []

    def fake_run(run, *_):
        started.append(run.spec.groups * run.spec.world_size)
        raise launch.RunFailed("stopped by the test")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(launch, "run_local", fake_run)
    path = write(tmp_path, manifest(tmp_path, groups=3, workersPerGroup=3))  # 9 > 4 x 2
    code, out = run_cli(capsys, "run", path)
    assert code == 2 and out.startswith("error:"), out
    assert "9 local processes, more than 4 x 2 CPUs" in out and "--force" in out, out
    assert started == [] and not (tmp_path / "runs").exists()
    code, out = run_cli(capsys, "run", "--force", path)
    assert code == 1 and started == [9], out
    write(tmp_path, manifest(tmp_path, groups=2, workersPerGroup=4))  # 8 = 4 x 2: allowed
    code, out = run_cli(capsys, "run", path)
    assert code == 1 and started == [9, 8], out


def test_a_crash_message_shows_why_above_torchruns_summary(tmp_path):
    from codistill_trainer.cli import launch

    log = tmp_path / "w.log"
    summary = [f"torchrun summary line {i}" for i in range(20)]
    log.write_text("\n".join(["training", "Fatal Python error: Aborted", "  File loop.py",
                              *summary]) + "\n")
    shown = launch.excerpt(log).splitlines()
    assert shown[:3] == ["Fatal Python error: Aborted", "  File loop.py", "torchrun summary line 0"]
    assert shown[-15:] == summary[-15:] and "..." in shown
    log.write_text("\n".join(["Traceback (most recent call last):", *summary[:3]]) + "\n")
    assert launch.excerpt(log).splitlines()[0] == "Traceback (most recent call last):"  # in the tail
    log.write_text("\n".join(summary) + "\n")
    assert launch.excerpt(log).splitlines() == summary[-15:]
    assert launch.excerpt(tmp_path / "none.log") == "(no log)"
