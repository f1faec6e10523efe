"""The dashboard's own tables: audit records, the services seen, the instances' last heartbeats.

SQLAlchemy Core, so the same tables live in SQLite (the default) or PostgreSQL. The indexes are
those the pages ask by: a conversation by correlation id, a message by id, the services page by
service and time, retention by time.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

__all__ = ["instances", "messages", "metadata", "services"]

metadata = MetaData()

_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite's rowid alias must be INTEGER

messages = Table(
    "dashboard_messages",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("message_id", String(255), nullable=False),
    Column("type", String(255), nullable=False),
    Column("source", String(255), nullable=False),
    Column("service", String(255), nullable=False),
    Column("queue", String(255), nullable=False),
    Column("instance", String(255), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("reason", String(64)),
    Column("error_type", String(255)),
    Column("error_message", Text),
    Column("correlation_id", String(255)),
    Column("causation_id", String(255)),
    Column("subject", String(255)),
    Column("sent_at", Float),
    Column("processed_at", Float, nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("round", Integer, nullable=False),
    Column("failures", Integer, nullable=False),
    #: JSON text: the message's own headers.
    Column("headers", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("body_size", Integer, nullable=False),
    Index("dashboard_messages_correlation", "correlation_id", "id"),
    Index("dashboard_messages_message", "message_id"),
    Index("dashboard_messages_service_time", "service", "processed_at"),
    Index("dashboard_messages_time", "processed_at"),
)

services = Table(
    "dashboard_services",
    metadata,
    Column("service", String(255), primary_key=True),
    Column("last_seen", Float, nullable=False),
)

instances = Table(
    "dashboard_instances",
    metadata,
    Column("instance", String(255), primary_key=True),
    Column("service", String(255), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("version", String(64)),
    Column("started_at", Float, nullable=False),
    Column("sent_at", Float, nullable=False),
    Column("interval", Float, nullable=False),
    #: JSON text: the bus's counters.
    Column("counters", Text, nullable=False),
    Column("outbox_backlog", Integer),
    Column("outbox_oldest", Float),
    Column("audit_dropped", Integer, nullable=False),
    Column("stopping", Boolean, nullable=False),
)
