"""The user's project folder: importable, and its config folder searched, for the duration of a command."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from searchlab.config.compose import USER_CONFIG_ENV


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """os.environ with these values for the duration of the block, restored afterwards (also variables it adds)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def project(config_dir: str | os.PathLike | None) -> Iterator[None]:
    """The user's project for the duration of a command: the current folder importable (as with `python -m`) and
    the config folder searched, in this process and in every process it starts (workers inherit the environment,
    DDP ranks sys.path). The environment is restored afterwards (the Python API runs commands in a long process)."""
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    values = {"PYTHONPATH": os.pathsep.join([here, *paths])}
    if config_dir is not None:
        values[USER_CONFIG_ENV] = os.path.abspath(config_dir)
    with environment(**values):
        yield
