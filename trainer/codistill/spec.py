"""The run spec: a `Codistillation` manifest read, defaulted and validated.

The contract's module that the local launcher, the trainer and the operator all import, so a field
means the same thing everywhere. The pydantic models below are the single source of truth: the
CRD's openAPIV3Schema is generated from them (field names are the CR's camelCase API), and every
error names the field it is about, e.g. ``spec.distillation.temperature``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from . import names
from .names import API_GROUP, API_VERSION, KIND

# A run that omits spec.image gets the trainer image its operator was installed with: the chart
# sets this env on the operator (its trainerImage value), so that no run pulls a public name this
# project does not own. Unset (a local `codistill run` needs no image; an operator started by
# hand), it is what `make images REGISTRY=localhost:5000` builds and `kind load` can load.
TRAINER_IMAGE_ENV = "CODISTILL_TRAINER_IMAGE"
LOCAL_TRAINER_IMAGE = "localhost:5000/codistill/trainer:0.1.0"
# The same for the ClusterTrainingRuntime of TrainJobs (the chart's trainJobRuntime.name).
TRAINJOB_RUNTIME_ENV = "CODISTILL_TRAINJOB_RUNTIME"
DEFAULT_TRAINJOB_RUNTIME = "codistill"
# Jobs are `<name>-g<i>`, their Services `<job>-master-0` and `<job>-worker-<i>`: DNS-1035 labels
# of at most 63 characters.
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Namespaces: DNS-1123 labels of at most 63 characters.
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Secret names: DNS-1123 subdomains (dots allowed), at most 253 characters.
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*(:[A-Za-z_][A-Za-z0-9_.]*)?$")
# The list fields of a pod template that the job renderer reads: each a list of mappings.
POD_LISTS = ("containers", "initContainers", "volumes")
CONTAINER_LISTS = ("env", "volumeMounts", "ports", "envFrom")
# An error is one short line: a 100,000-character value or 10,000 unknown fields are echoed
# only in part.
ECHO_CHARS = 80
MAX_CLAUSES = 5
# Collections nested deeper than this are refused when read: a pod template needs about 10,
# and pydantic's serializer (run.json) fails past about 250.
MAX_DEPTH = 100
MAX_INT_CHARS = 1000


class SpecError(ValueError):
    """A manifest that cannot run; the message names the file and field and what was expected."""


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True
    )


class Task(_Model):
    name: str = Field(
        "lm",
        pattern=TASK_NAME.pattern,
        description="A built-in task (`lm`, `ctr`) or an import path `pkg.module:factory` "
        "whose factory(**args) returns a codistill Task.",
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="Free-form keyword arguments for the task factory."
    )


class Optimizer(_Model):
    name: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Optimizer.")
    lr: float = Field(1e-3, gt=0, le=10, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Decoupled weight decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum (sgd only).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps from 0 to `lr`.")
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="Learning-rate schedule after warm-up (decays to 0 at `steps`)."
    )
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm; 0 disables.")


class Training(_Model):
    steps: int = Field(1000, ge=1, le=100_000_000, description="Optimizer steps per group.")
    batch_size: int = Field(32, ge=1, le=1_000_000, description="Examples per process per step.")
    optimizer: Optimizer = Field(default_factory=Optimizer, description="Optimizer settings.")
    eval_every_steps: int = Field(100, ge=1, description="Evaluate on the eval set every N steps.")
    eval_batches: int = Field(8, ge=1, le=10_000, description="Eval batches per evaluation.")
    checkpoint_every_steps: int = Field(
        100, ge=1, description="Save full training state (for resume) every N steps."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Base random seed.")
    rendezvous_timeout_seconds: int = Field(
        1800, ge=60, le=86400,
        description="How long a group's processes wait for each other to start (a slow node or "
        "image pull must fit in it) before the group fails and is restarted.",
    )
    data_sharding: Literal["disjoint", "shared"] = Field(
        "disjoint",
        description="`disjoint`: every group (and rank) reads its own shard, as in the paper; "
        "`shared`: every group reads the same data (the paper's control).",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="`bf16`: the student's and the teachers' forward passes run under bfloat16 "
        "autocast and the teachers are held in bfloat16 (half their memory); weights, gradients "
        "and the optimizer stay float32, and so do the published weights. `fp32`: float32 "
        "throughout.",
    )


class Distillation(_Model):
    weight: float = Field(1.0, ge=0, le=1000, description="Weight of the distillation term.")
    temperature: float = Field(1.0, ge=0.01, le=100, description="Softmax temperature.")
    loss: Literal["kl", "mse"] = Field(
        "kl", description="`kl` on tempered distributions, or `mse` on logits."
    )
    burn_in_steps: int = Field(
        0, ge=0, description="Steps of plain training before the distillation term is added."
    )
    exchange_every_steps: int = Field(
        50, ge=1, description="Publish this group's weights for its peers every K steps."
    )
    reload_every_steps: int = Field(
        50, ge=1, description="Swap in the peers' newest published weights every N steps."
    )
    max_staleness_steps: int = Field(
        1000,
        ge=1,
        description="Skip a teacher older than this many steps behind the student; must be at "
        "least exchangeEverySteps + reloadEverySteps.",
    )
    poll_interval_seconds: float = Field(
        1.0, ge=0.05, le=3600,
        description="How often each group checks the bucket for its peers' newest weights "
        "(in the background; it only bounds how soon a new publish can be swapped in). Raised to "
        "G x P / 2750 s (P the peers each polls: G - 1, or at most 2k with `teachers: k`) where G "
        "groups would read pointers faster than one S3 prefix serves.",
    )
    teachers: int | Literal["all"] = Field(
        "all",
        description="`all` peers, or a number k: distill from k peers drawn at random for each "
        "reload period (the group fetches and holds only those, and the next period's).",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )

    @model_validator(mode="after")
    def _staleness_fits_exchange(self) -> Distillation:
        floor = self.exchange_every_steps + self.reload_every_steps
        if self.max_staleness_steps < floor:
            raise ValueError(
                f"maxStalenessSteps: must be >= exchangeEverySteps + reloadEverySteps ({floor}), "
                f"got {self.max_staleness_steps}: every teacher would be skipped as stale"
            )
        if isinstance(self.teachers, int) and self.teachers < 1:
            raise ValueError(f"teachers: must be 'all' or >= 1, got {self.teachers}")
        return self


class Storage(_Model):
    url: str | None = Field(
        None,
        pattern=r"^[a-z][a-z0-9+.-]*://.+$",
        description="Bucket URL (`s3://bucket/prefix`, any fsspec URL; `file://` only for local "
        "runs). Runs live under <url>/<namespace>/<name>/. Local runs default to ./runs.",
    )
    endpoint: str | None = Field(
        None, pattern=r"^https?://.+$", description="S3 endpoint URL (MinIO, moto, ...)."
    )
    credentials_secret: str | None = Field(
        None,
        pattern=DNS1123_SUBDOMAIN.pattern,
        max_length=253,
        description="Secret in the run's namespace with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.",
    )
    on_delete: Literal["Retain", "Delete"] = Field(
        "Retain", description="`Delete` removes the run folder when the resource is deleted."
    )


class RunPolicy(_Model):
    backoff_limit: int | None = Field(None, ge=0, description="Restarts before a job fails.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="Job deadline.")
    suspend: bool = Field(False, description="Suspend every group's job (resume by unsetting).")
    scheduling_policy: dict[str, Any] | None = Field(
        None, description="Passed to every PyTorchJob's runPolicy.schedulingPolicy."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete finished jobs after this many seconds."
    )
    queue_name: str | None = Field(
        None, description="Kueue LocalQueue: label kueue.x-k8s.io/queue-name on every job."
    )


class Spec(_Model):
    groups: int = Field(2, ge=1, le=64, description="Model groups; 1 = plain data parallelism.")
    workers_per_group: int = Field(
        1, ge=1, le=1024, description="Pods per group: one Master plus Workers."
    )
    nproc_per_worker: int = Field(1, ge=1, le=64, description="Processes per pod (e.g. GPUs).")
    # A default factory, not a default: the CRD then has none, so the operator sees that the
    # field was omitted and fills in its own trainer image.
    image: str = Field(
        default_factory=lambda: os.environ.get(TRAINER_IMAGE_ENV) or LOCAL_TRAINER_IMAGE,
        min_length=1,
        description="Trainer container image. Omitted: the operator's trainer image (the "
        "chart's trainerImage, what `make images` built).",
    )
    template: dict[str, Any] | None = Field(
        None,
        description="Pod template merged into every trainer pod (resources, nodeSelector, "
        "tolerations, volumes, env).",
    )
    backend: Literal["auto", "trainjob", "pytorchjob"] = Field(
        "auto",
        description="The Kubeflow job of each group: TrainJob (Kubeflow Trainer v2 >= 2.2) or "
        "PyTorchJob (Training Operator v1.9). auto: TrainJob where Trainer v2 is installed, else "
        "PyTorchJob. Fixed once the run's jobs exist.",
    )
    runtime: str = Field(
        default_factory=lambda: os.environ.get(TRAINJOB_RUNTIME_ENV) or DEFAULT_TRAINJOB_RUNTIME,
        min_length=1,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN.pattern,
        description="TrainJobs only: the ClusterTrainingRuntime they run on. Omitted: the "
        "operator's (the chart's trainJobRuntime.name).",
    )
    task: Task = Field(default_factory=Task, description="What to train.")
    training: Training = Field(default_factory=Training, description="Training settings.")
    distillation: Distillation = Field(
        default_factory=Distillation, description="Codistillation settings."
    )
    storage: Storage = Field(default_factory=Storage, description="The shared bucket.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Job run policy.")

    @field_validator("template")
    @classmethod
    def _template_shape(cls, template: dict[str, Any] | None) -> dict[str, Any] | None:
        problem = template_problem(template)
        if problem:
            raise ValueError(problem)
        return template

    @model_validator(mode="after")
    def _teachers_fit_groups(self) -> Spec:
        k = self.distillation.teachers
        if isinstance(k, int) and k > self.groups - 1:
            raise ValueError(f"distillation.teachers: must be < groups ({self.groups}), got {k}")
        return self

    @property
    def world_size(self) -> int:
        """Processes in one group's DDP world."""
        return self.workers_per_group * self.nproc_per_worker


