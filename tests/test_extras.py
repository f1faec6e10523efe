"""The border of the optional extras: `import tidings` needs only pydantic, and a feature whose extra is
missing says which `pip install` brings it (a `ConfigurationError`, not a `ModuleNotFoundError`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

# Run in a venv that has the core dependency and nothing else; tidings comes from the source tree.
CHECK = textwrap.dedent(
    """
    import importlib.util, sys
    for extra in ("sqlalchemy", "aiosqlite", "asyncpg", "aio_pika", "aiormq", "opentelemetry"):
        assert importlib.util.find_spec(extra) is None, f"{extra} is installed: not a bare venv"

    import tidings
    from tidings import Bus, ConfigurationError

    import asyncio
    from tidings import Context, Event

    class Hello(Event):
        n: int

    bus = Bus("bare", "sqlite:///" + sys.argv[1])       # the embedded default needs no extra
    seen = []

    @bus.subscribe(Hello)
    async def hello(event: Hello, ctx: Context) -> None:
        seen.append(event.n)
        bus.stop()

    async def round_trip() -> None:
        async with bus:
            await bus.publish(Hello(n=1))
            await asyncio.wait_for(bus.run(), 30)

    asyncio.run(round_trip())
    assert seen == [1], seen

    for make, extra in (
        (lambda: Bus("bare", "memory://bare", database=object()), "sql"),
        (lambda: Bus("bare", "amqp://guest:guest@127.0.0.1:5672/"), "rabbitmq"),
    ):
        try:
            make()
        except ConfigurationError as error:
            assert f"pip install 'tidings[{extra}]'" in str(error), str(error)
        else:
            raise AssertionError(f"no ConfigurationError without the {extra} extra")
    print("ok")
    """
)


def _pydantic_requirement() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    start = text.index('"pydantic')
    return text[start + 1 : text.index('"', start + 1)]


def test_a_venv_with_only_the_core_dependency_imports_tidings_and_names_the_missing_extras(
    tmp_path: Path,
) -> None:
    env_dir = tmp_path / "bare"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    installed = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            _pydantic_requirement(),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    done = subprocess.run(
        [str(python), "-c", CHECK, str(tmp_path / "bus.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_importing_tidings_loads_no_optional_library() -> None:
    optional = ("sqlalchemy", "aio_pika", "aiormq", "opentelemetry")
    code = f"import sys, tidings; print(sorted(m for m in {optional!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
