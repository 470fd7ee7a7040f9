"""The operator's settings: defaults, overridable by CODISTILL_OPERATOR_<FIELD> env variables."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

ENV_PREFIX = "CODISTILL_OPERATOR_"
_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


@dataclasses.dataclass(frozen=True)
class Config:
    status_interval: float = 15.0  # seconds between status refreshes of every run
    retry_delay: float = 30.0  # before retrying a missing Secret or an unreachable bucket
    delete_attempts: int = 5  # tries to remove a run folder before releasing the resource anyway
    delete_delay: float = 10.0  # seconds between those tries
    metrics_port: int = 9090  # 0: no metrics server
    # Where the liveness and metrics servers listen: "::" on an IPv6-only cluster.
    bind_address: str = "0.0.0.0"
    api_timeout: float = 30.0  # seconds for one Kubernetes API call (connecting: at most 10)
    refresh_concurrency: int = 8  # runs whose status is refreshed at once
    # A refresh still running after this long is stuck (its calls all have timeouts): the
    # liveness probe then fails, and the kubelet restarts the operator.
    refresh_deadline: float = 300.0
    # The namespace of the leader Lease (the chart: the operator's own); empty: no election,
    # for an operator run by hand.
    lease_namespace: str = ""
    # kopf's watch of CRDs (and, namespaced, of namespaces) to notice ones created later. Off
    # for a namespaced operator: it then needs no cluster-scoped permission at all.
    scanning: bool = True

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        """Overrides from CODISTILL_OPERATOR_<FIELD> (for `kopf run`, which passes no config)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            name = ENV_PREFIX + field.name.upper()
            raw = env.get(name)
            if raw is not None:
                kind = type(field.default)
                try:
                    values[field.name] = _BOOLS[raw.lower()] if kind is bool else kind(raw)
                except (KeyError, ValueError):
                    raise ValueError(f"{name}: expected {kind.__name__}, got {raw!r}") from None
        return cls(**values)
