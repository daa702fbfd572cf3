"""MONAI Label's private API that the app uses (``apps/sam_med2d/monailabel_private.py``) is still there, as checked.

On another MONAI Label version this fails first, naming the module to check again, instead of the server failing at
run time in a training subprocess or a middleware rebuild.
"""

from __future__ import annotations

import inspect

import monailabel
from monailabel.tasks.train.basic_train import BasicTrainTask
from starlette.applications import Starlette

from apps.sam_med2d.monailabel_private import MONAILABEL_VERSION, TrainTaskHooks, wrap_running_app
from trainers.sam_med2d_train import SamMed2DTrain


def test_the_pinned_monailabel_version_is_installed() -> None:
    assert monailabel.__version__ == MONAILABEL_VERSION, (
        f"monailabel {monailabel.__version__} installed; apps/sam_med2d/monailabel_private.py was checked against "
        f"{MONAILABEL_VERSION}: check each private API it lists, then update MONAILABEL_VERSION"
    )


def test_the_private_train_hooks_exist_with_the_expected_signatures() -> None:
    for name in ("_create_network_and_optimizer", "_create_evaluator", "_create_trainer", "_device"):
        hook = getattr(BasicTrainTask, name)
        assert list(inspect.signature(hook).parameters) == ["self", "context"], name
        assert getattr(SamMed2DTrain, name) is getattr(TrainTaskHooks, name), f"{name} is overridden elsewhere"


def test_the_task_queue_functions_exist() -> None:
    from monailabel.utils.async_tasks.task import AsyncTask
    from monailabel.utils.async_tasks.utils import tasks

    assert list(inspect.signature(AsyncTask.run).parameters)[:3] == ["method", "request", "params"]
    assert list(inspect.signature(tasks).parameters) == ["method"]


def test_middleware_goes_in_front_of_a_built_app() -> None:
    app = Starlette()
    seen = []

    def wrap(stack):
        async def guarded(scope, receive, send):
            seen.append(scope["path"])
            await stack(scope, receive, send)

        return guarded

    wrap_running_app(app, wrap)
    from starlette.testclient import TestClient

    assert TestClient(app).get("/absent").status_code == 404 and seen == ["/absent"]
