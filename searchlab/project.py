"""The user's project folder: importable, and its config folder searched, for the duration of a command."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from searchlab.config import USER_CONFIG_ENV


@contextlib.contextmanager
def project(config_dir: str | os.PathLike | None) -> Iterator[None]:
    """The user's project for the duration of a command: the current folder importable (as with `python -m`) and
    the config folder searched, in this process and in every process it starts (workers inherit the environment,
    DDP ranks sys.path). The environment is restored afterwards (the Python API runs commands in a long process)."""
    saved = {k: os.environ.get(k) for k in (USER_CONFIG_ENV, "PYTHONPATH")}
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *[p for p in paths if p != here]])
    if config_dir is not None:
        os.environ[USER_CONFIG_ENV] = os.path.abspath(config_dir)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
