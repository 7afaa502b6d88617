"""Tasks: GLUE (nine), SQuAD v1.1, masked-LM. ``get_task(name)`` returns a :class:`Task`."""

from __future__ import annotations

from .base import DataArgs, DataError, Task, TaskData

__all__ = ["DataArgs", "DataError", "Task", "TaskData", "get_task", "TASK_NAMES"]

GLUE_NAMES = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
TASK_NAMES = GLUE_NAMES + ("squad", "mlm")


def get_task(name: str) -> Task:
    """The task called ``name`` (case-insensitive; ``sst-2``/``sts-b`` spellings accepted).

    Raises:
        ValueError: unknown task name (the message lists the known ones).
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key in GLUE_NAMES:
        from .glue import GlueTask

        return GlueTask(key)
    if key == "squad":
        from .squad import SquadTask

        return SquadTask()
    if key == "mlm":
        from .mlm import MlmTask

        return MlmTask()
    raise ValueError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}")
