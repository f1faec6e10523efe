"""The ledger harness: prove on a real broker and database that nothing is lost or applied twice.

Producer processes (`tidings.verify.producer`) write business rows and send commands, plainly
(with the broker's confirm) and through the outbox; consumer processes (`tidings.verify.consumer`)
apply each one's effect with the inbox. Every message id, delivery and effect goes into the ledger
tables (`tidings.verify.ledger`), and `check` (`tidings.verify.check`) counts what was sent,
confirmed, handled, lost, delivered or applied twice and dead-lettered, and the time the system
took to recover after each fault. `Run` (`tidings.verify.run`) starts and stops the processes and
removes what a run created.

`tidings verify` (docs/verify.md) runs it against the user's own system; `tests/chaos/` runs it
under faults (a killed consumer, cut connections, a restarted broker, a crashed database).
"""

from __future__ import annotations

from tidings.verify.check import Recovery, Report, check
from tidings.verify.ledger import Ledger
from tidings.verify.run import Run, RunSettings

__all__ = ["Ledger", "Recovery", "Report", "Run", "RunSettings", "check"]
