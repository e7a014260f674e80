"""The `maild` command: config lookup, tickets, rules, ingest, serve, inbound and reprocess."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy.engine import make_url

from maild.cli import main
from maild.config import load_settings
from maild.receive.spool import Delivery, insert_deliveries
from maild.routing.rules import load_rules
from maild.store.database import Database
from tests.conftest import BILLING, RunningMaild, mail, write_config

TICKET_KEYS = {
    "id",
    "type",
    "priority",
    "status",
    "subject",
    "requester",
    "participants",
    "rule",
    "rules_version",
    "application",
    "tags",
    "assignee",
    "created_at",
    "updated_at",
    "message_count",
    "page",
}
MESSAGE_KEYS = ("message_id", "from", "to", "cc", "subject", "date", "text", "attachments")
INBOUND_KEYS = ("id", "status", "protocol", "mail_from", "rcpt_tos", "size", "ticket_id", "error")
TYPE_ERROR = "type must be one of question, incident, problem, task, not 'incidnet'"
PRIORITY_ERROR = "priority must be one of low, normal, high, urgent, not 'urgnet'"
FAILED_EVENT = "message failed processing; kept for `maild reprocess`"
NO_ROUTE = (
    "ProcessingError: no route for billing@altis-dxp.com in the current rules (they changed "
    "after the message was accepted); fix the rules, then `maild reprocess`"
)


@pytest.fixture(autouse=True)
def _quiet(quiet_logging: None) -> None:
    """Every CLI test keeps the in-process daemon's logs off stdout (see conftest)."""


@pytest.fixture
def rules_config(tmp_path: Path, rules_dir: Path) -> Path:
    """A config that names only the rules folder (for commands that never open the database)."""
    return write_config(
        tmp_path, f'[smtp]\nlisten = "127.0.0.1:0"\n\n[rules]\npath = "{rules_dir}"\n'
    )


def cli(config: Path | None, *args: str, env: dict[str, str | None] | None = None) -> Result:
    """Run `maild ARGS --config CONFIG` in this process."""
    options = ["--config", str(config)] if config is not None else []
    return CliRunner().invoke(main, [*args, *options], env=env, catch_exceptions=False)


def upgraded(config: Path) -> Path:
    """The config, its database created by `maild db upgrade` (as an installed desk has it:
    read-only commands no longer create one)."""
    result = cli(config, "db", "upgrade")
    assert result.exit_code == 0, result.output
    return config


def cli_json(config: Path, *args: str) -> Any:
    """The parsed JSON of a `maild ... --json` run that must succeed."""
    result = cli(config, *args, "--json")
    assert (result.exit_code, result.stderr) == (0, "")
    return json.loads(result.stdout)


def ids(config: Path, *args: str) -> list[int]:
    """The ticket ids `maild tickets list ARGS --json` prints, in order."""
    return [view["id"] for view in cli_json(config, "tickets", "list", *args)]


def maild_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "maild", *args]


