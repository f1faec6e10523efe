"""A small user package for the command-line tests, written into a test's working directory.

`shop/basket.py` is a service whose bus names no transport (so `$TIDINGS_TRANSPORT` and
`--transport` apply); `shop/web.py` a producer with a database and no handlers (`tidings relay`,
`tidings tables`); `shop/pinned.py` a bus whose code names its transport; `shop/broken.py` and
`shop/boom.py` fail on import, the way user code does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tidings import Command, Event

BASKET = """
import asyncio
import logging
import os

from tidings import Bus, Command, Context, Event, RetryPolicy


class PriceChanged(Event, name="shop.price-changed"):
    product_id: int


class Checkout(Command, name="shop.checkout"):
    buyer: str


bus = Bus(
    "basket",
    shutdown_grace=float(os.environ.get("APP_GRACE", "30")),
    retry=RetryPolicy.none(),
)


@bus.subscribe(PriceChanged)
async def reprice(event: PriceChanged, ctx: Context) -> None: ...


@bus.handle(Checkout)
async def checkout(command: Checkout, ctx: Context) -> None:
    logging.getLogger("shop").info("checking out %s", command.buyer)
    with open(os.environ["APP_OUT"], "a") as out:
        out.write(f"started {command.buyer}\\n")
    if command.buyer == "mallory":
        raise ValueError(f"no basket for {command.buyer}")
    await asyncio.sleep(float(os.environ.get("APP_SLEEP", "0")))
    with open(os.environ["APP_OUT"], "a") as out:
        out.write(f"done {command.buyer}\\n")
"""

WEB = """
import os

from sqlalchemy.ext.asyncio import create_async_engine

from tidings import Bus

engine = create_async_engine(f"sqlite+aiosqlite:///{os.environ['APP_DB']}")
bus = Bus("web", database=engine)
"""

PINNED = """
from tidings import Bus

bus = Bus("pinned", "memory://pinned")
"""

BROKEN = """
import shop.basket
import a_library_nobody_installed
"""

BOOM = """
def configure():
    raise RuntimeError("SHOP_SECRET is not set")


configure()
"""


class PriceChanged(Event, name="shop.price-changed"):
    product_id: int


class Checkout(Command, name="shop.checkout"):
    buyer: str


def write_shop(directory: Path) -> None:
    """Write the `shop` package into `directory`."""
    package = directory / "shop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in {
        "basket": BASKET,
        "web": WEB,
        "pinned": PINNED,
        "broken": BROKEN,
        "boom": BOOM,
    }.items():
        (package / f"{name}.py").write_text(text)


def environment(**extra: str) -> dict[str, str]:
    """This process's environment without `PYTHONPATH` and `TIDINGS_TRANSPORT`, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TIDINGS_TRANSPORT")}
    return {**env, **extra}


#: `python -P -m tidings`: -P keeps Python from putting the working directory on `sys.path`
#: itself, so that finding the user's package there is the command's own doing.
COMMAND = [sys.executable, "-P", "-m", "tidings"]


def tidings(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the `tidings` command to its end in `cwd`."""
    return subprocess.run(
        [*COMMAND, *args],
        cwd=cwd,
        env=env if env is not None else environment(),
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
