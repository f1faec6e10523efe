"""The `tidings` command line (docs/cli.md).

tidings [--log-level LEVEL] [--log-format text|json] COMMAND ...   (or the options after COMMAND)

    run package.module:bus [--transport URL] [--concurrency N]
    relay package.module:bus [--transport URL]
    tables create package.module:bus
    topology package.module:bus [--json]
    dead-letters list|show ID|replay ID...|replay --all|purge --service NAME [--transport URL]
    asyncapi package.module:bus ... [--transport URL] [--yaml]
    saga diagram package.module:SagaClass
    dashboard [--transport URL] [--store URL] [--host 127.0.0.1] [--port 8088]
    verify --transport URL [--database URL] [--messages N] [--producers P] [--consumers C] ...

Each command is a module with `add_command(commands)`, which adds its parser to the subparsers and
sets `run`, the function that carries it out (`args -> exit code`); `main` parses, configures
logging and calls it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from tidings.cli import asyncapi, dashboard, dead_letters, saga, tables, topology, verify, worker
from tidings.errors import TidingsError
from tidings.logs import JsonLines, MessageFields

__all__ = ["main"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in `--help`; an option whose default is "not given" says its default in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """The parser of `tidings` and of each command under it (subparsers take their parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _logging_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--log-level and --log-format; below the top level they default to what the top level says."""

    def below(default: str) -> str:
        return "" if defaults else f" (default: as given before the command, else {default})"

    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO" if defaults else argparse.SUPPRESS,
        metavar="LEVEL",
        help=f"what is logged, to stderr: {', '.join(LOG_LEVELS)} (any case)" + below("INFO"),
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text" if defaults else argparse.SUPPRESS,
        help="text lines, or one JSON object a line with the message's fields (docs/cli.md)" + below("text"),
    )


def _share_logging_options(commands: argparse._SubParsersAction[Any]) -> None:
    """Let every command (and sub-command) take the logging options after its name too."""
    for command in commands.choices.values():
        _logging_options(command, defaults=False)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _share_logging_options(action)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tidings", description="The tidings service bus (docs/cli.md).")
    _logging_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    worker.add_command(commands)
    tables.add_command(commands)
    topology.add_command(commands)
    dead_letters.add_command(commands)
    asyncapi.add_command(commands)
    saga.add_command(commands)
    verify.add_command(commands)
    dashboard.add_command(commands)
    _share_logging_options(commands)  # after every add_command: it reaches the commands added
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler()  # stderr
    if args.log_format == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # On the handler, so the application's own records inside a handler get the message's
    # fields (and trace ids) too, not only tidings' (whose loggers have the filter already).
    handler.addFilter(MessageFields())
    logging.basicConfig(level=args.log_level, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tidings` command; returns the exit code."""
    args = _parser().parse_args(argv)
    _configure_logging(args)
    try:
        code: int = args.run(args)
    except worker.UserCodeFailed as error:
        print(f"tidings: {error}\n\n{error.traceback}", file=sys.stderr, end="")
        return 2
    except TidingsError as error:
        print(f"tidings: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130  # a Ctrl-C outside the worker's own signal handling (a prompt, an import)
    return code
