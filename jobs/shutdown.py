"""How the ``python -m jobs.<name>`` commands end: Ray let go by the command itself after a success.

Why: Ray's exit hook (``atexit``) first sleeps 0.5 s, so that the last lines of the workers' logs reach the console,
then disconnects (and stops a Ray this process started). After a job that succeeded its output is committed and its
summary printed, so the sleep only holds back the shell and every scripted run of the command: on the 2-core test
machine a joined classify job took 1.2-1.5 s from the end of its work to the exit of its process through the hook,
0.9 s with the disconnect here (the test suite runs dozens of such commands). After a failure the hook keeps its
sleep: the workers' last error lines are worth half a second.
"""

from __future__ import annotations

import sys
from typing import NoReturn


def exit_after(code: int) -> NoReturn:
    """``sys.exit(code)``, disconnecting from Ray (or stopping the Ray this process started) first when ``code`` is 0."""
    if code == 0:
        release_ray()
    sys.exit(code)


def release_ray() -> None:
    """``ray.shutdown()`` when this process is connected to Ray; nothing when it never imported Ray."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
