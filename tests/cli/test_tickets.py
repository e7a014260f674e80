"""`maild tickets set`, its shortcuts, the assignee filters and `tickets attachment`.

Tickets are filed by `maild ingest` (stored and filed at once, no daemon) or by a
running maild over SMTP when pages must reach the HTTPS stand-in for PagerDuty's
Events API (tests/fake_events.py).
"""

from __future__ import annotations

import getpass
import io
import json
import os
import pty
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from maild.cli import main
from maild.config import load_settings
from maild.logs import configure_logging
from maild.store.database import Database
from maild.store.outboxes import list_pages
from tests.conftest import AGENT, RunningMaild, mail, wait_until
from tests.fake_events import FakeEvents
from tests.outbound.test_paging import pagerduty_section

ALICE = "alice@customer.example"
SUPPORT = "support@altis-dxp.com"
HOSTING = "hosting@altis-dxp.com"
SYSOPS = "sysops@altis-dxp.com"
AGENTS = '[desk]\nagents = ["*@altis-dxp.com"]\n'
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) + b"\x00" * 64 + b"IEND"


@pytest.fixture(autouse=True)
def _quiet(quiet_logging: None) -> None:
    """An in-process daemon's logs stay off stdout (see conftest)."""


def cli(config: Path, *args: str, stdin: bytes | None = None) -> Result:
    """`maild ARGS --config CONFIG` in this process; logging put back off stdout after."""
    try:
        return CliRunner().invoke(
            main, [*args, "--config", str(config)], input=stdin, catch_exceptions=False
        )
    finally:
        configure_logging("json", "info", stream=io.StringIO())


def ok(config: Path, *args: str) -> str:
    result = cli(config, *args)
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    return result.stdout


def shown(config: Path, ticket_id: int) -> Any:
    return json.loads(ok(config, "tickets", "show", str(ticket_id), "--json"))


def ingest(config: Path, message: EmailMessage, to: str = HOSTING) -> int:
    """The message stored and filed by `maild ingest`; the id of its ticket."""
    result = cli(config, "ingest", "--recipient", to, "--sender", ALICE, stdin=message.as_bytes())
    assert result.exit_code == 0, result.stderr
    views = json.loads(ok(config, "tickets", "list", "--status", "all", "--json"))
    return max(view["id"] for view in views)


def maild_process(
    config: Path, *args: str, cwd: Path | None = None, stdout: int = subprocess.PIPE
) -> subprocess.CompletedProcess[bytes]:
    """`maild ARGS --config CONFIG` as a process of its own (this checkout's code)."""
    return subprocess.run(
        [sys.executable, "-m", "maild", *args, "--config", str(config)],
        cwd=cwd,
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=60,
        check=False,
    )


def local_user() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}".lower()


# 1. tickets set: events.


def test_set_prints_each_change_and_show_lists_them_as_events(
    make_config: Callable[..., Path],
) -> None:
    """Each change is a line of set's output and an event in show's text and JSON."""
    config = make_config()
    tid = ingest(config, mail("Checkout errors"))
    out = ok(
        config,
        "tickets",
        "set",
        str(tid),
        "--priority",
        "high",
        "--application",
        "shop-prod",
        "--assignee",
        "Jo@Altis-DXP.com",
        "--by",
        AGENT,
    )
    assert out.splitlines() == [
        "priority: normal → high",
        "application: (none) → shop-prod",
        "assignee: (none) → jo@altis-dxp.com",
    ]
    view = shown(config, tid)
    assert [(e["field"], e["old"], e["new"], e["by"]) for e in view["events"]] == [
        ("priority", "normal", "high", AGENT),
        ("application", "", "shop-prod", AGENT),
        ("assignee", None, "jo@altis-dxp.com", AGENT),
    ]
    assert {e["at"] for e in view["events"]} == {view["updated_at"]}
    assert (view["priority"], view["application"], view["assignee"]) == (
        "high",
        "shop-prod",
        "jo@altis-dxp.com",
    )
    text = ok(config, "tickets", "show", str(tid)).splitlines()
    assert "  assignee jo@altis-dxp.com" in text
    events = text[text.index("Events:") + 1 : text.index("Events:") + 4]
    when = view["updated_at"][:19].replace("T", " ")
    assert events == [
        f"  {when}  {AGENT}  priority: normal → high",
        f"  {when}  {AGENT}  application: (none) → shop-prod",
        f"  {when}  {AGENT}  assignee: (none) → jo@altis-dxp.com",
    ]


