"""The `status` of a Codistillation, typed once: the CRD's status schema is generated from these
models and the operator writes nothing else, so `kubectl describe` and the schema cannot drift."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Phase = Literal["Pending", "Running", "Suspended", "Degraded", "Succeeded", "Failed", "Invalid"]
GroupPhase = Literal[
    "Missing", "Pending", "Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed"
]
ConditionType = Literal["Ready", "Running", "Distilling", "Degraded", "Succeeded", "Failed"]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Condition(_Model):
    type: ConditionType = Field(..., description="Condition type.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., description="One CamelCase word saying why.")
    message: str = Field("", description="What happened, for people.")
    last_transition_time: str = Field(
        ...,
        description="When status last changed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    observed_generation: int | None = Field(
        None, description="metadata.generation this condition was computed from."
    )


class GroupStatus(_Model):
    group: int = Field(..., description="Group index, 0..groups-1.")
    job: str = Field(..., description="The group's TrainJob or PyTorchJob.")
    phase: GroupPhase = Field("Pending", description="From the job's conditions.")
    state: str | None = Field(None, description="The trainer's own state, from progress.json.")
    step: int = Field(0, description="Last step the group reported.")
    steps: int | None = Field(None, description="Steps the group will train.")
    loss: float | None = Field(None, description="Training loss (task + weighted distillation).")
    task_loss: float | None = Field(None, description="Task loss alone.")
    distill_loss: float | None = Field(None, description="Distillation loss alone.")
    eval_loss: float | None = Field(None, description="Latest loss on the eval set.")
    teachers: dict[str, int] = Field(
        default_factory=dict, description="Peer group -> the published step it distills from."
    )
    staleness: dict[str, int] = Field(
        default_factory=dict, description="Peer group -> how many steps that teacher is behind."
    )
    stale_peers: list[str] = Field(
        default_factory=list, description="Peers behind by more than maxStalenessSteps."
    )
    last_published: int | None = Field(None, description="Last step published for the peers.")
    restarts: int = Field(
        0, description="Times the group restarted: counted by its trainer on every resume, or "
        "seen in the job's conditions, whichever is more."
    )
    examples_per_sec: float | None = Field(None, description="Training throughput.")
    progress_time: str | None = Field(None, description="When progress.json was last written.")
    warnings: list[str] = Field(default_factory=list, description="The trainer's warnings.")
    message: str | None = Field(None, description="The job's latest condition message.")


class Applied(_Model):
    generation: int = Field(..., description="metadata.generation that is applied to the jobs.")
    fields: dict[str, Any] = Field(
        default_factory=dict,
        description="Values in force of the fields that cannot change under a running job.",
    )
    backend: Literal["trainjob", "pytorchjob"] = Field(
        "pytorchjob", description="The kind of the run's jobs: TrainJob or PyTorchJob."
    )
    burn_in_steps: int = Field(0, description="distillation.burnInSteps in force.")
    max_staleness_steps: int = Field(
        1000, description="distillation.maxStalenessSteps in force."
    )


class RunStatus(_Model):
    phase: Phase = Field("Pending", description="Run phase, from the groups' jobs.")
    observed_generation: int | None = Field(
        None, description="metadata.generation the operator last reconciled."
    )
    step: int | None = Field(None, description="Slowest group's step.")
    loss: float | None = Field(None, description="Mean training loss over the groups.")
    groups_ready: str | None = Field(None, description="Groups running or done, of all groups.")
    bucket: str | None = Field(None, description="The run folder (CODISTILL_RUN_URL).")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Running, Distilling, Degraded, Succeeded, Failed.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    groups: list[GroupStatus] = Field(default_factory=list, description="One entry per group.")
    applied: Applied | None = Field(None, description="What the jobs and run.json hold.")

    def condition(self, kind: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)
