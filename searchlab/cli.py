"""The `searchlab` command: parses the arguments and calls searchlab.commands. Wiring only.

Heavy packages (torch, Lightning, MLflow, Optuna) are imported only once the arguments and the composed config have
passed their checks, so `--help` answers at once and a misspelt key or option is reported in about a second. Bad
input of any kind ends here as one line on stderr and exit code 2, before any store is written.
"""

from __future__ import annotations

import argparse
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
    "ablate": "re-train study.name's finalists and one-factor variants of its winner over seeds: which techniques "
              "mattered",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="searchlab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, helptext in COMMANDS.items():
        sub = commands.add_parser(name, help=helptext, description=helptext + ". Arguments are Hydra overrides.")
        sub.add_argument("-cd", "--config-dir", metavar="DIR",
                         help="a folder of your own config groups (model/, search/, ...): its options add to the "
                              "built-in ones and replace those of the same name")
        if name in ("train", "best"):
            sub.add_argument("--export", metavar="DIR", help="also write the trained model (best epoch) to the new "
                                                             "folder DIR as an MLflow model")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optimizer=adam trainer.max_epochs=5")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from searchlab.config import ConfigError, project, redact
    from searchlab.interrupts import EXIT_TERMINATED, sigterm_as_interrupt, terminated

    try:
        with sigterm_as_interrupt(), project(args.config_dir):
            code = _run(args.command, args.overrides, getattr(args, "export", None))
    except ConfigError as err:
        print(f"searchlab: error: {redact(str(err))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("terminated (SIGTERM)" if terminated() else "interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    # SIGTERM (a preemption, `kill`, SLURM's --signal=TERM) stops as Ctrl-C does, with the exit code of SIGTERM.
    return EXIT_TERMINATED if code == EXIT_INTERRUPTED and terminated() else code


def _run(command: str, overrides: list[str], export: str | None = None) -> int:
    from searchlab.config import compose_config, validate_config

    validate_config(compose_config(overrides))  # the fast checks, before the heavy imports
    import searchlab.commands  # noqa: F401 (the heavy imports, Optuna's among them: warnings_once takes its warnings)
    from searchlab.quiet import warnings_once

    with warnings_once():  # library warnings once per study, one line each
        return _command(command, overrides, export)


def _command(command: str, overrides: list[str], export: str | None = None) -> int:
    from searchlab import commands

    if command in ("search", "worker"):
        result = commands.search(overrides, as_worker=command == "worker")
        return {"KILLED": EXIT_INTERRUPTED, "FAILED": EXIT_STUDY_FAILED}.get(result.status, 0)
    if command == "train":
        commands.train(overrides, export_dir=export)
        return 0
    if command == "best":
        return commands.best_config(overrides, export_dir=export)
    if command == "ablate":
        from searchlab.ablate import ablate

        return ablate(overrides)
    run = {"report": commands.report, "best": commands.best_config, "storage-proxy": commands.storage_proxy}
    return run[command](overrides)


if __name__ == "__main__":
    sys.exit(main())