class Metadata(_Model):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    name: str = Field(..., min_length=1, max_length=63)
    namespace: str = Field("default", min_length=1, max_length=63, pattern=DNS1123_LABEL.pattern)
    generation: int = 1
    uid: str | None = None  # on a cluster: tells a re-created run from the one it replaces


class Codistillation(_Model):
    api_version: str = Field(f"{API_GROUP}/{API_VERSION}")
    kind: Literal["Codistillation"] = KIND
    metadata: Metadata
    spec: Spec = Field(default_factory=Spec)
    status: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _name_fits_jobs(self) -> Codistillation:
        name, expected = self.metadata.name, f"{API_GROUP}/{API_VERSION}"
        if self.api_version != expected:
            raise ValueError(f"apiVersion: must be {expected}, got {short(repr(self.api_version))}")
        longest = names.longest_name(name, self.spec.groups, self.spec.workers_per_group)
        if not DNS1035.fullmatch(name) or len(longest) > 63:
            raise ValueError(
                f"metadata.name: must be a lower-case DNS-1035 label short enough that the "
                f"Training Operator's Service {longest!r} has at most 63 characters"
            )
        return self

    def job_name(self, group: int) -> str:
        return names.job_name(self.metadata.name, group)

    def resolved(self) -> dict[str, Any]:
        """The fully defaulted manifest (what `run.json` holds), in the CR's field names."""
        return self.model_dump(by_alias=True, exclude={"status"}, mode="json")


