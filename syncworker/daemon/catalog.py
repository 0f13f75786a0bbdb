"""What the worker runs, as one frozen snapshot: settings, jobs, their
resolved steps and their scopes. Replaced whole (a reload, a scopes_sql
refresh), never changed in place: a claim or a run that took the snapshot
goes on with the steps it saw, whatever a reload does meanwhile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from syncworker.config import JobConfig, Settings
from syncworker.steps import Step, resolve_job_steps
from syncworker.triggers import JobInfo

Scopes = Mapping[str, tuple[str, ...] | None]


@dataclass(frozen=True)
class Snapshot:
    settings: Settings
    steps: Mapping[str, Sequence[Step]]
    scopes: Scopes
    # Derived from the above, once per snapshot.
    job_info: Mapping[str, JobInfo] = field(init=False)
    claimable: Sequence[str] = field(init=False)  # the enabled jobs
    first_steps: Mapping[str, str] = field(init=False)  # job -> its first step's name

    def __post_init__(self) -> None:
        jobs = self.settings.jobs
        info = {
            name: JobInfo(
                enabled=job.enabled,
                scopes=self.scopes.get(name) if (job.scopes or job.scopes_sql) else None,
            )
            for name, job in jobs.items()
        }
        object.__setattr__(self, "job_info", info)
        object.__setattr__(self, "claimable", [n for n, j in jobs.items() if j.enabled])
        first = {job: steps[0].name for job, steps in self.steps.items() if steps}
        object.__setattr__(self, "first_steps", first)

    @property
    def jobs(self) -> Mapping[str, JobConfig]:
        return self.settings.jobs

    def with_scopes(self, scopes: Scopes) -> Snapshot:
        return dataclasses.replace(self, scopes=dict(scopes))

    def with_job_scopes(self, name: str, scopes: tuple[str, ...]) -> Snapshot:
        return self.with_scopes({**self.scopes, name: scopes})


def resolve(settings: Settings, config_source: str) -> Snapshot:
    """Import every job's steps now (a bad step is a ConfigError, all or
    nothing); the scopes are the configured ones until the database's."""
    steps = {
        name: resolve_job_steps(name, job, config_source, settings.database_url)
        for name, job in settings.jobs.items()
    }
    return Snapshot(settings, steps, {name: job.scopes for name, job in settings.jobs.items()})


class Catalog:
    """The snapshot in force: its one owner."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.now = snapshot

    def replace(self, snapshot: Snapshot) -> None:
        self.now = snapshot
