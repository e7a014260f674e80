"""Finding tickets: by the words of any of their messages, by a participant's address.

What it reads is made by migration 0009, outside the SQLModel models (they cannot
declare it), and kept in step by the database itself, in the transaction that
writes a message:

- SQLite: `message_search`, an FTS5 table with no content of its own (content=''),
  one row per message (rowid = message.id): its subject and the first
  TEXT_INDEXED characters of its text. Three triggers on `message` (insert,
  update, delete) write it.
- PostgreSQL: `message.search_vector`, a stored generated column,
  to_tsvector('simple', ...) of the same text, under a GIN index. The
  characters by which PostgreSQL's parser keeps an address, a host name, a path
  or a hyphenated word as one token are made spaces first, so that its words are
  SQLite's.
- Both: `ix_message_from_email_folded`, the sender's address without case
  (COLLATE NOCASE on SQLite, lower() on PostgreSQL), for `has_participant`.

Mail maild writes from a template (acknowledgements, notifications, solved
notices) and the desk's copies of a participant's mail (the original is indexed)
are left out (UNINDEXED_KINDS): every acknowledgement says "Is your site down?",
and a search for "site down" would find every acknowledged ticket.

A search is words: runs of letters and digits, everything else separates them
(`db1.example.com` is three words, found wherever all three are). Each word
goes to FTS5 in double quotes, so nothing typed is read as query syntax (OR,
NOT, NEAR, *, ^, column filters); PostgreSQL gets the words through
plainto_tsquery, which has no syntax. Both find the messages with every word
(in any order and case, subject or text), and the tickets they belong to.

A migration that rebuilds `message` on SQLite (a batch operation that copies the
table) drops the triggers with the old table: it must make them again
(tests/store/test_search.py checks they exist at head).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import ColumnElement, false, func, literal_column, select, table, union
from sqlalchemy import column as sql_column
from sqlmodel import Session

from maild.enums import Direction
from maild.mail import addresses
from maild.store.models import Message, Participant, Ticket, table_of

MAX_WORDS = 32  # in one search: each is a lookup in the index
PROBE = 1000  # matching messages read first (has_words)
TEXT_INDEXED = 100_000  # characters of a message's text that are indexed
UNINDEXED_KINDS = ("ack", "copy", "notify", "solved")  # as migration 0009 writes them

FTS_TABLE = "message_search"  # SQLite; FTS5 adds shadow tables named message_search_*
VECTOR_COLUMN = "search_vector"  # PostgreSQL, on message
INDEXES = frozenset({"ix_message_search_vector", "ix_message_from_email_folded"})
TRIGGERS = ("message_search_insert", "message_search_update", "message_search_delete")

_WORD = re.compile(r"[^\W_]+")  # letters and digits, as FTS5's unicode61 tokenizer reads them
_TICKET = table_of(Ticket)
_MESSAGE = table_of(Message)
_PARTICIPANT = table_of(Participant)
_FTS = table(FTS_TABLE, sql_column("rowid"))
_VECTORS = table(
    "message", sql_column("ticket_id"), sql_column("direction"), sql_column(VECTOR_COLUMN)
)
_INTERNAL = Direction.INTERNAL.value


class TooManyWords(ValueError):
    """A search of more than MAX_WORDS words."""

    def __init__(self, count: int) -> None:
        super().__init__(f"at most {MAX_WORDS} words, not {count}")


def words(text: str) -> list[str]:
    """The words a search looks for; TooManyWords past MAX_WORDS."""
    found = _WORD.findall(text)
    if len(found) > MAX_WORDS:
        raise TooManyWords(len(found))
    return found


def has_words(session: Session, text: str, *, public_only: bool = False) -> ColumnElement[bool]:
    """A condition on ticket: one of its messages has every word of `text` (with
    `public_only`, one that is not an internal note). A text without words finds no
    ticket.

    The tickets of the matching messages are read first, up to PROBE messages: a
    search that few messages match is then a lookup of those tickets by id. Only past
    that is the condition the subquery (one index scan, then every ticket it
    names), which PostgreSQL's planner otherwise chose for rare words too,
    reading every ticket (docs/benchmarks.md, "Searches")."""
    found = words(text)
    if not found:
        return false()
    if session.get_bind().dialect.name == "postgresql":
        query = func.plainto_tsquery(literal_column("'simple'::regconfig"), " ".join(found))
        matching = select(_VECTORS.c.ticket_id).where(_VECTORS.c[VECTOR_COLUMN].op("@@")(query))
        if public_only:
            matching = matching.where(_VECTORS.c.direction != _INTERNAL)
    else:
        quoted = " ".join(f'"{word}"' for word in found)  # a word has no quote to escape
        matching = (
            select(_MESSAGE.c.ticket_id)
            .select_from(_FTS.join(_MESSAGE, _MESSAGE.c.id == _FTS.c.rowid))
            .where(literal_column(FTS_TABLE).op("MATCH")(quoted))
        )
        if public_only:
            matching = matching.where(_MESSAGE.c.direction != _INTERNAL)
    first = session.execute(matching.limit(PROBE + 1)).scalars().all()
    if len(first) <= PROBE:  # every match: their tickets by id
        return _TICKET.c.id.in_(sorted(set(first)))
    return _TICKET.c.id.in_(matching)


def has_participant(
    session: Session, address: str, *, public_only: bool = False
) -> ColumnElement[bool]:
    """A condition on ticket: `address` (any case) is a participant of it (requester or
    cc), or sent one of its messages (an agent, the desk; with `public_only`, a message
    that is not an internal note)."""
    email = addresses.normalize(address)  # participants are stored lower-case
    sender = (
        func.lower(_MESSAGE.c.from_email)
        if session.get_bind().dialect.name == "postgresql"
        else _MESSAGE.c.from_email.collate("NOCASE")
    )
    senders = select(_MESSAGE.c.ticket_id).where(sender == email)
    if public_only:
        senders = senders.where(_MESSAGE.c.direction != _INTERNAL)
    return _TICKET.c.id.in_(
        union(select(_PARTICIPANT.c.ticket_id).where(_PARTICIPANT.c.email == email), senders)
    )


def has_customer(pattern: str) -> ColumnElement[bool]:
    """A condition on ticket: a participant's address matches a customer `pattern`, an
    address or `*@domain` (mail.addresses.sender_matches, as a token's customer is
    matched: participants are stored lower-case)."""
    pattern = pattern.strip().lower()
    matches: ColumnElement[bool]
    if pattern.startswith("*@"):
        domain = pattern[2:].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        matches = _PARTICIPANT.c.email.like(f"%@{domain}", escape="\\")
    else:
        matches = _PARTICIPANT.c.email == addresses.normalize(pattern)
    return _TICKET.c.id.in_(select(_PARTICIPANT.c.ticket_id).where(matches))


def include_name(name: str | None, type_: str, parent_names: Mapping[Any, Any]) -> bool:
    """Alembic's `include_name`: False for what this module's index is made of, which
    the models do not declare (so that comparing the schema with them, or an
    autogenerated migration, leaves it alone)."""
    if name is None:
        return True
    if type_ == "table":
        return name != FTS_TABLE and not name.startswith(f"{FTS_TABLE}_")
    if type_ == "column":
        return not (name == VECTOR_COLUMN and parent_names.get("table_name") == "message")
    if type_ == "index":
        return name not in INDEXES
    return True
