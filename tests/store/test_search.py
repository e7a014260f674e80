"""Finding tickets by the words of any message, by a participant's address, by application
(store/search.py, migration 0009), on SQLite (FTS5) and PostgreSQL (tsvector, GIN)."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlmodel import Session, col, select

from maild.store import search
from maild.store.database import Database
from maild.store.models import Message, Participant, Ticket
from maild.store.schema import (
    downgrade,
    head_revision,
    previous_revision,
    schema_state,
    upgrade,
)
from maild.store.search import (
    FTS_TABLE,
    INDEXES,
    MAX_WORDS,
    TEXT_INDEXED,
    TRIGGERS,
    VECTOR_COLUMN,
    TooManyWords,
    words,
)
from maild.store.tickets import list_tickets

BEFORE = previous_revision("0009")  # the schema without the search index
_numbers = itertools.count(1)


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    db.create_schema()
    yield db
    db.close()


def add_ticket(
    database: Database,
    *messages: str | tuple[str, str],
    subject: str = "A question",
    requester: str = "alice@customer.example",
    cc: tuple[str, ...] = (),
    senders: tuple[str, ...] = (),
    application: str = "",
    kind: str = "human",
) -> int:
    """A ticket with a message for each text (or (kind, text)); the first from the
    requester, the others from `senders` in turn, else the requester too."""

    def work(session: Session) -> int:
        ticket = Ticket(
            type="question",
            priority="normal",
            subject=subject,
            requester_email=requester,
            application=application,
        )
        session.add(ticket)
        session.flush()
        assert ticket.id is not None
        session.add(Participant(ticket_id=ticket.id, email=requester, role="requester"))
        for address in cc:
            session.add(Participant(ticket_id=ticket.id, email=address, role="cc"))
        for index, body in enumerate(messages):
            number = next(_numbers)
            sender = senders[index - 1] if 0 < index <= len(senders) else requester
            what, words_ = body if isinstance(body, tuple) else (kind, body)
            session.add(
                Message(
                    ticket_id=ticket.id,
                    message_id=f"m{number}@test.example",
                    message_id_hash=f"h{number}",
                    from_email=sender,
                    subject=subject if index == 0 else f"Re: {subject}",
                    text=words_,
                    kind=what,
                    direction="outbound" if what in ("ack", "agent") else "inbound",
                )
            )
        return ticket.id

    return database.run_write(work)


def found(database: Database, **filters: Any) -> list[int]:
    """The ids list_tickets gives for these filters, every status, newest first."""
    views = database.run_read(lambda s: list_tickets(s, status="all", **filters))
    return [view["id"] for view in views]


def test_a_word_only_in_a_follow_up_finds_its_ticket(database: Database) -> None:
    """A word that only a follow-up's text has (not the subject, not the first message)
    finds the ticket."""
    first = add_ticket(database, "Our site is slow.", "The log says zebra42 again.")
    second = add_ticket(database, "Nothing to see here.")
    assert found(database, search="zebra42") == [first]
    assert found(database, search="slow") == [first]
    assert found(database, search="question") == [second, first]  # the subject


def test_every_word_must_be_in_one_message(database: Database) -> None:
    """A ticket is found when one of its messages has all the words, in any order and
    case, in its subject or text; words spread over two messages do not count."""
    spread = add_ticket(database, "The cache is stale.", "Purge failed twice.")
    together = add_ticket(database, "Purge of the cache failed.", subject="Cache")
    across = add_ticket(database, "It failed at noon.", subject="Purge")
    assert found(database, search="cache purge") == [together]
    assert found(database, search="FAILED Purge cache") == [together]
    assert found(database, search="purge failed") == [across, together, spread]
    assert found(database, search="stale twice") == []


def test_a_search_many_messages_match_finds_the_same_tickets(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past PROBE matching messages, the tickets come from a subquery rather than a list
    of their ids: the same tickets, in the same order, with --limit too."""
    tickets = [add_ticket(database, "Purge the cache.", "Cache again.") for _ in range(4)]
    add_ticket(database, "Something else.")
    newest_first = list(reversed(tickets))
    assert found(database, search="cache") == newest_first
    monkeypatch.setattr(search, "PROBE", 2)
    assert found(database, search="cache") == newest_first
    assert found(database, search="cache", limit=2) == newest_first[:2]
    assert found(database, search="purge cache") == newest_first