def run(
    command: list[str], stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a real process with MAILD_CONFIG unset (unless given) and wait for it."""
    environment = {k: v for k, v in os.environ.items() if k != "MAILD_CONFIG"}
    return subprocess.run(
        command,
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
        env={**environment, **(env or {})},
    )


def ingest(config: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """`maild ingest --config CONFIG ARGS` as an MTA pipe transport would run it."""
    return run(maild_command("ingest", "--config", str(config), *args), stdin)


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))


def line_of(path: Path, text: str) -> int:
    """The 1-based number of the only line of `path` that is exactly `text`."""
    numbers = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line == text]
    assert len(numbers) == 1
    return numbers[0]


def break_rules(rules_dir: Path) -> Path:
    """Misspell the hosting route's type on line 16 and sysops' priority on line 24."""
    desk = rules_dir / "desk.toml"
    replace_in(
        desk, 'type = "incident"\npriority = "normal"', 'type = "incidnet"\npriority = "normal"'
    )
    replace_in(desk, 'priority = "urgent"', 'priority = "urgnet"')
    assert (line_of(desk, 'type = "incidnet"'), line_of(desk, 'priority = "urgnet"')) == (16, 24)
    return desk


def open_three(maild: RunningMaild) -> list[EmailMessage]:
    """Tickets 1, 2 and 3 (a question, an incident, an urgent incident), oldest first."""
    messages = [
        mail(
            "Backups missing",
            to="support@altis-dxp.com",
            body="Where are last night's backups?",
            Cc="Bob <bob@customer.example>",
        ),
        mail(
            "Deploy stuck",
            to="hosting@humanmade.com",
            frm="Carol Jones <carol@agency.example>",
            body="The pipeline hangs at the build step.",
        ),
        mail(
            "Site down",
            to="sysops@altis-dxp.com",
            frm="Dave <dave@shop.example>",
            body="Every page answers 502 since nine.",
        ),
    ]
    for message in messages:
        maild.send(message, [message["To"]])
        maild.settle()  # one at a time, so each ticket is updated later than the one before
    return messages


def test_maild_config_environment_variable_is_the_default_config(
    rules_config: Path, rules_dir: Path
) -> None:
    """Without --config the file named by $MAILD_CONFIG is read."""
    (rules_dir / "billing.toml").write_text(BILLING)
    result = cli(None, "rules", "check", env={"MAILD_CONFIG": str(rules_config)})
    version = load_rules(rules_dir).version
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == (
        f"ok: 4 routes, 2 domains (altis-dxp.com, humanmade.com), version {version[:12]}\n"
    )


def test_config_option_wins_over_the_environment_variable(
    rules_config: Path, tmp_path: Path
) -> None:
    """--config PATH is used even when $MAILD_CONFIG names another (missing) file."""
    env: dict[str, str | None] = {"MAILD_CONFIG": str(tmp_path / "elsewhere.toml")}
    result = cli(rules_config, "rules", "test", "support@altis-dxp.com", env=env)
    assert (result.exit_code, result.stderr) == (0, "")


@pytest.mark.parametrize(
    "command",
    [
        ["serve"],
        ["reprocess"],
        ["tickets", "list"],
        ["tickets", "show", "1"],
        ["tickets", "close", "1"],
        ["tickets", "solve", "1"],
        ["tickets", "reopen", "1"],
        ["tickets", "set", "1", "--status", "closed", "--by", "jo@altis-dxp.com"],
        ["tickets", "attachment", "1", "1"],
        ["rules", "check"],
        ["rules", "test", "support@altis-dxp.com"],
        ["inbound", "list"],
        ["inbound", "show", "1"],
    ],
)
def test_missing_config_file_exits_78_naming_the_path(command: list[str], tmp_path: Path) -> None:
    """Every command refuses a config path that does not exist with exit 78 and the path."""
    missing = tmp_path / "nowhere" / "config.toml"
    result = cli(missing, *command)
    assert (result.exit_code, result.stdout) == (78, "")
    assert result.stderr == (
        f"maild: {missing}: no such config file (set --config or MAILD_CONFIG)\n"
    )


def test_missing_config_named_by_the_environment_variable_is_named(tmp_path: Path) -> None:
    """A $MAILD_CONFIG that points nowhere is reported by its path with exit 78."""
    missing = tmp_path / "from-env.toml"
    result = cli(None, "tickets", "list", env={"MAILD_CONFIG": str(missing)})
    assert (result.exit_code, result.stdout) == (78, "")
    assert result.stderr == (
        f"maild: {missing}: no such config file (set --config or MAILD_CONFIG)\n"
    )


def test_without_option_or_variable_the_config_is_etc_maild() -> None:
    """With neither --config nor $MAILD_CONFIG, /etc/maild/config.toml is the file read."""
    if Path("/etc/maild/config.toml").exists():
        pytest.skip("this machine has a real /etc/maild/config.toml")
    result = cli(None, "rules", "check", env={"MAILD_CONFIG": None})
    assert (result.exit_code, result.stdout) == (78, "")
    assert result.stderr == (
        "maild: /etc/maild/config.toml: no such config file (set --config or MAILD_CONFIG)\n"
    )


@pytest.mark.parametrize(
    ("command", "body", "problem"),
    [
        (
            ["tickets", "list"],
            '[smtp]\nlisten = "127.0.0.1:0"\nlisten_backlog = 100\n',
            "3: [smtp] listen_backlog: unknown key",
        ),
        (
            ["rules", "check"],
            '[smtp]\nlisten = "127.0.0.1:0"\nlisten_backlog = 100\n',
            "3: [smtp] listen_backlog: unknown key",
        ),
        (["reprocess"], '\n[smpt]\nlisten = "127.0.0.1:0"\n', "2: [smpt]: unknown section"),
        (["inbound", "list"], 'source = "/etc/other.toml"\n', "1: source: unknown key"),
    ],
)
def test_unknown_config_key_exits_78_naming_the_key(
    command: list[str], body: str, problem: str, tmp_path: Path
) -> None:
    """A config key or section maild does not know is refused by file, line and name."""
    config = write_config(tmp_path, body)
    result = cli(config, *command)
    assert (result.exit_code, result.stdout) == (78, "")
    assert result.stderr == f"maild: {config}:{problem}\n"


def test_tickets_list_json_has_the_contract_shape(maild: RunningMaild) -> None:
    """tickets list --json gives each ticket's fields, participants and lowercase enums."""
    open_three(maild)
    views = cli_json(maild.settings.source, "tickets", "list")
    assert [set(view) for view in views] == [TICKET_KEYS] * 3
    stamps = [(view.pop("created_at"), view.pop("updated_at")) for view in views]
    version = maild.service.rules.version
    assert [view.pop("rules_version") for view in views] == [version] * 3
    assert [(view.pop("application"), view.pop("tags")) for view in views] == [("", [])] * 3
    assert [view.pop("assignee") for view in views] == [None] * 3
    assert views == [
        {
            "id": 3,
            "type": "incident",
            "priority": "urgent",
            "status": "open",
            "subject": "Site down",
            "requester": "dave@shop.example",
            "participants": [{"email": "dave@shop.example", "name": "Dave", "role": "requester"}],
            "rule": "sysops",
            "message_count": 1,
            "page": {
                "id": 1,
                "action": "trigger",
                "status": "withheld",
                "reason": "paging disabled ([pagerduty] enabled = false)",
            },
        },
        {
            "id": 2,
            "type": "incident",
            "priority": "normal",
            "status": "open",
            "subject": "Deploy stuck",
            "requester": "carol@agency.example",
            "participants": [
                {"email": "carol@agency.example", "name": "Carol Jones", "role": "requester"}
            ],
            "rule": "hosting",
            "message_count": 1,
            "page": None,
        },
        {
            "id": 1,
            "type": "question",
            "priority": "normal",
            "status": "open",
            "subject": "Backups missing",
            "requester": "alice@customer.example",
            "participants": [
                {"email": "alice@customer.example", "name": "Alice Example", "role": "requester"},
                {"email": "bob@customer.example", "name": "Bob", "role": "cc"},
            ],
            "rule": "support",
            "message_count": 1,
            "page": None,
        },
    ]
    times = [(datetime.fromisoformat(c), datetime.fromisoformat(u)) for c, u in stamps]
    assert [(c.utcoffset(), u.utcoffset(), c == u) for c, u in times] == [
        (timedelta(0), timedelta(0), True)
    ] * 3


def test_tickets_list_status_filter(maild: RunningMaild) -> None:
    """--status open is open+pending (the default), closed is solved+closed, all is every one."""
    open_three(maild)
    config = maild.settings.source
    close = cli(config, "tickets", "close", "2")
    assert (close.exit_code, close.stdout) == (0, "ticket 2 is closed\n")
    assert ids(config) == [3, 1]
    assert ids(config, "--status", "open") == [3, 1]
    assert ids(config, "--status", "closed") == [2]
    assert ids(config, "--status", "all") == [2, 3, 1]
    solve = cli(config, "tickets", "solve", "1")
    assert (solve.exit_code, solve.stdout) == (0, "ticket 1 is solved\n")
    assert ids(config) == [3]
    assert ids(config, "--status", "closed") == [1, 2]
    assert ids(config, "--status", "solved") == [1]
    assert ids(config, "--status", "all") == [1, 2, 3]


def test_tickets_list_type_and_priority_filters(maild: RunningMaild) -> None:
    """--type and --priority keep only tickets of that type or priority, and combine."""
    open_three(maild)
    config = maild.settings.source
    assert ids(config, "--type", "incident") == [3, 2]
    assert ids(config, "--type", "question") == [1]
    assert ids(config, "--type", "task") == []
    assert ids(config, "--priority", "urgent") == [3]
    assert ids(config, "--priority", "normal") == [2, 1]
    assert ids(config, "--priority", "low") == []
    assert ids(config, "--type", "incident", "--priority", "normal") == [2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("backups MISSING", [1]),  # subject, any case
        ("pipeline hangs", [2]),  # message body
        ("502", [3]),  # message body
        ("dave@shop.example", [3]),  # requester address
        ("Carol Jones", [2]),  # requester name
        ("customer.example", [1]),
        ("no such words", []),
    ],
)
def test_tickets_list_search(maild: RunningMaild, text: str, expected: list[int]) -> None:
    """--search finds text in the subject, the message bodies or the requester."""
    open_three(maild)
    assert ids(maild.settings.source, "--search", text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100%", [1]),
        ("%", [1]),
        ("user_a", [3]),
        ("_", [3]),
        ("C:\\temp", [5]),
    ],
)
def test_tickets_list_search_is_literal_text(
    maild: RunningMaild, text: str, expected: list[int]
) -> None:
    """--search matches its text literally: %, _ and \\ are not pattern characters."""
    subjects = [
        "Disk at 100% full",
        "Disk at 1000 GB",
        "Quota for user_a",
        "Quota for user-a",
        "Logs fill C:\\temp",
    ]
    for subject in subjects:
        maild.send(mail(subject), ["support@altis-dxp.com"])
    maild.settle()
    assert ids(maild.settings.source, "--search", text) == expected


