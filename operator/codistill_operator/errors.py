"""What a reconcile can fail with, by how it is handled (kept apart so no module imports the
reconciler just to name its errors)."""

from __future__ import annotations

from codistill.spec import SpecError


class Retry(Exception):
    """Transient (a Secret not there yet, a bucket down, a name taken): try again later."""


class JobConflict(Exception):
    """A job has one of our names but another owner."""


class MissingSecret(SpecError):
    """The credentials Secret is missing, incomplete or not readable (RBAC): the user may still
    create it or grant the read."""
