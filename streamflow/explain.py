"""`Explain.workflow_step`: why a step is where it is."""

from __future__ import annotations

from ledger import operations
from ledger.db import Repo
from ledger.explain import DependencySnapshot, StepExplanation

__all__ = ["DependencySnapshot", "Explain", "StepExplanation"]


class Explain:
    @staticmethod
    def workflow_step(workflow_id: str, step: str, *, repo: Repo) -> StepExplanation:
        """The step's raw state, operator label, blocker codes and dependency snapshot."""
        return operations.explain(repo, workflow_id, step)
