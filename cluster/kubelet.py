#!/usr/bin/env python3
"""A process kubelet: runs the pods of a ControlPlane (cluster/controlplane.py) as local processes.

There is no container engine on these machines, so a pod here is: its own network namespace
with its own IP on a host bridge (cluster/podnet.py), its own /etc/hosts (every Service of the
cluster resolves to the IPs of the pods its selector matches), a private mount + UTS namespace
per container (the pod's hostname, its volumes bind-mounted at their mountPaths, a private
/tmp), and each container a process group started through `ip netns exec` + `unshare` + `setpriv`
(runAsUser/runAsGroup, no_new_privs, capability bounding set). Images are not pulled: a table
(IMAGES) says how an image runs here.

    python -m cluster.kubelet --dir DIR            # attach to `controlplane.py up --dir DIR`
    python -m cluster.kubelet --dir DIR --cleanup  # remove what a killed kubelet left behind

From Python (standard library only, like controlplane.py):

    with ControlPlane(d, training_operator=True) as cp, ProcessKubelet(cp, d / "kubelet") as kubelet:
        ...  # pods get bound to node `codistill-node` and run

Identities: the kubelet talks to the apiserver as `system:node:<node>` (group system:nodes), so
the Node authorizer and NodeRestriction apply exactly as to a real kubelet (it can read only the
Secrets/ConfigMaps its pods reference, request tokens only for its pods' ServiceAccounts, write
only its pods' status). Binding unscheduled pods to the node is done as `system:kube-scheduler`
(the RBAC role that has pods/binding): there is one node, so a scheduler would only pick it.
See cluster/README.md, "The process kubelet", for what it does and does not do.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fnmatch
import http.client
import http.server
import json
import math
import os
import platform
import re
import secrets as pysecrets
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from cluster.controlplane import KUBERNETES_SERVICE_IP, SERVICE_CIDR, ControlPlane, proc_start_time
from cluster.podnet import IP, Forwarders, NetError, PodNetwork, Sandbox, netns_name, veth_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

NODE_NAME = "codistill-node"
KUBELET_PORT = 10250
KUBELET_VERSION = "v1.36.3-codistill-process"
POD_LOG_DIR = "logs"  # under the kubelet directory: logs/<ns>_<pod>_<uid>/<container>/<restartCount>.log
Obj = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# images: how an image runs on this machine

@dataclass(frozen=True)
class ImageSpec:
    """What an image would bring, as this machine provides it. `path` is the PATH a container
    of this image gets (host directories; "{shims}" is the kubelet's folder of small stand-ins,
    e.g. `nslookup`); `user`/`group` are the image's USER (runAsNonRoot is checked against
    `user` when the pod sets no runAsUser); entrypoint/cmd/env/workdir are ENTRYPOINT, CMD, ENV
    and WORKDIR. A workdir that does not exist on the host must lie in a volume or /tmp.
    `expose`: host folders the container must read, whatever its uid and its volumes: each is
    bind-mounted read-only after the volumes (a checkout under /tmp stays visible through the
    private /tmp), and a closed folder above one (the venv's interpreter under /root/.pyenv,
    /root being 0700) becomes an empty tmpfs first."""
    path: tuple[str, ...]
    user: int = 0
    group: int = 0
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = "/tmp"
    expose: tuple[str, ...] = ()


# what containerd and CRI-O give a container unless its securityContext says otherwise
DEFAULT_CAPS = frozenset({"chown", "dac_override", "fsetid", "fowner", "mknod", "net_raw", "setgid", "setuid",
                          "setfcap", "setpcap", "net_bind_service", "sys_chroot", "kill", "audit_write"})
SYSTEM_PATH = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")
VENV_BIN = str(ROOT / ".venv" / "bin")
# The project's Dockerfile: both images put /opt/venv/bin first in PATH and run as 10001:10001.
# CODISTILL_DATA (/opt/codistill/data in the image) is not set here: pass it in the pod's env,
# or extend the table (`images={**IMAGES, ...}`), where the data lies on this machine.
_PYTHON_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp"}


def _venv_home(venv: Path) -> tuple[str, ...]:
    """The installation the venv's interpreter comes from (pyvenv.cfg `home` is its bin/)."""
    with contextlib.suppress(OSError):
        for line in (venv / "pyvenv.cfg").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                return (str(Path(value.strip()).resolve().parent),)
    return (sys.base_prefix,)


# The venv's interpreter, and this checkout (its code, venv and test data), which may itself lie
# under /tmp (a CI clone) where each container has a private /tmp.
_VENV_EXPOSE = (*_venv_home(ROOT / ".venv"), str(ROOT))
IMAGES: dict[str, ImageSpec] = {
    "*codistill/trainer*": ImageSpec(path=(VENV_BIN, *SYSTEM_PATH), user=10001, group=10001,
                                     cmd=("python", "-m", "codistill_trainer.worker"),
                                     env={**_PYTHON_ENV, "MPLCONFIGDIR": "/tmp/matplotlib"}, expose=_VENV_EXPOSE),
    "*codistill/operator*": ImageSpec(path=(VENV_BIN, *SYSTEM_PATH), user=10001, group=10001,
                                      entrypoint=("python", "-m", "codistill_operator"),
                                      cmd=("--all-namespaces", "--liveness-port", "8080", "--metrics-port", "9090"),
                                      env=_PYTHON_ENV, expose=_VENV_EXPOSE),
    # The Training Operator's init container for PyTorchJob workers (--pytorch-init-container-image,
    # default alpine:3.10): `sh -c 'for i in $(seq N); do if nslookup MASTER; then ...'`.
    "alpine*": ImageSpec(path=("{shims}", *SYSTEM_PATH), user=0, group=0, cmd=("/bin/sh",)),
    "busybox*": ImageSpec(path=("{shims}", *SYSTEM_PATH), user=0, group=0, cmd=("/bin/sh",)),
}

# busybox's nslookup, answered from /etc/hosts (the pod's, through getent's `files` source): the
# pod netns has no DNS server, so `dns` fails at once on the pod's own loopback.
NSLOOKUP_SHIM = """#!/bin/sh
# nslookup NAME: resolved through /etc/hosts (codistill process kubelet; the image's busybox nslookup)
name=$1
[ -n "$name" ] || { echo "usage: nslookup NAME" >&2; exit 1; }
addrs=$(/usr/bin/getent ahostsv4 "$name" | while read -r ip rest; do echo "$ip"; done | /usr/bin/sort -u)
if [ -z "$addrs" ]; then echo "nslookup: can't resolve '$name'" >&2; exit 1; fi
printf 'Server:    /etc/hosts\\nAddress 1: /etc/hosts\\n\\nName:      %s\\n' "$name"
i=1; for a in $addrs; do echo "Address $i: $a"; i=$((i+1)); done
"""


def lookup_image(images: Mapping[str, ImageSpec], image: str) -> ImageSpec | None:
    """First pattern (fnmatch, in table order) matching the image as written or without its
    docker.io/library/ prefix."""
    short = re.sub(r"^(docker\.io/)?(library/)?", "", image)
    for pattern, spec in images.items():
        if fnmatch.fnmatchcase(image, pattern) or fnmatch.fnmatchcase(short, pattern):
            return spec
    return None


# ---------------------------------------------------------------------------------------------
# small helpers

def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_SUFFIXES = {"n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": Fraction(1),
             "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
             "P": Fraction(10**15), "E": Fraction(10**18), "Ki": Fraction(2**10), "Mi": Fraction(2**20),
             "Gi": Fraction(2**30), "Ti": Fraction(2**40), "Pi": Fraction(2**50), "Ei": Fraction(2**60)}


