"""The border of the optional extras: a missing one is a `ConfigurationError` saying what to install.

`import tidings` needs only pydantic. The SQL parts (`database=`: outbox, inbox) need the `sql`
extra, the RabbitMQ transport (`amqp://`) the `rabbitmq` extra, `tidings asyncapi --yaml` the
`asyncapi` extra (PyYAML); they are imported when first used, and a missing library then names the
`pip install` that brings it.
"""

from __future__ import annotations

from tidings.errors import ConfigurationError

__all__ = ["EXTRAS", "explain_missing_extra"]

#: The top-level modules each extra brings (what a `ModuleNotFoundError` may name).
EXTRAS = {
    "sql": ("sqlalchemy", "aiosqlite", "asyncpg", "greenlet"),
    "rabbitmq": ("aio_pika", "aiormq", "pamqp", "yarl"),
    "asyncapi": ("yaml",),
}


def explain_missing_extra(extra: str, feature: str, error: ModuleNotFoundError) -> None:
    """Raise a `ConfigurationError` naming the install if `error` is a library of `extra` missing.

    Returns when some other module is missing (not ours to explain): the caller re-raises `error`.
    """
    missing = (error.name or "").partition(".")[0]
    if missing in EXTRAS[extra]:
        raise ConfigurationError(
            f"{feature} needs the {extra!r} extra ({missing} is not installed): "
            f"pip install 'tidings[{extra}]'"
        ) from error