def _list_of_mappings(node: dict[str, Any], key: str, where: str) -> str | None:
    items = node[key]
    if not isinstance(items, list):
        return f"{where}.{key}: must be a list of mappings, got {type(items).__name__}"
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            return f"{where}.{key}[{i}]: must be a mapping, got {type(item).__name__}"
    return None


def template_problem(template: dict[str, Any] | None) -> str | None:
    """What is wrong with the shape of a pod template (relative to `template`), or None.

    The job renderer reads the template's containers and their env (and the other lists below):
    they must be lists of mappings, not strings or numbers, or rendering would fail on them."""
    if not template:
        return None
    for key in ("metadata", "spec"):
        if template.get(key) is not None and not isinstance(template[key], dict):
            return f"{key}: must be a mapping, got {type(template[key]).__name__}"
    pod = template.get("spec") or {}
    for key in POD_LISTS:
        if key in pod and (found := _list_of_mappings(pod, key, "spec")):
            return found
    for i, container in enumerate(pod.get("containers") or []):
        for key in CONTAINER_LISTS:
            if key in container and (found := _list_of_mappings(
                    container, key, f"spec.containers[{i}]")):
                return found
    return None


def short(text: str, limit: int = ECHO_CHARS) -> str:
    """`text`, cut to `limit` characters, for an error message."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _field(loc: tuple[Any, ...], msg: str) -> tuple[str, str]:
    """The dotted CR path of an error; cross-field validators prefix their message with it."""
    parts = [str(p) for p in loc if not str(p).startswith(("function-", "int", "literal"))]
    head, sep, rest = msg.partition(": ")
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9.]*(\[\d+\][A-Za-z0-9.]*)*", head):
        parts, msg = parts + [head], rest
    return short(".".join(parts)), msg


def describe(err: ValidationError) -> str:
    """One clause per field, each starting with the field's path in the CR."""
    found: dict[str, list[str]] = {}
    for e in err.errors():
        field, msg = _field(e["loc"], e["msg"].removeprefix("Value error, "))
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        found.setdefault(field, []).append(msg)
        got = e.get("input")
        if e["type"] not in ("missing", "extra_forbidden") and not isinstance(got, dict):
            found[field].append(f"(got {short(repr(got))})")
    clauses = []
    for field, msgs in found.items():
        got = [m for m in msgs if m.startswith("(got ")][:1]
        text = " or ".join(dict.fromkeys(m for m in msgs if not m.startswith("(got ")))
        clauses.append(f"{field}: {' '.join([text, *got])}")
    if len(clauses) > MAX_CLAUSES:
        clauses[MAX_CLAUSES:] = [f"and {len(clauses) - MAX_CLAUSES} more"]
    return "; ".join(clauses)


