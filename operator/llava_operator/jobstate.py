"""One stage attempt's state as the plan sees it, whatever runs the attempt.

Each backend reads its own kind of child into a JobState (a PyTorchJob's conditions, a local
process group's exit status); the plan decides from JobStates only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class JobPhase(StrEnum):
    CREATED = "Created"
    """Exists; no process has started yet (pods pending scheduling or images)."""
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        return self in (JobPhase.SUCCEEDED, JobPhase.FAILED)


@dataclass(frozen=True)
class JobState:
    """What the plan needs to know about one child."""

    phase: JobPhase
    reason: str = ""
    message: str = ""
    """Why it ended, as the backend tells it (for a failure: the first thing to read)."""
    start_time: str | None = None
    completion_time: str | None = None
    failed_replica: str | None = None
    """Replica type (Master/Worker) with failed pods, for backends that have replicas."""
    suspended: bool = False
    """The child's own suspension flag as it holds it now (set by us or by a queue)."""
    started: bool = False
    """A process of this attempt has run: from then on the attempt is the stage's, edits or not."""
