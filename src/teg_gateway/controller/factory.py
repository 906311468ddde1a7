"""The runtime chosen by ``[controller] runtime``: both runtimes imported normally.

The Docker runtime module imports without the Docker SDK (it loads the SDK on first
use), so choosing the process runtime never needs the optional extra.
"""

from __future__ import annotations

from teg_gateway.clock import Clock
from teg_gateway.config import Settings
from teg_gateway.controller.docker_runtime import DockerRuntime
from teg_gateway.controller.process_runtime import ProcessRuntime
from teg_gateway.controller.runtime import ControllerRuntime
from teg_gateway.controller.versions import ControllerPlaces
from teg_gateway.store.state import StateFile


def make_runtime(settings: Settings, state: StateFile | None = None,
                 clock: Clock | None = None) -> ControllerRuntime | None:
    """The runtime chosen by ``[controller] runtime``; None for ``none``. A runtime gets
    the ``[controller]`` section and the places it uses, not the whole settings."""
    ctl = settings.controller
    places = ControllerPlaces.of(settings)
    if ctl.runtime == "process":
        return ProcessRuntime(ctl, places, state, clock=clock)
    if ctl.runtime == "docker":
        return DockerRuntime(ctl, places, clock=clock)
    return None
