"""The `searchlab` command: parses the arguments and calls searchlab.commands. Wiring only.

Heavy packages (torch, Lightning, MLflow, Optuna) are imported only once the arguments and the composed config have
passed their checks, so `--help` answers at once and a misspelt key or option is reported in about a second. Bad
input of any kind ends here as one line on stderr and exit code 2, before any store is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

EXIT_BAD_INPUT = 2
EXIT_STUDY_FAILED = 1
EXIT_INTERRUPTED = 130

COMMANDS = {
    "search": "run or resume the study named by study.name (workers=N: N processes)",
    "worker": "join the study named by study.name and run its trials in this process",
    "train": "train one configuration, no study, and print its metrics",
    "report": "write the report of the study named by study.name (HTML, PNGs, MLflow)",
    "best": "print the best trial's full config as YAML and as a command line",
    "storage-proxy": "serve study.storage (postgresql://...) to workers as grpc://HOST:PORT",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="searchlab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, helptext in COMMANDS.items():
        sub = commands.add_parser(name, help=helptext, description=helptext + ". Arguments are Hydra overrides.")
        sub.add_argument("-cd", "--config-dir", metavar="DIR",
                         help="a folder of your own config groups (model/, search/, ...): its options add to the "
                              "built-in ones and replace those of the same name")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optimizer=adam trainer.max_epochs=5")
    return parser


def use_project(config_dir: str | None) -> None:
    """The user's project: the current folder importable (as with `python -m`) and the config folder searched, in
    this process and in every process it starts (workers inherit the environment; DDP ranks, sys.path)."""
    from searchlab.config import USER_CONFIG_ENV

    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if here not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([here, *[p for p in paths if p]])
    if config_dir is not None:
        os.environ[USER_CONFIG_ENV] = os.path.abspath(config_dir)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from searchlab.config import ConfigError, compose_config, redact, validate_config

    try:
        use_project(args.config_dir)
        validate_config(compose_config(args.overrides))  # the fast checks, before the heavy imports
        from searchlab import commands

        if args.command in ("search", "worker"):
            result = commands.search(args.overrides, as_worker=args.command == "worker")
            return {"KILLED": EXIT_INTERRUPTED, "FAILED": EXIT_STUDY_FAILED}.get(result.status, 0)
        if args.command == "train":
            commands.train(args.overrides)
            return 0
        run = {"report": commands.report, "best": commands.best_config, "storage-proxy": commands.storage_proxy}
        return run[args.command](args.overrides)
    except ConfigError as err:
        print(f"searchlab: error: {redact(str(err))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
