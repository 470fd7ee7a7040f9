"""`python -m codistill_operator`: the operator, with JSON logs; one leader among its replicas.

Namespaces: `--namespace NS` (repeatable), or `--all-namespaces` (the default), or the env
`WATCH_NAMESPACES=a,b`. Liveness: kopf's probe at `--liveness-port` (/healthz). Prometheus
metrics at `--metrics-port` (/metrics). Same handlers as `kopf run -m codistill_operator.handlers`.
With `CODISTILL_OPERATOR_LEASE_NAMESPACE` (the chart sets it), only the holder of the Lease
`codistill-operator` there acts (leader.py); kopf's own peering is off (`standalone`).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import os
import socket
import sys
import threading

import kopf
import kubernetes

from . import handlers  # noqa: F401 - registers the handlers
from .k8s import connect
from .leader import Leader
from .settings import Config


@dataclasses.dataclass(frozen=True)
class Options:
    namespaces: tuple[str, ...]  # empty: all namespaces
    liveness_port: int
    config: Config
    verbose: bool


def parse(argv: list[str], env: dict[str, str]) -> Options:
    defaults = Config.from_env(env)
    p = argparse.ArgumentParser(prog="python -m codistill_operator",
                                description=__doc__.split("\n")[0])
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable); default: $WATCH_NAMESPACES or all")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    p.add_argument("--liveness-port", type=int, default=8080, help="GET /healthz (default 8080)")
    p.add_argument("--metrics-port", type=int, default=defaults.metrics_port,
                   help="GET /metrics, 0 disables (default %(default)s)")
    p.add_argument("--status-interval", type=float, default=defaults.status_interval,
                   help="seconds between status refreshes (default %(default)s)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logs")
    args = p.parse_args(argv)
    from_env = [ns.strip() for ns in env.get("WATCH_NAMESPACES", "").split(",") if ns.strip()]
    namespaces = () if args.all_namespaces else tuple(args.namespace or from_env)
    config = dataclasses.replace(
        defaults, metrics_port=args.metrics_port, status_interval=args.status_interval,
        scanning=defaults.scanning and not namespaces,
    )
    return Options(namespaces, args.liveness_port, config, args.verbose)


def liveness_endpoint(options: Options) -> str:
    host = options.config.bind_address
    return f"http://{f'[{host}]' if ':' in host else host}:{options.liveness_port}/healthz"


class _Standby(http.server.BaseHTTPRequestHandler):
    """Liveness while waiting for the Lease (kopf serves it only once it runs)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b'{"standby": true}')

    def log_message(self, *_: object) -> None:  # probes every few seconds: not worth a line
        pass


def lead(options: Options) -> Leader | None:
    """Wait until this instance leads (None: no election configured), answering liveness."""
    namespace = options.config.lease_namespace
    if not namespace:
        return None
    leader = Leader(kubernetes.client.CoordinationV1Api(connect()), namespace,
                    timeout=options.config.api_timeout)
    family = socket.AF_INET6 if ":" in options.config.bind_address else socket.AF_INET
    server_class = type("Server", (http.server.ThreadingHTTPServer,), {"address_family": family})
    server = server_class((options.config.bind_address, options.liveness_port), _Standby)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        leader.acquire()
    finally:
        server.shutdown()
        server.server_close()
    return leader


def main(argv: list[str] | None = None) -> None:
    options = parse(sys.argv[1:] if argv is None else argv, dict(os.environ))
    kopf.configure(verbose=options.verbose, log_format=kopf.LogFormat.JSON)
    leader = lead(options)
    stop, lost, done = threading.Event(), threading.Event(), threading.Event()

    def on_lost() -> None:
        lost.set()
        stop.set()

    if leader is not None:
        leader.keep(on_lost=on_lost, stop=done)
    try:
        kopf.run(
            standalone=True,
            clusterwide=not options.namespaces,
            namespaces=options.namespaces,
            liveness_endpoint=liveness_endpoint(options),
            memo=kopf.Memo(config=options.config, stop=stop),
            stop_flag=stop if leader is not None else None,
        )
    finally:
        done.set()
        if leader is not None and not lost.is_set():
            leader.release()
    if lost.is_set():  # the Lease went to another instance: restart as a standby
        sys.exit("stopped: lost the leader lease")


if __name__ == "__main__":
    main()
