"""Tasks, one module each; importing this package registers every one of them.

Adding a task means adding a module here (and its test entry): nothing else is edited.
"""

import importlib
import pkgutil

from paretoray.actors.tasks.base import (
    Sample,
    Task,
    TaskConfig,
    TaskInputError,
    UnknownTaskError,
    available_tasks,
    build_task,
    register_task,
    task_class,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "haystack", "cache"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Sample",
    "Task",
    "TaskConfig",
    "TaskInputError",
    "UnknownTaskError",
    "available_tasks",
    "build_task",
    "register_task",
    "task_class",
]
