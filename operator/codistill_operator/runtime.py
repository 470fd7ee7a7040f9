"""The little the operator keeps in memory (everything else is re-observed from the cluster)."""

from __future__ import annotations

import threading

from .backends import Detector
from .k8s import Api, connect
from .settings import Config


class State:
    """Per operator run: the API client, the runs seen, their phases, one lock per run."""

    def __init__(self, config: Config):
        self.config = config
        self.runs: dict[tuple[str, str], str] = {}  # (namespace, name) -> last known phase
        self._api: Api | None = None
        self.detector = Detector()  # is Kubeflow Trainer v2 installed (cached a minute)
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._reconciles: dict[tuple[str, str], threading.Lock] = {}
        self._retrying: set[tuple[str, str]] = set()  # runs with a reconcile timer set
        self._guard = threading.Lock()

    @property
    def api(self) -> Api:
        """Connected on first use, after kopf has logged in (its login reads the same config)."""
        with self._guard:
            if self._api is None:
                self._api = Api(connect(), self.config.api_timeout)
            return self._api

    def lock(self, namespace: str, name: str) -> threading.Lock:
        """Serialises status writes of one run (reconciler, job events and the status loop)."""
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def reconciling(self, namespace: str, name: str) -> threading.Lock:
        """Serialises reconciles of one run: kopf's own handlers for it, and those that a job's
        event starts (a run deleted and created again under its name sees its old jobs go)."""
        with self._guard:
            return self._reconciles.setdefault((namespace, name), threading.Lock())

    def retry_later(self, namespace: str, name: str) -> bool:
        """Mark the run as having a reconcile timer; False if it has one already."""
        with self._guard:
            if (namespace, name) in self._retrying:
                return False
            self._retrying.add((namespace, name))
            return True

    def retried(self, namespace: str, name: str) -> None:
        with self._guard:
            self._retrying.discard((namespace, name))

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self.runs.pop((namespace, name), None)
            self._locks.pop((namespace, name), None)
