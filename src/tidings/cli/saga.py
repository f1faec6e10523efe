"""`tidings saga diagram package.module:SagaClass`: the saga's Mermaid diagram, from its declarations.

Nothing is connected to and no bus is needed: the class's `starts`/`handles`/`timeout` steps, their
`during=`/`to=` states and its `final=` states are all the diagram is drawn from (docs/sagas.md).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from tidings.errors import ConfigurationError
from tidings.sagas.declarations import definition_of
from tidings.sagas.diagram import mermaid

__all__ = ["add_command", "load_saga"]


def add_command(commands: Any) -> None:
    """Add `saga` to the `tidings` command's subparsers."""
    parser = commands.add_parser("saga", help="describe a saga class (its Mermaid diagram)")
    actions = parser.add_subparsers(dest="action", required=True)
    diagram = actions.add_parser(
        "diagram",
        help="print the saga's Mermaid state diagram",
        description="Print a Mermaid diagram of the saga, drawn from its declarations: a state "
        "diagram when its steps name states (during=, to=, final=), else a flowchart of the "
        "messages it takes. Paste it into a ```mermaid block.",
    )
    diagram.add_argument("saga", help="the saga class, as package.module:ClassName")
    diagram.set_defaults(run=_diagram)


def _diagram(args: argparse.Namespace) -> int:
    sys.stdout.write(mermaid(definition_of(load_saga(args.saga))))
    return 0


def load_saga(path: str) -> type:
    """Import `package.module:ClassName` (the working directory first, as `tidings run` does)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"expected package.module:ClassName, got {path!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ConfigurationError(f"no module {error.name}") from None
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ConfigurationError(f"module {module_name} has no attribute {attribute!r}")
        found = getattr(found, part)
    definition_of(found)  # a ConfigurationError for anything but a Saga subclass
    return found  # type: ignore[no-any-return]
