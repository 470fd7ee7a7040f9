"""`python -m codistill_operator`: the operator, standalone (no peering), with JSON logs.

Namespaces: `--namespace NS` (repeatable), or `--all-namespaces` (the default), or the env
`WATCH_NAMESPACES=a,b`. Liveness: kopf's probe at `--liveness-port` (/healthz). Prometheus
metrics at `--metrics-port` (/metrics). Same handlers as `kopf run -m codistill_operator.handlers`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import kopf

from . import handlers  # noqa: F401 - registers the handlers
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


def main(argv: list[str] | None = None) -> None:
    options = parse(sys.argv[1:] if argv is None else argv, dict(os.environ))
    kopf.configure(verbose=options.verbose, log_format=kopf.LogFormat.JSON)
    kopf.run(
        standalone=True,
        clusterwide=not options.namespaces,
        namespaces=options.namespaces,
        liveness_endpoint=liveness_endpoint(options),
        memo=kopf.Memo(config=options.config),
    )


if __name__ == "__main__":
    main()
