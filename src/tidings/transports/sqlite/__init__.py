"""The SQLite transport (`sqlite:///path.db`): the embedded default, its queues tables in one file.

`transport` is the transport itself (`SQLiteTransport`, `SQLiteSettings`); it hands every request
to `connection_thread`, the one thread that owns the SQLite connection, which runs the statements
of `queries` on the tables of `schema`. Each module imports only those below it, in that order.
"""

from tidings.transports.sqlite.transport import SQLiteSettings, SQLiteTransport

__all__ = ["SQLiteSettings", "SQLiteTransport"]
