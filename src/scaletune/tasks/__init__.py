"""Tasks, registered by name: importing this package registers causal_lm, dpo, kto, reward, seq_cls,
token_cls and seq_regression."""

from . import causal_lm, dpo, kto, reward, seq_cls, seq_regression, token_cls  # noqa: F401  (registration side effect)
from .base import IGNORE, TASKS, Task, get_task

__all__ = ["IGNORE", "TASKS", "Task", "get_task"]
