"""The one error type for bad user input, in a module of its own so that every room can raise it: the built-in
`_target_`s (data, networks) and the base rooms sit below searchlab.config and must not import it."""

from __future__ import annotations


class ConfigError(Exception):
    """Bad user input: the CLI prints it as one line and exits with code 2, before any store is written."""
