"""Routing rules v2: every match and set kind, precedence, several recipients, actions."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlmodel import col, select

from maild.cli import main
from maild.config import load_settings
from maild.enums import Priority, TicketType
from maild.errors import Problem, RecipientRefused, RulesError
from maild.routing.rules import MessageContext, RuleTable, best_decision, load_rules
from maild.store.models import Inbound
from tests.conftest import REPO, RunningMaild, mail

DESK = (REPO / "rules" / "desk.toml").read_text()
ALICE = MessageContext(sender="alice@customer.example", subject="Hello")
NAME = "route needs a name (a non-empty string)"
NEEDS_TYPE = "route needs a type"
NOT_AN_ADDRESS = (
    " is not an address like support@example.com, *@example.com or sysops+*@example.com"
)
REJECT = 'reject must be an SMTP reply such as "550 5.7.1 This address is retired",'
REJECT_AT_RCPT = (
    "reject only works on a route with recipients and no other conditions "
    "(it is decided at RCPT time)"
)
KNOWN_KEYS = (
    "ack, application, copy_participants, drop, headers, name, notify, page, priority, "
    "recipients, reject, sender_domains, senders, subject, tags, type"
)


def table(tmp_path: Path, *files: str) -> RuleTable:
    """A table of the given files (named 00.toml, 01.toml, ...) followed by the shipped desk."""
    folder = tmp_path / "rules"
    folder.mkdir(exist_ok=True)
    for number, text in enumerate(files):
        (folder / f"{number:02}.toml").write_text(text)
    (folder / "zz-desk.toml").write_text(DESK)
    return load_rules(folder)


def problems(tmp_path: Path, text: str) -> list[str]:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.toml").write_text(text)
    with pytest.raises(RulesError) as caught:
        load_rules(folder)
    return [p.message for p in caught.value.problems]


def summary(table: RuleTable, recipient: str, context: MessageContext = ALICE) -> tuple:
    d = table.decide(recipient, context)
    return (d.name, d.type.value, d.priority.value, d.page, d.application, d.tags, d.drop)


APPS = """
[[route]]
name = "sysops-app"
recipients = ["sysops+*@altis-dxp.com"]
type = "incident"
priority = "urgent"
page = true
application = "{subaddress}"
tags = ["app"]
"""


def test_a_subaddress_pattern_takes_only_tagged_mail_and_names_the_application(
    tmp_path: Path,
) -> None:
    """sysops+*@ takes sysops+myapp-production@ (application from the tag), not plain sysops@."""
    rules = table(tmp_path, APPS)
    assert summary(rules, "sysops+myapp-production@altis-dxp.com") == (
        "sysops-app", "incident", "urgent", True, "myapp-production", ("app",), False,
    )  # fmt: skip
    assert summary(rules, "sysops@altis-dxp.com")[0] == "sysops"
    assert summary(rules, "sysops+x@humanmade.com")[0] == "sysops"  # another domain


def test_an_exact_subaddress_and_a_domain_wildcard(tmp_path: Path) -> None:
    """`support+billing@` takes only that tag; `*@d` takes any mailbox at its domain."""
    rules = table(
        tmp_path,
        '[[route]]\nname = "billing"\nrecipients = ["support+billing@altis-dxp.com"]\n'
        'type = "task"\npriority = "low"\n'
        '[[route]]\nname = "catchall"\nrecipients = ["*@humanmade.com"]\n'
        'type = "question"\npriority = "low"\n',
    )
    assert summary(rules, "support+billing@altis-dxp.com")[:3] == ("billing", "task", "low")
    assert summary(rules, "support+other@altis-dxp.com")[0] == "support"
    assert summary(rules, "anyone@humanmade.com")[:3] == ("catchall", "question", "low")
    assert summary(rules, "sysops@humanmade.com")[0] == "catchall"  # the first route wins


VIP = """
[[route]]
name = "vip"
sender_domains = ["bigcustomer.example"]
priority = "high"
tags = ["vip"]
"""


def test_a_refining_route_overrides_only_what_it_sets(tmp_path: Path) -> None:
    """A VIP sender domain raises the priority; type, page and the rest come from the base."""
    rules = table(tmp_path, VIP)
    vip = MessageContext(sender="cto@mail.bigcustomer.example", subject="Slow")
    assert summary(rules, "support@altis-dxp.com", vip) == (
        "vip", "question", "high", False, "", ("vip",), False,
    )  # fmt: skip
    assert summary(rules, "support@altis-dxp.com")[:3] == ("support", "question", "normal")
    decision = rules.decide("support@altis-dxp.com", vip)
    assert decision.base == "support"


def test_notify_and_copy_participants_come_from_the_base_unless_the_winner_sets_them(
    tmp_path: Path,
) -> None:
    """A route's `notify` and `copy_participants` travel in its decision (and `rules test
    --json`); a refining route that sets neither keeps the base's."""
    rules = table(
        tmp_path,
        """
[[route]]
name = "team-vip"
sender_domains = ["vip.example"]
priority = "high"

[[route]]
name = "team"
recipients = ["help@altis-dxp.com"]
type = "question"
priority = "normal"
notify = ["Support-Team@altis-dxp.com"]
copy_participants = false
""",
    )
    plain = rules.decide("help@altis-dxp.com", ALICE)
    assert (plain.notify, plain.copy_participants) == (("support-team@altis-dxp.com",), False)
    vip = rules.decide("help@altis-dxp.com", MessageContext(sender="a@vip.example", subject="s"))
    assert (vip.name, vip.notify, vip.copy_participants) == (
        "team-vip", ("support-team@altis-dxp.com",), False,
    )  # fmt: skip
    assert plain.as_dict()["notify"] == ["support-team@altis-dxp.com"]
    shipped = rules.decide("support@altis-dxp.com", ALICE)
    assert (shipped.notify, shipped.copy_participants) == ((), None)


@pytest.mark.parametrize(
    ("condition", "context", "applies"),
    [
        ('senders = ["alice@customer.example"]', ALICE, True),
        ('senders = ["ALICE@customer.example"]', ALICE, True),
        ('senders = ["*@customer.example"]', ALICE, True),
        ('senders = ["bob@customer.example"]', ALICE, False),
        ('sender_domains = ["customer.example"]', ALICE, True),
        ('sender_domains = ["other.example"]', ALICE, False),
        ('subject = "^hel"', ALICE, True),
        ('subject = "access request"', ALICE, False),
        (
            'headers = { "X-Priority" = "^1" }',
            MessageContext("a@x.example", "s", (("x-priority", "1 (Highest)"),)),
            True,
        ),
        (
            'headers = { "X-Priority" = "^1" }',
            MessageContext("a@x.example", "s", (("X-Priority", "3"),)),
            False,
        ),
        ('headers = { "X-Priority" = "^1" }', ALICE, False),  # the header is absent
    ],
)
def test_each_condition_kind(
    tmp_path: Path, condition: str, context: MessageContext, applies: bool
) -> None:
    """senders, sender_domains, subject and headers each decide whether a route applies."""
    rules = table(
        tmp_path,
        f'[[route]]\nname = "special"\nrecipients = ["support@altis-dxp.com"]\n{condition}\n'
        'type = "task"\npriority = "high"\n',
    )
    expected = "special" if applies else "support"
    assert rules.decide("support@altis-dxp.com", context).name == expected


def test_all_conditions_must_hold(tmp_path: Path) -> None:
    """A route with a sender and a subject condition needs both."""
    rules = table(
        tmp_path,
        '[[route]]\nname = "both"\nsender_domains = ["customer.example"]\n'
        'subject = "invoice"\ntype = "task"\n',
    )
    assert rules.decide("support@altis-dxp.com", ALICE).name == "support"
    invoice = MessageContext(sender="alice@customer.example", subject="Invoice 12")
    assert rules.decide("support@altis-dxp.com", invoice).name == "both"
    stranger = MessageContext(sender="eve@else.example", subject="Invoice 12")
    assert rules.decide("support@altis-dxp.com", stranger).name == "support"


def test_the_first_route_in_file_order_wins(tmp_path: Path) -> None:
    """Two routes that both apply: the one in the earlier file wins."""
    first = '[[route]]\nname = "first"\nsubject = "."\npriority = "low"\n'
    second = '[[route]]\nname = "second"\nsubject = "."\npriority = "high"\n'
    assert table(tmp_path, first, second).decide("support@altis-dxp.com", ALICE).name == "first"
    steps = table(tmp_path, first, second).explain("support@altis-dxp.com", ALICE)
    assert [(s.route, s.outcome) for s in steps][:3] == [
        ("first", "wins"),
        ("second", "applies (an earlier route won)"),
        ("support", "applies (an earlier route won)"),
    ]


def test_several_recipients_take_the_highest_priority_and_drop_only_if_all_drop(
    tmp_path: Path,
) -> None:
    """support@ + sysops@ is urgent; a dropping route loses to any route that files."""
    rules = table(
        tmp_path,
        '[[route]]\nname = "noise"\nheaders = { "List-Id" = "noise" }\ndrop = true\n'
        'recipients = ["hosting@altis-dxp.com"]\ntype = "task"\npriority = "low"\n',
    )
    decisions, unrouted = rules.decide_all(
        ["support@altis-dxp.com", "sysops@altis-dxp.com", "nobody@altis-dxp.com"], ALICE
    )
    assert unrouted == ["nobody@altis-dxp.com"]
    assert best_decision(decisions).name == "sysops"
    noisy = MessageContext("list@x.example", "s", (("List-Id", "<noise.lists.example>"),))
    both, _ = rules.decide_all(["hosting@altis-dxp.com", "support@altis-dxp.com"], noisy)
    assert [d.drop for d in both] == [True, False]
    assert best_decision(both).name == "support"
    (alone,), _ = rules.decide_all(["hosting@altis-dxp.com"], noisy)
    assert best_decision([alone]).drop is True


def test_reject_refuses_at_rcpt_with_its_own_reply(tmp_path: Path) -> None:
    """A retired address is refused with the route's reply; others are untouched."""
    rules = table(
        tmp_path,
        '[[route]]\nname = "retired"\nrecipients = ["help@altis-dxp.com"]\n'
        'reject = "550 5.1.1 help@ is retired, write to support@altis-dxp.com"\n',
    )
    with pytest.raises(RecipientRefused) as caught:
        rules.resolve("help@altis-dxp.com")
    assert caught.value.smtp_reply == "550 5.1.1 help@ is retired, write to support@altis-dxp.com"
    assert caught.value.reason == "rejected by route retired"
    assert rules.resolve("support@altis-dxp.com").name == "support"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\nsubject = "(unclosed"\n'
            'type = "task"\npriority = "low"\n',
            [
                "subject: not a valid regular expression: missing ), unterminated subpattern "
                "at position 0"
            ],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\ntype = "task"\n'
            'priority = "low"\n[[route]]\nname = "y"\nrecipients = ["a@d.example"]\n'
            'headers = { "X-A" = "[" }\ntype = "task"\npriority = "low"\n',
            [
                "headers.X-A: not a valid regular expression: unterminated character set at "
                "position 0"
            ],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\nheaders = ["X-A"]\n'
            'type = "task"\npriority = "low"\n',
            ["headers must be a table of header name = regular expression"],
        ),
        (
            '[[route]]\nname = "x"\nsenders = ["nobody"]\npriority = "low"\n',
            ["'nobody' in senders is not an address or *@domain"],
        ),
        (
            '[[route]]\nname = "x"\nsender_domains = ["not a domain"]\npriority = "low"\n',
            ["'not a domain' in sender_domains is not a domain"],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a+*@d.example"]\napplication = "{app}"\n'
            'type = "task"\npriority = "low"\n',
            [
                "application: unknown placeholder {app} (known: domain, local, recipient, "
                "subaddress)"
            ],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\ntags = ["", 5]\n'
            'type = "task"\npriority = "low"\n',
            ["tags must be a list of non-empty strings"],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\nreject = "go away"\n',
            [
                'reject must be an SMTP reply such as "550 5.7.1 This address is retired", '
                "not 'go away'"
            ],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\nsubject = "x"\n'
            'reject = "550 5.7.1 no"\n[[route]]\nname = "y"\nrecipients = ["a@d.example"]\n'
            'type = "task"\npriority = "low"\n',
            [
                "reject only works on a route with recipients and no other conditions "
                "(it is decided at RCPT time)"
            ],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\ndrop = true\n'
            'reject = "550 5.7.1 no"\n',
            ["reject and drop cannot be combined"],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\npriority = "low"\n'
            'reject = "550 5.7.1 no"\n',
            ["a rejecting route sets nothing"],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\n',
            ["route needs a type", "route needs a priority"],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\ndrop = "yes"\n'
            'type = "task"\npriority = "low"\n',
            ["drop must be true or false, not 'yes'"],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\napplication = 5\n'
            'type = "task"\npriority = "low"\n',
            ["application must be a string"],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\nsubject = 5\n'
            'type = "task"\npriority = "low"\n',
            ["subject must be a regular expression in a string"],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\nack = "no"\n'
            'type = "task"\npriority = "low"\n',
            ["ack must be true or false, not 'no'"],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\ncopy_participants = 1\n'
            'type = "task"\npriority = "low"\n',
            ["copy_participants must be true or false, not 1"],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\n'
            'notify = ["team@d.example", "*@d.example", "nobody"]\n'
            'type = "task"\npriority = "low"\n',
            ["'*@d.example' in notify is not an address", "'nobody' in notify is not an address"],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\n'
            f'notify = ["{"a" * 400}@d.example"]\ntype = "task"\npriority = "low"\n',
            [f"'{'a' * 400}@d.example' in notify is not an address"],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\nnotify = "team@d.example"\n'
            'type = "task"\npriority = "low"\n',
            ["notify must be a list of non-empty strings"],
        ),
        (
            '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\nsubject = "urgent"\n'
            'type = "task"\npriority = "low"\n',
            [
                "recipient 'a@d.example' of route 'x' has conditions but no route without "
                "conditions takes it: mail to it would be refused"
            ],
        ),
    ],
)
def test_each_load_error_names_what_is_wrong(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    """Every kind of mistake is refused with its own message."""
    assert problems(tmp_path, text) == expected


def test_load_errors_carry_the_line_of_the_key(tmp_path: Path) -> None:
    """The regex error is reported at the `subject =` line."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.toml").write_text(
        '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\n\nsubject = "(x"\n'
        'type = "task"\npriority = "low"\n'
    )
    with pytest.raises(RulesError) as caught:
        load_rules(folder)
    (problem,) = caught.value.problems
    assert (problem.file, problem.line) == (str(folder / "a.toml"), 5)
    assert isinstance(problem, Problem)


def problem_lines(tmp_path: Path, text: str) -> list[tuple[int, str]]:
    """(line, message) of each problem of a one-file table, in the order reported."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.toml").write_text(text)
    with pytest.raises(RulesError) as caught:
        load_rules(folder)
    return [(p.line, p.message) for p in caught.value.problems]


ROUTE = '[[route]]\nname = "x"\nrecipients = ["a@d.example"]\n'  # lines 1-3
MADE = 'type = "task"\npriority = "low"\n'
KNOWN_FIELDS = "domain, local, recipient, subaddress"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'route = [{ name = "x", recipients = ["a@d.example"], type = "task", '
            'priority = "low" }, 5]\n',
            [(1, "[[route]] must be a table")],
        ),
        ('[[route]]\nname = 5\nrecipients = ["a@d.example"]\n' + MADE, [(2, NAME)]),
        (
            '[[route]]\nname = "x"\nrecipients = "a@d.example"\n' + MADE,
            [(3, "recipients must be a non-empty list of addresses")],
        ),
        (  # a wrong list is one problem: its entries are not checked one by one
            ROUTE + 'senders = ["nobody", 5]\n' + MADE,
            [(4, "senders must be a list of non-empty strings")],
        ),
        (
            ROUTE + 'sender_domains = ["", "d.example"]\n' + MADE,
            [(4, "sender_domains must be a list of non-empty strings")],
        ),
        (
            ROUTE + 'senders = "alice@customer.example"\n' + MADE,
            [(4, "senders must be a list of non-empty strings")],
        ),
        (
            ROUTE + MADE + 'headers = { "X-A" = 5, "X-B" = "(", "X-C" = "fine" }\n',
            [
                (6, "headers.X-A must be a regular expression in a string"),
                (
                    6,
                    "headers.X-B: not a valid regular expression: missing ), unterminated "
                    "subpattern at position 0",
                ),
            ],
        ),
        (
            ROUTE + MADE + "headers = {}\n",
            [(6, "headers must be a table of header name = regular expression")],
        ),
        (
            ROUTE + MADE + 'application = "{"\n',
            [(6, "application: Single '{' encountered in format string")],
        ),
        (  # each unknown placeholder, by name
            ROUTE + MADE + 'application = "{env}-{app}-{subaddress}"\n',
            [
                (6, f"application: unknown placeholder {{app}} (known: {KNOWN_FIELDS})"),
                (6, f"application: unknown placeholder {{env}} (known: {KNOWN_FIELDS})"),
            ],
        ),
        (  # unknown keys first, by name
            ROUTE + MADE + "zeta = 1\nalpha = 2\n",
            [
                (7, f"unknown key 'alpha' in [[route]] (known: {KNOWN_KEYS})"),
                (6, f"unknown key 'zeta' in [[route]] (known: {KNOWN_KEYS})"),
            ],
        ),
        (ROUTE + "reject = 5\n", [(4, f"{REJECT} not 5")]),
        (  # a type that is not a string is unknown, and the route has none
            ROUTE + 'type = 5\npriority = "low"\n',
            [(4, "type must be one of question, incident, problem, task, not 5"), (1, NEEDS_TYPE)],
        ),
        (  # no recipient is valid: nothing to reject at RCPT time
            '[[route]]\nname = "x"\nrecipients = ["nope"]\nreject = "550 5.7.1 no"\n',
            [(3, "'nope'" + NOT_AN_ADDRESS), (4, REJECT_AT_RCPT)],
        ),
        (  # senders that are not a list are not a condition
            ROUTE + 'senders = "a@b.example"\nreject = "550 5.7.1 no"\n',
            [(4, "senders must be a list of non-empty strings")],
        ),
        (  # every problem of a route at once, in this order; each at its key or entry
            '[[route]]\nzz = 1\nname = ""\ntype = "bogus"\ndrop = true\n'
            'recipients = ["a@d.example", "nope"]\nreject = "go away"\npage = "yes"\n',
            [
                (2, f"unknown key 'zz' in [[route]] (known: {KNOWN_KEYS})"),
                (3, NAME),
                (8, "page must be true or false, not 'yes'"),
                (7, f"{REJECT} not 'go away'"),
                (6, "'nope'" + NOT_AN_ADDRESS),
                (4, "type must be one of question, incident, problem, task, not 'bogus'"),
                (7, "reject and drop cannot be combined"),
                (8, "a rejecting route sets nothing"),  # at the first of page and type by name
            ],
        ),
    ],
)
def test_each_route_problem_is_reported_at_its_line(
    tmp_path: Path, text: str, expected: list[tuple[int, str]]
) -> None:
    """The route checks without a test above, with their lines; a route's problems together."""
    assert problem_lines(tmp_path, text) == expected


def test_over_smtp_application_tags_drop_and_reject(
    make_config: Callable[..., Path], rules_dir: Path
) -> None:
    """End to end: the ticket records application and tags; drop keeps mail; reject refuses."""
    (rules_dir / "00-apps.toml").write_text(
        APPS + '[[route]]\nname = "noise"\nrecipients = ["hosting@altis-dxp.com"]\n'
        'headers = { "List-Id" = "noise" }\ndrop = true\n'
        '[[route]]\nname = "retired"\nrecipients = ["help@altis-dxp.com"]\n'
        'reject = "550 5.1.1 help@ is retired"\n'
    )
    with RunningMaild(load_settings(make_config())) as maild:
        address = "sysops+shop-production@altis-dxp.com"
        maild.send(mail("Shop down", to=address), [address])
        noisy = mail("list traffic", to="hosting@altis-dxp.com", List_Id="<noise.example>")
        maild.send(noisy, ["hosting@altis-dxp.com"])
        with maild.smtp() as client:
            client.mail("alice@customer.example")
            assert client.rcpt("help@altis-dxp.com") == (550, b"5.1.1 help@ is retired")
        maild.settle()
        (ticket,) = maild.tickets()
        view = maild.ticket(ticket["id"])
        assert (view["rule"], view["priority"], view["application"], view["tags"]) == (
            "sysops-app",
            Priority.URGENT.value,
            "shop-production",
            ["app"],
        )
        assert view["type"] == TicketType.INCIDENT.value
        rows = maild.service.database.run_read(
            lambda s: [
                (r.status, r.error) for r in s.exec(select(Inbound).order_by(col(Inbound.id))).all()
            ]
        )
        assert rows == [("processed", None), ("dropped", "dropped by route noise")]


def cli(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--config", str(config)], catch_exceptions=False)


@pytest.mark.usefixtures("quiet_logging")
def test_rules_test_routes_with_a_sender_subject_and_headers(
    make_config: Callable[..., Path], rules_dir: Path
) -> None:
    """--from, --subject and --header reach refining routes; the steps say why."""
    (rules_dir / "00-vip.toml").write_text(VIP)
    config = make_config()
    plain = cli(config, "rules", "test", "support@altis-dxp.com", "--json")
    assert json.loads(plain.stdout)["route"] == "support"
    vip = cli(
        config,
        "rules",
        "test",
        "support@altis-dxp.com",
        "--from",
        "cto@bigcustomer.example",
        "--subject",
        "Slow",
        "--header",
        "X-Priority=1",
        "--json",
    )
    result = json.loads(vip.stdout)
    assert (result["route"], result["base"], result["priority"], result["tags"]) == (
        "vip",
        "support",
        "high",
        ["vip"],
    )
    assert [(s["route"], s["outcome"]) for s in result["steps"]] == [
        ("vip", "wins"),
        ("support", "applies (an earlier route won)"),
        ("hosting", "skipped: recipient not in recipients"),
        ("sysops", "skipped: recipient not in recipients"),
    ]
    human = cli(
        config, "rules", "test", "support@altis-dxp.com", "--from", "cto@bigcustomer.example"
    )
    assert human.stdout.splitlines() == [
        f"support@altis-dxp.com: route 'vip' ({rules_dir / '00-vip.toml'}:2) -> question, "
        "high, tags vip",
        *(f"  {s['route']} ({s['file']}:{s['line']}): {s['outcome']}" for s in result["steps"]),
    ]
    bad = cli(config, "rules", "test", "support@altis-dxp.com", "--header", "nocolon")
    assert bad.exit_code == 2
    assert "--header 'nocolon': write NAME=VALUE" in bad.stderr


@pytest.mark.usefixtures("quiet_logging")
def test_rules_explain_a_stored_message_and_a_file(
    make_config: Callable[..., Path], rules_dir: Path, tmp_path: Path
) -> None:
    """explain --message ID and explain FILE.eml show every route tried and the decision."""
    (rules_dir / "00-vip.toml").write_text(VIP)
    config = make_config()
    message = mail("Slow", frm="CTO <cto@bigcustomer.example>")
    with RunningMaild(load_settings(config)) as maild:
        maild.send(message, ["support@altis-dxp.com", "sysops@altis-dxp.com"])
        maild.settle()
    stored = json.loads(cli(config, "rules", "explain", "--message", "1", "--json").stdout)
    assert [(r["recipient"], r["decision"]["route"]) for r in stored["recipients"]] == [
        ("support@altis-dxp.com", "vip"),
        ("sysops@altis-dxp.com", "vip"),
    ]
    assert stored["decision"]["route"] == "vip"
    assert stored["sender"] == "cto@bigcustomer.example"
    eml = tmp_path / "m.eml"
    eml.write_bytes(message.as_bytes())
    text = cli(config, "rules", "explain", str(eml), "--rcpt", "hosting@humanmade.com")
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0] == (
        f"hosting@humanmade.com: route 'vip' ({rules_dir / '00-vip.toml'}:2) -> incident, "
        "high, tags vip"
    )
    assert lines[1] == f"  vip ({rules_dir / '00-vip.toml'}:2): wins"
    neither = cli(config, "rules", "explain")
    assert (neither.exit_code, neither.stderr) == (
        2,
        "maild: give either --message ID or FILE.eml\n",
    )


@pytest.mark.usefixtures("quiet_logging")
def test_rules_replay_shows_which_stored_messages_would_route_differently(
    make_config: Callable[..., Path], rules_dir: Path
) -> None:
    """After adding a VIP route, replay flags the VIP's earlier message as changed, no other."""
    config = make_config()
    with RunningMaild(load_settings(config)) as maild:
        maild.send(mail("Slow", frm="cto@bigcustomer.example"), ["support@altis-dxp.com"])
        maild.send(mail("Hello"), ["hosting@humanmade.com"])
        maild.settle()
    (rules_dir / "00-vip.toml").write_text(VIP)
    rows = json.loads(cli(config, "rules", "replay", "--since", "1h", "--json").stdout)
    assert [(r["inbound"], r["was"], r["now"], r["priority"], r["changed"]) for r in rows] == [
        (1, "support", "vip", "high", True),
        (2, "hosting", "hosting", "normal", False),
    ]
    only = json.loads(cli(config, "rules", "replay", "--changed", "--json").stdout)
    assert [r["inbound"] for r in only] == [1]
    bad = cli(config, "rules", "replay", "--since", "soon")
    assert bad.exit_code == 2


def test_every_example_in_the_rules_guide_loads_beside_the_shipped_table(tmp_path: Path) -> None:
    """Each ```toml example in rules/README.md is a valid table next to desk.toml."""
    guide = (REPO / "rules" / "README.md").read_text()
    examples = re.findall(r"```toml\n(.*?)```", guide, flags=re.DOTALL)
    assert len(examples) >= 6
    for number, example in enumerate(examples):
        folder = tmp_path / f"example{number}"
        folder.mkdir()
        if "[[route]]" not in example or 'name = "support"' in example:
            continue  # a fragment of one key, or the shipped table itself
        (folder / "00-example.toml").write_text(example)
        (folder / "zz-desk.toml").write_text(DESK)
        load_rules(folder)  # raises RulesError, naming file:line, if the guide is wrong


VENDOR = """
[[route]]
name = "vendor"
recipients = ["support@altis-dxp.com"]
sender_domains = ["vendor.example"]
type = "task"
priority = "low"
"""


def test_explain_and_replay_route_by_the_sender_filing_used(
    make_config: Callable[..., Path], rules_dir: Path, tmp_path: Path
) -> None:
    """No From, and a MAIL FROM too long to be an address: filing routes it with no sender,
    so `support`. explain and replay read MAIL FROM whole and said `vendor`."""
    (rules_dir / "00-vendor.toml").write_text(VENDOR)
    config = make_config()
    message = tmp_path / "m.eml"
    message.write_bytes(b"To: support@altis-dxp.com\r\nSubject: no From\r\n\r\nhello\r\n")
    sender = "x" * 320 + "@vendor.example"
    stored = CliRunner().invoke(
        main,
        [
            *("ingest", "--config", str(config), "--recipient", "support@altis-dxp.com"),
            *("--sender", sender, str(message)),
        ],
        catch_exceptions=False,
    )
    assert stored.exit_code == 0, stored.output
    (ticket,) = json.loads(cli(config, "tickets", "list", "--json").stdout)
    assert ticket["rule"] == "support"
    explained = json.loads(cli(config, "rules", "explain", "--message", "1", "--json").stdout)
    assert explained["decision"]["route"] == "support"
    (replayed,) = json.loads(cli(config, "rules", "replay", "--json").stdout)
    assert (replayed["was"], replayed["now"], replayed["changed"]) == ("support", "support", False)


NOISE = """
[[route]]
name = "noise"
recipients = ["support@altis-dxp.com"]
headers = { "List-Id" = "newsletter" }
drop = true
"""


def test_replay_names_the_route_that_dropped_a_delivery(
    make_config: Callable[..., Path], rules_dir: Path
) -> None:
    """A delivery a route dropped keeps that route (inbound.dropped_by_route): replay
    says it was `noise`, and, once the route is gone, that it would now be `support`."""
    (rules_dir / "00-noise.toml").write_text(NOISE)
    config = make_config()
    with RunningMaild(load_settings(config)) as maild:
        maild.send(
            mail("Weekly news", List_Id="<newsletter.vendor.example>"), ["support@altis-dxp.com"]
        )
        maild.settle()
        (row,) = maild.service.database.run_read(lambda s: s.exec(select(Inbound)).all())
    assert (row.status, row.dropped_by_route) == ("dropped", "noise")
    (rules_dir / "00-noise.toml").unlink()
    (replayed,) = json.loads(cli(config, "rules", "replay", "--json").stdout)
    assert (replayed["was"], replayed["now"], replayed["changed"]) == ("noise", "support", True)
