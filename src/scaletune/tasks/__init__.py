"""Tasks, registered by name: importing this package registers causal_lm, seq_cls and token_cls."""

from . import causal_lm, seq_cls, token_cls  # noqa: F401  (registration side effect)
from .base import IGNORE, TASKS, Task, get_task

__all__ = ["IGNORE", "TASKS", "Task", "get_task"]