def test_tickets_list_is_most_recently_updated_first(maild: RunningMaild) -> None:
    """A reply or a status change moves a ticket to the top of the list."""
    first, _, _ = open_three(maild)
    config = maild.settings.source
    assert ids(config) == [3, 2, 1]
    reply = mail("Re: Backups missing", body="Still missing.", In_Reply_To=first["Message-ID"])
    maild.send(reply, ["support@altis-dxp.com"])
    maild.settle()
    assert ids(config) == [1, 3, 2]
    assert cli(config, "tickets", "close", "2").exit_code == 0
    assert ids(config, "--status", "all") == [2, 1, 3]
    assert ids(config, "--limit", "1") == [1]


def test_tickets_list_human_output_is_a_table(maild: RunningMaild) -> None:
    """Without --json the tickets are rows of a table under a header row."""
    open_three(maild)
    result = cli(maild.settings.source, "tickets", "list")
    assert (result.exit_code, result.stderr) == (0, "")
    header, rule, *rows = result.stdout.splitlines()
    assert header.split() == [
        "ID",
        "TYPE",
        "PRIORITY",
        "STATUS",
        "PAGE",
        "MSGS",
        "UPDATED",
        "REQUESTER",
        "SUBJECT",
    ]
    assert set(rule) == {"-", " "}
    assert [row.split()[:6] for row in rows] == [
        ["3", "incident", "urgent", "open", "withheld", "1"],  # paging is off in tests
        ["2", "incident", "normal", "open", "-", "1"],
        ["1", "question", "normal", "open", "-", "1"],
    ]
    assert [row.split()[8:] for row in rows] == [
        ["dave@shop.example", "Site", "down"],
        ["carol@agency.example", "Deploy", "stuck"],
        ["alice@customer.example", "Backups", "missing"],
    ]


