"""The one place that uses MONAI Label's (and Starlette's) private or internal API, where no public hook exists.

Checked against monailabel ``MONAILABEL_VERSION`` (``tests/test_monailabel_private.py`` fails on another version,
naming what to check again):

- ``BasicTrainTask._create_network_and_optimizer``, ``_create_evaluator``, ``_create_trainer``, ``_device``: the
  train task needs its own engine (nine optimizer steps per batch on different parameter groups, gradients averaged
  by the iteration, so no ``DistributedDataParallel`` wrapper; validation is the paper's prompting protocol, not an
  evaluator; CPU whenever CUDA is absent). :class:`TrainTaskHooks` maps them to public methods of the task.
- ``monailabel.utils.async_tasks``: the retraining scheduler starts train and scoring tasks as ``POST /train`` and
  ``POST /scoring`` do, and reads their states, through :func:`start_task` and :func:`task_states`.
- ``monailabel.app.app`` and Starlette's ``middleware_stack``: the HTTP guard (token, CORS, size limits, worker
  threads) goes in front of the running server through :func:`running_server_app` and :func:`wrap_running_app`;
  MONAI Label builds its FastAPI app before it loads an app and offers no middleware hook.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

MONAILABEL_VERSION = "0.8.5"


class TrainTaskHooks:
    """Mixin for a ``BasicTrainTask`` (put it first among the bases): MONAI Label's private construction steps call
    the task's public :meth:`create_network` and :meth:`create_trainer`; no evaluator is created; without CUDA the
    device is the CPU (MONAI Label's own choice assumes a GPU)."""

    def create_network(self, context: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        raise NotImplementedError

    def create_trainer(self, context: Any) -> Any:
        raise NotImplementedError

    def _create_network_and_optimizer(self, context: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        return self.create_network(context)

    def _create_evaluator(self, context: Any) -> None:
        return None

    def _create_trainer(self, context: Any) -> Any:
        return self.create_trainer(context)

    def _device(self, context: Any) -> torch.device:
        return super()._device(context) if torch.cuda.is_available() else torch.device("cpu")  # type: ignore[misc]


def start_task(kind: str, request: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """Start a MONAI Label background task (``train``, ``scoring``) as its REST endpoint does: ``(task, detail)``."""
    from monailabel.utils.async_tasks.task import AsyncTask

    return AsyncTask.run(kind, request=dict(request), params=dict(params) if params is not None else None)


def task_states(kind: str) -> list[dict[str, Any]]:
    """The records of MONAI Label's background tasks of one kind (``status``, ``id``, ...)."""
    from monailabel.utils.async_tasks.utils import tasks

    return list(tasks(kind))


def running_server_app() -> Any | None:
    """MONAI Label's FastAPI app in the server process, ``None`` elsewhere (training and scoring subprocesses)."""
    server = sys.modules.get("monailabel.app")
    return None if server is None else server.app


def wrap_running_app(app: Any, wrap: Callable[[Any], Any]) -> None:
    """Put middleware (``wrap(stack)``) in front of a Starlette/FastAPI ``app``, running or not.

    An app that has served (its lifespan runs inside the built middleware stack, and MONAI Label creates the
    MONAI Label app there) can no longer ``add_middleware``; the stack is built again (so exception handlers added
    since take effect) and wrapped, which is equivalent.
    """
    app.middleware_stack = wrap(app.build_middleware_stack())
