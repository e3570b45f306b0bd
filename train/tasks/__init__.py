"""Task registry: ``get_task(name)``; tasks are added by registering a :class:`Task` subclass."""

from __future__ import annotations

from .base import Task

_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    _TASKS[cls.name] = cls
    return cls


def list_tasks() -> list[str]:
    _load()
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    from ..config import ConfigError

    _load()
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}. Fix: use one of {', '.join(sorted(_TASKS))}")
    return _TASKS[name]()


def _load() -> None:
    from . import ave, avqa, avs, avvp  # noqa: F401  (each registers itself)


__all__ = ["Task", "get_task", "list_tasks", "register_task"]
