"""The broker permissions one service needs: `rabbitmqctl set_permissions` patterns, no wider.

RabbitMQ grants a user, per vhost, three regular expressions over exchange and queue names:
configure (declare, delete), write (publish to an exchange; bind a queue, or an exchange as the
destination) and read (consume, get, purge; the source of a binding; a queue declared with a
dead-letter exchange). A tidings service declares the namespace's four exchanges and the delay
cascade (every service may be the first to need them), its own queue and error queue and, per
instance, a reply queue and its error queue; it publishes to the exchanges, binds its queues and
the cascade, and consumes only its own queues. So each of the three patterns is exactly those
names: another service's queue matches none of them, so it can neither consume from it, bind it,
nor declare anything else. (What RabbitMQ cannot restrict this way: binding one's own queue to
the commands exchange under another service's routing key.)
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from tidings.transports.rabbitmq.topology import DELAY_LEVELS, Topology

__all__ = ["Permissions", "service_permissions"]

#: The per-instance reply queue's suffix, as `requests` names it: `.replies.<12 hex digits>`.
_REPLY_SUFFIX = r"\.replies\.[0-9a-f]{12}"


@dataclass(frozen=True, slots=True)
class Permissions:
    """The three patterns of `rabbitmqctl set_permissions` for one user in one vhost."""

    vhost: str
    user: str
    configure: str
    write: str
    read: str

    def command(self) -> str:
        """The `rabbitmqctl` command that grants them, quoted for a POSIX shell."""
        return shlex.join(
            [
                "rabbitmqctl",
                "set_permissions",
                "-p",
                self.vhost,
                self.user,
                self.configure,
                self.write,
                self.read,
            ]
        )


def service_permissions(topology: Topology, queue: str, *, user: str | None = None) -> Permissions:
    """What the service whose queue is `queue` needs (its user: `user`, by default the queue's name)."""
    own = [topology.queue(queue), topology.error_queue(queue)]
    shared = [topology.events_exchange, topology.commands_exchange, topology.errors_exchange,
              topology.delayed_exchange]  # fmt: skip
    names = [re.escape(name) for name in (*own, *shared)]
    reply = re.escape(topology.queue(queue)) + _REPLY_SUFFIX
    error_suffix = topology.error_queue(queue).removeprefix(topology.queue(queue))  # ".error"
    names.append(reply + rf"(?:{re.escape(error_suffix)})?")
    names.append(_delay_levels(topology))
    # Anchored on both ends: RabbitMQ matches the pattern anywhere in the name otherwise.
    pattern = "^(?:" + "|".join(names) + ")$"
    return Permissions(topology.settings.vhost, user or queue, pattern, pattern, pattern)


def _delay_levels(topology: Topology) -> str:
    """One pattern for the 32 delay levels (exchanges and queues share the names)."""
    levels = [topology.delay_level(level) for level in range(DELAY_LEVELS)]
    prefix = levels[0][:-2]
    if all(name == f"{prefix}{level:02d}" for level, name in enumerate(levels)):
        return re.escape(prefix) + "(?:[0-2][0-9]|3[01])"
    return "|".join(re.escape(name) for name in levels)