def parse(doc: dict[str, Any], source: str = "manifest") -> Codistillation:
    """Validate one manifest dict; raise SpecError naming `source` and the field.

    JSON types are checked strictly, as the CRD's schema does (`"2"` is no integer, `"yes"` no
    boolean; an integer is a number): `codistill run` must not accept what `kubectl apply`
    refuses."""
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: expected a mapping with apiVersion, kind, metadata, spec")
    try:
        return Codistillation.model_validate(doc, strict=True)
    except ValidationError as e:
        raise SpecError(f"{source}: {describe(e)}") from None
    except RecursionError:
        raise SpecError(f"{source}: nested too deeply") from None


def load(path: str | Path) -> Codistillation:
    """Read and validate the one Codistillation in a YAML file."""
    return parse(read(path), str(path))


class _Loader(yaml.SafeLoader):
    """Safe YAML without aliases: `*name` would share one node in many places, so a small file
    (a "billion laughs") expands to gigabytes when the run spec is dumped to run.json. Nesting
    is bounded (MAX_DEPTH) for the same reason: what is read must also be written."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{short(str(event.anchor))}) are not allowed in a manifest",
                event.start_mark)
        if self.depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        # Last-wins would silently drop a value (`groups: 2` ... `groups: 64`); kubectl refuses
        # duplicate keys too. Merged keys (`<<`) may be overridden, as YAML intends.
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the base class refuses it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {short(repr(key))}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: Any) -> Any:
        # Python reads and writes (run.json) at most 4300 decimal digits; no field needs 1000
        if len(node.value) > MAX_INT_CHARS:
            raise yaml.constructor.ConstructorError(
                None, None, f"integer of {len(node.value)} characters is too long",
                node.start_mark)
        return super().construct_yaml_int(node)

    def construct_yaml_binary(self, node: Any) -> Any:
        # bytes are no JSON value: run.json and the CR could not hold them
        raise yaml.constructor.ConstructorError(
            None, None, "binary values (!!binary) are not allowed in a manifest", node.start_mark)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:binary", _Loader.construct_yaml_binary)


# YAML 1.1 reads `3e-4` (no dot) as a string; kubectl's YAML reader, and YAML 1.2, as a number.
# Strict types would then refuse `lr: 3e-4`, which `kubectl apply` accepts: read it as a float.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?([0-9][0-9_]*(\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _one_line(text: object) -> str:
    return short(" ".join(str(text).split()), 3 * ECHO_CHARS)


def read(path: str | Path) -> dict[str, Any]:
    """The one Codistillation document in a YAML file (others, e.g. Secrets, are skipped)."""
    path = Path(path)
    try:
        docs = [d for d in yaml.load_all(path.read_bytes(), Loader=_Loader) if d is not None]
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.reader.ReaderError as e:
        raise SpecError(f"{path}: not UTF-8/UTF-16 YAML text: {e.reason} at byte {e.position}"
                        ) from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8/UTF-16 YAML text: {e.reason}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        problem = _one_line(getattr(e, "problem", None) or e)
        raise SpecError(f"{path}:{line} malformed YAML: {problem}") from None
    runs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if len(runs) != 1:
        raise SpecError(f"{path}: expected exactly one document with kind: {KIND}, found {len(runs)}")
    return runs[0]
