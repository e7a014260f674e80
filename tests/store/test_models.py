"""store.models.from_row: a table model's instance from column values, without its constructor."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from maild.store.models import Page, Ticket, from_row


def test_from_row_gives_what_the_constructor_gives() -> None:
    when = datetime(2026, 12, 3, 14, 0, tzinfo=UTC)
    values: dict[str, Any] = dict(
        id=7, type="incident", priority="urgent", subject="Down", created_at=when
    )
    made, loaded = Ticket(**values), from_row(Ticket, values)
    assert loaded.model_fields_set == made.model_fields_set == set(values)
    expected, got = made.model_dump(), loaded.model_dump()
    assert got.pop("updated_at") >= expected.pop("updated_at")  # a default factory: called anew
    assert got == expected
    assert (loaded.status, loaded.tags, loaded.assignee) == ("open", [], None)  # the defaults


def test_from_row_calls_each_default_factory_for_each_instance() -> None:
    first, second = from_row(Ticket, {"id": 1}), from_row(Ticket, {"id": 2})
    first.tags.append("x")
    assert second.tags == []
    assert from_row(Ticket, {"id": 3, "tags": ["a"]}).tags == ["a"]


def test_a_loaded_instance_changes_like_a_made_one() -> None:
    loaded = from_row(Ticket, {"id": 1, "type": "question", "priority": "normal"})
    loaded.status = "solved"
    loaded.priority = "high"
    assert (loaded.status, loaded.priority) == ("solved", "high")
    assert loaded.model_dump()["status"] == "solved"
    assert from_row(Page, {"id": 2, "ticket_id": 1}).ticket_id == 1  # any table model
    assert not hasattr(from_row(Ticket, {"id": 4, "unknown": 1}), "unknown")


def test_the_first_instance_of_a_process_can_be_changed() -> None:
    """Made before any constructor or query has configured the mappers (a fresh worker)."""
    import subprocess
    import sys

    code = (
        "from maild.store.models import Ticket, from_row\n"
        "t = from_row(Ticket, {'id': 1, 'type': 'question', 'priority': 'normal'})\n"
        "t.status = 'solved'\n"
        "print(t.status)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout) == (0, "solved\n"), done.stderr
