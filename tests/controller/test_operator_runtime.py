"""The operator under a hung API server or a hung run: every call times out, and one stuck run
never holds the status of the others (cluster-readiness row 14)."""

from __future__ import annotations

import asyncio
import socket
import threading

import kubernetes
import pytest

from codistill_operator import handlers
from codistill_operator.k8s import Api
from codistill_operator.runtime import State
from codistill_operator.settings import Config
from codistill_operator.status import loop, write


def test_every_api_call_gives_up_on_a_server_that_never_answers() -> None:
    """A listening socket that accepts and never replies: a dropped connection, as seen."""
    server = socket.create_server(("127.0.0.1", 0))
    config = kubernetes.client.Configuration()
    config.host = f"http://127.0.0.1:{server.getsockname()[1]}"
    api = Api(kubernetes.client.ApiClient(config), timeout=0.5)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            api.get_run("ns", "demo")
        except Exception as e:  # urllib3's read timeout, as the kubernetes client raises it
            errors.append(e)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(10)
    server.close()
    assert not caller.is_alive(), "the call still waits for an answer"
    assert "timed out" in str(errors[0]).lower()


def test_a_hung_run_is_skipped_not_waited_for_and_fails_liveness_past_its_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    release, refreshed = threading.Event(), []

    def fake_refresh(state: State, namespace: str, name: str) -> str:
        refreshed.append(name)
        if name == "hung":
            release.wait(10)
        return "ok"

    monkeypatch.setattr(write, "refresh", fake_refresh)
    state = State(Config(metrics_port=0, status_interval=0.05, refresh_deadline=0.3))
    state.runs.update({("ns", "hung"): "Running", ("ns", "ok"): "Running"})
    refreshes, stopping = loop.Refreshes(2), asyncio.Event()
    memo = type("Memo", (), {"refreshes": refreshes, "state": state})()

    async def scenario() -> float:
        task = asyncio.create_task(loop.run(state, refreshes, stopping))
        await asyncio.sleep(0.6)
        with pytest.raises(RuntimeError, match="status refresh has been running"):
            handlers.refresh_probe(memo=memo)
        stuck = refreshes.oldest()
        release.set()
        stopping.set()
        await task
        return stuck

    stuck = asyncio.run(scenario())
    assert refreshed.count("hung") == 1  # skipped while in flight, never queued behind itself
    assert refreshed.count("ok") >= 5  # the other run went on being refreshed meanwhile
    assert stuck > 0.3 and refreshes.oldest() == 0 and handlers.refresh_probe(memo=memo) == 0


def test_the_probes_listen_where_configured_ipv6_too() -> None:
    from codistill_operator import __main__ as cli

    options = cli.parse(["--liveness-port", "8081"], {"CODISTILL_OPERATOR_BIND_ADDRESS": "::"})
    assert cli.liveness_endpoint(options) == "http://[::]:8081/healthz"
    assert cli.liveness_endpoint(cli.parse([], {})) == "http://0.0.0.0:8080/healthz"


def test_a_standby_answers_liveness_while_it_waits_for_the_lease(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    from codistill.net import free_port
    from codistill_operator import __main__ as cli

    port, answers = free_port(), []

    class Waiting:
        def __init__(self, api: object, namespace: str, timeout: float) -> None:
            answers.append(namespace)

        def acquire(self) -> None:  # what the kubelet's probe sees meanwhile
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                answers.append((r.status, r.read()))

    monkeypatch.setattr(cli, "Leader", Waiting)
    monkeypatch.setattr(cli, "connect", lambda: None)
    env = {"CODISTILL_OPERATOR_LEASE_NAMESPACE": "codistill-system"}
    assert cli.lead(cli.parse(["--liveness-port", str(port)], env)) is not None
    assert answers == ["codistill-system", (200, b'{"standby": true}')]
    with pytest.raises(OSError):  # and the port is free again for kopf's own probe server
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
    assert cli.lead(cli.parse([], {})) is None  # run by hand: no election
