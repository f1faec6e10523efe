"""`tidings run`: finding the user's bus, `--transport`, the start and stop lines; the parser.

Every command runs as a real process in a working directory holding the `shop` package, with no
`PYTHONPATH` (tests/cli/shop.py).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.shop import COMMAND, Checkout, environment, tidings, write_shop
from tests.helpers import eventually
from tidings import Bus


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    """A working directory with the `shop` package in it."""
    write_shop(tmp_path)
    return tmp_path


async def start_worker(cwd: Path, *args: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *COMMAND, *args, cwd=cwd, env=environment(**env), stderr=asyncio.subprocess.PIPE
    )


async def line_with(process: asyncio.subprocess.Process, text: str) -> str:
    """The first line of the process's stderr that contains `text`."""
    assert process.stderr is not None
    async with asyncio.timeout(30):
        while line := (await process.stderr.readline()).decode():
            if text in line:
                return line
    raise AssertionError(f"the process ended without logging {text!r}")


async def stop(process: asyncio.subprocess.Process) -> tuple[int, str]:
    """SIGTERM, then the exit code and the rest of stderr."""
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        _, rest = await process.communicate()
    assert process.returncode is not None
    return process.returncode, rest.decode()


async def test_run_finds_the_package_in_the_working_directory_and_logs_its_start_and_stop(
    shop: Path,
) -> None:
    out = shop / "out.txt"
    worker = await start_worker(shop, "run", "shop.basket:bus", "--concurrency", "3", APP_OUT=str(out))
    try:
        started = await line_with(worker, "worker basket started")
        # The default transport is relative to the working directory: the line says which file.
        database = shop.resolve() / "tidings.db"  # noqa: ASYNC240 (a path computation, no I/O to speak of)
        assert f"transport sqlite:///tidings.db ({database})" in started
        assert "queue basket" in started
        assert "handlers shop.price-changed (event), shop.checkout (command)" in started
        # --concurrency raises the prefetch to at least itself; the bus's (4 x 10) is above it.
        assert "concurrency 3, prefetch 40" in started

        async with Bus("till", f"sqlite:///{database}") as till:
            till.route(Checkout, to="basket")
            await till.send(Checkout(buyer="alice"))
            await eventually(lambda: out.exists() and "done alice" in out.read_text())
    finally:
        code, rest = await stop(worker)
    assert code == 0
    stopped = next(line for line in rest.splitlines() if "worker basket stopped" in line)
    assert "1 handled, 0 dead-lettered" in stopped
    assert "released 0 unfinished" in stopped


async def test_the_stop_line_counts_the_messages_released_unfinished(shop: Path) -> None:
    out = shop / "out.txt"
    worker = await start_worker(
        shop, "run", "shop.basket:bus", APP_OUT=str(out), APP_SLEEP="60", APP_GRACE="0.2"
    )
    try:
        await line_with(worker, "worker basket started")
        async with Bus("till", f"sqlite:///{shop / 'tidings.db'}") as till:
            till.route(Checkout, to="basket")
            await till.send(Checkout(buyer="bob"))
            await eventually(lambda: out.exists() and "started bob" in out.read_text())
    finally:
        code, rest = await stop(worker)
    assert code == 0
    stopped = next(line for line in rest.splitlines() if "worker basket stopped" in line)
    assert "0 handled" in stopped
    assert "released 1 unfinished at the end of the shutdown grace" in stopped


async def test_the_transport_option_applies_to_a_bus_made_without_one(shop: Path) -> None:
    worker = await start_worker(shop, "run", "shop.basket:bus", "--transport", "memory://elsewhere")
    try:
        started = await line_with(worker, "worker basket started")
    finally:
        code, _ = await stop(worker)
    assert code == 0
    assert "transport memory://elsewhere," in started
    assert not (shop / "tidings.db").exists()


def test_the_transport_option_refuses_a_bus_whose_code_names_its_transport(shop: Path) -> None:
    result = tidings("run", "shop.pinned:bus", "--transport", "amqp://app:s3cret@rabbit/", cwd=shop)
    assert result.returncode == 2
    assert "shop.pinned:bus is on 'memory://pinned', named in its code" in result.stderr
    assert "amqp://app:***@rabbit/" in result.stderr
    assert "s3cret" not in result.stderr


@pytest.mark.parametrize(
    ("path", "complaint"),
    [
        ("shop.basket:bsu", "module shop.basket has no attribute 'bsu' (its buses: bus)"),
        ("shop.bsket:bus", "no module shop.bsket (looked in the working directory "),
        ("shoop.basket:bus", "no module shoop (looked in the working directory "),
        ("shop.basket", "expected package.module:attribute"),
        ("shop.basket:Checkout", "'shop.basket:Checkout' is ModelMetaclass, not a tidings Bus"),
    ],
)
def test_a_wrong_path_says_what_is_wrong(shop: Path, path: str, complaint: str) -> None:
    result = tidings("run", path, cwd=shop)
    assert result.returncode == 2
    assert complaint in result.stderr
    assert "Traceback" not in result.stderr


def test_an_import_error_inside_the_users_module_is_shown_as_theirs(shop: Path) -> None:
    result = tidings("run", "shop.broken:bus", cwd=shop)
    assert result.returncode == 2
    assert (
        "importing shop.broken failed: ModuleNotFoundError: No module named 'a_library_nobody_installed'"
        in (result.stderr)
    )
    assert "no module shop.broken" not in result.stderr
    assert 'shop/broken.py", line 3' in result.stderr  # where, in their code


def test_an_exception_while_importing_shows_the_users_traceback_only(shop: Path) -> None:
    result = tidings("run", "shop.boom:bus", cwd=shop)
    assert result.returncode == 2
    assert "importing shop.boom failed: RuntimeError: SHOP_SECRET is not set" in result.stderr
    assert 'shop/boom.py", line 6, in <module>' in result.stderr
    assert 'shop/boom.py", line 3, in configure' in result.stderr
    assert "importlib" not in result.stderr


def test_the_installed_script_finds_the_package_too(shop: Path) -> None:
    # The console script's directory, not the working directory, is what Python puts first on
    # sys.path for it.
    script = Path(sys.executable).parent / "tidings"
    if not script.exists():
        pytest.skip(f"no tidings script next to {sys.executable} (the package is not installed)")
    result = subprocess.run(
        [str(script), "topology", "shop.basket:bus"],
        cwd=shop,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "service basket" in result.stdout


def test_help_shows_every_default(shop: Path) -> None:
    def help_of(*command: str) -> str:
        return " ".join(tidings(*command, "--help", cwd=shop).stdout.split())  # unwrapped

    assert "(default: INFO)" in help_of()
    run = help_of("run")
    assert "(default: the bus's own)" in run
    assert "(default: the bus's, Bus(concurrency=10))" in run
    assert "(default: 100)" in help_of("dead-letters", "list")
    assert "(default: $TIDINGS_TRANSPORT, else sqlite:///tidings.db, relative to the working directory)" in (
        help_of("dead-letters", "purge")
    )


def test_the_log_level_is_one_of_the_levels(shop: Path) -> None:
    wrong = tidings("--log-level", "loud", "topology", "shop.basket:bus", cwd=shop)
    assert wrong.returncode == 2
    assert "invalid choice: 'LOUD'" in wrong.stderr
    assert tidings("--log-level", "debug", "topology", "shop.basket:bus", cwd=shop).returncode == 0