def test_a_search_without_words_finds_nothing(database: Database) -> None:
    """Letters and digits make words; a search of punctuation alone finds no ticket."""
    add_ticket(database, "Hello * world")
    assert words(" *-- ()\"' ") == []
    assert found(database, search="*") == []
    assert found(database, search="") == []


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ('"zebra"', True),  # quotes
        ('"zebra', True),  # an unbalanced quote
        ("(zebra)", True),  # parentheses
        ("^zebra", True),  # FTS5's start-of-column
        ("zebra -giraffe", True),  # no NOT: both words are there
        ("zebra NOT giraffe", False),  # NOT is a word, and not in the text
        ("zebra OR okapi", False),  # OR is a word: no message has "or" and "okapi"
        ("NEAR(zebra giraffe)", False),  # NEAR is a word too
        ("zeb*", False),  # no prefix search: "zeb" is a word of its own
        ("subject:zebra", False),  # no column filter: "subject" is a word
        ("zebra AND", False),
        ("{text}: giraffe", False),
    ],
)
def test_search_syntax_is_read_as_words(database: Database, query: str, expected: bool) -> None:
    """Quotes, *, NEAR, OR, NOT, -, ^, parentheses and column filters are neither
    errors nor query syntax: only the words in them count, all of them."""
    ticket = add_ticket(database, "The zebra met a giraffe.", subject="Animals")
    assert found(database, search=query) == ([ticket] if expected else [])


@pytest.mark.parametrize(
    "query",
    [
        *("db1", "db1.example.com", "example com", "ops", "ops+x@db1.example.com"),
        *("v2", "v2.4.1", "fail", "over", "fail-over", "usr", "/usr/lib", "a_b", "b"),
        *("tag", "14", "05"),
    ],
)
def test_words_are_letters_and_digits_on_every_database(database: Database, query: str) -> None:
    """Addresses, host names, paths, versions, hyphenated words, tags and times are
    words separated by their punctuation, on PostgreSQL as on SQLite: any of their
    words finds the message."""
    ticket = add_ticket(
        database, "Mail ops+x@db1.example.com: v2.4.1 fail-over in /usr/lib a_b <tag> at 14:05"
    )
    assert found(database, search=query) == [ticket]


def test_more_than_max_words_is_refused(database: Database) -> None:
    """A search of more than MAX_WORDS words raises TooManyWords, naming the limit."""
    many = " ".join(f"w{n}" for n in range(MAX_WORDS + 1))
    assert len(words(" ".join(f"w{n}" for n in range(MAX_WORDS)))) == MAX_WORDS
    with pytest.raises(TooManyWords, match=f"at most {MAX_WORDS} words, not {MAX_WORDS + 1}"):
        found(database, search=many)