def test_set_remove_cc_takes_a_cc_off_and_leaves_the_requester(
    make_config: Callable[..., Path],
) -> None:
    config = make_config()
    message = mail("Copies")
    message["Cc"] = "Bob <bob@customer.example>"
    tid = ingest(config, message)
    out = ok(
        config, "tickets", "set", str(tid), "--remove-cc", "BOB@customer.example",
        "--remove-cc", ALICE, "--by", AGENT,
    )  # fmt: skip
    assert out.splitlines() == ["cc: bob@customer.example → (none)"]
    assert [p["email"] for p in shown(config, tid)["participants"]] == [ALICE]
    again = ok(config, "tickets", "set", str(tid), "--remove-cc", "bob@customer.example",
               "--by", AGENT)  # fmt: skip
    assert again.splitlines() == [f"ticket {tid} unchanged: it already is as asked"]


def test_set_json_prints_the_ticket_as_show_json_does(make_config: Callable[..., Path]) -> None:
    """set --json is the changed ticket exactly as `tickets show --json` prints it."""
    config = make_config()
    tid = ingest(config, mail("Checkout errors"))
    printed = json.loads(
        ok(config, "tickets", "set", str(tid), "--status", "pending", "--by", AGENT, "--json")
    )
    assert printed == shown(config, tid)
    assert [(e["field"], e["new"]) for e in printed["events"]] == [("status", "pending")]


def test_set_that_changes_nothing_says_so_and_writes_no_event(
    make_config: Callable[..., Path],
) -> None:
    """Asking for what the ticket already is: exit 0, a line saying so, no event."""
    config = make_config()
    tid = ingest(config, mail("Checkout errors"))
    out = ok(config, "tickets", "set", str(tid), "--priority", "normal", "--by", AGENT)
    assert out == f"ticket {tid} unchanged: it already is as asked\n"
    assert shown(config, tid)["events"] == []


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--by", AGENT], "nothing to change: give --priority, --type, --application, --status"),
        (["--assignee", AGENT, "--unassign", "--by", AGENT], "--assignee and --unassign"),
        (["--priority", "urgent"], "Missing option '--by'"),
        (["--priority", "urgnet", "--by", AGENT], "'urgnet' is not one of"),
        (["--priority", "urgent", "--by", "jo"], "'jo' is not an email address"),
        (["--priority", "urgent", "--by", "Jo <jo@altis-dxp.com>"], "is not an email address"),
        (["--assignee", "jo", "--by", AGENT], "Invalid value for --assignee"),
    ],
)
def test_set_usage_errors_exit_2_and_change_nothing(
    make_config: Callable[..., Path], args: list[str], error: str
) -> None:
    """A request set cannot make as asked exits 2 naming the problem; the ticket stays."""
    config = make_config()
    tid = ingest(config, mail("Checkout errors"))
    result = cli(config, "tickets", "set", str(tid), *args)
    assert (result.exit_code, result.stdout) == (2, "")
    assert error in result.stderr
    assert shown(config, tid)["events"] == []


def test_with_agents_set_by_and_assignee_must_be_agents(
    make_config: Callable[..., Path],
) -> None:
    """[desk] agents: --by or --assignee outside them exits 2; an agent is accepted."""
    config = make_config(AGENTS)
    tid = ingest(config, mail("Checkout errors"))
    stranger = cli(config, "tickets", "set", str(tid), "--priority", "low", "--by", ALICE)
    assert stranger.exit_code == 2
    assert f"{ALICE} is not one of [desk] agents (*@altis-dxp.com)" in stranger.stderr
    assign = cli(config, "tickets", "set", str(tid), "--assignee", ALICE, "--by", AGENT)
    assert assign.exit_code == 2
    assert "Invalid value for --assignee" in assign.stderr
    assert shown(config, tid)["events"] == []
    ok(config, "tickets", "set", str(tid), "--assignee", "sam@altis-dxp.com", "--by", AGENT)
    assert shown(config, tid)["assignee"] == "sam@altis-dxp.com"


