"""What travels from a session's capture to a mirror's apply stream: committed transactions of writes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class WriteKind(enum.Enum):
    QUERY = "query"  # a statement's own text, sent as a simple Query (no parameters)
    EXTENDED = "extended"  # the client's Parse and Bind frames, replayed with the same parameters
    COPY = "copy"  # COPY … FROM STDIN: the statement text plus the client's CopyData frames
    IMAGE = "image"  # row images captured through RETURNING, applied by key


class ImageOp(enum.Enum):
    INSERT = "insert"  # plain INSERT of the rows (ON CONFLICT DO NOTHING: only the inserted rows come back)
    UPSERT = "upsert"  # INSERT … ON CONFLICT DO UPDATE: the rows as they ended up, inserted or updated
    UPDATE = "update"  # the rows after the update, matched by primary key
    DELETE = "delete"  # the rows as they were, matched by primary key
    # Change data capture (proxy/cdc/changes.py): an update that left TOASTed columns out; only
    # Image.columns are set, on the row matched by primary key
    PATCH = "patch"
    # CDC: an update that changed the key and left TOASTed columns out. Each row is
    # {"old": key, "new": present columns}: the old row is moved to the new key (keeping the
    # columns left out), unless a row with the new key exists already (a replay)
    MOVE = "move"


@dataclass(frozen=True, slots=True)
class Image:
    """Row images of one statement: each row is the text of ``row_to_json(row)`` as the primary
    sent it (bytes in the session's client_encoding), applied by key on the mirror."""

    op: ImageOp
    table: str  # the target as written in the statement, quoted where needed: 'public."Order"'
    conflict: str | None  # for UPSERT on a table without primary key: the client's "ON CONFLICT (…)" target
    rows: tuple[bytes, ...]
    columns: tuple[str, ...] = ()  # PATCH, MOVE: the columns the rows carry (the only ones set)


@dataclass(frozen=True, slots=True)
class Write:
    """One statement the primary completed, to be applied on the mirrors."""

    kind: WriteKind
    sql: str  # QUERY/COPY: the text to run; EXTENDED/IMAGE: the client's statement (for the journal)
    # the primary's CommandComplete tag ("INSERT 0 3"); the mirror's must match. "" means nothing
    # to compare: CDC's idempotent writes may rightly touch no row (an upsert or delete replayed)
    tag: str
    fingerprint: str  # pglast fingerprint of the client's statement (journal, metrics)
    tables: tuple[str, ...]  # tables written, as written
    parse: bytes = b""  # EXTENDED: a Parse frame of the unnamed statement
    bind: bytes = b""  # EXTENDED: a Bind frame (unnamed portal and statement), result formats emptied
    copy_data: tuple[bytes, ...] = ()  # COPY: whole CopyData frames, in order
    # COPY with a column list: the target (as written) and the columns; the others get their
    # defaults, which the mirror would compute again (checked against its catalog first)
    copy_table: str = ""
    copy_columns: tuple[str, ...] | None = None
    image: Image | None = None

    @property
    def size(self) -> int:
        """Bytes held in memory for this write (the apply queue's bound counts these)."""
        n = len(self.sql) + len(self.parse) + len(self.bind) + sum(len(c) for c in self.copy_data)
        if self.image is not None:
            n += sum(len(r) for r in self.image.rows)
        return n + 64


@dataclass(frozen=True, slots=True)
class Txn:
    """A transaction the primary committed: applied on a mirror as BEGIN; settings; writes; COMMIT."""

    seq: int  # commit-acknowledgement order across the whole proxy
    database: str
    session: str  # the client (peer address), for the journal
    # (name, value) of the session's settings that change what a write means (search_path,
    # TimeZone, DateStyle, role, …): applied with set_config(name, value, true) first.
    settings: tuple[tuple[str, str], ...]
    writes: tuple[Write, ...]
    size: int = field(default=0)

    @property
    def tables(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for write in self.writes:
            for table in write.tables:
                seen[table] = None
        return tuple(seen)


@dataclass(frozen=True, slots=True)
class Divergence:
    """A write the mirror did not apply as the primary did (or could not be mirrored at all)."""

    mirror: str
    database: str
    reason: str  # e.g. "tag differs: primary INSERT 0 3, mirror INSERT 0 2", "mirror error 23505: …"
    tables: tuple[str, ...]
    fingerprint: str = ""
    statement: str = ""  # the client's statement, cut to a bounded length
    seq: int = 0
    kind: str = "diverged"  # diverged | failed | unmirrored | out_of_sync | ddl
