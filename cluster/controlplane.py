#!/usr/bin/env python3
"""A real Kubernetes control plane on loopback, for tests and by hand.

etcd, kube-apiserver (x509 client certs, Node+RBAC authorization, the default admission plugins
with PodSecurity, service-account tokens) and kube-controller-manager run as local processes,
built by cluster/build.sh; optionally the Kubeflow Training Operator too, with its CRDs, its
ClusterRole and its validating webhook, and/or JobSet + Kubeflow Trainer v2 (TrainJob) with theirs,
and/or Kueue (quota-based admission of TrainJobs and PyTorchJobs). No kubelet, no scheduler:
pods stay Pending (cluster/kubelet.py runs them).

    python3 cluster/controlplane.py up --dir DIR [--no-training-operator] [--trainer-v2] [--kueue]
    python3 cluster/controlplane.py status --dir DIR
    python3 cluster/controlplane.py down --dir DIR

From Python (standard library only; needs the binaries and the `openssl` command):

    from controlplane import ControlPlane
    with ControlPlane("/tmp/cp", training_operator=True) as cp:
        cp.kubectl("get", "--raw", "/readyz")
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)

Every process is started in its own session, logs to DIR/logs/<name>.log, and is recorded (pid
and kernel start time, so a reused pid is never signalled) in DIR/state.json; stop() / `down`
sends SIGTERM to each, then SIGKILL after a grace period. A failed start stops what it started.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import http.client
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GO_MODULES = HERE / "go"

SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "codistill-admin"
TRAINING_OPERATOR_USER = "training-operator"
TRAINING_OPERATOR_NAMESPACE = "kubeflow"
FIELD_MANAGER = "codistill-cluster"

# What the Training Operator v1.9 hard-codes (pkg/cert/cert.go, cmd/training-operator.v1).
TO_WEBHOOK_CONFIGURATION = "validator.training-operator.kubeflow.org"
TO_WEBHOOK_SECRET = "training-operator-webhook-cert"
TO_WEBHOOK_SERVICE = "training-operator"
TO_CA_NAME = "training-operator-ca"
TO_ROTATOR_CERT_FILE = Path("/tmp/k8s-webhook-server/serving-certs/tls.crt")
TO_SCHEMES = {  # --enable-scheme value -> (kind, plural)
    "pytorchjob": ("PyTorchJob", "pytorchjobs"),
    "tfjob": ("TFJob", "tfjobs"),
    "xgboostjob": ("XGBoostJob", "xgboostjobs"),
    "paddlejob": ("PaddleJob", "paddlejobs"),
    "jaxjob": ("JAXJob", "jaxjobs"),
}

# Kubeflow Trainer v2 and JobSet (the releases' kustomize bases and cmd/ defaults). Both run with
# their internal cert rotator off (certManagement / internalCertManagement enable: false), so the
# names below only appear in the serving certificate's SANs and in the webhook configurations.
JOBSET_USER = "jobset-controller-manager"
JOBSET_SERVICE_DNS = "jobset-webhook-service.jobset-system.svc"
JOBSET_CLUSTER_ROLE = "jobset-manager-role"  # manager-role in role.yaml, namePrefix jobset-
TRAINER_USER = "kubeflow-trainer-controller-manager"
TRAINER_SERVICE_DNS = "kubeflow-trainer-controller-manager.kubeflow-system.svc"
TRAINER_CLUSTER_ROLE = "kubeflow-trainer-controller-manager"
# build.sh also copies this older release's TrainJob CRD (tests validate against both); keep it
# equal to build.sh's trainer_prev_version
TRAINER_PREVIOUS = "v2.2.0"

# Kueue (config/default of the release: namespace kueue-system, namePrefix kueue-). Its internal
# cert management is off (internalCertManagement enable: false), so the Service name only appears
# in the serving certificate's SANs.
KUEUE_USER = "kueue-controller-manager"
KUEUE_NAMESPACE = "kueue-system"
KUEUE_SERVICE_DNS = "kueue-webhook-service.kueue-system.svc"
KUEUE_PREFIX = "kueue-"
# the job kinds codistill creates; "kubeflow.org/pytorchjob" is off in Kueue's default config
KUEUE_FRAMEWORKS = ("trainer.kubeflow.org/trainjob", "kubeflow.org/pytorchjob")
# the CRDs that config/components/crd/kustomization.yaml gives a conversion webhook (v1beta1 <-> v1beta2)
KUEUE_CONVERTED_CRDS = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
# With internal cert management off, cmd/kueue/main.go always reads the metrics server's certificate
# from this hard-coded folder (even with metrics off) and exits if it is missing
KUEUE_METRICS_CERT_DIR = "/etc/kueue/metrics/certs"

# The init container template for PyTorchJob workers that the `restricted` Pod Security Standard
# admits (the operator's built-in one has no securityContext, so in a namespace enforcing
# `restricted` it cannot create worker pods): the one the project ships for real clusters
# (manifests/training-operator/). Pass it as
# TrainingOperator(pytorch_init_container_template=RESTRICTED_PYTORCH_INIT_CONTAINER).
RESTRICTED_PYTORCH_INIT_CONTAINER = (
    HERE.parent / "manifests" / "training-operator" / "pytorch-init-container.yaml"
).read_text()


class ClusterError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# binaries

def default_cache_dir() -> Path:
    return Path(os.environ.get("CLUSTER_CACHE") or ROOT / ".cache" / "cluster")


def module_version(module_dir: str, module: str) -> str:
    """The version of `module` that cluster/go/<module_dir>/go.mod requires."""
    text = (GO_MODULES / module_dir / "go.mod").read_text()
    m = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", text, re.M)
    if not m:
        raise ClusterError(f"{module} is not required in cluster/go/{module_dir}/go.mod")
    return m.group(1)


def versions() -> dict[str, str]:
    kube = module_version("kubernetes", "k8s.io/kubernetes")
    return {
        "kube-apiserver": kube,
        "kube-controller-manager": kube,
        "kubectl": kube,
        "etcd": module_version("etcd", "go.etcd.io/etcd/server/v3"),
        "training-operator": module_version("training-operator", "github.com/kubeflow/training-operator"),
        "jobset": module_version("jobset", "sigs.k8s.io/jobset"),
        "trainer": module_version("trainer", "github.com/kubeflow/trainer/v2"),
        "kueue": module_version("kueue", "sigs.k8s.io/kueue"),
    }


def binaries(cache_dir: Path | None = None) -> dict[str, Path]:
    """Where cluster/build.sh puts each binary: <cache>/bin/<name>-<version>/<name>."""
    bin_dir = Path(cache_dir or default_cache_dir()) / "bin"
    return {name: bin_dir / f"{name}-{v}" / name for name, v in versions().items()}


def trainer_crds(version: str = TRAINER_PREVIOUS, cache_dir: Path | None = None) -> Path:
    """The folder with the trainer.kubeflow.org CRDs of a Trainer release that build.sh copies:
    the built one's manifests/crds (all three), or the previous release's (trainjobs only)."""
    bin_dir = Path(cache_dir or default_cache_dir()) / "bin"
    if version == versions()["trainer"]:
        return bin_dir / f"trainer-{version}" / "manifests" / "crds"
    return bin_dir / f"trainer-crds-{version}"


def missing_binaries(cache_dir: Path | None = None) -> list[str]:
    missing = [name for name, path in binaries(cache_dir).items() if not os.access(path, os.X_OK)]
    prev = trainer_crds(TRAINER_PREVIOUS, cache_dir) / "trainer.kubeflow.org_trainjobs.yaml"
    return missing + ([f"trainer-crds-{TRAINER_PREVIOUS}"] if not prev.exists() else [])


def ensure_built(cache_dir: Path | None = None) -> None:
    """Run cluster/build.sh if a binary is missing (a cold build takes many minutes)."""
    if missing_binaries(cache_dir):
        env = dict(os.environ)
        if cache_dir:
            env["CLUSTER_CACHE"] = str(cache_dir)
        subprocess.run([str(HERE / "build.sh")], check=True, env=env)


# ---------------------------------------------------------------------------------------------
# certificates, with the openssl command

class PKI:
    """Keys and certificates in one folder; what exists is reused."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def path(self, name: str, ext: str) -> Path:
        return self.dir / f"{name}.{ext}"

    def _openssl(self, *args: str) -> None:
        r = subprocess.run(["openssl", *args], capture_output=True, text=True)
        if r.returncode:
            raise ClusterError(f"openssl {' '.join(args)}: {r.stderr.strip()}")

    def key(self, name: str) -> Path:
        key = self.path(name, "key")
        if not key.exists():
            # -traditional: PKCS#1, which every consumer here reads (cert-controller needs it)
            self._openssl("genrsa", "-traditional", "-out", str(key), "2048")
            os.chmod(key, 0o600)
        return key

    def public_key(self, name: str) -> Path:
        pub = self.path(name, "pub")
        if not pub.exists():
            self._openssl("rsa", "-in", str(self.key(name)), "-pubout", "-out", str(pub))
        return pub

    def _config(self, name: str, extensions: Sequence[str]) -> Path:
        cnf = self.path(name, "cnf")
        cnf.write_text("[req]\ndistinguished_name = dn\n[dn]\n[v3]\n" + "".join(f"{e}\n" for e in extensions))
        return cnf

    @staticmethod
    def _subject(cn: str, orgs: Iterable[str]) -> str:
        return "".join(f"/O={o}" for o in orgs) + f"/CN={cn}"

    def ca(self, name: str, cn: str, *, dns: Sequence[str] = (), days: int = 3650) -> tuple[Path, Path]:
        crt, key = self.path(name, "crt"), self.key(name)
        if not crt.exists():
            ext = ["basicConstraints = critical, CA:TRUE",
                   "keyUsage = critical, digitalSignature, keyEncipherment, keyCertSign",
                   "subjectKeyIdentifier = hash"]
            if dns:
                ext.append("subjectAltName = " + ", ".join(f"DNS:{d}" for d in dns))
            cnf = self._config(name, ext)
            self._openssl("req", "-x509", "-new", "-key", str(key), "-out", str(crt), "-days", str(days),
                          "-subj", self._subject(cn, ()), "-config", str(cnf), "-extensions", "v3",
                          "-set_serial", "0x" + secrets.token_hex(16))
            cnf.unlink()
        return crt, key

    def cert(self, name: str, ca: str, cn: str, *, orgs: Sequence[str] = (), dns: Sequence[str] = (),
             ips: Sequence[str] = (), server: bool = False, client: bool = False,
             days: int = 3650) -> tuple[Path, Path]:
        crt, key = self.path(name, "crt"), self.key(name)
        if not crt.exists():
            usages = (["serverAuth"] if server else []) + (["clientAuth"] if client else [])
            ext = ["basicConstraints = critical, CA:FALSE",
                   "keyUsage = critical, digitalSignature, keyEncipherment",
                   "extendedKeyUsage = " + ", ".join(usages),
                   "authorityKeyIdentifier = keyid"]
            sans = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
            if sans:
                ext.append("subjectAltName = " + ", ".join(sans))
            cnf = self._config(name, ext)
            csr = self.path(name, "csr")
            self._openssl("req", "-new", "-key", str(key), "-out", str(csr),
                          "-subj", self._subject(cn, orgs), "-config", str(cnf))
            self._openssl("x509", "-req", "-in", str(csr), "-CA", str(self.path(ca, "crt")),
                          "-CAkey", str(self.path(ca, "key")), "-set_serial", "0x" + secrets.token_hex(16),
                          "-days", str(days), "-extfile", str(cnf), "-extensions", "v3", "-out", str(crt))
            csr.unlink()
            cnf.unlink()
        return crt, key


