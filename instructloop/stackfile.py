"""``<run-dir>/stack.json``: what ``instructloop up`` tells its clients (the labeler, tests, benchmarks).

The launcher writes it once every component is healthy and removes it on stop; readers parse it with
``StackFile.read``, so the keys are spelled once.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

STACK_FILE_NAME = "stack.json"
LEARNER_STATE_SUBDIR = "learner"
"""``<run-dir>/learner``: the learner's state folder (dataset, checkpoints) in a stack ``up`` started."""


class ComponentInfo(BaseModel):
    pid: int | None = None
    """The current process (a new one after each restart)."""
    url: str | None = None
    log: str
    restarts: int = 0
    """How many times ``up`` restarted this component after a crash."""
    healthy: bool = True
    """False between a crash and the restarted process answering its health check."""


class StackFile(BaseModel):
    gateway_url: str
    keys_file: str
    run_dir: str
    up_pid: int
    components: dict[str, ComponentInfo]

    @staticmethod
    def path(run_dir: Path) -> Path:
        return Path(run_dir) / STACK_FILE_NAME

    @classmethod
    def read(cls, run_dir: Path) -> StackFile:
        """Parse ``<run_dir>/stack.json``; FileNotFoundError when the stack is not up."""
        return cls.model_validate_json(cls.path(run_dir).read_text())

    def write(self, run_dir: Path) -> Path:
        """Write atomically (a reader never sees half a file)."""
        target = self.path(run_dir)
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, target)
        return target
