"""Shared test set-up: ROS 2 traffic stays on this machine, in a DDS domain of this run's own.

Markers (pytest.ini): `ros` tests need rclpy and hiera_perception_msgs, `ros_launch` tests the launch stack. Where
those don't import they skip, except when HIERA_PERCEPTION_REQUIRE_ROS / _LAUNCH is 1 (`make test`, so CI),
where a missing piece fails the test instead of hiding it.
Fixtures: `ros_context` (an initialised rclpy Context of the test's own) and `spin_until`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Iterator

import pytest

# Set before any test imports rclpy. Discovery on localhost only, always; the domain is kept when the caller chose one.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 101 + 1))

# marker -> (modules it needs, environment variable that makes them required)
_NEEDS = {
    "ros": (("rclpy", "hiera_perception_msgs"), "HIERA_PERCEPTION_REQUIRE_ROS"),
    "ros_launch": (("rclpy", "launch", "launch_ros", "launch_testing"), "HIERA_PERCEPTION_REQUIRE_LAUNCH"),
}


def _missing(modules: tuple[str, ...]) -> list[str]:
    # find_spec only locates the top-level package; it imports nothing heavy at collection time.
    return [m for m in modules if importlib.util.find_spec(m) is None]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker, (modules, require_var) in _NEEDS.items():
        if os.environ.get(require_var) == "1":
            continue  # required: a missing module fails the test with its ImportError
        missing = _missing(modules)
        if not missing:
            continue
        skip = pytest.mark.skip(reason=f"{marker} test: {', '.join(missing)} not importable")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread per test process: on 2 cores, the test, the nodes it starts and the OS share them, and
    threads spinning against each other cost far more than a second thread gains (measured: ~3x wall time)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def own_ros_domain() -> Iterator[str]:
    """A DDS domain for one test module alone, on localhost (request it before any rclpy.init there)."""
    import random

    saved = {k: os.environ.get(k) for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE")}
    os.environ["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(60, 90))
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    yield os.environ["ROS_DOMAIN_ID"]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def ros_context() -> Iterator[object]:
    """An initialised rclpy Context for one test, shut down afterwards (nodes made on it die with it)."""
    import rclpy

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        context.try_shutdown()


@pytest.fixture
def spin_until() -> Callable[..., bool]:
    """`spin_until(executor, predicate, timeout_s=10.0)`: spin until predicate() is true; returns whether it was."""

    from ros_helpers import spin_until

    return spin_until


@pytest.fixture(scope="session")
def always_wave(tmp_path_factory):
    """A checkpoint of the tiny Hiera that predicts "wave" (ACTIONS[0]) for every clip: a zero head with the largest
    bias on class 0; labels ACTIONS, id always_wave, version 3, trained at 0.1 s between frames."""
    import torch

    from hiera_perception.checkpoint import save_checkpoint
    from hiera_perception.config import get_config
    from hiera_perception.model import Hiera
    from hiera_perception.synth import ACTIONS

    torch.manual_seed(0)
    model = Hiera(get_config("hiera_tiny_8x64", num_classes=len(ACTIONS)))
    with torch.no_grad():
        model.head.projection.weight.zero_()
        model.head.projection.bias.copy_(torch.linspace(1.0, 0.0, len(ACTIONS)))
    path = tmp_path_factory.mktemp("models") / "wave.pt"
    save_checkpoint(path, model, labels=list(ACTIONS), model_id="always_wave", version=3,
                    extra={"sampling": {"frame_stride_s": 0.1}})
    return path
