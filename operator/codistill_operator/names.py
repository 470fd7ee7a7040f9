"""Names of the operator's own API objects, defined once (the run spec owns group/version/kind)."""

from codistill_trainer.spec import API_GROUP, API_VERSION, KIND

PLURAL = "codistillations"
COMPONENT = "codistill-operator"  # events' source, jobs' managed-by label
FINALIZER = f"{API_GROUP}/run-folder"  # only on runs with storage.onDelete: Delete
SPEC_HASH = f"{API_GROUP}/spec-hash"  # annotation on each job: the rendering it holds

__all__ = ["API_GROUP", "API_VERSION", "KIND", "PLURAL", "COMPONENT", "FINALIZER", "SPEC_HASH"]
