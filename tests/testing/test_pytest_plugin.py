"""The pytest plugin: its entry point, the `tidings_harness` fixture, `--tidings-transport URL`.

The option is shown the way a user would use it: `test_harness.py` run again, in a pytest process
of its own, on SQLite and on RabbitMQ.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tidings.testing.pytest_plugin import fresh_system_url

pytest_plugins = ["pytester"]

HARNESS_TESTS = Path(__file__).with_name("test_harness.py")

#: What the inner pytest runs need of the project's settings (pytester's own directory has none).
INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""

#: A test as a user of the plugin writes it.
USER_TEST = """
from tidings import Bus, Command, Context
from tidings.transports.memory import MemoryTransport


class Job(Command, name="plugin-test.job"):
    n: int


def jobs_bus() -> Bus:
    bus = Bus("jobs", "memory://")

    @bus.handle(Job)
    async def job(command: Job, ctx: Context) -> None:
        pass

    return bus


async def test_a_job_is_handled(tidings_harness):
    bus = jobs_bus()
    async with tidings_harness(bus) as h:
        await h.send(Job(n=1))
        await h.idle()
        assert h.handled(Job) == [Job(n=1)]
        print("harness on", h.real, type(bus.transport.inner).__name__)
"""


def test_the_plugin_is_registered_as_a_pytest11_entry_point() -> None:
    [plugin] = [entry for entry in entry_points(group="pytest11") if entry.name == "tidings"]
    assert plugin.value == "tidings.testing.pytest_plugin"


def test_without_the_option_each_harness_is_on_a_private_memory_broker(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*harness on None MemoryTransport*"])


def test_the_option_puts_each_harness_on_a_fresh_system_of_that_transport(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest("-s", "--tidings-transport", "sqlite:///shared.db?visibility_timeout=5")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*harness on sqlite:///*/bus-*.db?visibility_timeout=5 SQLiteTransport*"])
    # Not the file the URL named: each harness a new one, in a temporary directory.
    assert not (pytester.path / "shared.db").exists()


def test_the_option_is_listed_in_pytests_help(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--tidings-transport=URL*"])


def test_a_fresh_rabbitmq_system_is_a_namespace_of_its_own_on_the_same_broker() -> None:
    url = "amqp://user:secret@broker:5672/shop?namespace=orders&queue_type=classic"
    first, second = fresh_system_url(url, Path()), fresh_system_url(url, Path())
    assert first is not None
    assert second is not None
    assert first != second
    parts = urlsplit(first)
    assert (parts.scheme, parts.netloc, parts.path) == ("amqp", "user:secret@broker:5672", "/shop")
    options = parse_qs(parts.query)
    assert options["queue_type"] == ["classic"]
    [namespace] = options["namespace"]
    assert namespace.startswith("orders-")

    default = fresh_system_url("amqps://broker/", Path())
    assert default is not None
    [namespace] = parse_qs(urlsplit(default).query)["namespace"]
    assert namespace.startswith("tidings-test-")
    # RabbitMQ namespaces are at most 64 characters, whatever the URL's was.
    long = fresh_system_url(f"amqp://broker/?namespace={'n' * 64}", Path())
    assert long is not None
    assert len(parse_qs(urlsplit(long).query)["namespace"][0]) == 64


def test_a_fresh_sqlite_system_is_a_new_file_with_the_urls_options(tmp_path: Path) -> None:
    url = fresh_system_url("sqlite:///bus.db?busy_timeout=2", tmp_path)
    assert url is not None
    assert url.startswith(f"sqlite:///{tmp_path}/bus-")
    assert url.endswith(".db?busy_timeout=2")
    assert fresh_system_url("memory://", tmp_path) is None  # the harness's own private broker
    assert fresh_system_url("kafka://broker", tmp_path) == "kafka://broker"  # unknown: as given


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_harness_tests_pass_on_sqlite(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        str(HARNESS_TESTS), "-p", "no:cacheprovider", "--tidings-transport", "sqlite:///bus.db"
    )
    assert_all_passed(result)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_harness_tests_pass_on_rabbitmq(pytester: pytest.Pytester, rabbitmq_url: str) -> None:
    # rabbitmq_url skips this when RabbitMQ does not answer (fails under CI); its vhost is this
    # session's, deleted at its end with the namespaces the inner run made in it.
    result = pytester.runpytest_subprocess(
        str(HARNESS_TESTS), "-p", "no:cacheprovider", "--tidings-transport", rabbitmq_url
    )
    assert_all_passed(result)


def assert_all_passed(result: pytest.RunResult) -> None:
    outcomes = result.parseoutcomes()
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert outcomes.get("failed", 0) == outcomes.get("errors", 0) == 0
    assert outcomes["passed"] >= 20