def test_set_on_an_unknown_ticket_exits_1_as_show_does(make_config: Callable[..., Path]) -> None:
    """A ticket id that does not exist: `maild: no ticket N` and exit 1."""
    config = make_config()
    ingest(config, mail("Checkout errors"))
    result = cli(config, "tickets", "set", "42", "--priority", "urgent", "--by", AGENT)
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", "maild: no ticket 42\n")


# 2. The shortcuts.


def test_close_solve_and_reopen_are_events_by_the_user_running_them(
    make_config: Callable[..., Path],
) -> None:
    """Each shortcut writes a status event: by --by when given, else USER@HOST."""
    config = make_config()
    tid = ingest(config, mail("Checkout errors"))
    assert ok(config, "tickets", "close", str(tid)) == f"ticket {tid} is closed\n"
    assert ok(config, "tickets", "solve", str(tid), "--by", AGENT) == f"ticket {tid} is solved\n"
    assert ok(config, "tickets", "reopen", str(tid), "--by", AGENT) == f"ticket {tid} is open\n"
    assert ok(config, "tickets", "reopen", str(tid)) == f"ticket {tid} is open\n"  # no change
    assert [(e["field"], e["old"], e["new"], e["by"]) for e in shown(config, tid)["events"]] == [
        ("status", "open", "closed", local_user()),
        ("status", "closed", "solved", AGENT),
        ("status", "solved", "open", AGENT),
    ]


def test_a_shortcuts_by_is_checked_as_sets_is(make_config: Callable[..., Path]) -> None:
    """An explicit --by outside [desk] agents exits 2 for close too."""
    config = make_config(AGENTS)
    tid = ingest(config, mail("Checkout errors"))
    result = cli(config, "tickets", "close", str(tid), "--by", ALICE)
    assert result.exit_code == 2
    assert "not one of [desk] agents" in result.stderr
    assert shown(config, tid)["status"] == "open"


# 3. Assignee filters.


def test_list_filters_by_assignee_and_unassigned(make_config: Callable[..., Path]) -> None:
    """--assignee ADDR and --unassigned select tickets; the JSON rows carry assignee."""
    config = make_config()
    first, second, third = (ingest(config, mail(f"Ticket {n}")) for n in (1, 2, 3))
    ok(config, "tickets", "set", str(first), "--assignee", AGENT, "--by", AGENT)
    ok(config, "tickets", "set", str(third), "--assignee", "sam@altis-dxp.com", "--by", AGENT)

    def listed(*args: str) -> list[tuple[int, str | None]]:
        views = json.loads(ok(config, "tickets", "list", *args, "--json"))
        return [(view["id"], view["assignee"]) for view in views]

    assert listed("--assignee", "JO@altis-dxp.com") == [(first, AGENT)]
    assert listed("--unassigned") == [(second, None)]
    assert sorted(listed()) == [(first, AGENT), (second, None), (third, "sam@altis-dxp.com")]
    ok(config, "tickets", "set", str(first), "--unassign", "--by", AGENT)
    assert sorted(listed("--unassigned")) == [(first, None), (second, None)]
    both = cli(config, "tickets", "list", "--assignee", AGENT, "--unassigned")
    assert both.exit_code == 2
    assert "--assignee and --unassigned cannot be combined" in both.stderr


# 4. Attachments out.


def with_attachments(subject: str, *files: tuple[bytes, str, str]) -> EmailMessage:
    message = mail(subject, body="See attached.")
    for data, filename, kind in files:
        maintype, subtype = kind.split("/")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return message


