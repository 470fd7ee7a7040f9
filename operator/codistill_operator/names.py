"""Names private to the operator; shared ones (API group, labels, env) are in codistill.names."""

from codistill.names import API_GROUP, MANAGED_BY

COMPONENT = MANAGED_BY  # events' source component
FINALIZER = f"{API_GROUP}/run-folder"  # only on runs with storage.onDelete: Delete
SPEC_HASH = f"{API_GROUP}/spec-hash"  # annotation on each job: the rendering it holds
# On each TrainJob: the hash of its immutable part (all of its spec but suspend); when it changes,
# the job is replaced instead of patched.
RECREATE_HASH = f"{API_GROUP}/recreate-hash"