def test_tickets_list_human_output_without_tickets(make_config: Callable[..., Path]) -> None:
    """An empty desk says so instead of printing an empty table."""
    result = cli(upgraded(make_config()), "tickets", "list")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "no tickets\n", "")


def test_tickets_show_json_adds_the_messages(maild: RunningMaild) -> None:
    """tickets show --json is the list view plus every message with its attachments."""
    message = mail(
        "Backups missing",
        body="Where are last night's backups?",
        Cc="Bob <bob@customer.example>",
        Date="Mon, 24 Nov 2025 09:30:00 +0100",
    )
    message.add_attachment(b"log line\n", maintype="text", subtype="plain", filename="error.log")
    maild.send(message, ["support@altis-dxp.com"])
    maild.settle()
    view = cli_json(maild.settings.source, "tickets", "show", "1")
    assert set(view) == TICKET_KEYS | {"messages", "pages", "acknowledgements", "events"}
    assert view["events"] == []
    assert {key: view[key] for key in ("id", "type", "priority", "status", "message_count")} == {
        "id": 1,
        "type": "question",
        "priority": "normal",
        "status": "open",
        "message_count": 1,
    }
    assert [{key: m[key] for key in MESSAGE_KEYS} for m in view["messages"]] == [
        {
            "message_id": message["Message-ID"],
            "from": {"name": "Alice Example", "email": "alice@customer.example"},
            "to": [{"name": "", "email": "support@altis-dxp.com"}],
            "cc": [{"name": "Bob", "email": "bob@customer.example"}],
            "subject": "Backups missing",
            "date": "2025-11-24T08:30:00+00:00",
            "text": "Where are last night's backups?",
            "attachments": [
                {
                    "number": 1,
                    "filename": "error.log",
                    "content_type": "text/plain",
                    "size": 9,
                    "sha256": hashlib.sha256(b"log line\n").hexdigest(),
                }
            ],
        }
    ]


def test_tickets_show_text_has_plain_newlines_whichever_way_mail_came(
    maild: RunningMaild, tmp_path: Path
) -> None:
    """A multi-line body reads the same over SMTP (CRLF on the wire) and through a LF pipe."""
    body = "First line.\nSecond line."
    maild.send(mail("Over SMTP", body=body), ["support@altis-dxp.com"])
    maild.settle()
    piped = tmp_path / "piped.eml"
    piped.write_bytes(mail("Through a pipe", body=body).as_bytes())
    result = ingest(maild.settings.source, "--recipient", "support@altis-dxp.com", str(piped))
    assert result.returncode == 0
    config = maild.settings.source
    texts = [cli_json(config, "tickets", "show", n)["messages"][0]["text"] for n in ("1", "2")]
    assert texts == [body, body]


def test_tickets_show_unknown_id_exits_1(make_config: Callable[..., Path]) -> None:
    """A ticket id that does not exist is an error on stderr with exit 1."""
    result = cli(upgraded(make_config()), "tickets", "show", "42", "--json")
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", "maild: no ticket 42\n")


def test_tickets_show_human_output(maild: RunningMaild) -> None:
    """Without --json the subject, the participants and each message's text are shown."""
    first = mail("Backups missing", body="Where are they?", Cc="Bob <bob@customer.example>")
    maild.send(first, ["support@altis-dxp.com"])
    reply = mail("Re: Backups missing", body="Any news?", In_Reply_To=first["Message-ID"])
    maild.send(reply, ["support@altis-dxp.com"])
    maild.settle()
    result = cli(maild.settings.source, "tickets", "show", "1")
    assert (result.exit_code, result.stderr) == (0, "")
    wanted = [
        "Ticket #1: Backups missing",
        "  question, normal, open; route support",
        "  requester Alice Example <alice@customer.example>",
        "  cc        Bob <bob@customer.example>",
        f"--- message 1: {first['Message-ID']}",
        "Subject: Backups missing",
        "Where are they?",
        f"--- message 2: {reply['Message-ID']}",
        "Subject: Re: Backups missing",
        "Any news?",
    ]
    assert [line for line in result.stdout.splitlines() if line in wanted] == wanted


def test_close_solve_and_reopen_change_the_status(maild: RunningMaild) -> None:
    """tickets close, solve and reopen set the status that list and show report."""
    open_three(maild)
    config = maild.settings.source
    for command, status in (("close", "closed"), ("solve", "solved"), ("reopen", "open")):
        result = cli(config, "tickets", command, "2")
        assert (result.exit_code, result.stdout, result.stderr) == (
            0,
            f"ticket 2 is {status}\n",
            "",
        )
        assert cli_json(config, "tickets", "show", "2")["status"] == status
        assert [v["status"] for v in cli_json(config, "tickets", "list", "--status", "all")] == [
            status,
            "open",
            "open",
        ]


@pytest.mark.parametrize("command", ["close", "solve", "reopen"])
def test_status_change_of_unknown_ticket_exits_1(
    command: str, make_config: Callable[..., Path]
) -> None:
    """Changing the status of a ticket that does not exist fails with exit 1."""
    result = cli(upgraded(make_config()), "tickets", command, "7")
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", "maild: no ticket 7\n")