def write_kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path, user: str) -> Path:
    def b64(p):
        return base64.b64encode(Path(p).read_bytes()).decode()
    text = f"""apiVersion: v1
kind: Config
clusters:
- name: codistill
  cluster:
    server: {server}
    certificate-authority-data: {b64(ca)}
users:
- name: {user}
  user:
    client-certificate-data: {b64(cert)}
    client-key-data: {b64(key)}
contexts:
- name: {user}@codistill
  context: {{cluster: codistill, user: {user}}}
current-context: {user}@codistill
"""
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


# ---------------------------------------------------------------------------------------------
# processes

def free_port(taken: set[int] | None = None) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not taken or port not in taken:
            if taken is not None:
                taken.add(port)
            return port


def proc_start_time(pid: int) -> int | None:
    """The kernel's start time of pid (clock ticks since boot), None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ManagedProcess:
    def __init__(self, name: str, pid: int, start_time: int | None, argv: list[str], log: str,
                 popen: subprocess.Popen | None = None):
        self.name, self.pid, self.start_time, self.argv, self.log = name, pid, start_time, argv, log
        self.popen = popen

    def to_json(self) -> dict:
        return {"name": self.name, "pid": self.pid, "start_time": self.start_time, "argv": self.argv, "log": self.log}

    @classmethod
    def from_json(cls, d: dict) -> "ManagedProcess":
        return cls(d["name"], d["pid"], d["start_time"], d["argv"], d["log"])

    def alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            return False
        st = proc_start_time(self.pid)
        return st is not None and st == self.start_time

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(Path(self.log).read_text(errors="replace").splitlines()[-lines:])
        return ""


def stop_processes(procs: Sequence[ManagedProcess], grace: float = 10.0,
                   say: Callable[[str], None] = lambda s: None) -> None:
    """SIGTERM each process in turn (in the given order; callers pass newest first), wait up
    to `grace` seconds, SIGKILL what is left. Processes are only ever signalled by pid, after
    checking that the pid still belongs to the process that was started."""
    survivors = []
    for p in procs:
        if not p.alive():
            continue
        say(f"stopping {p.name} (pid {p.pid})")
        p.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while p.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if p.alive():
            say(f"{p.name} (pid {p.pid}) still running after {grace:.0f}s: SIGKILL")
            p.signal(signal.SIGKILL)
            deadline = time.monotonic() + 5
            while p.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        if p.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=1)
        if p.alive():
            survivors.append(f"{p.name} (pid {p.pid})")
    if survivors:
        raise ClusterError(f"survived SIGKILL: {', '.join(survivors)}")


# ---------------------------------------------------------------------------------------------
# the control plane

class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager (+ optionally the Training Operator, and
    JobSet + Trainer v2; both trainers can run side by side: different API groups; and Kueue).

    start() brings everything up and waits until it is usable: /readyz ok, the `default`
    ServiceAccount exists (so pods can be created), and each controller's webhooks answer.
    stop() stops every process by pid. Use it as a context manager, or from a pytest fixture:

        @pytest.fixture(scope="session")
        def cluster(tmp_path_factory):
            with ControlPlane(tmp_path_factory.mktemp("cluster"), training_operator=True) as cp:
                yield cp
    """

    def __init__(self, directory: str | os.PathLike, *, training_operator: bool | "TrainingOperator" = False,
                 trainer_v2: bool | "TrainerV2" = False, jobset: bool | "JobSet" | None = None,
                 kueue: bool | "Kueue" = False,
                 cache_dir: str | os.PathLike | None = None, die_with_parent: bool = True,
                 timeout: float = 180.0, etcd_fsync: bool = False, verbose: bool = False,
                 apiserver_args: Sequence[str] = (), controller_manager_args: Sequence[str] = (),
                 binary_paths: dict[str, str | os.PathLike] | None = None,
                 manifests: Sequence[str | os.PathLike] = ()):
        """manifests: files applied (kubectl apply --server-side) before kube-controller-manager
        starts, e.g. CRDs: its garbage collector only watches the resources that exist when it
        starts and finds later ones by periodic re-discovery (measured: 41 s until the dependents
        of a deleted custom resource of a CRD created after start were collected).
        trainer_v2: Kubeflow Trainer v2 (TrainJob); it needs JobSet, so jobset defaults to it.
        kueue: Kueue, started after the other controllers (its job webhooks fail closed)."""
        self.dir = Path(directory).resolve()
        self.manifests = [Path(m) for m in manifests]
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.bin = {**binaries(self.cache_dir), **{k: Path(v) for k, v in (binary_paths or {}).items()}}
        self.die_with_parent = die_with_parent
        self.timeout = timeout
        self.etcd_fsync = etcd_fsync
        self.verbose = verbose
        self.apiserver_args = list(apiserver_args)
        self.controller_manager_args = list(controller_manager_args)
        if training_operator is True:
            training_operator = TrainingOperator()
        self.training_operator: TrainingOperator | None = training_operator or None
        if trainer_v2 is True:
            trainer_v2 = TrainerV2()
        self.trainer_v2: TrainerV2 | None = trainer_v2 or None
        if jobset is None:
            jobset = bool(self.trainer_v2)
        if jobset is True:
            jobset = JobSet()
        self.jobset: JobSet | None = jobset or None
        if self.trainer_v2 and not self.jobset:
            raise ValueError("Trainer v2 renders TrainJobs into JobSets: it needs jobset")
        self.kueue: Kueue | None = (Kueue() if kueue is True else kueue) or None
        self.processes: list[ManagedProcess] = []
        self.ports: dict[str, int] = {}
        self.pki = PKI(self.dir / "pki")
        self.kubeconfig = self.dir / "kubeconfig"
        self.state_file = self.dir / "state.json"

    # -- public API ------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG pointing at the admin kubeconfig."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the kubectl built with the control plane (same version), as admin."""
        r = subprocess.run([str(self.bin["kubectl"]), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args],
                           input=input, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def request(self, method: str, path: str, body: object = None, *, timeout: float = 10) -> tuple[int, object]:
        """One HTTPS request to the apiserver as admin; returns (status, decoded JSON or text)."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.ports["apiserver"], context=self._ssl(), timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", "Accept": "application/json"})
            resp = conn.getresponse()
            raw = resp.read().decode(errors="replace")
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw

    def start(self) -> "ControlPlane":
        needed = ["etcd", "kube-apiserver", "kube-controller-manager", "kubectl"]
        needed += ["training-operator"] if self.training_operator else []
        needed += ["jobset"] if self.jobset else []
        needed += ["trainer"] if self.trainer_v2 else []
        needed += ["kueue"] if self.kueue else []
        missing = [n for n in needed if not os.access(self.bin[n], os.X_OK)]
        if missing:
            raise ClusterError(f"not built: {', '.join(missing)}; run cluster/build.sh")
        if self._running_from_state():
            raise ClusterError(f"a control plane from {self.dir} is still running; stop it first (down --dir)")
        self.ports = {}
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        t0 = time.monotonic()
        try:
            self._pki()
            self._start_etcd()
            self._start_apiserver()
            if self.training_operator:
                # CRDs before kube-controller-manager: its garbage collector only watches the
                # resources it found at start-up; a CRD created later is picked up by its periodic
                # re-discovery, so deleting a PyTorchJob would leave its pods for a while
                self.training_operator.install(self)
            for component in self._components():  # their CRDs too, for the same reason
                if component:
                    component.install(self)
            if self.manifests:
                apply_server_side(self, self.manifests)
            self._start_controller_manager()
            self._wait(self._default_serviceaccount, "the default ServiceAccount (kube-controller-manager)")
            if self.training_operator:
                self.training_operator.start(self)
            for component in self._components():
                if component:
                    component.start(self)
        except BaseException:
            self._say("start failed; stopping what was started")
            with contextlib.suppress(Exception):
                self.stop()
            raise
        self._say(f"control plane up in {time.monotonic() - t0:.1f}s: {self.server}")
        return self

    def stop(self, grace: float = 10.0) -> None:
        procs = self.processes or self._load_state_processes()
        stop_processes(list(reversed(procs)), grace, self._say)
        self.processes = []
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()

    def alive(self) -> dict[str, bool]:
        procs = self.processes or self._load_state_processes()
        return {p.name: p.alive() for p in procs}

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @classmethod
    def attach(cls, directory: str | os.PathLike) -> "ControlPlane":
        """A ControlPlane for what `up` (or another start()) left running in directory."""
        cp = cls(directory)
        state = json.loads(cp.state_file.read_text())
        cp.ports = state["ports"]
        cp.processes = [ManagedProcess.from_json(p) for p in state["processes"]]
        return cp

    # -- internals -------------------------------------------------------------------------

    def _components(self) -> tuple:
        """The controllers after the Training Operator, in start order (None: not run)."""
        return self.jobset, self.trainer_v2, self.kueue

    def _say(self, msg: str) -> None:
        if self.verbose:
            print(f"[controlplane] {msg}", file=sys.stderr, flush=True)

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.path("ca", "crt")))
        ctx.load_cert_chain(str(self.pki.path("admin", "crt")), str(self.pki.path("admin", "key")))
        return ctx

    def _load_state_processes(self) -> list[ManagedProcess]:
        try:
            state = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return []
        self.ports = self.ports or state.get("ports", {})
        return [ManagedProcess.from_json(p) for p in state["processes"]]

    def _running_from_state(self) -> bool:
        return any(p.alive() for p in self._load_state_processes())

    def _save_state(self) -> None:
        state = {"dir": str(self.dir), "server": self.server if "apiserver" in self.ports else None,
                 "kubeconfig": str(self.kubeconfig), "ports": self.ports,
                 "processes": [p.to_json() for p in self.processes]}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        """Start a process that stop() will stop; its output goes to DIR/logs/<name>.log."""
        log = self.dir / "logs" / f"{name}.log"
        with open(log, "ab") as f:
            f.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
            f.flush()
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                     cwd=self.dir, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent if self.die_with_parent else None)
        p = ManagedProcess(name, popen.pid, proc_start_time(popen.pid), argv, str(log), popen)
        self.processes.append(p)
        self._save_state()
        self._say(f"started {name} (pid {p.pid})")
        return p

    def _wait(self, check: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        last_error = None
        while True:
            for p in self.processes:
                if not p.alive():
                    raise ClusterError(f"{p.name} exited while waiting for {what}; {p.log}:\n{p.log_tail()}")
            try:
                if check():
                    self._say(f"{what}: ok")
                    return
            except (OSError, http.client.HTTPException, ClusterError) as e:
                last_error = e
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what} (last error: {last_error})")
            time.sleep(0.2)

    def _pki(self) -> None:
        pki = self.pki
        pki.ca("ca", "codistill-ca")
        pki.cert("apiserver", "ca", "kube-apiserver", server=True,
                 dns=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                      "kubernetes.default.svc.cluster.local"],
                 ips=["127.0.0.1", KUBERNETES_SERVICE_IP])
        pki.cert("apiserver-kubelet-client", "ca", "kube-apiserver-kubelet-client", orgs=["system:masters"], client=True)
        pki.cert("admin", "ca", ADMIN_USER, orgs=["system:masters"], client=True)
        pki.cert("kube-controller-manager", "ca", "system:kube-controller-manager", client=True)
        # the front proxy (aggregated APIs: metrics-server and the like), as kubeadm sets it up
        pki.ca("front-proxy-ca", "front-proxy-ca")
        pki.cert("front-proxy-client", "front-proxy-ca", "front-proxy-client", client=True)
        pki.public_key("sa")

    def _start_etcd(self) -> None:
        taken = set(self.ports.values())
        client, peer = free_port(taken), free_port(taken)
        self.ports.update(etcd=client, etcd_peer=peer)
        data = self.dir / "etcd"
        argv = [str(self.bin["etcd"]), "--name", "default", "--data-dir", str(data),
                "--listen-client-urls", f"http://127.0.0.1:{client}",
                "--advertise-client-urls", f"http://127.0.0.1:{client}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"default=http://127.0.0.1:{peer}",
                "--initial-cluster-state", "new", "--log-level", "warn"]
        if not self.etcd_fsync:
            argv.append("--unsafe-no-fsync")
        self.spawn("etcd", argv)

        def healthy() -> bool:
            conn = http.client.HTTPConnection("127.0.0.1", client, timeout=2)
            try:
                conn.request("GET", "/health")
                r = conn.getresponse()
                return r.status == 200 and json.loads(r.read()).get("health") == "true"
            finally:
                conn.close()
        self._wait(healthy, "etcd /health")

    def _start_apiserver(self) -> None:
        port = free_port(set(self.ports.values()))
        self.ports["apiserver"] = port
        p = self.pki
        argv = [str(self.bin["kube-apiserver"]),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1", f"--secure-port={port}", "--advertise-address=127.0.0.1",
                f"--cert-dir={self.dir / 'apiserver'}",
                f"--tls-cert-file={p.path('apiserver', 'crt')}", f"--tls-private-key-file={p.path('apiserver', 'key')}",
                f"--client-ca-file={p.path('ca', 'crt')}",
                f"--kubelet-client-certificate={p.path('apiserver-kubelet-client', 'crt')}",
                f"--kubelet-client-key={p.path('apiserver-kubelet-client', 'key')}",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={p.path('sa', 'pub')}",
                f"--service-account-signing-key-file={p.path('sa', 'key')}",
                # the `kubernetes` Service gets no endpoints: the apiserver refuses to publish a
                # loopback address in them (subsets[0].addresses[0].ip: may not be in the loopback range)
                "--endpoint-reconciler-type=none",
                "--authorization-mode=Node,RBAC",
                # the default plugins (NamespaceLifecycle, LimitRanger, ServiceAccount, PodSecurity,
                # Priority, DefaultTolerationSeconds, DefaultStorageClass, ResourceQuota,
                # MutatingAdmissionWebhook, ValidatingAdmissionWebhook, ValidatingAdmissionPolicy, ...)
                # stay on; NodeRestriction is what kubeadm adds
                "--enable-admission-plugins=NodeRestriction",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--requestheader-client-ca-file={p.path('front-proxy-ca', 'crt')}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={p.path('front-proxy-client', 'crt')}",
                f"--proxy-client-key-file={p.path('front-proxy-client', 'key')}",
                "--allow-privileged=true", "--profiling=false",
                *self.apiserver_args]
        self.spawn("kube-apiserver", argv)
        write_kubeconfig(self.kubeconfig, self.server, p.path("ca", "crt"), p.path("admin", "crt"),
                         p.path("admin", "key"), ADMIN_USER)
        self._save_state()
        self._wait(lambda: self.request("GET", "/readyz", timeout=5)[0] == 200, "kube-apiserver /readyz")

    def _start_controller_manager(self) -> None:
        port = free_port(set(self.ports.values()))
        self.ports["kube-controller-manager"] = port
        p = self.pki
        kc = write_kubeconfig(self.dir / "kube-controller-manager.kubeconfig", self.server, p.path("ca", "crt"),
                              p.path("kube-controller-manager", "crt"), p.path("kube-controller-manager", "key"),
                              "system:kube-controller-manager")
        argv = [str(self.bin["kube-controller-manager"]),
                f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1", f"--secure-port={port}",
                f"--cert-dir={self.dir / 'kube-controller-manager'}",
                "--controllers=*", "--use-service-account-credentials=true",
                f"--root-ca-file={p.path('ca', 'crt')}",
                f"--service-account-private-key-file={p.path('sa', 'key')}",
                f"--cluster-signing-cert-file={p.path('ca', 'crt')}",
                f"--cluster-signing-key-file={p.path('ca', 'key')}",
                f"--service-cluster-ip-range={SERVICE_CIDR}", "--cluster-name=codistill",
                "--leader-elect=false",
                *self.controller_manager_args]
        self.spawn("kube-controller-manager", argv)

        def healthy() -> bool:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # its own self-signed cert
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=2)
            try:
                conn.request("GET", "/healthz")
                return conn.getresponse().status == 200
            finally:
                conn.close()
        self._wait(healthy, "kube-controller-manager /healthz")

    def _default_serviceaccount(self) -> bool:
        return self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200


class TrainingOperator:
    """The Kubeflow Training Operator (v1 controllers) as a local process of a ControlPlane.

    Installs the CRDs of the enabled schemes and the release's ClusterRole (bound to the
    operator's own client-certificate user, not system:masters), the namespace `kubeflow`, the
    Secret its cert rotator insists on (pre-filled with a CA and a serving certificate for
    127.0.0.1, so the rotator finds them valid and keeps them), and a
    ValidatingWebhookConfiguration whose clientConfig.url is https://127.0.0.1:<port>/... with
    that CA as caBundle."""

    def __init__(self, schemes: Sequence[str] = ("pytorchjob",), *, threads: int = 1,
                 pytorch_init_container_template: str | None = None, args: Sequence[str] = ()):
        unknown = [s for s in schemes if s.lower() not in TO_SCHEMES]
        if unknown:
            raise ValueError(f"unknown schemes {unknown}; known: {sorted(TO_SCHEMES)}")
        self.schemes = [s.lower() for s in schemes]
        self.threads = threads
        self.init_template = pytorch_init_container_template
        self.args = list(args)
        self.kubeconfig: Path | None = None

    def manifests(self, cp: ControlPlane) -> Path:
        return cp.bin["training-operator"].parent / "manifests"

    def install(self, cp: ControlPlane) -> None:
        """Certificates, ports, and the objects in the apiserver (needs only the apiserver)."""
        d = cp.dir / "training-operator"
        certs = d / "tmp" / "k8s-webhook-server" / "serving-certs"
        certs.mkdir(parents=True, exist_ok=True)
        p = cp.pki
        webhook_ca, _ = p.ca("training-operator-webhook-ca", TO_CA_NAME, dns=[TO_CA_NAME])
        dns = f"{TO_WEBHOOK_SERVICE}.{TRAINING_OPERATOR_NAMESPACE}.svc"
        serving_crt, serving_key = p.cert("training-operator-webhook", "training-operator-webhook-ca", dns,
                                          dns=[dns, "localhost"], ips=["127.0.0.1"], server=True, days=825)
        (certs / "tls.crt").write_bytes(serving_crt.read_bytes())
        (certs / "tls.key").write_bytes(serving_key.read_bytes())
        os.chmod(certs / "tls.key", 0o600)
        client_crt, client_key = p.cert("training-operator", "ca", TRAINING_OPERATOR_USER, client=True)
        self.kubeconfig = write_kubeconfig(d / "kubeconfig", cp.server, p.path("ca", "crt"), client_crt, client_key,
                                           TRAINING_OPERATOR_USER)
        taken = set(cp.ports.values())
        webhook, metrics, probe = free_port(taken), free_port(taken), free_port(taken)
        cp.ports.update({"training-operator-webhook": webhook, "training-operator-metrics": metrics,
                         "training-operator-probe": probe})

        self._install(cp, webhook, webhook_ca, serving_crt, serving_key)
        self._serving_crt = serving_crt

    def start(self, cp: ControlPlane) -> None:
        """Start the operator (after install()) and wait until its webhook answers."""
        d = cp.dir / "training-operator"
        serving_crt = self._serving_crt
        webhook, metrics, probe = (cp.ports[f"training-operator-{k}"] for k in ("webhook", "metrics", "probe"))

        # cert-controller's rotator waits for this exact file (where the Deployment mounts the
        # Secret); only its existence is checked. The webhook server itself reads the copy under
        # $TMPDIR, see below.
        if not TO_ROTATOR_CERT_FILE.exists():
            TO_ROTATOR_CERT_FILE.parent.mkdir(parents=True, exist_ok=True)
            TO_ROTATOR_CERT_FILE.write_bytes(serving_crt.read_bytes())

        argv = [str(cp.bin["training-operator"]),
                *(f"--enable-scheme={s}" for s in self.schemes),
                f"--webhook-server-port={webhook}",
                f"--metrics-bind-address=127.0.0.1:{metrics}",
                f"--health-probe-bind-address=127.0.0.1:{probe}",
                "--leader-elect=false", f"--controller-threads={self.threads}",
                "--gang-scheduler-name=",  # no gang scheduling
                *self.args]
        if self.init_template is not None:
            tpl = d / "pytorch-init-container.yaml"
            tpl.write_text(self.init_template)
            argv.append(f"--pytorch-init-container-template-file={tpl}")
        env = {k: v for k, v in os.environ.items() if k not in ("KUBEFLOW_NAMESPACE", "KUBERNETES_SERVICE_HOST")}
        env.update(KUBECONFIG=str(self.kubeconfig), MY_POD_NAMESPACE=TRAINING_OPERATOR_NAMESPACE,
                   # controller-runtime's webhook server reads $TMPDIR/k8s-webhook-server/serving-certs
                   TMPDIR=str(d / "tmp"))
        cp.spawn("training-operator", argv, env=env)

        def ready() -> bool:
            conn = http.client.HTTPConnection("127.0.0.1", probe, timeout=2)
            try:
                conn.request("GET", "/readyz")
                return conn.getresponse().status == 200
            finally:
                conn.close()
        cp._wait(ready, "training-operator /readyz")
        cp._wait(lambda: self._webhook_answers(cp), "training-operator webhook (dry-run create)")

    def _install(self, cp: ControlPlane, webhook_port: int, webhook_ca: Path, serving_crt: Path,
                 serving_key: Path) -> None:
        m = self.manifests(cp)
        def b64(path):
            return base64.b64encode(path.read_bytes()).decode()
        ca_key = cp.pki.path("training-operator-webhook-ca", "key")
        objects = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": TRAINING_OPERATOR_NAMESPACE}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": "training-operator"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "training-operator"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": TRAINING_OPERATOR_USER}]},
            # the keys cert-controller reads and writes (ca.crt, ca.key, tls.crt, tls.key)
            {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
             "metadata": {"name": TO_WEBHOOK_SECRET, "namespace": TRAINING_OPERATOR_NAMESPACE},
             "data": {"ca.crt": b64(webhook_ca), "ca.key": b64(ca_key),
                      "tls.crt": b64(serving_crt), "tls.key": b64(serving_key)}},
            {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
             "metadata": {"name": TO_WEBHOOK_CONFIGURATION},
             "webhooks": [{
                 "name": f"validator.{s}.training-operator.kubeflow.org",
                 "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail",
                 "timeoutSeconds": 10,
                 "clientConfig": {"url": f"https://127.0.0.1:{webhook_port}/validate-kubeflow-org-v1-{s}",
                                  "caBundle": b64(webhook_ca)},
                 "rules": [{"apiGroups": ["kubeflow.org"], "apiVersions": ["v1"],
                            "operations": ["CREATE", "UPDATE"], "resources": [TO_SCHEMES[s][1]]}],
             } for s in self.schemes]},
        ]
        objects_file = write_list(cp.dir / "training-operator" / "objects.json", objects)
        files = [m / "crds" / f"kubeflow.org_{TO_SCHEMES[s][1]}.yaml" for s in self.schemes]
        files += [m / "rbac" / "role.yaml", objects_file]
        apply_server_side(cp, files)
        wait_established(cp, [f"{TO_SCHEMES[s][1]}.kubeflow.org" for s in self.schemes])

    def _webhook_answers(self, cp: ControlPlane) -> bool:
        """A server-side dry-run create passes through the webhook (failurePolicy Fail)."""
        s = self.schemes[0]
        kind, plural = TO_SCHEMES[s]
        spec_key = {"pytorchjob": "pytorchReplicaSpecs", "tfjob": "tfReplicaSpecs",
                    "xgboostjob": "xgbReplicaSpecs", "paddlejob": "paddleReplicaSpecs",
                    "jaxjob": "jaxReplicaSpecs"}[s]
        role = {"pytorchjob": "Master", "tfjob": "Chief", "xgboostjob": "Master", "paddlejob": "Master",
                "jaxjob": "Worker"}[s]
        container = {"pytorchjob": "pytorch", "tfjob": "tensorflow", "xgboostjob": "xgboost",
                     "paddlejob": "paddle", "jaxjob": "jax"}[s]
        job = {"apiVersion": "kubeflow.org/v1", "kind": kind,
               "metadata": {"name": "webhook-probe", "namespace": TRAINING_OPERATOR_NAMESPACE},
               "spec": {spec_key: {role: {"replicas": 1, "template": {"spec": {
                   "containers": [{"name": container, "image": "probe"}]}}}}}}
        status, body = cp.request("POST", f"/apis/kubeflow.org/v1/namespaces/{TRAINING_OPERATOR_NAMESPACE}/{plural}"
                                          "?dryRun=All", job)
        if status != 201:
            raise ClusterError(f"dry-run create: {status} {body.get('message') if isinstance(body, dict) else body}")
        return True


# ---------------------------------------------------------------------------------------------
# helpers shared by the controllers

def apply_server_side(cp: ControlPlane, files: Sequence[Path]) -> None:
    args = ["apply", "--server-side", "--force-conflicts", f"--field-manager={FIELD_MANAGER}"]
    for f in files:
        args += ["-f", str(f)]
    cp.kubectl(*args)


def wait_established(cp: ControlPlane, crds: Sequence[str]) -> None:
    """Wait until each CRD (by name) is Established.

    Not `kubectl wait --for=condition=Established`: right after the create it fails on a CRD
    that has no status.conditions yet instead of waiting. And a CRD whose apiserver stopped
    while it was still "Installing" stays Established=False after a restart (the apiserver
    only queues it for establishing on an update event), so after a few seconds a stuck one
    gets a harmless annotation update to kick it."""
    t0 = time.monotonic()
    kicked: dict[str, float] = {}

    def established() -> bool:
        done = True
        for name in crds:
            status, crd = cp.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conds = {c["type"]: c["status"] for c in (crd.get("status", {}).get("conditions") or [])} \
                if status == 200 else {}
            if conds.get("Established") == "True":
                continue
            done = False
            now = time.monotonic()
            if conds.get("NamesAccepted") == "True" and now - t0 > 3 and now - kicked.get(name, 0) > 2:
                kicked[name] = now
                cp.kubectl("annotate", "--overwrite", f"crd/{name}", f"codistill.io/establish-kick={int(time.time())}")
        return done
    cp._wait(established, "CRDs established")


def http_ok(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    finally:
        conn.close()


def webhook_certs(cp: ControlPlane, name: str, service_dns: str, cert_dir: Path) -> Path:
    """A CA and a serving certificate for 127.0.0.1 (and the in-cluster Service name), written as
    tls.crt/tls.key into cert_dir where controller-runtime's webhook server reads them.
    Returns the CA (the webhook configurations' caBundle)."""
    ca, _ = cp.pki.ca(f"{name}-webhook-ca", f"{name}-webhook-ca")
    crt, key = cp.pki.cert(f"{name}-webhook", f"{name}-webhook-ca", service_dns,
                           dns=[service_dns, "localhost"], ips=["127.0.0.1"], server=True, days=825)
    cert_dir.mkdir(parents=True, exist_ok=True)
    (cert_dir / "tls.crt").write_bytes(crt.read_bytes())
    (cert_dir / "tls.key").write_bytes(key.read_bytes())
    os.chmod(cert_dir / "tls.key", 0o600)
    return ca


def webhook(name: str, url: str, ca: Path, group: str, version: str, resource: str, operations: Sequence[str],
            object_selector: dict | None = None) -> dict:
    """One entry of a {Validating,Mutating}WebhookConfiguration, called by URL (no Service)."""
    w = {"name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail",
         "timeoutSeconds": 10,
         "clientConfig": {"url": url, "caBundle": base64.b64encode(ca.read_bytes()).decode()},
         "rules": [{"apiGroups": [group], "apiVersions": [version], "operations": list(operations),
                    "resources": [resource]}]}
    if object_selector:
        w["objectSelector"] = object_selector
    return w


def cluster_role_binding(role: str, user: str, namespace: str | None = None) -> dict:
    """Binds the ClusterRole `role` to user; with namespace, the Role `role` of that namespace
    (a RoleBinding)."""
    kind = "Role" if namespace else "ClusterRole"
    meta = {"name": role, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": f"{kind}Binding", "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}


def manifest_objects(cp: ControlPlane, path: Path) -> list[dict]:
    """The objects of a release's YAML file as JSON (standard library only: kubectl decodes it;
    --dry-run=client creates nothing)."""
    text = cp.kubectl("create", "--dry-run=client", "--validate=false", "-o", "json", "-f", str(path)).stdout
    decoder, objects, i = json.JSONDecoder(), [], 0
    while text[i:].strip():  # one JSON document per file of a folder, a List for several in one file
        out, end = decoder.raw_decode(text, i + len(text[i:]) - len(text[i:].lstrip()))
        objects += out["items"] if out.get("kind") == "List" else [out]
        i = end
    return objects


def write_list(path: Path, objects: Sequence[dict]) -> Path:
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}, indent=1))
    return path


