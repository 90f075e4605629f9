"""Surviving a lost control-database connection while a promote or rollback is in flight.

A promotion holds its control-database connection idle while the target applies, which can take
minutes; a connection terminated in that time (a failover, `pg_terminate_backend`, the server's
`idle_session_timeout`) must not turn a committed apply into a `failed` release. Work whose
outcome the target has already decided is run with `control_db_retry`: on a connection error it
closes the broken connection, reconnects and runs the work again. The work must be safe to repeat
(the settle functions are conditional UPDATEs in one transaction, so they are).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from django.db import DatabaseError, InterfaceError, OperationalError, connection

logger = logging.getLogger("releases.services")  # one logger name for operators, as before the split

T = TypeVar("T")

# Errors the control database's driver raises for a connection that is gone (terminated, timed out,
# closed by the server or the network) or is unusable after such an error.
CONTROL_DB_ERRORS = (InterfaceError, OperationalError)

# Pauses before the 2nd, 3rd and 4th attempts: a server restart or failover takes a few seconds. After
# the last one the error propagates and the reconciler settles the release from the target's history.
RETRY_DELAYS = (0.0, 0.5, 2.0)


def control_db_reset() -> bool:
    """Close the control-database connection, so the next query opens a new one. False inside an atomic block (an in-process task running in its caller's
    transaction): that transaction is lost with its connection and cannot be resumed."""
    if connection.in_atomic_block:
        return False
    with contextlib.suppress(DatabaseError):  # closing a dead connection may complain; it is closed
        connection.close()  # an in-memory SQLite database is kept (Django ignores the close)
    return True


def control_db_retry(action: Callable[[], T], *, what: str) -> T:
    """Run `action`; when the control-database connection is lost, reconnect and run it again."""
    for delay in (*RETRY_DELAYS, None):
        try:
            return action()
        except CONTROL_DB_ERRORS as exc:
            if delay is None or not control_db_reset():
                raise
            logger.warning(
                "control database connection lost while %s (%s); reconnecting and retrying",
                what,
                type(exc).__name__,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
