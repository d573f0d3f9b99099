"""A relabel queue in a SQL database: a SQLite file by default, Postgres (any SQLAlchemy URL) in production.

One row per (dataset fingerprint, row id)::

    pending ──claim──▶ in_review ──decide──▶ relabeled | confirmed | skipped
       ▲                   │
       └─────release───────┘   (a reviewer who went away)

* Enqueuing is idempotent: a re-run audit or a retried task refreshes the score and rank of rows
  still ``pending`` and never touches a row someone claimed or decided.
* Claiming is safe under concurrency: on Postgres ``SELECT … FOR UPDATE SKIP LOCKED`` inside the
  claiming transaction; on SQLite every write transaction starts with ``BEGIN IMMEDIATE``, which
  takes the database's single write lock before reading, so two workers never see the same
  pending row as free.
* The queue records its schema version in ``<table>_meta``. A table from another version, or a
  table of that name that this package did not create, is refused with :class:`QueueSchemaError`
  before anything is written.

Every statement goes through SQLAlchemy Core with bound parameters; table and schema names are
checked against ``[A-Za-z_][A-Za-z0-9_]*`` before they reach SQL.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pandas as pd

from tracin_tasks.exceptions import (
    ConfigurationError,
    InvalidTransitionError,
    QueueSchemaError,
    SinkUnavailableError,
    UnknownRowIdsError,
    require_extra,
)
from tracin_tasks.integrations.relabel.base import (
    CONFIRMED,
    FINAL_STATUSES,
    IN_REVIEW,
    PENDING,
    RELABELED,
    Decision,
    Delivery,
    FlaggedBatch,
    redact,
    utcnow,
)

sa = require_extra("sqlalchemy", "sql")

SCHEMA_VERSION = 1
DEFAULT_TABLE = "tracin_relabel_queue"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,50}$")
_CHUNK = 500


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigurationError(
            f"Queue {what} {value!r} is not a plain SQL name; use letters, digits and '_' "
            "(starting with a letter or '_', at most 51 characters)."
        )
    return value


def _define(metadata: Any, table: str, schema: str | None) -> tuple[Any, Any]:
    t = sa.Table(
        table, metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("row_id", sa.String(256), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("audit_key", sa.String(64), nullable=False),
        sa.Column("audit_run_id", sa.String(64)),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("self_influence", sa.Float),
        sa.Column("given_label", sa.Integer, nullable=False),
        sa.Column("suggested_label", sa.Integer),
        sa.Column("reason", sa.String(200)),
        sa.Column("status", sa.String(16), nullable=False, server_default=PENDING),
        sa.Column("decided_label", sa.Integer),
        sa.Column("decided_by", sa.String(128)),
        sa.Column("note", sa.Text),
        sa.Column("claimed_by", sa.String(128)),
        sa.Column("times_flagged", sa.Integer, nullable=False, server_default="1"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True)),
        sa.Column("decided_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("fingerprint", "row_id", name=f"uq_{table}_row"),
        sa.Index(f"ix_{table}_status", "fingerprint", "status", "rank"),
        schema=schema,
    )
    meta = sa.Table(
        f"{table}_meta", metadata,
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False),
        schema=schema,
    )
    return t, meta


class SqlQueue:
    """The relabel queue in a SQL database (see the module docstring).

    Args:
        url: a SQLAlchemy URL: ``sqlite:///relabel.db`` or ``postgresql+psycopg://user:pw@host/db``.
            Put the password in the URL only from a secret (e.g. a Prefect Secret block); it is
            never logged or shown.
        table: the queue table (``<table>_meta`` holds its schema version).
        schema: the database schema (Postgres) the tables live in.
        create: create the tables when they do not exist yet.
    """

    def __init__(self, url: str, table: str = DEFAULT_TABLE, schema: str | None = None, create: bool = True,
                 connect_timeout: float = 10.0):
        self.table_name = _check_name(table, "table name")
        self.schema = _check_name(schema, "schema name") if schema else None
        self.url = url
        self.name = f"{redact(url)}#{table}"
        try:
            parsed = sa.engine.make_url(url)
        except Exception as exc:
            raise ConfigurationError(f"{redact(url)!r} is not a SQLAlchemy database URL.") from None
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite" and self.schema:
            raise ConfigurationError("SQLite has no schemas; drop schema= or use a Postgres URL.")
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                folder = os.path.dirname(os.path.abspath(parsed.database))
                try:
                    os.makedirs(folder, exist_ok=True)
                except OSError as exc:
                    raise ConfigurationError(
                        f"Cannot create the folder of the SQLite queue {redact(url)!r}: {exc.strerror or exc}. "
                        "Point the URI at a writable folder."
                    ) from None
            kwargs["connect_args"] = {"timeout": 60.0}
        elif self.dialect == "postgresql":
            kwargs["connect_args"] = {"connect_timeout": int(connect_timeout)}
        try:
            self.engine = sa.create_engine(parsed, **kwargs)
        except Exception as exc:  # a missing driver, a malformed option
            raise ConfigurationError(f"Cannot set up the queue database {redact(url)!r}: {type(exc).__name__}: "
                                     f"{exc}. Is its driver installed (tracin-tasks[postgres] for Postgres)?") from None
        if self.dialect == "sqlite":
            self._sqlite_immediate()
        self.metadata = sa.MetaData()
        self.table, self.meta = _define(self.metadata, self.table_name, self.schema)
        self._ready(create)

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> SqlQueue:
        """``<sqlalchemy url>?table=…&schema=…``; other query options go to the driver."""
        base, _, query_text = uri.partition("?")  # urlsplit would turn sqlite:///rel into sqlite:/rel
        query = dict(parse_qsl(query_text, keep_blank_values=True))
        for key in ("table", "schema"):
            if key in query and key not in options:
                options[key] = query.pop(key)
            query.pop(key, None)
        return cls(base + ("?" + urlencode(query) if query else ""), **options)

    # -- connection handling ------------------------------------------------------------------

    def _sqlite_immediate(self) -> None:
        # pysqlite opens transactions lazily and as DEFERRED; take the write lock up front instead
        @sa.event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @sa.event.listens_for(self.engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            if isinstance(exc, sa.exc.OperationalError) and "no such table" in str(exc.orig):
                raise QueueSchemaError(f"The queue table {self.table_name!r} disappeared from {self.name}.") from None
            raise SinkUnavailableError(
                f"The relabel queue {self.name} cannot be reached: {type(exc.orig).__name__}: "
                f"{str(exc.orig).splitlines()[0] if str(exc.orig) else ''}"
            ) from None

    def _ready(self, create: bool) -> None:
        with self._tx() as conn:
            insp = sa.inspect(conn)
            has_queue = insp.has_table(self.table_name, schema=self.schema)
            has_meta = insp.has_table(f"{self.table_name}_meta", schema=self.schema)
            if not has_queue and not has_meta:
                if not create:
                    raise QueueSchemaError(
                        f"{self.name} has no queue table {self.table_name!r}: check the URI and ?table=, or let an "
                        "audit with --relabel create it."
                    )
                self.metadata.create_all(conn)
                conn.execute(sa.insert(self.meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            found = None
            if has_meta:
                found = conn.execute(sa.select(self.meta.c.value).where(self.meta.c.key == "schema_version")).scalar()
            if found is None:
                raise QueueSchemaError(
                    f"Table {self.table_name!r} in {self.name} exists but was not created by tracin-tasks "
                    f"(no schema version in {self.table_name}_meta). Nothing was written. Use another table "
                    f"(table=... / ?table=...) or move that table away."
                )
            if str(found) != str(SCHEMA_VERSION):
                newer = str(found).isdigit() and int(found) > SCHEMA_VERSION
                raise QueueSchemaError(
                    f"Queue table {self.table_name!r} in {self.name} has schema version {found}; this version "
                    f"of tracin-tasks uses {SCHEMA_VERSION}. Nothing was written. "
                    + ("Upgrade tracin-tasks to use it." if newer else
                       "Export it (`tracin-tasks relabel list --queue ... --format csv`) and point this version at a "
                       "new table, or run the matching tracin-tasks version to drain it.")
                )
            columns = {c["name"] for c in insp.get_columns(self.table_name, schema=self.schema)}
            missing = {c.name for c in self.table.columns} - columns
            if missing:
                raise QueueSchemaError(
                    f"Queue table {self.table_name!r} in {self.name} says schema version {found} but lacks the "
                    f"columns {sorted(missing)}; it was altered by hand. Nothing was written."
                )

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> SqlQueue:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the sink protocol --------------------------------------------------------------------

    def deliver(self, batch: FlaggedBatch) -> Delivery:
        """Enqueue the batch's rows; rows already queued keep their status (see the module docstring)."""
        for attempt in range(3):
            try:
                return self._deliver(batch)
            except sa.exc.IntegrityError:
                # another process enqueued the same rows between our read and our insert (Postgres
                # READ COMMITTED); the transaction rolled back whole, so reading again is safe
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _deliver(self, batch: FlaggedBatch) -> Delivery:
        q = self.table
        now = utcnow()
        delivered = updated = unchanged = 0
        rows = list(batch.rows)
        with self._tx() as conn:
            for start in range(0, len(rows), _CHUNK):
                chunk = rows[start:start + _CHUNK]
                ids = [r.row_id for r in chunk]
                existing = dict(conn.execute(
                    sa.select(q.c.row_id, q.c.status).where(q.c.fingerprint == batch.fingerprint, q.c.row_id.in_(ids))
                ).all())
                values = [{
                    "fingerprint": batch.fingerprint, "row_id": r.row_id, "run_id": batch.run_id,
                    "audit_key": batch.audit_key, "audit_run_id": batch.audit_run_id, "score": r.score,
                    "rank": r.rank, "self_influence": r.self_influence, "given_label": r.given_label,
                    "suggested_label": r.suggested_label, "reason": r.reason[:200], "status": PENDING,
                    "times_flagged": 1, "created_at": now, "updated_at": now,
                } for r in chunk if r.row_id not in existing]
                if values:
                    conn.execute(sa.insert(q), values)
                delivered += len(values)
                refresh = [r for r in chunk if existing.get(r.row_id) == PENDING]
                for r in refresh:
                    conn.execute(
                        sa.update(q)
                        .where(q.c.fingerprint == batch.fingerprint, q.c.row_id == r.row_id, q.c.status == PENDING)
                        .values(
                            score=r.score, rank=r.rank, self_influence=r.self_influence,
                            suggested_label=r.suggested_label, reason=r.reason[:200],
                            audit_run_id=batch.audit_run_id, updated_at=now,
                            times_flagged=sa.case((q.c.audit_key != batch.audit_key, q.c.times_flagged + 1),
                                                  else_=q.c.times_flagged),
                            audit_key=batch.audit_key,
                        )
                    )
                updated += len(refresh)
                unchanged += len(chunk) - len(values) - len(refresh)
        return Delivery(self.name, delivered, updated, unchanged)

    def decisions(self, fingerprint: str) -> list[Decision]:
        q = self.table
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(q).where(q.c.fingerprint == fingerprint, q.c.status.in_(FINAL_STATUSES)).order_by(q.c.rank)
            ).mappings().all()
        return [Decision(
            row_id=r["row_id"], status=r["status"],
            label=r["decided_label"] if r["status"] == RELABELED else r["given_label"],
            given_label=r["given_label"], decided_by=r["decided_by"],
            decided_at=r["decided_at"].isoformat() if r["decided_at"] else None,
            audit_run_id=r["audit_run_id"], note=r["note"],
        ) for r in rows]

    # -- the reviewer's side ------------------------------------------------------------------

    def claim(self, worker: str, n: int = 10, fingerprint: str | None = None) -> list[dict[str, Any]]:
        """Take up to ``n`` pending rows (most suspicious first) for ``worker``; concurrent
        workers never get the same row."""
        if n < 1:
            raise ConfigurationError(f"claim needs n >= 1, got {n}.")
        q = self.table
        now = utcnow()
        with self._tx() as conn:
            pick = sa.select(q.c.id).where(q.c.status == PENDING)
            if fingerprint:
                pick = pick.where(q.c.fingerprint == fingerprint)
            pick = pick.order_by(q.c.rank, q.c.id).limit(n).with_for_update(skip_locked=True)
            ids = list(conn.execute(pick).scalars())
            if not ids:
                return []
            conn.execute(
                sa.update(q).where(q.c.id.in_(ids), q.c.status == PENDING)
                .values(status=IN_REVIEW, claimed_by=str(worker)[:128], claimed_at=now, updated_at=now)
            )
            got = conn.execute(
                sa.select(q).where(q.c.id.in_(ids), q.c.claimed_by == str(worker)[:128], q.c.status == IN_REVIEW)
                .order_by(q.c.rank)
            ).mappings().all()
        return [dict(r) for r in got]

    def decide(self, row_id: str, fingerprint: str, status: str, label: int | None = None, by: str | None = None,
               note: str | None = None) -> str:
        """Record a reviewer's decision about a pending or claimed row; returns the stored status.

        A ``relabeled`` decision that keeps the given label is stored as ``confirmed``.
        """
        if status not in FINAL_STATUSES:
            raise InvalidTransitionError(f"A decision must be one of {FINAL_STATUSES}, got {status!r}.")
        q = self.table
        now = utcnow()
        with self._tx() as conn:
            row = conn.execute(
                sa.select(q.c.status, q.c.given_label, q.c.decided_by)
                .where(q.c.fingerprint == fingerprint, q.c.row_id == str(row_id))
            ).first()
            if row is None:
                raise UnknownRowIdsError(f"Row {row_id!r} of data {fingerprint[:12]} is not in the queue.", [str(row_id)])
            if row.status in FINAL_STATUSES:
                raise InvalidTransitionError(
                    f"Row {row_id!r} was already decided ({row.status}, by {row.decided_by or 'unknown'}); "
                    "a decision is final."
                )
            if status == RELABELED:
                if label is None:
                    raise InvalidTransitionError(f"Relabeling row {row_id!r} needs the new label.")
                if int(label) == row.given_label:
                    status = CONFIRMED
            conn.execute(
                sa.update(q).where(q.c.fingerprint == fingerprint, q.c.row_id == str(row_id), q.c.status == row.status)
                .values(status=status, decided_label=int(label) if status == RELABELED else None,
                        decided_by=(by or None) and str(by)[:128], note=note, decided_at=now, updated_at=now)
            )
        return status

    def release(self, worker: str | None = None, fingerprint: str | None = None) -> int:
        """Put claimed rows back to ``pending`` (all, or those of one worker); returns how many."""
        q = self.table
        stmt = sa.update(q).where(q.c.status == IN_REVIEW)
        if worker:
            stmt = stmt.where(q.c.claimed_by == worker)
        if fingerprint:
            stmt = stmt.where(q.c.fingerprint == fingerprint)
        with self._tx() as conn:
            return conn.execute(stmt.values(status=PENDING, claimed_by=None, claimed_at=None, updated_at=utcnow())).rowcount

    def rows(self, fingerprint: str | None = None, status: str | Sequence[str] | None = None,
             run_id: str | None = None) -> pd.DataFrame:
        """The queue as a table, most suspicious first."""
        q = self.table
        stmt = sa.select(q)
        if fingerprint:
            stmt = stmt.where(q.c.fingerprint == fingerprint)
        if run_id:
            stmt = stmt.where(q.c.run_id == run_id)
        if status:
            stmt = stmt.where(q.c.status.in_([status] if isinstance(status, str) else list(status)))
        with self._tx() as conn:
            result = conn.execute(stmt.order_by(q.c.fingerprint, q.c.rank))
            return pd.DataFrame(result.mappings().all(), columns=list(result.keys()))

    def counts(self, fingerprint: str | None = None) -> dict[str, int]:
        q = self.table
        stmt = sa.select(q.c.status, sa.func.count()).group_by(q.c.status)
        if fingerprint:
            stmt = stmt.where(q.c.fingerprint == fingerprint)
        with self._tx() as conn:
            return {s: int(n) for s, n in conn.execute(stmt).all()}