def test_only_the_first_characters_of_a_long_text_are_indexed(database: Database) -> None:
    """A word within the first TEXT_INDEXED characters of a text is found; one after is not."""
    filler = "x " * (TEXT_INDEXED // 2)
    ticket = add_ticket(database, f"early {filler} late")
    assert found(database, search="early") == [ticket]
    assert found(database, search="late") == []


def test_maild_own_template_mail_is_not_searched(database: Database) -> None:
    """The words of an acknowledgement (which every ticket gets) find nothing; an agent's
    reply and an auto-reply are searched like a customer's mail."""
    ticket = add_ticket(
        database,
        "My page is blank.",
        ("ack", "Is your site down? Mail sysops@ to page on-call."),
        ("agent", "We restarted the worker."),
        ("auto", "I am out of the office."),
    )
    assert found(database, search="site down") == []
    assert found(database, search="restarted worker") == [ticket]
    assert found(database, search="office") == [ticket]


def test_the_index_follows_changed_and_deleted_messages(database: Database) -> None:
    """A message's new text is searched instead of its old one; a deleted message, or one
    that became an acknowledgement, is found no more."""
    ticket = add_ticket(database, "The old words.", "Second message.")

    def change(session: Session) -> None:
        first, second = session.exec(select(Message).order_by(col(Message.id))).all()
        first.text = "The new words."
        second.kind = "ack"
        session.add_all([first, second])

    database.run_write(change)
    assert found(database, search="old") == []
    assert found(database, search="new words") == [ticket]
    assert found(database, search="second") == []

    def delete(session: Session) -> None:
        session.execute(text("DELETE FROM message"))

    database.run_write(delete)
    assert found(database, search="new") == []


def test_participant_finds_requester_cc_and_any_sender_in_any_case(database: Database) -> None:
    """--participant finds a ticket by its requester, a CC, or the sender of any of its
    messages (an agent, who is no participant), whatever the case or angle brackets."""
    first = add_ticket(database, "Hello", cc=("carol@customer.example",))
    second = add_ticket(
        database, "Hi", "Answered.", requester="bob@shop.example", senders=("Jo@Altis-DXP.com",)
    )
    assert found(database, participant="carol@customer.example") == [first]
    assert found(database, participant="CAROL@Customer.Example") == [first]
    assert found(database, participant="<alice@customer.example>") == [first]
    assert found(database, participant="bob@shop.example") == [second]
    assert found(database, participant="jo@altis-dxp.com") == [second]
    assert found(database, participant="nobody@customer.example") == []
    assert found(database, participant="carol") == []


def test_application_is_matched_exactly(database: Database) -> None:
    """--application keeps the tickets of that application, exactly as routed."""
    shop = add_ticket(database, "One", application="shop-production")
    add_ticket(database, "Two", application="shop-staging")
    none = add_ticket(database, "Three")
    assert found(database, application="shop-production") == [shop]
    assert found(database, application="shop") == []
    assert found(database, application="") == [none]


def test_the_filters_combine(database: Database) -> None:
    """--participant, --application and --search narrow each other, with --status."""
    match = add_ticket(database, "Checkout 502", application="shop", cc=("c@x.example",))
    add_ticket(database, "Checkout 502", application="blog", cc=("c@x.example",))
    add_ticket(database, "Checkout 502", application="shop")
    add_ticket(database, "Login fails", application="shop", cc=("c@x.example",))
    filters = {"participant": "c@x.example", "application": "shop", "search": "502"}
    assert found(database, **filters) == [match]
    views = database.run_read(lambda s: list_tickets(s, status="closed", **filters))
    assert views == []


def search_objects(database: Database) -> set[str]:
    """The names of the search index's parts that exist in the database."""
    with database.write_engine.connect() as connection:
        schema = inspect(connection)
        names = set(schema.get_table_names()) & {FTS_TABLE}
        names |= {c["name"] for c in schema.get_columns("message")} & {VECTOR_COLUMN}
        names |= {i["name"] or "" for i in schema.get_indexes("message")} & INDEXES
        if database.is_sqlite:
            rows = connection.execute(
                text("SELECT name FROM sqlite_master WHERE type = 'trigger'")
            ).all()
            names |= {name for (name,) in rows}
    return names


def test_the_index_exists_at_head(database: Database) -> None:
    """At head the index and what keeps it are all there: on SQLite the FTS5 table and its
    three triggers, on PostgreSQL the generated column and its GIN index; on both the
    folded sender index. (A migration that rebuilt message on SQLite would lose the
    triggers.)"""
    expected = (
        {FTS_TABLE, *TRIGGERS, "ix_message_from_email_folded"}
        if database.is_sqlite
        else {VECTOR_COLUMN, *INDEXES}
    )
    assert search_objects(database) == expected


def test_upgrading_indexes_stored_messages_and_downgrading_removes_the_index(
    make_config: Callable[..., Path], database_url: str
) -> None:
    """Messages stored before the index are found after `maild db upgrade`; a downgrade
    removes the index and keeps the messages; upgrading again indexes them again."""
    database = Database(database_url)
    try:
        upgrade(database.write_engine, BEFORE)
        with database.write_engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO ticket (type, priority, status, subject, requester_email, "
                    "requester_name, rule, rules_version, application, tags, created_at, "
                    "updated_at) VALUES ('question', 'normal', 'open', 'Old', 'a@x.example', "
                    "'', 'support', 'v1', 'shop', '[]', '2026-01-01 00:00:00', "
                    "'2026-01-01 00:00:00')"
                )
            )
            for n, (kind, body) in enumerate([("human", "a stored okapi"), ("ack", "site down")]):
                connection.execute(
                    text(
                        "INSERT INTO message (ticket_id, message_id, message_id_hash, "
                        'message_id_synthesized, in_reply_to, "references", from_email, '
                        'from_name, "to", cc, subject, text, rule, rules_version, defects, '
                        "direction, kind, auto_reasons, created_at) VALUES (1, :mid, :mid, "
                        "false, '[]', '[]', 'Agent@X.example', '', '[]', '[]', 'Old', :body, "
                        "'support', '', '[]', 'inbound', :kind, '[]', '2026-01-01 00:00:00')"
                    ).bindparams(mid=f"m{n}@x", body=body, kind=kind)
                )
        upgraded = subprocess.run(
            [sys.executable, "-m", "maild", "db", "upgrade", "--config", str(make_config())],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert upgraded.returncode == 0, upgraded.stderr
        assert schema_state(database.write_engine).current == head_revision()
        assert found(database, search="okapi stored") == [1]
        assert found(database, search="site down") == []
        assert found(database, participant="agent@x.example") == [1]
        assert found(database, application="shop") == [1]

        downgrade(database.write_engine, BEFORE)
        assert search_objects(database) == set()
        with database.write_engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM message")).scalar() == 2
            indexes = {i["name"] for i in inspect(connection).get_indexes("ticket")}
        assert "ix_ticket_application_updated" not in indexes

        upgrade(database.write_engine)
        assert found(database, search="okapi") == [1]
    finally:
        database.close()
