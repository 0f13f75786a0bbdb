"""What a database error means for the worker, so each is handled on purpose.

- An outage (the server unreachable, restarting, a dropped connection) or a
  fail-over (a read-only server: a replica, a demoted primary,
  `default_transaction_read_only`): wait and try again with back-off;
  nothing the worker holds is given up for it.
- A configuration error (no such role or database, a wrong password, no
  pg_hba.conf entry, no CONNECT privilege): trying again cannot help; at
  start it is exit 78 with the server's own message.
- Anything else is a bug or a broken schema, and is reported as such.
"""

from __future__ import annotations

import re

import psycopg

# Errors the worker rides out: psycopg's OperationalError (connections,
# shutdowns, cancels, pool timeouts) and a server that refuses writes.
TRANSIENT: tuple[type[psycopg.Error], ...] = (
    psycopg.OperationalError,
    psycopg.errors.ReadOnlySqlTransaction,
)
TRANSIENT_OR_TIMEOUT: tuple[type[Exception], ...] = (*TRANSIENT, TimeoutError)

# libpq reports a refused connection with no SQLSTATE, only the server's
# FATAL message: these say the settings are wrong, not that it is down.
_CONFIG_MESSAGES = re.compile(
    r"FATAL:\s+("
    r"database \".*\" does not exist"
    r"|role \".*\" does not exist"
    r"|password authentication failed"
    r"|no pg_hba\.conf entry"
    r"|permission denied for database"
    r"|role \".*\" is not permitted to log in"
    r"|Ident authentication failed"
    r"|Peer authentication failed"
    r"|pg_hba\.conf rejects connection"
    r")"
    r"|password is required"
    r"|fe_sendauth: no password supplied",
    re.IGNORECASE,
)


def config_problem(exc: BaseException) -> str | None:
    """The server's reason when `exc` says the connection settings are wrong
    (retrying cannot help); None for an outage or anything else."""
    if not isinstance(exc, psycopg.OperationalError):
        return None
    text = str(exc)
    found = _CONFIG_MESSAGES.search(text)
    if found is None:
        return None
    return " ".join(text[found.start() :].split())


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """The first line of an error's message, for a log line; `empty` (by
    default the error's type name) when it has none: a driver error with an
    empty message must not raise IndexError in the handler meant for it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else (empty or type(exc).__name__)