def quantity(q: str | int | float) -> Fraction:
    """A Kubernetes resource quantity ("500m", "2Gi", "1e3") as an exact number."""
    m = re.fullmatch(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))(?:[eE]([+-]?\d+))?([a-zA-Z]*)\s*", str(q))
    if not m or m.group(3) not in _SUFFIXES:
        raise ValueError(f"not a quantity: {q!r}")
    value = Fraction(m.group(1)) * _SUFFIXES[m.group(3)]
    return value * Fraction(10) ** int(m.group(2)) if m.group(2) else value


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined variables are replaced, $$ escapes, the rest stays."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _log(msg: str) -> None:
    print(f"[kubelet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class ConfigError(Exception):
    """A container cannot be started (yet): it waits with this reason and message."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


# ---------------------------------------------------------------------------------------------
# the apiserver, over HTTPS with a client certificate

class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any, what: str):
        msg = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"{what}: {status} {msg}")
        self.status = status


class Api:
    """A minimal client: JSON in/out, one keep-alive connection per thread, watches."""

    def __init__(self, port: int, ca: Path, cert: Path, key: Path, host: str = "127.0.0.1"):
        self.host, self.port = host, port
        self.ctx = ssl.create_default_context(cafile=str(ca))
        self.ctx.load_cert_chain(str(cert), str(key))
        self._local = threading.local()

    def _connect(self, timeout: float) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=timeout)

    def call(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
             timeout: float = 15) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        for attempt in (0, 1):  # a kept-alive connection the server closed: reconnect once
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = self._connect(timeout)
            try:
                conn.timeout = timeout
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        try:
            return resp.status, json.loads(raw) if raw else {}
        except ValueError:
            return resp.status, raw.decode(errors="replace")

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, out = self.call(method, path, body, **kw)
        if status >= 300:
            raise ApiError(status, out, f"{method} {path}")
        return out

    def patch(self, path: str, body: Any) -> Any:
        return self.ok("PATCH", path, body, content_type="application/merge-patch+json")

    def watch(self, path: str, holder: list, timeout_s: int = 240) -> Iterator[Obj]:
        """Events of one watch request; `holder` gets the connection, so that it can be aborted."""
        conn = self._connect(timeout_s + 30)
        holder[:] = [conn]
        try:
            sep = "&" if "?" in path else "?"
            conn.request("GET", f"{path}{sep}watch=1&allowWatchBookmarks=true&timeoutSeconds={timeout_s}",
                         headers={"Accept": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise ApiError(resp.status, resp.read().decode(errors="replace"), f"watch {path}")
            while line := resp.readline():
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()


class Informer:
    """List + watch of one collection into a dict keyed by uid; calls on_change after each change."""

    def __init__(self, api: Api, path: str, name: str, on_change: Callable[[], None], stop: threading.Event):
        self.api, self.path, self.name, self.on_change, self.stop = api, path, name, on_change, stop
        self.items: dict[str, Obj] = {}
        self.synced = threading.Event()
        self._lock = threading.Lock()
        self._conn: list = []
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"informer-{name}")

    def snapshot(self) -> list[Obj]:
        with self._lock:
            return list(self.items.values())

    def abort(self) -> None:
        for conn in self._conn:
            with contextlib.suppress(Exception):
                if conn.sock:
                    conn.sock.shutdown(2)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                listed = self.api.ok("GET", self.path)
                with self._lock:
                    self.items = {o["metadata"]["uid"]: o for o in listed.get("items", [])}
                rv = listed["metadata"]["resourceVersion"]
                self.synced.set()
                self.on_change()
                while not self.stop.is_set():  # re-watch from rv until the server says it is too old
                    sep = "&" if "?" in self.path else "?"
                    gone = False
                    for ev in self.api.watch(f"{self.path}{sep}resourceVersion={rv}", self._conn):
                        obj = ev.get("object") or {}
                        if ev.get("type") == "ERROR":
                            gone = True  # 410 Gone (or any error): list again
                            break
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if ev["type"] == "BOOKMARK":
                            continue
                        with self._lock:
                            if ev["type"] == "DELETED":
                                self.items.pop(obj["metadata"]["uid"], None)
                            else:
                                self.items[obj["metadata"]["uid"]] = obj
                        self.on_change()
                    if gone:
                        break
            except Exception as e:  # noqa: BLE001 - the apiserver restarting, a reset watch, ...
                if not self.stop.is_set():
                    _log(f"informer {self.name}: {e}; retrying in 1s")
                    self.stop.wait(1)


# ---------------------------------------------------------------------------------------------
# what the kubelet knows about a pod

@dataclass
class Ctr:
    spec: Obj
    init: bool
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    start_time: int | None = None  # kernel start time of proc, for the state file
    started_mono: float = 0.0
    restarts: int = 0
    crashes: int = 0            # consecutive, for the back-off
    next_start: float = 0.0     # monotonic: not before
    done: bool = False          # terminated and not to be restarted

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def succeeded(self) -> bool:
        return self.done and self.state.get("terminated", {}).get("exitCode") == 0


@dataclass
class PodRun:
    pod: Obj
    dir: Path
    init: list[Ctr]
    main: list[Ctr]
    start_time: str = field(default_factory=now_rfc3339)
    sandbox: Sandbox | None = None
    volumes: dict[str, Path] | None = None       # name -> host folder, once prepared
    read_only: set[str] = field(default_factory=set)  # volumes always mounted read-only
    tokens: list[tuple[Path, Obj, float]] = field(default_factory=list)  # (file, source, refresh at)
    host_mounts: list[str] = field(default_factory=list)  # tmpfs made on the host (emptyDir Memory)
    mountpoints: dict[str, list[str]] = field(default_factory=dict)  # target -> paths made for it
    phase: str = "Pending"
    terminating_since: float | None = None
    kill_deadline: float = 0.0
    orphaned: bool = False      # gone from the API without our seeing a deletionTimestamp
    gone: bool = False
    posted: Obj | None = None
    cond_times: dict[str, tuple[str, str]] = field(default_factory=dict)
    last_error: str = ""
    last_ip: str | None = None  # stays after the netns is gone
    volume_retry: float = 0.0

    @property
    def uid(self) -> str:
        return self.pod["metadata"]["uid"]

    @property
    def ns(self) -> str:
        return self.pod["metadata"]["namespace"]

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]

    @property
    def hostname(self) -> str:
        return (self.pod["spec"].get("hostname") or self.name)[:63]

    @property
    def ip(self) -> str | None:
        return self.sandbox.ip if self.sandbox else None

    @property
    def containers(self) -> list[Ctr]:
        return self.init + self.main

    def running(self) -> list[Ctr]:
        return [c for c in self.containers if c.proc is not None]


# ---------------------------------------------------------------------------------------------
# the kubelet

class ProcessKubelet:
    """Registers a Node, binds unscheduled pods to it and runs them; see the module docstring.

    images: image pattern -> ImageSpec (default IMAGES); backoff: (first, max) seconds between
    restarts of a crashing container (a real kubelet: 10, 300; the first restart is immediate);
    stop_grace: seconds between SIGTERM and SIGKILL for the pods still running at stop()."""

    def __init__(self, cp: ControlPlane, directory: str | os.PathLike, *,
                 images: Mapping[str, ImageSpec] = IMAGES, node_name: str = NODE_NAME,
                 bridge: str = "cdst0", pod_cidr: str = "10.244.0.0/24",
                 capacity: Mapping[str, str] | None = None, backoff: tuple[float, float] = (10.0, 300.0),
                 heartbeat: float = 10.0, stop_grace: float = 5.0, sync_period: float = 0.2,
                 verbose: bool = False):
        self.cp = cp
        self.dir = Path(directory).resolve()
        self.images = dict(images)
        self.node = node_name
        self.backoff = backoff
        self.heartbeat = heartbeat
        self.stop_grace = stop_grace
        self.sync_period = sync_period
        self.verbose = verbose
        self.state_file = self.dir / "state.json"
        self.shims = Path(f"/run/codistill-kubelet-{bridge}/bin")  # outside the pods' private /tmp
        self.net = PodNetwork(bridge=bridge, cidr=pod_cidr, service_ips=(KUBERNETES_SERVICE_IP,),
                              service_cidr=SERVICE_CIDR, on_change=self._save_state)
        self.host_ip = self.net.gateway
        self.capacity = {**self._machine_capacity(), **(capacity or {})}
        self.labels = {"kubernetes.io/hostname": node_name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(),
                                                                                          platform.machine())}
        self.runs: dict[str, PodRun] = {}
        self.forwarders = Forwarders()
        self._made: dict[str, int] = {}   # host paths made as mount points -> pods using them
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._informers: list[Informer] = []
        self._bind_tried: dict[str, float] = {}
        self._log_server: http.server.ThreadingHTTPServer | None = None
        self._state_lock = threading.RLock()
        self._events_once: set[tuple[str, str, str]] = set()
        self._node_since = now_rfc3339()
        self._pods: Informer | None = None
        self._unscheduled: Informer | None = None
        self._services: Informer | None = None
        self._started = False

    # -- public API ------------------------------------------------------------------------

    def __enter__(self) -> "ProcessKubelet":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> "ProcessKubelet":
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.cleanup(self.dir)  # what a killed kubelet in this folder left behind
            self._identities()
            self.net.setup()  # first: it refuses when another kubelet has this bridge (and shims)
            self.shims.mkdir(parents=True, exist_ok=True)
            self.shims.parent.chmod(0o755)
            (self.shims / "nslookup").write_text(NSLOOKUP_SHIM)
            (self.shims / "nslookup").chmod(0o755)
            # the `kubernetes` Service's ClusterIP, on the bridge, forwarded to the apiserver
            self.forwarders.add(KUBERNETES_SERVICE_IP, 443, self.cp.ports["apiserver"])
            self._start_log_server()
            self._register_node()
            stop, wake = self._stop, self._wake.set
            q = urllib.parse.quote
            self._pods = Informer(self.api, f"/api/v1/pods?fieldSelector={q('spec.nodeName=' + self.node)}",
                                  "pods", wake, stop)
            self._unscheduled = Informer(self.scheduler_api, "/api/v1/pods?fieldSelector=" + q(
                "spec.nodeName=,status.phase!=Succeeded,status.phase!=Failed"), "unscheduled", wake, stop)
            self._services = Informer(self.api, "/api/v1/services", "services", wake, stop)
            self._informers = [self._pods, self._unscheduled, self._services]
            for inf in self._informers:
                inf.thread.start()
            deadline = time.monotonic() + timeout
            for inf in self._informers:
                if not inf.synced.wait(max(0.1, deadline - time.monotonic())):
                    raise RuntimeError(f"informer {inf.name} did not sync in {timeout}s")
            for target, name in ((self._loop, "sync"), (self._heartbeats, "heartbeat")):
                t = threading.Thread(target=target, daemon=True, name=f"kubelet-{name}")
                t.start()
                self._threads.append(t)
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise
        self._say(f"node {self.node} ready: pods on {self.net.net}, host {self.host_ip}")
        return self

    def stop(self) -> None:
        """Kill every pod process, remove every netns/veth/mount/folder made; also after a failed start."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=30)
        self._threads = []
        errors = self._shutdown_pods()  # a no-op unless the sync thread could not do it
        if self._started and hasattr(self, "api"):
            with contextlib.suppress(Exception):  # best effort: the control plane may be gone already
                self.api.call("PATCH", f"/api/v1/nodes/{self.node}/status",
                              {"status": {"conditions": self._node_conditions(ready=False)}},
                              content_type="application/merge-patch+json", timeout=3)
        for inf in self._informers:
            inf.abort()
        self.forwarders.close()
        if self._log_server:
            self._log_server.shutdown()
            self._log_server.server_close()
            self._log_server = None
        ours = self.net.made_bridge  # false when start() found another kubelet's bridge
        try:
            self.net.teardown()
        except NetError as e:
            errors.append(str(e))
        if ours:
            shutil.rmtree(self.shims.parent, ignore_errors=True)
        for path in sorted(self._made, key=len, reverse=True):
            with contextlib.suppress(OSError):
                Path(path).rmdir() if Path(path).is_dir() else Path(path).unlink()
        self._made = {}
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        self._say("stopped")
        if errors:
            raise RuntimeError("kubelet cleanup: " + "; ".join(errors))

    def _shutdown_pods(self) -> list[str]:
        """SIGTERM every pod's processes, SIGKILL after stop_grace, tear every pod down."""
        errors: list[str] = []
        runs = list(self.runs.values())
        for run in runs:
            for c in run.running():
                self._signal(c, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        while any(c.proc.poll() is None for r in runs for c in r.running()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for run in runs:
            for c in run.running():
                self._signal(c, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(timeout=5)
                self._signal(c, signal.SIGKILL)  # the rest of its process group
                c.proc = None
            try:
                self._teardown(run)
            except Exception as e:  # noqa: BLE001 - go on cleaning the others
                errors.append(f"{run.ns}/{run.name}: {e}")
        self.runs = {}
        return errors

    def expose(self, port: int, bridge_port: int | None = None) -> str:
        """Make 127.0.0.1:port reachable from pods at <host_ip>:<bridge_port or port>; returns it."""
        p = self.forwarders.add(self.host_ip, port if bridge_port is None else bridge_port, port)
        return f"{self.host_ip}:{p}"

    def log_path(self, namespace: str, pod: str, container: str, restart: int | None = None) -> Path | None:
        """The log file of a container (the latest run unless `restart` is given)."""
        for d in sorted((self.dir / POD_LOG_DIR).glob(f"{namespace}_{pod}_*")):
            files = sorted((d / container).glob("*.log"), key=lambda p: int(p.stem))
            if restart is not None:
                files = [f for f in files if int(f.stem) == restart]
            if files:
                return files[-1]
        return None

    def logs(self, namespace: str, pod: str, container: str, restart: int | None = None) -> str:
        path = self.log_path(namespace, pod, container, restart)
        return path.read_text(errors="replace") if path else ""

    @staticmethod
    def cleanup(directory: str | os.PathLike) -> list[str]:
        """Undo what a kubelet that was killed (no stop()) recorded in directory/state.json."""
        state_file = Path(directory) / "state.json"
        try:
            state = json.loads(state_file.read_text())
        except (FileNotFoundError, ValueError):
            return []
        done = []
        for p in state.get("processes", []):
            # The container's leader dies with the kubelet (PR_SET_PDEATHSIG), its children do
            # not. Its pid is their process group and session: while they live, the kernel hands
            # that pid to no new process, so a group without its leader is still ours. A pid
            # that is alive with another start time was reused: then the group had emptied.
            st = proc_start_time(p["pid"])
            if st in (None, p["start_time"]):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p["pid"], signal.SIGKILL)
                    done.append(f"killed process group {p['pid']} ({p['what']})")
        time.sleep(0.2 if done else 0)
        for m in state.get("mounts", []):
            if subprocess.run(["umount", m], capture_output=True).returncode == 0:
                done.append(f"umount {m}")
        done += PodNetwork.cleanup(state.get("net", {}))
        for path in sorted(state.get("made", []), key=len, reverse=True):
            with contextlib.suppress(OSError):
                Path(path).rmdir() if Path(path).is_dir() else Path(path).unlink()
                done.append(f"removed {path}")
        if state.get("shims"):
            shutil.rmtree(Path(state["shims"]).parent, ignore_errors=True)
        state_file.unlink()
        return done

    # -- setup -----------------------------------------------------------------------------

    def _say(self, msg: str) -> None:
        if self.verbose:
            _log(msg)

    def _identities(self) -> None:
        pki, port = self.cp.pki, self.cp.ports["apiserver"]
        ca = pki.path("ca", "crt")
        node_crt, node_key = pki.cert(f"kubelet-{self.node}", "ca", f"system:node:{self.node}",
                                      orgs=["system:nodes"], client=True)
        sched_crt, sched_key = pki.cert("kube-scheduler", "ca", "system:kube-scheduler", client=True)
        self.serving_cert = pki.cert(f"kubelet-{self.node}-serving", "ca", self.node, server=True,
                                     dns=[self.node], ips=[self.host_ip])
        self.api = Api(port, ca, node_crt, node_key)
        self.scheduler_api = Api(port, ca, sched_crt, sched_key)

    @staticmethod
    def _machine_capacity() -> dict[str, str]:
        mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal:"))
        disk = shutil.disk_usage("/")
        return {"cpu": str(os.cpu_count() or 1), "memory": f"{mem_kib}Ki", "pods": "110",
                "ephemeral-storage": str(disk.total)}

    def _node_conditions(self, ready: bool = True) -> list[Obj]:
        now = now_rfc3339()
        conds = [{"type": t, "status": "False", "reason": f"KubeletHasNo{t}" if t != "PIDPressure" else
                  "KubeletHasSufficientPID", "message": "process kubelet: not measured",
                  "lastHeartbeatTime": now, "lastTransitionTime": self._node_since}
                 for t in ("MemoryPressure", "DiskPressure", "PIDPressure")]
        conds.append({"type": "Ready", "status": "True" if ready else "False",
                      "reason": "KubeletReady" if ready else "KubeletNotReady",
                      "message": "process kubelet is posting ready status" if ready else "process kubelet stopped",
                      "lastHeartbeatTime": now, "lastTransitionTime": now if not ready else self._node_since})
        return conds

    def _node_status(self) -> Obj:
        uname = os.uname()
        return {"capacity": self.capacity, "allocatable": self.capacity,
                "conditions": self._node_conditions(),
                # only the InternalIP: the apiserver dials the first address type it prefers
                # (Hostname first), and the node name resolves nowhere
                "addresses": [{"type": "InternalIP", "address": self.host_ip}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": KUBELET_PORT}},
                "nodeInfo": {"machineID": pysecrets.token_hex(16) if not Path("/etc/machine-id").exists()
                             else Path("/etc/machine-id").read_text().strip(),
                             "systemUUID": self.node, "bootID": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                             "kernelVersion": uname.release, "osImage": "codistill process kubelet",
                             "containerRuntimeVersion": "process://0", "kubeletVersion": KUBELET_VERSION,
                             "kubeProxyVersion": "", "operatingSystem": "linux",
                             "architecture": self.labels["kubernetes.io/arch"]}}

    def _register_node(self) -> None:
        self._node_since = now_rfc3339()
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node, "labels": self.labels},
                "spec": {"podCIDR": str(self.net.net), "podCIDRs": [str(self.net.net)]}}
        status, body = self.api.call("POST", "/api/v1/nodes", node)
        if status not in (201, 409):
            raise ApiError(status, body, "register node")
        self.api.patch(f"/api/v1/nodes/{self.node}/status", {"status": self._node_status()})
        self._renew_lease()

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        spec = {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": now_micro()}
        status, _ = self.api.call("PATCH", path, {"spec": spec}, content_type="application/merge-patch+json")
        if status == 404:
            self.api.ok("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                        {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                         "metadata": {"name": self.node, "namespace": "kube-node-lease"}, "spec": spec})

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self._renew_lease()
                self.api.patch(f"/api/v1/nodes/{self.node}/status", {"status": {"conditions": self._node_conditions()}})
            except Exception as e:  # noqa: BLE001
                _log(f"heartbeat: {e}")

    def _save_state(self) -> None:
        """Everything a `cleanup` would have to undo, written at each change."""
        with self._state_lock:
            procs = [{"pid": c.proc.pid, "start_time": c.start_time, "what": f"{r.ns}/{r.name}/{c.name}"}
                     for r in list(self.runs.values()) for c in r.containers if c.proc is not None]
            state = {"node": self.node, "net": self.net.state(), "processes": procs,
                     "mounts": [m for r in list(self.runs.values()) for m in r.host_mounts],
                     "made": list(self._made), "shims": str(self.shims)}
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=1))
            tmp.replace(self.state_file)

    # -- the sync loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.sync_period)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._sync()
            except Exception:  # noqa: BLE001 - one bad pod must not stop the node
                _log("sync failed:\n" + traceback.format_exc())
        # Stopping: this thread forked every pod process, and their PR_SET_PDEATHSIG fires when
        # *this thread* ends, so the graceful part (SIGTERM, wait) happens here, before it does.
        with contextlib.suppress(Exception):
            self._shutdown_pods()

    def _sync(self) -> None:
        self._bind_unscheduled()
        pods = {p["metadata"]["uid"]: p for p in self._pods.snapshot()}
        for uid, pod in pods.items():
            run = self.runs.get(uid)
            if run is None:
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    continue  # finished before this kubelet started: nothing to run
                if pod["metadata"].get("deletionTimestamp"):
                    self._delete_pod(pod)  # never started here: nothing to kill
                    continue
                run = self.runs[uid] = self._new_run(pod)
            run.pod = pod
        # every new pod gets its IP before any container starts, so that an init container
        # looking up another new pod (the worker's init-pytorch, the master) finds it at once
        for uid, run in self.runs.items():
            run.orphaned = uid not in pods
            try:
                self._ensure_sandbox(run)
            except Exception as e:  # noqa: BLE001 - retried next round
                _log(f"pod {run.ns}/{run.name}: sandbox: {e}")
        self._update_hosts()
        for uid, run in list(self.runs.items()):
            try:
                self._sync_pod(run)
            except Exception as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {e}"
                if msg != run.last_error:
                    run.last_error = msg
                    _log(f"pod {run.ns}/{run.name}: {msg}\n{traceback.format_exc()}")
            if run.gone:
                del self.runs[uid]
        self._update_hosts()

    def _new_run(self, pod: Obj) -> PodRun:
        spec = pod["spec"]
        run = PodRun(pod=pod, dir=self.dir / "pods" / pod["metadata"]["uid"],
                     init=[Ctr(c, True) for c in spec.get("initContainers") or []],
                     main=[Ctr(c, False) for c in spec.get("containers") or []])
        for c in run.main if run.init else []:
            c.state = {"waiting": {"reason": "PodInitializing"}}
        self._say(f"pod {run.ns}/{run.name}: admitted")
        return run

    def _bind_unscheduled(self) -> None:
        now = time.monotonic()
        for pod in self._unscheduled.snapshot():
            meta, spec = pod["metadata"], pod["spec"]
            if spec.get("nodeName") or meta.get("deletionTimestamp") or now - self._bind_tried.get(meta["uid"], -99) < 5:
                continue
            if (spec.get("schedulerName") or "default-scheduler") != "default-scheduler":
                continue  # someone else's (a gang scheduler, ...)
            if any(self.labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
                continue
            self._bind_tried[meta["uid"]] = now
            status, body = self.scheduler_api.call(
                "POST", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding",
                {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"], "uid": meta["uid"]},
                 "target": {"apiVersion": "v1", "kind": "Node", "name": self.node}})
            if status == 201:
                self._event(pod, "Normal", "Scheduled",
                            f"Successfully assigned {meta['namespace']}/{meta['name']} to {self.node}",
                            component="default-scheduler", api=self.scheduler_api)
            elif status != 409:
                _log(f"binding {meta['namespace']}/{meta['name']}: {status} {body}")
        live = {p["metadata"]["uid"] for p in self._unscheduled.snapshot()}
        self._bind_tried = {k: v for k, v in self._bind_tried.items() if k in live}

    def _sync_pod(self, run: PodRun) -> None:
        pod, now = run.pod, time.monotonic()
        if run.terminating_since is not None or run.orphaned or pod["metadata"].get("deletionTimestamp"):
            self._terminate(run, now)
            return
        if run.phase in ("Succeeded", "Failed"):
            return
        if pod["spec"].get("hostNetwork"):
            for c in run.containers:
                c.state = {"waiting": {"reason": "CreateContainerConfigError",
                                       "message": "hostNetwork is not supported by the process kubelet"}}
            self._post_status(run)
            return
        if run.sandbox is None:
            return  # _ensure_sandbox failed; next round
        if run.volumes is None and now >= run.volume_retry:
            try:
                self._prepare_volumes(run)
            except ConfigError as e:
                run.volume_retry = now + 2
                for c in run.containers:
                    c.state = {"waiting": {"reason": "ContainerCreating", "message": e.message}}
                self._event(run.pod, "Warning", "FailedMount", e.message, once=True)
        if run.volumes is not None:
            self._refresh_tokens(run, now)
            self._reap(run, now)
            self._start_due(run, now)
            run.phase = self._phase(run)
            if run.phase in ("Succeeded", "Failed"):
                self._say(f"pod {run.ns}/{run.name}: {run.phase}")
                self._teardown(run)  # processes are gone; free the IP and the netns
        self._post_status(run)

    def _ensure_sandbox(self, run: PodRun) -> None:
        if (run.sandbox is not None or run.orphaned or run.pod["metadata"].get("deletionTimestamp")
                or run.phase in ("Succeeded", "Failed") or run.pod["spec"].get("hostNetwork")):
            return

        def files(ip: str) -> dict[str, str]:
            return {"hosts": self._hosts_text(run, ip), "hostname": run.hostname + "\n",
                    # no DNS server in a pod: names come from /etc/hosts; `dns` fails at once
                    "resolv.conf": "# codistill process kubelet: no DNS, names are in /etc/hosts\n"
                                   "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"}
        run.sandbox = self.net.add(netns_name("cdst", run.ns, run.name, run.uid), veth_name(run.uid), files)
        run.last_ip = run.sandbox.ip
        self._say(f"pod {run.ns}/{run.name}: netns {run.sandbox.netns}, ip {run.ip}")

    # -- containers ------------------------------------------------------------------------

    def _reap(self, run: PodRun, now: float) -> None:
        policy = run.pod["spec"].get("restartPolicy") or "Always"
        for c in run.running():
            rc = c.proc.poll()
            if rc is None:
                continue
            self._signal(c, signal.SIGKILL)  # what it left in its process group (a container's end)
            term = {"exitCode": rc if rc >= 0 else 128 - rc, "reason": "Completed" if rc == 0 else "Error",
                    "startedAt": c.state.get("running", {}).get("startedAt", now_rfc3339()),
                    "finishedAt": now_rfc3339(), "containerID": self._container_id(run, c)}
            if rc < 0:
                term["signal"] = -rc
            self._exited(run, c, term, policy, now)
            self._save_state()

    def _exited(self, run: PodRun, c: Ctr, term: Obj, policy: str, now: float) -> None:
        c.proc = None
        failed = term["exitCode"] != 0
        self._say(f"pod {run.ns}/{run.name}: container {c.name} exited {term['exitCode']}")
        restart = (failed and policy != "Never") if c.init else (policy == "Always" or (policy == "OnFailure" and failed))
        if not restart:
            c.state, c.done = {"terminated": term}, True
            return
        if now - c.started_mono > 600:
            c.crashes = 0  # ran long enough: the back-off starts over, as in the kubelet
        c.crashes += 1
        first, most = self.backoff
        delay = 0.0 if c.crashes == 1 else min(most, first * 2 ** (c.crashes - 2))
        c.last_state, c.restarts, c.next_start = {"terminated": term}, c.restarts + 1, now + delay
        c.state = {"waiting": {"reason": "CrashLoopBackOff",
                               "message": f"back-off {delay:g}s restarting failed container={c.name} "
                                          f"pod={run.name}_{run.ns}({run.uid})"}} if delay else \
            {"waiting": {"reason": "ContainerCreating"}}
        if delay:
            self._event(run.pod, "Warning", "BackOff", "Back-off restarting failed container", container=c.name)

    def _start_due(self, run: PodRun, now: float) -> None:
        for c in run.init:
            if c.succeeded:
                continue
            if not c.done and c.proc is None and now >= c.next_start:
                self._start(run, c, now)
            return  # one init container at a time, in order
        for c in run.main:
            if not c.done and c.proc is None and now >= c.next_start:
                self._start(run, c, now)

    def _start(self, run: PodRun, c: Ctr, now: float) -> None:
        try:
            argv, env, script = self._launch(run, c)
        except ConfigError as e:
            c.next_start = now + 2  # a Secret may appear, a key be added: try again
            if c.state.get("waiting", {}).get("message") != e.message:
                self._event(run.pod, "Warning", "Failed", f"Error: {e.message}", container=c.name)
            c.state = {"waiting": {"reason": e.reason, "message": e.message}}
            return
        log_file = self.dir / POD_LOG_DIR / f"{run.ns}_{run.name}_{run.uid}" / c.name / f"{c.restarts}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        if argv is None:  # the executable is not there: what a runtime reports as StartError
            log_file.write_text(script + "\n")
            term = {"exitCode": 128, "reason": "StartError", "message": script, "startedAt": now_rfc3339(),
                    "finishedAt": now_rfc3339()}
            c.started_mono = now
            self._event(run.pod, "Warning", "Failed", f"Error: {script}", container=c.name)
            self._exited(run, c, term, run.pod["spec"].get("restartPolicy") or "Always", now)
            return
        with open(log_file, "ab") as log:
            full = [IP, "netns", "exec", run.sandbox.netns,
                    "/usr/bin/unshare", "--mount", "--uts", "--propagation", "private", "--",
                    "/bin/bash", "--norc", "--noprofile", "-c", script, "sh", *argv]  # bash: fds above 9
            c.proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      env=env, cwd="/", start_new_session=True, close_fds=True)
        c.start_time, c.started_mono = proc_start_time(c.proc.pid), now
        c.state = {"running": {"startedAt": now_rfc3339()}}
        self._save_state()
        self._say(f"pod {run.ns}/{run.name}: started {c.name} (pid {c.proc.pid}): {shlex.join(argv)}")
        self._event(run.pod, "Normal", "Started", f"Started container {c.name}", container=c.name)

    def _launch(self, run: PodRun, c: Ctr) -> tuple[list[str] | None, dict[str, str], str]:
        """(argv, env, the sh script that sets the container up); argv None: not executable."""
        pod, ctr = run.pod, c.spec
        image = lookup_image(self.images, ctr.get("image", ""))
        if image is None:
            raise ConfigError("ErrImagePull", f'image "{ctr.get("image")}" is not mapped by the process kubelet '
                                              f"(known patterns: {', '.join(self.images)})")
        psc, sc = pod["spec"].get("securityContext") or {}, ctr.get("securityContext") or {}
        uid = sc.get("runAsUser", psc.get("runAsUser", image.user))
        gid = sc.get("runAsGroup", psc.get("runAsGroup", image.group if uid == image.user else 0))
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) and uid == 0:
            raise ConfigError("CreateContainerConfigError",
                              f'container has runAsNonRoot and image will run as root '
                              f'(pod: "{run.name}_{run.ns}({run.uid})", container: {c.name})')
        env = self._env(run, c, image)
        command = [expand(a, env) for a in ctr.get("command") or image.entrypoint]
        args = [expand(a, env) for a in (ctr.get("args") or ([] if ctr.get("command") else image.cmd))]
        argv = command + args
        if not argv:
            raise ConfigError("CreateContainerError", "no command specified")
        # exposed host folders last: the private /tmp among the volumes must not hide them
        mounts = self._mounts(run, c) + self._exposed(image)
        workdir = ctr.get("workingDir") or image.workdir
        inside = any(workdir == m or workdir.startswith(m.rstrip("/") + "/") for s, m, _, _ in mounts if s)
        if not inside and not Path(workdir).is_dir():
            raise ConfigError("CreateContainerError", f"workingDir {workdir} does not exist on this machine "
                                                      "(put it in a volume or under /tmp)")
        if "/" not in argv[0]:
            exe = shutil.which(argv[0], path=env.get("PATH", ""))
            if exe is None:
                return None, env, f'exec: "{argv[0]}": executable file not found in $PATH'
            argv[0] = exe
        groups = [*psc.get("supplementalGroups", [])] + ([psc["fsGroup"]] if "fsGroup" in psc else [])
        priv = []
        if uid or gid or groups:
            priv += [f"--reuid={uid}", f"--regid={gid}",
                     f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]
        if sc.get("allowPrivilegeEscalation") is False:
            priv.append("--no-new-privs")
        if not sc.get("privileged"):
            # a container runtime's default capabilities, less `drop`, plus `add`; as the bounding
            # set: root gets exactly these, a non-root uid none (no ambient set) but no more
            # through a setuid binary either
            caps = {k: {c.lower().removeprefix("cap_") for c in (sc.get("capabilities") or {}).get(k) or []}
                    for k in ("drop", "add")}
            keep = (set() if "all" in caps["drop"] else DEFAULT_CAPS - caps["drop"]) | caps["add"]
            priv += ["--inh-caps=-all", "--bounding-set=-all" + "".join(f",+{c}" for c in sorted(keep))
                     if "all" not in keep else "--bounding-set=+all"]
        # die with the kubelet (its sync thread), even when it is SIGKILLed
        priv.append("--pdeathsig=KILL")
        q = shlex.quote
        # Every source is opened (fd 10+i) before the first mount: the private /tmp would hide a
        # kubelet folder under /tmp (pytest's tmp_path), a volume at /x whatever lies below /x.
        fds = [10 + i for i in range(len(mounts))]
        lines = ["set -e", f"/usr/bin/hostname {q(run.hostname)}",
                 *(f"exec {fd}<{q(src)}" for fd, (src, _, _, _) in zip(fds, mounts) if src)]
        for fd, (src, dst, ro, mkdir) in zip(fds, mounts):
            if src is None:  # a closed folder of the host, replaced (see ImageSpec.expose)
                lines.append(f"/usr/bin/mount -t tmpfs -o mode=0755,size=1m tmpfs {q(dst)}")
                continue
            if mkdir:
                lines.append(f"/usr/bin/mkdir -p {q(dst)}" if Path(src).is_dir() else
                             f"/usr/bin/mkdir -p {q(str(Path(dst).parent))}; /usr/bin/touch {q(dst)}")
            lines.append(f"/usr/bin/mount --no-canonicalize --bind /proc/self/fd/{fd} {q(dst)}")
            if ro:
                lines.append(f"/usr/bin/mount -o remount,bind,ro {q(dst)}")
        lines.append("exec " + " ".join(f"{fd}<&-" for fd, m in zip(fds, mounts) if m[0]) if fds else ":")
        lines.append(f"/usr/bin/mkdir -p {q(workdir)}" if inside else ":")
        # env: the working directory is entered as the container's user, and what bash added
        # to the environment (PWD, OLDPWD, SHLVL, _) goes again
        lines.append(f'exec /usr/bin/setpriv {" ".join(priv)} -- /usr/bin/env --chdir={q(workdir)} '
                     '-u PWD -u OLDPWD -u SHLVL -u _ "$@"')
        return argv, env, "\n".join(lines)

    @staticmethod
    def _exposed(image: ImageSpec) -> list[tuple[str | None, str, bool, bool]]:
        out: list[tuple[str | None, str, bool, bool]] = []
        for path in image.expose:
            p = Path(path)
            closed = next((a for a in reversed(p.parents) if a != Path("/") and a.is_dir()
                           and not a.stat().st_mode & 0o001), None)
            if not p.exists():
                continue
            if closed is not None and (None, str(closed), False, False) not in out:
                out.append((None, str(closed), False, False))
            out.append((str(p), str(p), True, True))
        return out

    def _mounts(self, run: PodRun, c: Ctr) -> list[tuple[str, str, bool, bool]]:
        """(host source, target, read-only, make the target inside) for each mount, parents first;
        a target not below another mount must exist on the host: it is made, and removed later."""
        wanted: list[tuple[str, str, bool]] = []
        for vm in c.spec.get("volumeMounts") or []:
            vol = run.volumes.get(vm["name"])
            if vol is None:
                raise ConfigError("CreateContainerConfigError", f'volume "{vm["name"]}" is not defined')
            src = vol / vm["subPath"] if vm.get("subPath") else vol
            if vm.get("subPath") and not src.exists():
                src.mkdir(parents=True, mode=0o777)
            wanted.append((str(src), os.path.normpath(vm["mountPath"]), bool(vm.get("readOnly")) or vm["name"] in run.read_only))
        if not any(t == "/tmp" for _, t, _ in wanted):
            tmp = run.dir / "tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            tmp.chmod(0o1777)
            wanted.append((str(tmp), "/tmp", False))
        wanted.sort(key=lambda m: m[1].count("/"))
        out = []
        for i, (src, target, ro) in enumerate(wanted):
            below = any(target.startswith(t.rstrip("/") + "/") for _, t, _ in wanted[:i])
            if not below and target not in run.mountpoints:
                run.mountpoints[target] = self._make_mountpoint(target, Path(src).is_dir())
            out.append((src, target, ro, below))
        return out

    def _make_mountpoint(self, target: str, is_dir: bool) -> list[str]:
        chain, cur = [], Path("/")
        parts = Path(target).parts[1:]
        for i, part in enumerate(parts):
            cur = cur / part
            if cur.is_symlink():
                cur = cur.resolve()  # /var/run -> /run
            key = str(cur)
            if key in self._made:
                self._made[key] += 1
            elif cur.exists():
                continue
            else:
                cur.touch(0o644) if (i == len(parts) - 1 and not is_dir) else cur.mkdir(0o755)
                self._made[key] = 1
            chain.append(key)
        self._save_state()
        return chain

    def _release_mountpoints(self, run: PodRun) -> None:
        for chain in run.mountpoints.values():
            for key in reversed(chain):
                self._made[key] -= 1
                if self._made[key] <= 0:
                    del self._made[key]
                    with contextlib.suppress(OSError):
                        Path(key).rmdir() if Path(key).is_dir() else Path(key).unlink()
        run.mountpoints = {}

    def _container_id(self, run: PodRun, c: Ctr) -> str:
        return f"process://{run.uid[:8]}-{c.name}-{c.restarts}"

    def _signal(self, c: Ctr, sig: int) -> None:
        """The container's process group (it is its own session), by the pid we started."""
        if c.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.proc.pid, sig)

    # -- environment -----------------------------------------------------------------------

    def _env(self, run: PodRun, c: Ctr, image: ImageSpec) -> dict[str, str]:
        ctr, ns = c.spec, run.ns
        env = {**image.env, "PATH": ":".join(p.replace("{shims}", str(self.shims)) for p in image.path),
               "HOSTNAME": run.hostname}
        env.update(self._service_env(run.pod))
        for src in ctr.get("envFrom") or []:
            ref = src.get("configMapRef") or src.get("secretRef") or {}
            kind = "ConfigMap" if "configMapRef" in src else "Secret"
            data = self._get_data(ns, kind, ref["name"], bool(ref.get("optional")))
            for k, v in (data or {}).items():
                if re.fullmatch(r"[-._a-zA-Z][-._a-zA-Z0-9]*", src.get("prefix", "") + k):
                    env[src.get("prefix", "") + k] = v
        for e in ctr.get("env") or []:
            if "valueFrom" not in e:
                env[e["name"]] = expand(e.get("value", ""), env)
                continue
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                value = self._field(run, vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                value = self._resource(run, vf["resourceFieldRef"], ctr)
            else:
                ref = vf.get("configMapKeyRef") or vf.get("secretKeyRef")
                kind = "ConfigMap" if "configMapKeyRef" in vf else "Secret"
                data = self._get_data(ns, kind, ref["name"], bool(ref.get("optional")))
                value = None if data is None else data.get(ref["key"])
                if value is None and data is not None and not ref.get("optional"):
                    raise ConfigError("CreateContainerConfigError",
                                      f"couldn't find key {ref['key']} in {kind} {ns}/{ref['name']}")
            if value is not None:
                env[e["name"]] = value
        return env

    def _get_data(self, ns: str, kind: str, name: str, optional: bool) -> dict[str, str] | None:
        """A ConfigMap's or Secret's data as text (None: missing and optional)."""
        plural = "configmaps" if kind == "ConfigMap" else "secrets"
        status, obj = self.api.call("GET", f"/api/v1/namespaces/{ns}/{plural}/{name}")
        if status == 404 or (status == 403 and optional):
            if optional:
                return None
            raise ConfigError("CreateContainerConfigError", f'{kind.lower()} "{name}" not found')
        if status != 200:
            raise ConfigError("CreateContainerConfigError", f"{kind.lower()} {ns}/{name}: {status} "
                                                            f"{obj.get('message') if isinstance(obj, dict) else obj}")
        if kind == "Secret":
            return {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
        return {**{k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("binaryData") or {}).items()},
                **(obj.get("data") or {})}

    def _field(self, run: PodRun, path: str) -> str:
        meta, spec = run.pod["metadata"], run.pod["spec"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.*)'\]", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        if path in ("metadata.labels", "metadata.annotations"):  # volumes only: k="v" lines
            return "".join(f"{k}={json.dumps(v)}\n" for k, v in sorted((meta.get(path[9:]) or {}).items()))
        values = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                  "metadata.uid": meta["uid"], "spec.nodeName": self.node,
                  "spec.serviceAccountName": spec.get("serviceAccountName", ""),
                  "status.podIP": run.ip or "", "status.podIPs": run.ip or "",
                  "status.hostIP": self.host_ip, "status.hostIPs": self.host_ip}
        if path not in values:
            raise ConfigError("CreateContainerConfigError", f"unsupported fieldPath {path}")
        return values[path]

    def _resource(self, run: PodRun, ref: Obj, ctr: Obj) -> str:
        """limits.* default to the node's allocatable, as in the kubelet; the value is rounded up
        to a whole number of `divisor`s."""
        if ref.get("containerName"):
            ctr = next((c for c in run.pod["spec"]["containers"] + (run.pod["spec"].get("initContainers") or [])
                        if c["name"] == ref["containerName"]), ctr)
        kind, _, name = ref["resource"].partition(".")
        value = ((ctr.get("resources") or {}).get(kind) or {}).get(name)
        if value is None and kind == "limits":
            value = self.capacity.get(name)
        divisor = quantity(ref.get("divisor") or "1") or Fraction(1)
        return str(math.ceil(quantity(value or "0") / divisor))

    def _service_env(self, pod: Obj) -> dict[str, str]:
        """{SVC}_SERVICE_HOST/_PORT and the docker-link style {SVC}_PORT_* of the Services of the
        pod's namespace (enableServiceLinks, default true) and always of `kubernetes`."""
        ns, links = pod["metadata"]["namespace"], pod["spec"].get("enableServiceLinks", True)
        out: dict[str, str] = {}
        for svc in sorted(self._services.snapshot(), key=lambda s: s["metadata"]["name"]):
            sns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
            if not ((sns == ns and links) or (sns == "default" and name == "kubernetes")):
                continue
            ip, ports = svc["spec"].get("clusterIP"), svc["spec"].get("ports") or []
            if not ip or ip == "None" or not ports:
                continue
            n = name.upper().replace("-", "_")
            out[f"{n}_SERVICE_HOST"], out[f"{n}_SERVICE_PORT"] = ip, str(ports[0]["port"])
            for i, p in enumerate(ports):
                proto = p.get("protocol", "TCP")
                if p.get("name"):
                    out[f"{n}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
                url = f"{proto.lower()}://{ip}:{p['port']}"
                if i == 0:
                    out[f"{n}_PORT"] = url
                pre = f"{n}_PORT_{p['port']}_{proto}"
                out.update({pre: url, f"{pre}_PROTO": proto.lower(), f"{pre}_PORT": str(p["port"]), f"{pre}_ADDR": ip})
        return out

    # -- volumes ---------------------------------------------------------------------------

    def _prepare_volumes(self, run: PodRun) -> None:
        spec, volumes = run.pod["spec"], {}
        for v in spec.get("volumes") or []:
            d = run.dir / "volumes" / v["name"]
            d.mkdir(parents=True, exist_ok=True)
            volumes[v["name"]] = d
            if "emptyDir" in v:
                d.chmod(0o777)
                ed = v["emptyDir"] or {}
                if ed.get("medium") == "Memory" and str(d) not in run.host_mounts:
                    size = math.ceil(quantity(ed["sizeLimit"])) if ed.get("sizeLimit") else "50%"
                    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", str(d)],
                                   check=True, capture_output=True)
                    run.host_mounts.append(str(d))
                    self._save_state()
                if "fsGroup" in (spec.get("securityContext") or {}):
                    os.chown(d, -1, spec["securityContext"]["fsGroup"])
                    d.chmod(0o2777)
                continue
            kinds = {"projected": lambda p: p.get("sources") or [],
                     "configMap": lambda p: [{"configMap": p}],
                     "secret": lambda p: [{"secret": {**p, "name": p.get("secretName")}}],
                     "downwardAPI": lambda p: [{"downwardAPI": p}]}
            kind = next((k for k in kinds if k in v), None)
            if kind is None:
                other = next((k for k in v if k != "name"), "?")
                raise ConfigError("ContainerCreating", f'volume "{v["name"]}": {other} volumes are not supported '
                                                       "by the process kubelet (emptyDir, projected, configMap, "
                                                       "secret, downwardAPI are)")
            mode = v[kind].get("defaultMode", 0o644)
            for source in kinds[kind](v[kind]):
                self._project(run, d, source, mode)
            run.read_only.add(v["name"])
        run.volumes = volumes

    def _project(self, run: PodRun, d: Path, source: Obj, mode: int) -> None:
        """One source of a projected volume (or a configMap/secret/downwardAPI volume) into d."""
        ns = run.ns
        if "serviceAccountToken" in source:
            sat = source["serviceAccountToken"]
            path = d / sat["path"]
            self._write_token(run, path, sat, mode)
            return
        if "downwardAPI" in source:
            for item in source["downwardAPI"].get("items") or []:
                text = self._field(run, item["fieldRef"]["fieldPath"]) if "fieldRef" in item else \
                    self._resource(run, item["resourceFieldRef"], run.pod["spec"]["containers"][0])
                self._write(d / item["path"], text.encode(), item.get("mode", mode))
            return
        kind = "configMap" if "configMap" in source else "secret"
        ref = source[kind]
        if not ref.get("name"):
            raise ConfigError("ContainerCreating", f"a {kind} volume source without a name")
        plural = "configmaps" if kind == "configMap" else "secrets"
        status, obj = self.api.call("GET", f"/api/v1/namespaces/{ns}/{plural}/{ref['name']}")
        if status != 200:
            if ref.get("optional"):
                return
            raise ConfigError("ContainerCreating", f'MountVolume.SetUp failed: {kind} "{ref["name"]}" not found'
                              if status == 404 else f"{kind} {ns}/{ref['name']}: {status}")
        data = {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()} if kind == "configMap" else {}
        data.update({k: (v.encode() if kind == "configMap" else base64.b64decode(v))
                     for k, v in (obj.get("data") or {}).items()})
        items = ref.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                if ref.get("optional"):
                    continue
                raise ConfigError("ContainerCreating", f"configmap/secret {ref['name']}: no key {item['key']}")
            self._write(d / item["path"], data[item["key"]], item.get("mode", mode))

    def _write_token(self, run: PodRun, path: Path, sat: Obj, mode: int) -> None:
        """A TokenRequest as the node (NodeRestriction: bound to this pod, for its ServiceAccount)."""
        spec = run.pod["spec"]
        seconds = int(sat.get("expirationSeconds") or 3600)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [sat["audience"]] if sat.get("audience") else None,
                         "expirationSeconds": seconds,
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": run.name, "uid": run.uid}}}
        sa = spec.get("serviceAccountName") or "default"
        status, out = self.api.call("POST", f"/api/v1/namespaces/{run.ns}/serviceaccounts/{sa}/token", body)
        if status != 201:
            raise ConfigError("ContainerCreating", f"MountVolume.SetUp failed: token for serviceaccount {run.ns}/{sa}: "
                              f"{status} {out.get('message') if isinstance(out, dict) else out}")
        psc = spec.get("securityContext") or {}
        # as the kubelet: a token only one non-root user reads is 0600 and that user's
        owner = psc.get("runAsUser") if psc.get("runAsUser") and "fsGroup" not in psc else None
        self._write(path, out["status"]["token"].encode(), 0o600 if owner else mode, owner)
        run.tokens = [t for t in run.tokens if t[0] != path] + [(path, sat, time.monotonic() + 0.8 * seconds)]

    def _refresh_tokens(self, run: PodRun, now: float) -> None:
        for path, sat, due in list(run.tokens):
            if now >= due and run.running():
                with contextlib.suppress(ConfigError):
                    self._write_token(run, path, sat, path.stat().st_mode & 0o777)

    @staticmethod
    def _write(path: Path, data: bytes, mode: int, owner: int | None = None) -> None:
        """Atomic: a temporary file renamed over the old one inside the (bind-mounted) folder."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.chmod(mode)
        if owner is not None:
            os.chown(tmp, owner, -1)
        tmp.replace(path)

    # -- status ----------------------------------------------------------------------------

    def _phase(self, run: PodRun) -> str:
        """The kubelet's getPhase, for processes."""
        policy = run.pod["spec"].get("restartPolicy") or "Always"
        if any(c.done and not c.succeeded for c in run.init):
            return "Failed"
        if not all(c.succeeded for c in run.init):
            return "Pending"
        running = sum(c.proc is not None for c in run.main)
        stopped = sum(bool(c.done or c.last_state) and c.proc is None for c in run.main)
        succeeded = sum(c.succeeded for c in run.main)
        waiting = len(run.main) - running - stopped
        if waiting:
            return "Pending"
        if running:
            return "Running"
        if policy == "Always":
            return "Running"
        if stopped == succeeded and all(c.done for c in run.main):
            return "Succeeded"
        if policy == "Never" and all(c.done for c in run.main):
            return "Failed"
        return "Running"

    def _ctr_status(self, run: PodRun, c: Ctr) -> Obj:
        st: Obj = {"name": c.name, "image": c.spec.get("image", ""), "imageID": "",
                   "ready": c.proc is not None and not c.init, "started": c.proc is not None,
                   "restartCount": c.restarts, "state": c.state, "lastState": c.last_state}
        if c.proc is not None or "terminated" in c.state:
            st["containerID"] = self._container_id(run, c)
        if c.init:
            st["ready"] = c.succeeded
        return st

    def _condition(self, run: PodRun, ctype: str, ok: bool, reason: str = "", message: str = "") -> Obj:
        status = "True" if ok else "False"
        prev = run.cond_times.get(ctype)
        if prev is None or prev[0] != status:
            run.cond_times[ctype] = (status, now_rfc3339())
        cond = {"type": ctype, "status": status, "lastProbeTime": None,
                "lastTransitionTime": run.cond_times[ctype][1]}
        if not ok and reason:
            cond.update(reason=reason, message=message)
        return cond

    def _post_status(self, run: PodRun) -> None:
        terminal = run.phase in ("Succeeded", "Failed")
        init_left = [c.name for c in run.init if not c.succeeded]
        unready = [c.name for c in run.main if c.proc is None]
        mine = [self._condition(run, "PodReadyToStartContainers", run.sandbox is not None),
                self._condition(run, "Initialized", not init_left, "ContainersNotInitialized",
                                f"containers with incomplete status: [{' '.join(init_left)}]"),
                self._condition(run, "ContainersReady", not unready,
                                "PodCompleted" if terminal else "ContainersNotReady",
                                "" if terminal else f"containers with unready status: [{' '.join(unready)}]"),
                self._condition(run, "Ready", not unready, "PodCompleted" if terminal else "ContainersNotReady",
                                "" if terminal else f"containers with unready status: [{' '.join(unready)}]"),
                self._condition(run, "PodScheduled", True)]
        others = [c for c in run.pod.get("status", {}).get("conditions") or []
                  if c["type"] not in {m["type"] for m in mine}]
        status: Obj = {"phase": run.phase, "conditions": mine + others,
                       "hostIP": self.host_ip, "hostIPs": [{"ip": self.host_ip}], "startTime": run.start_time,
                       "containerStatuses": [self._ctr_status(run, c) for c in run.main]}
        if run.last_ip:
            ip = run.ip or run.last_ip  # a finished pod keeps its IP in status
            status.update(podIP=ip, podIPs=[{"ip": ip}])
        if run.init:
            status["initContainerStatuses"] = [self._ctr_status(run, c) for c in run.init]
        if status == run.posted:
            return
        status_code, body = self.api.call("PATCH", f"/api/v1/namespaces/{run.ns}/pods/{run.name}/status",
                                          {"status": status}, content_type="application/merge-patch+json")
        if status_code == 200:
            run.posted = status
        elif status_code != 404:
            _log(f"status of {run.ns}/{run.name}: {status_code} {body.get('message') if isinstance(body, dict) else body}")

    # -- termination -----------------------------------------------------------------------

    def _terminate(self, run: PodRun, now: float) -> None:
        """deletionTimestamp: SIGTERM, SIGKILL after the grace period, clean up, delete with grace 0."""
        if run.terminating_since is None:
            grace = run.pod["metadata"].get("deletionGracePeriodSeconds")
            if grace is None:
                grace = run.pod["spec"].get("terminationGracePeriodSeconds", 30)
            run.terminating_since, run.kill_deadline = now, now + float(grace)
            if run.running():
                self._event(run.pod, "Normal", "Killing", "Stopping container " +
                            ", ".join(c.name for c in run.running()))
                self._say(f"pod {run.ns}/{run.name}: deleting, SIGTERM (grace {grace}s)")
            for c in run.running():
                self._signal(c, signal.SIGTERM)
        if run.running() and now >= run.kill_deadline:
            for c in run.running():
                self._signal(c, signal.SIGKILL)
        for c in run.running():
            rc = c.proc.poll()
            if rc is None:
                continue
            self._signal(c, signal.SIGKILL)
            c.proc = None
            c.done = True
            c.state = {"terminated": {"exitCode": rc if rc >= 0 else 128 - rc, "reason": "Completed" if rc == 0 else "Error",
                                      "startedAt": c.state.get("running", {}).get("startedAt", now_rfc3339()),
                                      "finishedAt": now_rfc3339(), "containerID": self._container_id(run, c)}}
        if run.running():
            return
        self._teardown(run)
        if not run.orphaned:
            if run.phase not in ("Succeeded", "Failed"):
                # a deleted pod ends terminal, as with the real kubelet (1.27+)
                run.phase = "Succeeded" if run.main and all(c.succeeded for c in run.main) else "Failed"
                self._post_status(run)
            self._delete_pod(run.pod)
        run.gone = True

    def _delete_pod(self, pod: Obj) -> None:
        meta = pod["metadata"]
        status, body = self.api.call("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                                     {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                                      "preconditions": {"uid": meta["uid"]}})
        if status not in (200, 404, 409):
            _log(f"delete {meta['namespace']}/{meta['name']}: {status} {body}")
        self._say(f"pod {meta['namespace']}/{meta['name']}: deleted")

    def _teardown(self, run: PodRun) -> None:
        """Free what a pod holds on the host (its processes are gone): netns, veth, tmpfs, folders.
        The logs stay."""
        errors = []
        for m in run.host_mounts:
            if subprocess.run(["umount", m], capture_output=True).returncode:
                r = subprocess.run(["umount", "-l", m], capture_output=True, text=True)
                if r.returncode:
                    errors.append(f"umount {m}: {r.stderr.strip()}")
        run.host_mounts = []
        self._release_mountpoints(run)
        if run.sandbox is not None:
            try:
                self.net.remove(run.sandbox)
            except NetError as e:
                errors.append(str(e))
            run.sandbox = None
        if run.dir.exists():
            shutil.rmtree(run.dir, ignore_errors=True)
        self._save_state()
        if errors:
            raise RuntimeError("; ".join(errors))

    # -- names -----------------------------------------------------------------------------

    def _hosts_text(self, run: PodRun, ip: str | None = None) -> str:
        """The pod's /etc/hosts: itself, and every Service -> the IPs of the live pods its selector
        matches (headless or not: ClusterIPs route nowhere here), under the names cluster DNS
        would answer; short names only for the pod's own namespace."""
        me = ip or run.ip
        sub = run.pod["spec"].get("subdomain")
        # the pod's own subdomain names too: a JobSet pod finds rank 0 as <hostname>.<subdomain>,
        # which may be itself (Trainer's PET_MASTER_ADDR)
        own = f"{' '.join(self._subdomain_names(run, run.ns))} {run.hostname}" if sub else run.hostname
        lines = ["# Kubernetes-managed hosts file (codistill process kubelet).",
                 "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{me}\t{own}"]
        live = [r for r in self.runs.values() if r.ip and r.phase not in ("Succeeded", "Failed")
                and not r.pod["metadata"].get("deletionTimestamp") and not r.orphaned]
        entries: list[tuple[str, str]] = []
        for svc in self._services.snapshot() if self._services else []:
            sns, name, spec = svc["metadata"]["namespace"], svc["metadata"]["name"], svc["spec"]
            names = ([name] if sns == run.ns else []) + [f"{name}.{sns}", f"{name}.{sns}.svc",
                                                         f"{name}.{sns}.svc.cluster.local"]
            selector = spec.get("selector")
            if selector:
                ips = sorted({r.ip for r in live if r.ns == sns and
                              all((r.pod["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())})
            elif name == "kubernetes" and sns == "default":
                ips = [spec.get("clusterIP") or KUBERNETES_SERVICE_IP]  # the forwarder on the bridge
            else:
                ips = []
            entries += [(i, " ".join(names)) for i in ips]
        for r in live:  # the other pods with a subdomain, by the names their headless Service gives
            if r.pod["spec"].get("subdomain") and r is not run:
                entries.append((r.ip, " ".join(self._subdomain_names(r, run.ns))))
        lines += [f"{i}\t{n}" for i, n in sorted(entries)]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _subdomain_names(r: PodRun, reader_ns: str) -> list[str]:
        """What cluster DNS answers for a pod with hostname and subdomain (the records of the
        headless Service named like the subdomain; that the Service exists is not checked):
        <hostname>.<subdomain>.<ns>[.svc[.cluster.local]], and <hostname>.<subdomain> through
        the search path of a pod in the same namespace."""
        name = f"{r.hostname}.{r.pod['spec']['subdomain']}"
        fq = [f"{name}.{r.ns}.svc.cluster.local", f"{name}.{r.ns}.svc", f"{name}.{r.ns}"]
        return fq + ([name] if r.ns == reader_ns else [])

    def _update_hosts(self) -> None:
        for run in list(self.runs.values()):
            if run.sandbox is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.net.write_in_place(run.sandbox.etc / "hosts", self._hosts_text(run))

    # -- events ----------------------------------------------------------------------------

    def _event(self, pod: Obj, type_: str, reason: str, message: str, *, container: str | None = None,
               component: str = "kubelet", api: Api | None = None, once: bool = False) -> None:
        meta = pod["metadata"]
        key = (meta["uid"], reason, message)
        if once:
            if key in self._events_once:
                return
            self._events_once.add(key)
        ref = {"apiVersion": "v1", "kind": "Pod", "namespace": meta["namespace"], "name": meta["name"],
               "uid": meta["uid"]}
        if container:
            ref["fieldPath"] = f"spec.containers{{{container}}}"
        now = now_rfc3339()
        ev = {"apiVersion": "v1", "kind": "Event",
              "metadata": {"name": f"{meta['name']}.{pysecrets.token_hex(8)}", "namespace": meta["namespace"]},
              "involvedObject": ref, "reason": reason, "message": message, "type": type_,
              "source": {"component": component, "host": self.node}, "firstTimestamp": now, "lastTimestamp": now,
              "count": 1, "reportingComponent": component, "reportingInstance": self.node}
        with contextlib.suppress(Exception):  # events are best effort
            (api or self.api).call("POST", f"/api/v1/namespaces/{meta['namespace']}/events", ev, timeout=5)

    # -- the kubelet's own HTTPS port: container logs for `kubectl logs` ---------------------

    def _start_log_server(self) -> None:
        kubelet = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
                body = f"{message}\n".encode()  # kubectl shows the body: text, not BaseHTTPRequestHandler's HTML
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # exec, attach, port-forward
                self.send_error(501, "the process kubelet serves container logs only (no exec, attach, port-forward)")

            def do_GET(self) -> None:  # /containerLogs/<ns>/<pod>/<container>?tailLines=&previous=&follow=
                url = urllib.parse.urlsplit(self.path)
                parts, q = url.path.strip("/").split("/"), dict(urllib.parse.parse_qsl(url.query))
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.do_POST()
                    return
                _, ns, name, container = parts
                run = next((r for r in list(kubelet.runs.values()) if r.ns == ns and r.name == name), None)
                restart = None
                if q.get("previous") == "true":
                    c = next((c for c in run.containers if c.name == container), None) if run else None
                    if c is None or c.restarts == 0:
                        self.send_error(400, f'previous terminated container "{container}" in pod "{name}" not found')
                        return
                    restart = c.restarts - 1
                path = kubelet.log_path(ns, name, container, restart)
                if path is None:
                    self.send_error(404, f"no log of container {container} in pod {ns}/{name}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                data = path.read_bytes()
                if "tailLines" in q:
                    data = b"".join(data.splitlines(keepends=True)[-int(q["tailLines"]):])
                self.wfile.write(data)
                pos = path.stat().st_size
                while q.get("follow") == "true" and not kubelet._stop.is_set():
                    c = next((c for c in run.containers if c.name == container), None) if run else None
                    with open(path, "rb") as f:
                        f.seek(pos)
                        chunk = f.read()
                    if chunk:
                        pos += len(chunk)
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    elif c is None or c.proc is None or run.gone:
                        return
                    else:
                        time.sleep(0.3)

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*map(str, self.serving_cert))
        ctx.load_verify_locations(str(self.cp.pki.path("ca", "crt")))
        ctx.verify_mode = ssl.CERT_REQUIRED  # the apiserver's kubelet-client certificate
        server = http.server.ThreadingHTTPServer((self.host_ip, KUBELET_PORT), Handler)
        server.daemon_threads = True
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._log_server = server
        threading.Thread(target=server.serve_forever, daemon=True, name="kubelet-logs").start()


# ---------------------------------------------------------------------------------------------
# command line

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run a process kubelet for `controlplane.py up --dir DIR`.")
    ap.add_argument("--dir", required=True, type=Path, help="the control plane's folder")
    ap.add_argument("--kubelet-dir", type=Path, help="the kubelet's folder (default DIR/kubelet)")
    ap.add_argument("--node", default=NODE_NAME)
    ap.add_argument("--backoff", type=float, default=10.0, help="first restart back-off in seconds (max 30x)")
    ap.add_argument("--cleanup", action="store_true", help="only remove what a killed kubelet left behind")
    a = ap.parse_args(argv)
    kdir = a.kubelet_dir or a.dir / "kubelet"
    if a.cleanup:
        for line in ProcessKubelet.cleanup(kdir) or ["nothing to clean"]:
            print(line)
        return 0
    cp = ControlPlane.attach(a.dir)
    kubelet = ProcessKubelet(cp, kdir, node_name=a.node, backoff=(a.backoff, 30 * a.backoff), verbose=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    kubelet.start()
    print(f"node {a.node} running; pods' logs in {kdir / POD_LOG_DIR}; Ctrl-C stops it", file=sys.stderr)
    done.wait()
    kubelet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
