"""TracIn math on tensors. Imports torch, numpy and pandas only — never an orchestration or
tracking library — so it runs on a bare GPU box."""

from tracin_tasks.core.checkpoint import Checkpoint
from tracin_tasks.core.tracin import CheckpointPass, TopInfluence, TracIn

__all__ = ["Checkpoint", "CheckpointPass", "TopInfluence", "TracIn"]
