"""A run's (or a step's) record counters, as stored in `runs` and `run_steps`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

COUNTERS = ("processed", "inserted", "updated", "deleted", "errored")


@dataclass
class Counters:
    total: int | None = None
    processed: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    errored: int = 0

    def as_params(self) -> dict[str, Any]:
        return dict(vars(self))