def test_reply_reopens_a_closed_ticket(maild: RunningMaild) -> None:
    """A customer's reply to a ticket closed with the CLI opens it again."""
    first, _, _ = open_three(maild)
    config = maild.settings.source
    assert cli(config, "tickets", "close", "1").exit_code == 0
    assert ids(config, "--status", "closed") == [1]
    reply = mail("Re: Backups missing", body="Not fixed.", In_Reply_To=first["Message-ID"])
    maild.send(reply, ["support@altis-dxp.com"])
    maild.settle()
    assert ids(config, "--status", "closed") == []
    assert ids(config) == [1, 3, 2]
    view = cli_json(config, "tickets", "show", "1")
    assert (view["status"], view["message_count"]) == ("open", 2)
    assert [m["text"] for m in view["messages"]] == [
        "Where are last night's backups?",
        "Not fixed.",
    ]


def test_rules_check_accepts_the_shipped_table(rules_config: Path, rules_dir: Path) -> None:
    """rules check on the shipped table exits 0 and counts its three routes."""
    result = cli(rules_config, "rules", "check")
    version = load_rules(rules_dir).version
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == (
        f"ok: 3 routes, 2 domains (altis-dxp.com, humanmade.com), version {version[:12]}\n"
    )


def test_rules_check_lists_every_problem_with_file_and_line(
    rules_config: Path, rules_dir: Path
) -> None:
    """A broken table exits 78 and names each problem as file:line: message."""
    desk = break_rules(rules_dir)
    result = cli(rules_config, "rules", "check")
    assert (result.exit_code, result.stdout) == (78, "")
    assert result.stderr == (
        f"{desk}:16: {TYPE_ERROR}\n{desk}:24: {PRIORITY_ERROR}\n2 problem(s) in {rules_dir}\n"
    )


def test_rules_test_json_for_a_paging_address(rules_config: Path, rules_dir: Path) -> None:
    """rules test --json shows the route, type, priority, paging and where the route is."""
    result = cli(rules_config, "rules", "test", "sysops@humanmade.com", "--json")
    assert (result.exit_code, result.stderr) == (0, "")
    desk = str(rules_dir / "desk.toml")
    assert json.loads(result.stdout) == {
        "address": "sysops@humanmade.com",
        "accepted": True,
        "route": "sysops",
        "base": "sysops",
        "recipient": "sysops@humanmade.com",
        "type": "incident",
        "priority": "urgent",
        "page": True,
        "ack": True,
        "application": "",
        "tags": [],
        "drop": False,
        "file": desk,
        "line": 20,
        "steps": [
            {
                "route": "support",
                "file": desk,
                "line": 6,
                "outcome": "skipped: recipient not in recipients",
            },
            {
                "route": "hosting",
                "file": desk,
                "line": 13,
                "outcome": "skipped: recipient not in recipients",
            },
            {"route": "sysops", "file": desk, "line": 20, "outcome": "wins"},
        ],
    }


def test_rules_test_human_output(rules_config: Path, rules_dir: Path) -> None:
    """rules test without --json says in one line where the mail goes, then every route tried."""
    result = cli(rules_config, "rules", "test", "support@altis-dxp.com")
    assert (result.exit_code, result.stderr) == (0, "")
    desk = rules_dir / "desk.toml"
    assert result.stdout == (
        f"support@altis-dxp.com: route 'support' ({desk}:6) -> question, normal\n"
        f"  support ({desk}:6): wins\n"
        f"  hosting ({desk}:13): skipped: recipient not in recipients\n"
        f"  sysops ({desk}:20): skipped: recipient not in recipients\n"
    )


@pytest.mark.parametrize(
    ("address", "reason", "reply"),
    [
        (
            "billing@altis-dxp.com",
            "no route",
            "550 5.1.1 <billing@altis-dxp.com>: no such mailbox here",
        ),
        (
            "support@example.org",
            "not our domain",
            "550 5.7.1 <support@example.org>: relay access denied, example.org is not a domain "
            "of this desk",
        ),
    ],
)
def test_rules_test_refused_address_exits_1(
    rules_config: Path, address: str, reason: str, reply: str
) -> None:
    """An address the desk would refuse at RCPT exits 1 with accepted false and the reason."""
    result = cli(rules_config, "rules", "test", address, "--json")
    assert (result.exit_code, result.stderr) == (1, "")
    assert json.loads(result.stdout) == {
        "address": address,
        "accepted": False,
        "reason": reason,
        "smtp_reply": reply,
    }


def test_rules_test_on_a_broken_table_exits_78(rules_config: Path, rules_dir: Path) -> None:
    """rules test refuses to answer from a broken table, with exit 78 and file:line."""
    desk = break_rules(rules_dir)
    result = cli(rules_config, "rules", "test", "support@altis-dxp.com", "--json")
    assert (result.exit_code, result.stdout) == (78, "")
    assert result.stderr == (
        f"maild: the rules table is broken:\n{desk}:16: {TYPE_ERROR}\n{desk}:24: {PRIORITY_ERROR}\n"
    )


