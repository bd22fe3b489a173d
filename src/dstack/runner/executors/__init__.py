"""Executors run a job's commands: in a Docker container when the job has an image, else on the host."""

from dstack.runner.executors.base import (
    Execution,
    Executor,
    ExecutorError,
    Mount,
    OutputCallback,
    pick_free_ports,
)

__all__ = ["Execution", "Executor", "ExecutorError", "Mount", "OutputCallback", "pick_free_ports"]