def controller_env(kubeconfig: Path, tmpdir: Path) -> dict[str, str]:
    """os.environ for a controller-runtime manager: its kubeconfig, and TMPDIR where its webhook
    server looks for serving-certs (it defaults to $TMPDIR/k8s-webhook-server/serving-certs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "POD_NAMESPACE")}
    env.update(KUBECONFIG=str(kubeconfig), TMPDIR=str(tmpdir))
    return env


def dry_run_create(cp: ControlPlane, path: str, obj: dict) -> bool:
    """A server-side dry-run create passes through the admission webhooks (failurePolicy Fail)."""
    status, body = cp.request("POST", f"{path}?dryRun=All", obj)
    if status != 201:
        raise ClusterError(f"dry-run create: {status} {body.get('message') if isinstance(body, dict) else body}")
    return True


class JobSet:
    """The JobSet controller (jobset.x-k8s.io) as a local process of a ControlPlane.

    Installs the release's CRD and ClusterRole (bound to its own client-certificate user) and the
    webhook configurations of config/components/webhook (the JobSet defaulter and validator, and
    the pod ones for pods labelled jobset.sigs.k8s.io/jobset-name) with clientConfig.url
    https://127.0.0.1:<port>/... . The internal cert rotator is off (internalCertManagement
    enable: false, a documented option): the serving certificate is ours, in webhook.certDir."""

    def __init__(self, *, args: Sequence[str] = ()):
        self.args = list(args)

    def manifests(self, cp: ControlPlane) -> Path:
        return cp.bin["jobset"].parent / "manifests"

    def install(self, cp: ControlPlane) -> None:
        d = cp.dir / "jobset"
        d.mkdir(parents=True, exist_ok=True)
        self.cert_dir = d / "serving-certs"
        ca = webhook_certs(cp, "jobset", JOBSET_SERVICE_DNS, self.cert_dir)
        crt, key = cp.pki.cert("jobset", "ca", JOBSET_USER, client=True)
        self.kubeconfig = write_kubeconfig(d / "kubeconfig", cp.server, cp.pki.path("ca", "crt"), crt, key,
                                           JOBSET_USER)
        taken = set(cp.ports.values())
        cp.ports.update({"jobset-webhook": free_port(taken), "jobset-probe": free_port(taken)})
        base = f"https://127.0.0.1:{cp.ports['jobset-webhook']}"
        pods = {"matchExpressions": [{"key": "jobset.sigs.k8s.io/jobset-name", "operator": "Exists"}]}
        js = ("jobset.x-k8s.io", "v1alpha2", "jobsets")
        objects = [
            cluster_role_binding(JOBSET_CLUSTER_ROLE, JOBSET_USER),
            # config/components/webhook/manifests.yaml with its patches (objectSelector on pods)
            {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
             "metadata": {"name": "jobset-mutating-webhook-configuration"},
             "webhooks": [webhook("mjobset.kb.io", f"{base}/mutate-jobset-x-k8s-io-v1alpha2-jobset", ca, *js,
                                  ["CREATE"]),
                          webhook("mpod.kb.io", f"{base}/mutate--v1-pod", ca, "", "v1", "pods", ["CREATE"], pods)]},
            {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
             "metadata": {"name": "jobset-validating-webhook-configuration"},
             "webhooks": [webhook("vjobset.kb.io", f"{base}/validate-jobset-x-k8s-io-v1alpha2-jobset", ca, *js,
                                  ["CREATE", "UPDATE"]),
                          webhook("vpod.kb.io", f"{base}/validate--v1-pod", ca, "", "v1", "pods", ["CREATE"], pods)]},
        ]
        objects_file = write_list(d / "objects.json", objects)
        # the ClusterRole is `manager-role` in the release file; kustomize's namePrefix renames it
        m = self.manifests(cp)
        role = d / "role.yaml"
        role.write_text(re.sub(r"^  name: manager-role$", f"  name: {JOBSET_CLUSTER_ROLE}",
                               (m / "rbac" / "role.yaml").read_text(), flags=re.M))
        apply_server_side(cp, [m / "crds" / "jobset.x-k8s.io_jobsets.yaml", role, objects_file])
        wait_established(cp, ["jobsets.jobset.x-k8s.io"])

    def config(self, cp: ControlPlane) -> str:
        # metrics off ("0"): its secure metrics server would want a certificate of its own and
        # TokenReview rights; nothing here scrapes it
        return json.dumps({
            "apiVersion": "config.jobset.x-k8s.io/v1alpha1", "kind": "Configuration",
            "webhook": {"port": cp.ports["jobset-webhook"], "host": "127.0.0.1", "certDir": str(self.cert_dir)},
            "metrics": {"bindAddress": "0"},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{cp.ports['jobset-probe']}"},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
        }, indent=1)

    def start(self, cp: ControlPlane) -> None:
        d = cp.dir / "jobset"
        cfg = d / "config.yaml"
        cfg.write_text(self.config(cp))  # JSON is YAML
        # --zap-devel=false: JSON log lines like Trainer's (JobSet's default is the console format)
        argv = [str(cp.bin["jobset"]), f"--config={cfg}", "--zap-devel=false", *self.args]
        cp.spawn("jobset", argv, env=controller_env(self.kubeconfig, self.cert_dir.parent))
        cp._wait(lambda: http_ok(cp.ports["jobset-probe"], "/readyz"), "jobset /readyz")
        probe = {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
                 "metadata": {"name": "webhook-probe", "namespace": "default"},
                 "spec": {"replicatedJobs": [{"name": "probe", "replicas": 1, "template": {"spec": {"template": {
                     "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "probe"}]}}}}}]}}
        cp._wait(lambda: dry_run_create(cp, "/apis/jobset.x-k8s.io/v1alpha2/namespaces/default/jobsets", probe),
                 "jobset webhook (dry-run create)")


class TrainerV2:
    """The Kubeflow Trainer v2 controller manager (trainer.kubeflow.org: TrainJob, TrainingRuntime,
    ClusterTrainingRuntime) as a local process of a ControlPlane. Needs JobSet (its CRD for the
    TrainJob controller's watch, its controller to run the JobSets).

    Installs the release's three CRDs (manifests/base/crds) and ClusterRole (bound to its own
    client-certificate user), and the webhook configurations of manifests/base/webhook (defaulter
    and validator of TrainJobs, validators of both runtimes) with clientConfig.url. The cert
    rotator is off (certManagement enable: false); the webhook server reads the serving
    certificate from $TMPDIR/k8s-webhook-server/serving-certs (Trainer's config has no certDir).
    runtimes: also install the release's default ClusterTrainingRuntimes (manifests/runtimes/,
    e.g. "torch_distributed" for torch-distributed; their images are real ones the process kubelet
    does not map)."""

    def __init__(self, *, threads: int = 1, feature_gates: dict[str, bool] | None = None,
                 runtimes: Sequence[str] = (), args: Sequence[str] = ()):
        self.threads = threads
        self.feature_gates = dict(feature_gates or {})
        self.runtimes = list(runtimes)
        self.args = list(args)

    def manifests(self, cp: ControlPlane) -> Path:
        return cp.bin["trainer"].parent / "manifests"

    def install(self, cp: ControlPlane) -> None:
        d = cp.dir / "trainer"
        d.mkdir(parents=True, exist_ok=True)
        self.tmpdir = d / "tmp"
        ca = webhook_certs(cp, "trainer", TRAINER_SERVICE_DNS, self.tmpdir / "k8s-webhook-server" / "serving-certs")
        crt, key = cp.pki.cert("trainer", "ca", TRAINER_USER, client=True)
        self.kubeconfig = write_kubeconfig(d / "kubeconfig", cp.server, cp.pki.path("ca", "crt"), crt, key,
                                           TRAINER_USER)
        taken = set(cp.ports.values())
        cp.ports.update({"trainer-webhook": free_port(taken), "trainer-probe": free_port(taken)})
        base = f"https://127.0.0.1:{cp.ports['trainer-webhook']}/"
        g = ("trainer.kubeflow.org", "v1alpha1")
        # the validators skip objects labelled trainer.kubeflow.org/webhook-validation=disabled
        # (patch_validating.yaml: the two runtime validators only)
        skip = {"matchExpressions": [{"key": "trainer.kubeflow.org/webhook-validation", "operator": "NotIn",
                                      "values": ["disabled"]}]}
        objects = [
            cluster_role_binding(TRAINER_CLUSTER_ROLE, TRAINER_USER),
            {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
             "metadata": {"name": "defaulter.trainer.kubeflow.org"},
             "webhooks": [webhook("defaulter.trainjob.trainer.kubeflow.org",
                                  base + "mutate-trainer-kubeflow-org-v1alpha1-trainjob", ca, *g, "trainjobs",
                                  ["CREATE", "UPDATE"])]},
            {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
             "metadata": {"name": "validator.trainer.kubeflow.org"},
             "webhooks": [webhook(f"validator.{r[:-1]}.trainer.kubeflow.org",
                                  base + f"validate-trainer-kubeflow-org-v1alpha1-{r[:-1]}", ca, *g, r,
                                  ["CREATE", "UPDATE"], skip if r != "trainjobs" else None)
                          for r in ("clustertrainingruntimes", "trainingruntimes", "trainjobs")]},
        ]
        objects_file = write_list(d / "objects.json", objects)
        m = self.manifests(cp)
        crds = ["trainjobs", "trainingruntimes", "clustertrainingruntimes"]
        apply_server_side(cp, [*(m / "crds" / f"trainer.kubeflow.org_{c}.yaml" for c in crds),
                               m / "rbac" / "role.yaml", objects_file])
        wait_established(cp, [f"{c}.trainer.kubeflow.org" for c in crds])

    def config(self, cp: ControlPlane) -> str:
        """A minimal Configuration (the release's is manifests/manager/controller_manager_config.yaml):
        loopback ports, no leader election, no metrics (see JobSet.config), no cert rotator."""
        cfg = {"apiVersion": "config.trainer.kubeflow.org/v1alpha1", "kind": "Configuration",
               "webhook": {"port": cp.ports["trainer-webhook"], "host": "127.0.0.1"},
               "metrics": {"bindAddress": "0"},
               "health": {"healthProbeBindAddress": f"127.0.0.1:{cp.ports['trainer-probe']}"},
               "leaderElection": {"leaderElect": False},
               "controller": {"groupKindConcurrency": {f"{k}.trainer.kubeflow.org": self.threads for k in
                                                       ("TrainJob", "TrainingRuntime", "ClusterTrainingRuntime")}},
               "certManagement": {"enable": False}}
        if self.feature_gates:
            cfg["featureGates"] = self.feature_gates
        return json.dumps(cfg, indent=1)

    def start(self, cp: ControlPlane) -> None:
        d = cp.dir / "trainer"
        cfg = d / "config.yaml"
        cfg.write_text(self.config(cp))
        argv = [str(cp.bin["trainer"]), f"--config={cfg}", *self.args]
        cp.spawn("trainer", argv, env=controller_env(self.kubeconfig, self.tmpdir))
        cp._wait(lambda: http_ok(cp.ports["trainer-probe"], "/readyz"), "trainer /readyz")
        probe = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
                 "metadata": {"name": "webhook-probe"},
                 "spec": {"template": {"spec": {"replicatedJobs": [{
                     "name": "node", "template": {"metadata": {"labels": {
                         "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                         "spec": {"template": {"spec": {"containers": [{"name": "node", "image": "probe"}]}}}}}]}}}}
        cp._wait(lambda: dry_run_create(cp, "/apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes", probe),
                 "trainer webhook (dry-run create)")
        if self.runtimes:
            apply_server_side(cp, [self.manifests(cp) / "runtimes" / f"{r}.yaml" for r in self.runtimes])


class Kueue:
    """Kueue (kueue.x-k8s.io) as a local process of a ControlPlane, managing the job kinds in
    `frameworks` (its Configuration's integrations.frameworks).

    install() (before kube-controller-manager) applies the release's CRDs, five of them with the
    conversion webhook of config/components/crd by clientConfig.url, and its ClusterRole
    `kueue-manager-role` and Role `kueue-manager-secrets-role` (namespace kueue-system: MultiKueue's
    controllers watch Secrets there), bound to its own client-certificate user. start() applies the
    release's webhook configurations, only the entries for Kueue's own kinds and the enabled
    frameworks, by clientConfig.url: there, not in install(), because its job webhooks fail closed
    and the Training Operator's start-up probe creates a PyTorchJob. Internal cert management is
    off (a documented option): the serving certificate is ours, in webhook.certDir."""

    def __init__(self, *, frameworks: Sequence[str] = KUEUE_FRAMEWORKS, feature_gates: dict[str, bool] | None = None,
                 manage_jobs_without_queue_name: bool = False, args: Sequence[str] = ()):
        self.frameworks = list(frameworks)
        # VisibilityOnDemand (beta, on by default) starts an aggregated API server that wants a
        # certificate in /visibility and an APIService; nothing here reads pending workloads so
        self.feature_gates = {"VisibilityOnDemand": False, **(feature_gates or {})}
        self.manage_jobs_without_queue_name = manage_jobs_without_queue_name
        self.args = list(args)

    def manifests(self, cp: ControlPlane) -> Path:
        return cp.bin["kueue"].parent / "manifests"

    def install(self, cp: ControlPlane) -> None:
        d = cp.dir / "kueue"
        d.mkdir(parents=True, exist_ok=True)
        self.cert_dir = d / "serving-certs"
        self.ca = webhook_certs(cp, "kueue", KUEUE_SERVICE_DNS, self.cert_dir)
        # the same pair as the metrics certificate main.go insists on (its server is off); see start()
        self.etc = d / "etc"
        webhook_certs(cp, "kueue", KUEUE_SERVICE_DNS, self.etc / Path(KUEUE_METRICS_CERT_DIR).relative_to("/etc"))
        crt, key = cp.pki.cert("kueue", "ca", KUEUE_USER, client=True)
        self.kubeconfig = write_kubeconfig(d / "kubeconfig", cp.server, cp.pki.path("ca", "crt"), crt, key, KUEUE_USER)
        taken = set(cp.ports.values())
        cp.ports.update({"kueue-webhook": free_port(taken), "kueue-probe": free_port(taken)})
        self.base = f"https://127.0.0.1:{cp.ports['kueue-webhook']}"
        m = self.manifests(cp)
        crds = [self._with_conversion(c) for c in manifest_objects(cp, m / "crds")]
        roles = [self._kustomized(r) for f in ("role.yaml", "manager_secrets_role.yaml")
                 for r in manifest_objects(cp, m / "rbac" / f)]
        objects = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": KUEUE_NAMESPACE}}, *roles,
                   cluster_role_binding(f"{KUEUE_PREFIX}manager-role", KUEUE_USER),
                   cluster_role_binding(f"{KUEUE_PREFIX}manager-secrets-role", KUEUE_USER, KUEUE_NAMESPACE)]
        apply_server_side(cp, [write_list(d / "crds.json", crds), write_list(d / "objects.json", objects)])
        wait_established(cp, [c["metadata"]["name"] for c in crds])

    def _client_config(self, path: str) -> dict:
        return {"url": self.base + path, "caBundle": base64.b64encode(self.ca.read_bytes()).decode()}

    def _with_conversion(self, crd: dict) -> dict:
        if crd["spec"]["names"]["plural"] in KUEUE_CONVERTED_CRDS:
            crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                "clientConfig": self._client_config("/convert"), "conversionReviewVersions": ["v1"]}}
        return crd

    @staticmethod
    def _kustomized(obj: dict) -> dict:
        """What config/default's namePrefix and namespace do to a release object."""
        meta = obj["metadata"]
        meta["name"] = KUEUE_PREFIX + meta["name"]
        if "namespace" in meta:
            meta["namespace"] = KUEUE_NAMESPACE
        return obj

    def webhook_configurations(self, cp: ControlPlane) -> list[dict]:
        """The release's two configurations (config/components/webhook) with the entries for
        Kueue's own kinds and for the enabled frameworks only (the others would be Kueue's no-op
        webhooks), each called by URL; the job entries get the namespaceSelector of the
        kustomization (not in kube-system, kueue-system)."""
        # a framework "group/kind" (or "pod", "deployment", ...) is the resource "<kind>s"
        enabled = {f.rsplit("/", 1)[-1] + "s" for f in self.frameworks}
        not_system = {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                                            "values": ["kube-system", KUEUE_NAMESPACE]}]}
        configurations = manifest_objects(cp, self.manifests(cp) / "webhook" / "manifests.yaml")
        for c in configurations:
            self._kustomized(c)
            kept = []
            for w in c["webhooks"]:
                rule = w["rules"][0]
                if "kueue.x-k8s.io" not in rule["apiGroups"]:
                    if not enabled & {r.split("/")[0] for r in rule["resources"]}:
                        continue
                    w["namespaceSelector"] = not_system
                w["clientConfig"] = self._client_config(w["clientConfig"]["service"]["path"])
                kept.append(w)
            c["webhooks"] = kept
        return configurations

    def config(self, cp: ControlPlane) -> str:
        """A minimal Configuration (config.kueue.x-k8s.io/v1beta2; the release's is
        config/components/manager/controller_manager_config.yaml): loopback ports, no leader
        election, no metrics (see JobSet.config), no internal cert management."""
        return json.dumps({
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
            "namespace": KUEUE_NAMESPACE,
            "manageJobsWithoutQueueName": self.manage_jobs_without_queue_name,
            "webhook": {"port": cp.ports["kueue-webhook"], "host": "127.0.0.1", "certDir": str(self.cert_dir)},
            "metrics": {"bindAddress": "0"},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{cp.ports['kueue-probe']}"},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": self.frameworks},
            "featureGates": self.feature_gates,
        }, indent=1)

    def argv(self, cp: ControlPlane, config: Path) -> list[str]:
        """Kueue in a private mount namespace whose /etc is the host's with DIR/kueue/etc laid over
        it (a read-only overlay): the metrics certificate folder is hard-coded under /etc, and
        the host's /etc stays untouched. Not root: in a user namespace of its own as well.
        unshare and sh exec, so the recorded pid is Kueue's."""
        userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
        script = 'mount -t overlay codistill-kueue-etc -o "lowerdir=$0:/etc" /etc && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", *userns, "sh", "-c", script, str(self.etc),
                str(cp.bin["kueue"]), f"--config={config}", *self.args]

    def start(self, cp: ControlPlane) -> None:
        d = cp.dir / "kueue"
        cfg = d / "config.yaml"
        cfg.write_text(self.config(cp))
        apply_server_side(cp, [write_list(d / "webhooks.json", self.webhook_configurations(cp))])
        cp.spawn("kueue", self.argv(cp, cfg), env=controller_env(self.kubeconfig, d))
        cp._wait(lambda: http_ok(cp.ports["kueue-probe"], "/readyz"), "kueue /readyz")
        probe = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
                 "metadata": {"name": "webhook-probe", "namespace": "default"},
                 "spec": {"queueName": "probe", "podSets": [{"name": "main", "count": 1, "template": {"spec": {
                     "restartPolicy": "Never", "containers": [{"name": "c", "image": "probe"}]}}}]}}
        cp._wait(lambda: dry_run_create(cp, "/apis/kueue.x-k8s.io/v1beta2/namespaces/default/workloads", probe),
                 "kueue webhook (dry-run create)")