@pytest.mark.parametrize("source", [[], ["-"]], ids=["no-argument", "dash"])
def test_ingest_from_stdin_stores_and_files_the_message(
    make_config: Callable[..., Path], source: list[str]
) -> None:
    """ingest reads the message from stdin, exits 0 and the ticket exists when it returns."""
    config = make_config()
    raw = mail("Piped in", to="sysops@humanmade.com", body="Down again.").as_bytes()
    maild_bin = Path(sys.executable).with_name("maild")  # the installed entry point
    result = run(
        [str(maild_bin), "ingest", "--recipient", "sysops@humanmade.com", *source],
        stdin=raw,
        env={"MAILD_CONFIG": str(config)},
    )
    assert (result.returncode, result.stdout) == (0, b"")
    (ticket,) = cli_json(config, "tickets", "list", "--status", "all")
    assert (
        ticket["id"],
        ticket["subject"],
        ticket["type"],
        ticket["priority"],
        ticket["rule"],
    ) == (
        1,
        "Piped in",
        "incident",
        "urgent",
        "sysops",
    )


def test_ingest_from_a_file_keeps_the_envelope(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """ingest FILE stores the delivery with its envelope as processed into a ticket."""
    config = make_config()
    message = tmp_path / "message.eml"
    message.write_bytes(mail("From a file").as_bytes())
    result = ingest(
        config,
        "--recipient",
        "support@altis-dxp.com",
        "--sender",
        "alice@customer.example",
        str(message),
    )
    assert (result.returncode, result.stdout) == (0, b"")
    (delivery,) = cli_json(config, "inbound", "list")
    assert {key: delivery[key] for key in INBOUND_KEYS} == {
        "id": 1,
        "status": "processed",
        "protocol": "pipe",
        "mail_from": "alice@customer.example",
        "rcpt_tos": ["support@altis-dxp.com"],
        "size": len(message.read_bytes()),
        "ticket_id": 1,
        "error": None,
    }
    assert cli_json(config, "tickets", "show", "1")["subject"] == "From a file"


@pytest.mark.parametrize(
    ("recipient", "reply"),
    [
        ("billing@altis-dxp.com", "550 5.1.1 <billing@altis-dxp.com>: no such mailbox here"),
        (
            "support@example.org",
            "550 5.7.1 <support@example.org>: relay access denied, example.org is not a domain "
            "of this desk",
        ),
    ],
)
def test_ingest_unknown_recipient_exits_67_and_stores_nothing(
    make_config: Callable[..., Path], recipient: str, reply: str
) -> None:
    """A recipient without a route is a permanent failure (67) and nothing is kept."""
    config = upgraded(make_config())
    result = ingest(config, "--recipient", recipient, stdin=mail("Lost").as_bytes())
    assert (result.returncode, result.stdout) == (67, b"")
    assert result.stderr.decode() == f"maild: {reply}\n"
    assert cli_json(config, "inbound", "list") == []
    assert cli_json(config, "tickets", "list", "--status", "all") == []


@pytest.mark.parametrize("broken", ["unknown key", "missing file", "rules"])
def test_ingest_with_broken_configuration_exits_75(
    make_config: Callable[..., Path], rules_dir: Path, tmp_path: Path, broken: str
) -> None:
    """A config or rules problem is a temporary failure (75), so the MTA keeps the mail."""
    config = upgraded(make_config())
    used = tmp_path / "ingest.toml"
    if broken == "unknown key":
        used.write_text(config.read_text() + '\n[escalation]\nallowed_sender = "x"\n')
        line = line_of(used, 'allowed_sender = "x"')
        problem = f"{used}:{line}: [escalation] allowed_sender: unknown key"
    elif broken == "missing file":
        problem = f"{used}: no such config file (set --config or MAILD_CONFIG)"
    else:
        used.write_text(config.read_text())
        desk = break_rules(rules_dir)
        problem = f"{desk}:16: {TYPE_ERROR}\n{desk}:24: {PRIORITY_ERROR}"
    result = ingest(used, "--recipient", "support@altis-dxp.com", stdin=mail("Kept").as_bytes())
    assert (result.returncode, result.stdout) == (75, b"")
    assert result.stderr.decode() == f"maild: temporary failure, fix the configuration: {problem}\n"
    assert cli_json(config, "inbound", "list") == []


def test_ingest_over_max_message_size_exits_65(make_config: Callable[..., Path]) -> None:
    """A message over [smtp] max_message_size is refused with 65; one at the limit is stored."""
    config = upgraded(make_config())
    raw = mail("Large").as_bytes()
    smtp_section = 'hostname = "mx.test.invalid"'
    replace_in(config, smtp_section, f"{smtp_section}\nmax_message_size = {len(raw) - 1}")
    result = ingest(config, "--recipient", "support@altis-dxp.com", stdin=raw)
    assert (result.returncode, result.stdout) == (65, b"")
    assert result.stderr.decode() == (
        f"maild: message is {len(raw)} bytes, over [smtp] max_message_size ({len(raw) - 1})\n"
    )
    assert cli_json(config, "inbound", "list") == []
    replace_in(config, f"max_message_size = {len(raw) - 1}", f"max_message_size = {len(raw)}")
    assert ingest(config, "--recipient", "support@altis-dxp.com", stdin=raw).returncode == 0
    assert ids(config, "--status", "all") == [1]


def test_ingest_exits_75_while_the_database_is_locked(
    make_config: Callable[..., Path], database_url: str
) -> None:
    """A database that cannot take the write within busy_timeout makes ingest exit 75."""
    if not database_url.startswith("sqlite"):
        pytest.skip(
            "holds SQLite's database-wide write lock (BEGIN EXCLUSIVE); PostgreSQL has none"
        )
    config = upgraded(make_config())  # the schema exists, the file is in WAL mode
    replace_in(config, 'busy_timeout = "2s"', 'busy_timeout = "0.2s"')
    assert cli_json(config, "inbound", "list") == []
    raw = mail("While locked").as_bytes()
    holder = sqlite3.connect(make_url(database_url).database or "", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        result = ingest(config, "--recipient", "support@altis-dxp.com", stdin=raw)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert (result.returncode, result.stdout) == (75, b"")
    assert result.stderr.decode().splitlines()[0] == (
        "maild: temporary failure: OperationalError: (sqlite3.OperationalError) database is locked"
    )
    assert cli_json(config, "inbound", "list") == []
    assert ingest(config, "--recipient", "support@altis-dxp.com", stdin=raw).returncode == 0
    assert ids(config) == [1]


@pytest.mark.slow
def test_serve_refuses_a_broken_rules_table(rules_config: Path, rules_dir: Path) -> None:
    """maild serve exits 78 before listening when the rules table is broken, naming file:line."""
    desk = break_rules(rules_dir)
    result = run(maild_command("serve", "--config", str(rules_config)))
    assert (result.returncode, result.stdout) == (78, b"")
    assert result.stderr.decode() == (
        "maild: refusing to start, the rules table is broken:\n"
        f"{desk}:16: {TYPE_ERROR}\n{desk}:24: {PRIORITY_ERROR}\n"
    )


@pytest.mark.slow
def test_serve_refuses_an_unknown_config_key(rules_config: Path) -> None:
    """maild serve exits 78 on a config key it does not know, naming the file, line and key."""
    replace_in(rules_config, "[rules]", '[rules]\nfolder = "rules"')
    line = line_of(rules_config, 'folder = "rules"')
    result = run(maild_command("serve", "--config", str(rules_config)))
    assert (result.returncode, result.stdout) == (78, b"")
    assert result.stderr.decode() == f"maild: {rules_config}:{line}: [rules] folder: unknown key\n"


def test_inbound_list_and_status_filter(maild: RunningMaild, tmp_path: Path) -> None:
    """inbound list shows deliveries newest first with their state; --status filters them."""
    maild.send(mail("Over SMTP"), ["support@altis-dxp.com", "hosting@altis-dxp.com"])
    maild.settle()
    config = maild.settings.source
    piped = tmp_path / "piped.eml"
    piped.write_bytes(mail("Through a pipe").as_bytes())
    assert ingest(config, "--recipient", "sysops@altis-dxp.com", str(piped)).returncode == 0
    views = cli_json(config, "inbound", "list")
    assert [{key: v[key] for key in INBOUND_KEYS if key != "size"} for v in views] == [
        {
            "id": 2,
            "status": "processed",
            "protocol": "pipe",
            "mail_from": "",
            "rcpt_tos": ["sysops@altis-dxp.com"],
            "ticket_id": 2,
            "error": None,
        },
        {
            "id": 1,
            "status": "processed",
            "protocol": "smtp",
            "mail_from": "alice@customer.example",
            "rcpt_tos": ["support@altis-dxp.com", "hosting@altis-dxp.com"],
            "ticket_id": 1,
            "error": None,
        },
    ]
    assert [v["id"] for v in cli_json(config, "inbound", "list", "--status", "processed")] == [2, 1]
    assert cli_json(config, "inbound", "list", "--status", "failed") == []
    assert [v["id"] for v in cli_json(config, "inbound", "list", "--limit", "1")] == [2]
    table = cli(config, "inbound", "list")
    assert (table.exit_code, table.stderr) == (0, "")
    header, _, *rows = table.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "RECEIVED", "FROM", "TO", "SIZE", "TICKET", "ERROR"]
    assert [row.split()[:2] for row in rows] == [["2", "processed"], ["1", "processed"]]


def test_inbound_show_json(make_config: Callable[..., Path], tmp_path: Path) -> None:
    """inbound show --json gives one delivery's envelope, size, hash and state."""
    config = make_config()
    message = tmp_path / "message.eml"
    raw = mail("Envelope").as_bytes()
    message.write_bytes(raw)
    result = ingest(
        config, "--recipient", "hosting@altis-dxp.com", "--sender", "a@b.example", str(message)
    )
    assert result.returncode == 0
    view = cli_json(config, "inbound", "show", "1")
    received, processed = view.pop("received_at"), view.pop("processed_at")
    assert datetime.fromisoformat(received) <= datetime.fromisoformat(processed)
    assert view == {
        "id": 1,
        "status": "processed",
        "protocol": "pipe",
        "peer": "",
        "helo": "",
        "session_id": "",
        "mail_from": "a@b.example",
        "rcpt_tos": ["hosting@altis-dxp.com"],
        "size": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "ticket_id": 1,
        "attempts": 1,
        "error": None,
    }


def test_inbound_show_raw_is_the_exact_bytes_over_smtp(maild: RunningMaild) -> None:
    """inbound show --raw writes the message exactly as the SMTP client delivered it."""
    raw = (
        b"From: Zo\xc3\xab <zoe@customer.example>\r\nTo: support@altis-dxp.com\r\n"
        b"Subject: raw bytes\r\nMessage-ID: <raw-1@customer.example>\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b".a line that starts with a dot\r\nGr\xc3\xbc\xc3\x9fe\r\n\r\n  trailing spaces  \r\n"
    )
    with maild.smtp() as client:
        client.sendmail("zoe@customer.example", ["support@altis-dxp.com"], raw)
    maild.settle()
    result = cli(maild.settings.source, "inbound", "show", "1", "--raw")
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout_bytes == raw


def test_inbound_show_raw_is_the_exact_bytes_through_a_pipe(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """inbound show --raw writes a piped message byte for byte, bare LFs and odd bytes included."""
    config = make_config()
    raw = (
        b"From: x@customer.example\nTo: support@altis-dxp.com\nSubject: caf\xe9\n\n"
        b"line one\r\nline two\n\x00\xff no final newline"
    )
    message = tmp_path / "odd.eml"
    message.write_bytes(raw)
    assert ingest(config, "--recipient", "support@altis-dxp.com", str(message)).returncode == 0
    result = run(maild_command("inbound", "show", "1", "--raw", "--config", str(config)))
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == raw


def test_inbound_show_unknown_id_exits_1(make_config: Callable[..., Path]) -> None:
    """A delivery id that does not exist is an error on stderr with exit 1."""
    result = cli(upgraded(make_config()), "inbound", "show", "9", "--raw")
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", "maild: no delivery 9\n")


def store_delivery(config: Path, recipient: str) -> int:
    """A `received` delivery put straight into the spool, as if accepted under other rules."""
    settings = load_settings(config)
    database = Database(settings.database.url, settings.database.busy_timeout)
    delivery = Delivery(
        protocol="smtp",
        mail_from="alice@customer.example",
        rcpt_tos=[recipient],
        raw=mail("Invoice 1234", to=recipient, body="Please resend it.").as_bytes(),
    )
    try:
        database.create_schema()
        (inbound_id,) = database.run_write(lambda s: insert_deliveries(s, [delivery]))
    finally:
        database.close()
    return inbound_id


def test_reprocess_fails_without_a_route_then_files_once_the_rules_are_fixed(
    make_config: Callable[..., Path], rules_dir: Path
) -> None:
    """A delivery whose recipient lost its route fails (exit 1), and files after the fix."""
    config = make_config()
    inbound_id = store_delivery(config, "billing@altis-dxp.com")
    failed = cli(config, "reprocess", str(inbound_id), "--json")
    assert failed.exit_code == 1
    assert [json.loads(line)["event"] for line in failed.stderr.splitlines()] == [FAILED_EVENT]
    assert json.loads(failed.stdout) == [
        {
            "inbound": inbound_id,
            "outcome": "failed",
            "ticket": None,
            "route": None,
            "error": NO_ROUTE,
        }
    ]
    (listed,) = cli_json(config, "inbound", "list", "--status", "failed")
    assert (listed["id"], listed["status"], listed["error"], listed["ticket_id"]) == (
        inbound_id,
        "failed",
        NO_ROUTE,
        None,
    )
    assert cli_json(config, "tickets", "list", "--status", "all") == []

    (rules_dir / "billing.toml").write_text(BILLING)
    fixed = cli(config, "reprocess", "--json")
    assert (fixed.exit_code, fixed.stderr) == (0, "")
    assert json.loads(fixed.stdout) == [
        {
            "inbound": inbound_id,
            "outcome": "created",
            "ticket": 1,
            "route": "billing",
            "error": None,
        }
    ]
    ticket = cli_json(config, "tickets", "show", "1")
    assert (ticket["type"], ticket["priority"], ticket["rule"], ticket["subject"]) == (
        "task",
        "low",
        "billing",
        "Invoice 1234",
    )
    assert cli_json(config, "inbound", "list", "--status", "failed") == []
    assert cli_json(config, "inbound", "show", str(inbound_id))["attempts"] == 2


def test_reprocess_human_output_is_a_table(make_config: Callable[..., Path]) -> None:
    """Without --json reprocess prints one table row per delivery it tried."""
    config = make_config()
    inbound_id = store_delivery(config, "billing@altis-dxp.com")
    result = cli(config, "reprocess", str(inbound_id))
    assert result.exit_code == 1
    assert [json.loads(line)["event"] for line in result.stderr.splitlines()] == [FAILED_EVENT]
    header, _, row = result.stdout.splitlines()
    assert header.split() == ["INBOUND", "OUTCOME", "TICKET", "ROUTE", "ERROR"]
    assert row.split()[:3] == [str(inbound_id), "failed", "ProcessingError:"]


def test_reprocess_with_nothing_failed(make_config: Callable[..., Path], tmp_path: Path) -> None:
    """With no failed deliveries reprocess says so and exits 0, processed ones untouched."""
    config = upgraded(make_config())
    empty = cli(config, "reprocess")
    assert (empty.exit_code, empty.stdout, empty.stderr) == (0, "nothing to reprocess\n", "")
    message = tmp_path / "message.eml"
    message.write_bytes(mail("Fine").as_bytes())
    assert ingest(config, "--recipient", "support@altis-dxp.com", str(message)).returncode == 0
    for args in ([], ["1"]):
        result = cli(config, "reprocess", *args)
        assert (result.exit_code, result.stdout, result.stderr) == (0, "nothing to reprocess\n", "")
    as_json = cli(config, "reprocess", "--json")
    assert (as_json.exit_code, as_json.stdout) == (0, "[]\n")
    assert cli_json(config, "inbound", "show", "1")["attempts"] == 1