def test_attachment_writes_the_exact_bytes_numbered_as_show_numbers_them(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Attachments are numbered by message, then within it; N gives that one's exact bytes."""
    config = make_config()
    first = with_attachments(
        "Screenshots", (b"first\n", "a.txt", "text/plain"), (PNG, "shot.png", "image/png")
    )
    tid = ingest(config, first)
    reply = with_attachments("Re: Screenshots", (b"\x00\x01third", "c.bin", "application/x-c"))
    reply["In-Reply-To"] = first["Message-ID"]
    assert ingest(config, reply) == tid
    view = shown(config, tid)
    numbered = [(a["number"], a["filename"]) for m in view["messages"] for a in m["attachments"]]
    assert numbered == [(1, "a.txt"), (2, "shot.png"), (3, "c.bin")]
    text = ok(config, "tickets", "show", str(tid))
    assert "Attachment 2: shot.png (image/png, " in text
    for number, expected in ((1, b"first\n"), (2, PNG), (3, b"\x00\x01third")):
        out = tmp_path / f"out-{number}"
        result = cli(config, "tickets", "attachment", str(tid), str(number), "-o", str(out))
        assert (result.exit_code, result.stdout) == (0, "")
        assert out.read_bytes() == expected
    stdout = cli(config, "tickets", "attachment", str(tid), "2")
    assert (stdout.exit_code, stdout.stdout_bytes, stdout.stderr) == (0, PNG, "")


def test_a_hostile_filename_is_never_used_as_a_path(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """../../etc/x.png from the mail is a name shown (stored as x.png), never a path written."""
    config = make_config()
    tid = ingest(config, with_attachments("Look", (PNG, "../../etc/x.png", "image/png")))
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    out = work / "saved"
    result = maild_process(config, "tickets", "attachment", str(tid), "1", "-o", "saved", cwd=work)
    assert (result.returncode, result.stdout) == (0, b""), result.stderr
    assert out.read_bytes() == PNG
    assert sorted(p.name for p in work.iterdir()) == ["saved"]
    assert not (tmp_path / "etc").exists()
    assert not (tmp_path / "a" / "etc").exists()
    assert [p for p in tmp_path.rglob("*.png")] == []
    assert b"(attachment 1: 'x.png', image/png)" in result.stderr  # its stored, safe name


def test_attachment_number_out_of_range_exits_1_saying_how_many(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """N past the last: exit 1 naming how many there are; 0 is a usage error; no file written."""
    config = make_config()
    tid = ingest(
        config,
        with_attachments("Two", (b"1", "1.txt", "text/plain"), (b"2", "2.txt", "text/plain")),
    )
    bare = ingest(config, mail("None"))
    out = tmp_path / "out"
    result = cli(config, "tickets", "attachment", str(tid), "3", "-o", str(out))
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"maild: ticket {tid} has 2 attachments; there is no attachment 3\n"
    none = cli(config, "tickets", "attachment", str(bare), "1", "-o", str(out))
    assert none.stderr == f"maild: ticket {bare} has no attachments; there is no attachment 1\n"
    zero = cli(config, "tickets", "attachment", str(tid), "0", "-o", str(out))
    assert zero.exit_code == 2
    missing = cli(config, "tickets", "attachment", "42", "1", "-o", str(out))
    assert (missing.exit_code, missing.stderr) == (1, "maild: no ticket 42\n")
    assert not out.exists()


def test_an_existing_file_is_kept_unless_force(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """-o onto an existing file exits 1 and keeps it; --force replaces it whole."""
    config = make_config()
    tid = ingest(config, with_attachments("Shot", (PNG, "shot.png", "image/png")))
    out = tmp_path / "shot.png"
    out.write_bytes(b"mine")
    kept = cli(config, "tickets", "attachment", str(tid), "1", "-o", str(out))
    assert (kept.exit_code, kept.stderr) == (
        1,
        f"maild: {out} exists; give --force to replace it\n",
    )
    assert out.read_bytes() == b"mine"
    forced = cli(config, "tickets", "attachment", str(tid), "1", "-o", str(out), "--force")
    assert forced.exit_code == 0, forced.stderr
    assert out.read_bytes() == PNG
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".maild")) == []


def test_attachment_refuses_to_write_to_a_terminal(make_config: Callable[..., Path]) -> None:
    """Without -o and with stdout a terminal: exit 2 pointing at -o; nothing written to it."""
    config = make_config()
    tid = ingest(config, with_attachments("Shot", (PNG, "shot.png", "image/png")))
    controller, terminal = pty.openpty()
    try:
        result = maild_process(config, "tickets", "attachment", str(tid), "1", stdout=terminal)
        os.set_blocking(controller, False)
        try:
            written = os.read(controller, 4096)
        except BlockingIOError:
            written = b""
    finally:
        os.close(terminal)
        os.close(controller)
    assert result.returncode == 2
    assert b"will not write an attachment to a terminal: give -o FILE" in result.stderr
    assert written == b""


# 5. Paging, end to end: a running maild sends what the CLI queued.


@pytest.fixture
def events(tmp_path: Path) -> Iterator[FakeEvents]:
    with FakeEvents(tmp_path / "events") as fake:
        yield fake


def pages_of(database: Database) -> list[dict[str, Any]]:
    return list(reversed(database.run_read(lambda s: list_pages(s))))


def test_raising_to_urgent_pages_and_solving_resolves_under_the_same_key(
    make_config: Callable[..., Path], events: FakeEvents
) -> None:
    """set --priority urgent on a hosting@ incident reaches PagerDuty as a trigger carrying the
    subject; set --status solved sends the resolve with its dedup key."""
    config = make_config(pagerduty_section(events.url, events.ca_file))
    subject = "Checkout errors since nine"
    with RunningMaild(load_settings(config)) as maild:
        maild.send(mail(subject, to=HOSTING), [HOSTING], sender=ALICE)
        maild.settle()
        (ticket,) = maild.tickets()
        tid = ticket["id"]
        raised = ok(config, "tickets", "set", str(tid), "--priority", "urgent", "--by", AGENT)
        (trigger,) = events.wait_for(1)
        key = trigger["dedup_key"]
        assert raised.splitlines() == [
            "priority: normal → urgent",
            f"PagerDuty trigger queued as page 1 (dedup key {key})",
        ]
        solved = ok(config, "tickets", "set", str(tid), "--status", "solved", "--by", AGENT)
        resolve = events.wait_for(2)[1]
        database = maild.service.database
        wait_until(lambda: [p["status"] for p in pages_of(database)] == ["sent", "sent"])
        view = maild.ticket(tid)
    assert trigger["event_action"] == "trigger"
    assert subject in trigger["payload"]["summary"]
    assert f"raised by {AGENT}" in trigger["payload"]["summary"]
    assert trigger["payload"]["custom_details"]["route"] == "sysops"
    assert solved.splitlines() == [
        "status: open → solved",
        f"PagerDuty resolve queued as page 2 (dedup key {key})",
    ]
    assert (resolve["event_action"], resolve["dedup_key"]) == ("resolve", key)
    assert [(e["field"], e["new"], e["by"]) for e in view["events"]] == [
        ("priority", "urgent", AGENT),
        ("status", "solved", AGENT),
    ]
    assert len(events.events) == 2


def test_lowering_the_priority_resolves_the_incident(
    make_config: Callable[..., Path], events: FakeEvents
) -> None:
    """A sysops@ incident lowered to high: its incident is resolved under the same key."""
    config = make_config(pagerduty_section(events.url, events.ca_file))
    with RunningMaild(load_settings(config)) as maild:
        maild.send(mail("Site down", to=SYSOPS), [SYSOPS], sender=ALICE)
        (trigger,) = events.wait_for(1)
        (ticket,) = maild.tickets()
        out = ok(config, "tickets", "set", str(ticket["id"]), "--priority", "high", "--by", AGENT)
        resolve = events.wait_for(2)[1]
    assert "PagerDuty resolve queued as page 2" in out
    assert (resolve["event_action"], resolve["dedup_key"]) == ("resolve", trigger["dedup_key"])


def test_the_allow_list_withholds_the_page_of_a_change(
    make_config: Callable[..., Path], events: FakeEvents
) -> None:
    """--by outside [escalation] allowed_senders: the trigger is withheld, with the reason
    printed and shown on the ticket; nothing reaches PagerDuty."""
    config = make_config(
        pagerduty_section(events.url, events.ca_file)
        + '[escalation]\nallowed_senders = ["*@trusted.example"]\n'
    )
    with RunningMaild(load_settings(config)) as maild:
        maild.send(mail("Checkout errors", to=HOSTING), [HOSTING], sender=ALICE)
        maild.settle()
        (ticket,) = maild.tickets()
        out = ok(config, "tickets", "set", str(ticket["id"]), "--priority", "urgent", "--by", AGENT)
        view = maild.ticket(ticket["id"])
    reason = f"sender {AGENT} is not in [escalation] allowed_senders"
    assert out.splitlines()[-1] == f"PagerDuty trigger withheld (page 1): {reason}"
    assert view["page"] == {"id": 1, "action": "trigger", "status": "withheld", "reason": reason}
    assert events.requests == 0