# ---------------------------------------------------------------------------------------------
# command line

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a control plane with its state in DIR")
    up.add_argument("--dir", required=True, type=Path)
    up.add_argument("--no-training-operator", action="store_true", help="only etcd, apiserver, controller-manager")
    up.add_argument("--trainer-v2", action="store_true", help="also JobSet and Kubeflow Trainer v2 (TrainJob)")
    up.add_argument("--kueue", action="store_true", help="also Kueue (TrainJob and PyTorchJob integrations)")
    up.add_argument("--scheme", action="append", help="Training Operator --enable-scheme (default pytorchjob)")
    up.add_argument("--restricted-init-container", action="store_true",
                    help="give PyTorchJob workers an init container the restricted Pod Security Standard admits")
    up.add_argument("--timeout", type=float, default=180)
    down = sub.add_parser("down", help="stop every process started in DIR")
    down.add_argument("--dir", required=True, type=Path)
    down.add_argument("--grace", type=float, default=10, help="seconds between SIGTERM and SIGKILL")
    st = sub.add_parser("status", help="which processes of DIR are running")
    st.add_argument("--dir", required=True, type=Path)
    sub.add_parser("versions", help="the versions and binary paths in use")
    a = ap.parse_args(argv)

    if a.cmd == "versions":
        for name, path in binaries().items():
            print(f"{name:25} {versions()[name]:10} {path}{'' if path.exists() else '  (not built)'}")
        return 0
    if a.cmd == "up":
        to = None
        if not a.no_training_operator:
            to = TrainingOperator(a.scheme or ("pytorchjob",),
                                  pytorch_init_container_template=RESTRICTED_PYTORCH_INIT_CONTAINER
                                  if a.restricted_init_container else None)
        cp = ControlPlane(a.dir, training_operator=to, trainer_v2=a.trainer_v2, kueue=a.kueue,
                          die_with_parent=False, timeout=a.timeout, verbose=True)
        try:
            cp.start()
        except ClusterError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"kubeconfig: {cp.kubeconfig}")
        print(f"export KUBECONFIG={cp.kubeconfig}")
        return 0
    if a.cmd == "down":
        cp = ControlPlane(a.dir, verbose=True)
        if not cp.state_file.exists():
            print(f"nothing recorded in {cp.state_file}", file=sys.stderr)
            return 0
        cp.stop(grace=a.grace)
        print("stopped")
        return 0
    if a.cmd == "status":
        cp = ControlPlane(a.dir)
        procs = cp._load_state_processes()
        if not procs:
            print("not running")
            return 1
        for p in procs:
            print(f"{p.name:20} pid {p.pid:<8} {'running' if p.alive() else 'gone'}")
        if "apiserver" in cp.ports:
            print(f"server {cp.server}\nexport KUBECONFIG={cp.kubeconfig}")
        return 0 if all(p.alive() for p in procs) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
