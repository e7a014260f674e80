"""The routing table: the shipped rules, tie-breaking, every load error with its file:line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maild.enums import Priority, TicketType
from maild.errors import Problem, RecipientRefused, RulesError
from maild.mail import addresses
from maild.routing.rules import (
    Decision,
    MessageContext,
    Route,
    RuleTable,
    best_decision,
    load_rules,
)
from tests.conftest import REPO

DOMAINS = ("altis-dxp.com", "humanmade.com")
NOT_AN_ADDRESS = (
    " is not an address like support@example.com, *@example.com or sysops+*@example.com"
)
SHIPPED = [
    ("support", "support", TicketType.QUESTION, Priority.NORMAL, False),
    ("hosting", "hosting", TicketType.INCIDENT, Priority.NORMAL, False),
    ("sysops", "sysops", TicketType.INCIDENT, Priority.URGENT, True),
]


def route_toml(
    name: str,
    recipients: list[str],
    kind: str = "question",
    priority: str = "normal",
) -> str:
    quoted = ", ".join(f'"{r}"' for r in recipients)
    return (
        f'[[route]]\nname = "{name}"\nrecipients = [{quoted}]\n'
        f'type = "{kind}"\npriority = "{priority}"\n'
    )


def make_rules(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (folder / name).write_text(body, encoding="utf-8")
    return folder


def problems_of(folder: Path) -> list[Problem]:
    with pytest.raises(RulesError) as info:
        load_rules(folder)
    return info.value.problems


def summary(route: Route) -> tuple[str, TicketType, Priority, bool]:
    return (route.name, route.type, route.priority, route.page)


@pytest.fixture(scope="module")
def shipped() -> RuleTable:
    """The repository's own routing table, loaded once (read only)."""
    return load_rules(REPO / "rules")


# The shipped table


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize(("mailbox", "name", "kind", "priority", "page"), SHIPPED)
def test_shipped_table_routes_each_desk_address(
    rules_dir: Path,
    domain: str,
    mailbox: str,
    name: str,
    kind: TicketType,
    priority: Priority,
    page: bool,
) -> None:
    """support@, hosting@ and sysops@ at both domains make question, incident, paged incident."""
    table = load_rules(rules_dir)
    assert (name, kind, priority, page) == summary(table.resolve(f"{mailbox}@{domain}"))


def test_shipped_table_domains(rules_dir: Path) -> None:
    """The shipped table serves exactly altis-dxp.com and humanmade.com."""
    assert frozenset({"altis-dxp.com", "humanmade.com"}) == load_rules(rules_dir).domains


def test_shipped_table_routes_in_file_order(rules_dir: Path) -> None:
    """The shipped routes are support, hosting, sysops in order, each at its [[route]] line."""
    table = load_rules(rules_dir)
    desk = rules_dir / "desk.toml"
    lines = desk.read_text(encoding="utf-8").splitlines()
    starts = [n for n, line in enumerate(lines, start=1) if line.strip() == "[[route]]"]
    names = ["support", "hosting", "sysops"]
    expected = [(name, str(desk), starts[i], i) for i, name in enumerate(names)]
    assert expected == [(r.name, r.file, r.line, r.position) for r in table.routes]


@pytest.mark.parametrize(
    "address",
    [
        "SUPPORT@ALTIS-DXP.COM",
        "Support@Altis-Dxp.Com",
        "support+billing@altis-dxp.com",
        "Support+Billing+More@ALTIS-DXP.com",
        "<support@altis-dxp.com>",
        "  support@altis-dxp.com  ",
        "support+@altis-dxp.com",
    ],
)
def test_matching_ignores_case_tags_brackets_and_space(rules_dir: Path, address: str) -> None:
    """Case, a +tag subaddress, angle brackets and surrounding space do not change the route."""
    assert load_rules(rules_dir).resolve(address).name == "support"


def test_another_domain_is_refused_as_relaying(rules_dir: Path) -> None:
    """A recipient outside the desk's domains is refused with 550 5.7.1."""
    with pytest.raises(RecipientRefused) as info:
        load_rules(rules_dir).resolve("support@example.com")
    refused = info.value
    assert refused.smtp_reply.startswith("550 5.7.1")
    expected = (
        "550 5.7.1 <support@example.com>: relay access denied, "
        "example.com is not a domain of this desk"
    )
    assert expected == refused.smtp_reply
    assert refused.address == "support@example.com"
    assert refused.reason == "not our domain"


def test_address_without_domain_is_refused_as_relaying(rules_dir: Path) -> None:
    """A recipient with no domain at all is refused with 550 5.7.1 saying so."""
    with pytest.raises(RecipientRefused) as info:
        load_rules(rules_dir).resolve("postmaster")
    expected = "550 5.7.1 <postmaster>: relay access denied, no domain is not a domain of this desk"
    assert expected == info.value.smtp_reply


def test_unknown_mailbox_at_our_domain_is_refused(rules_dir: Path) -> None:
    """An unrouted mailbox at one of our domains is refused with 550 5.1.1."""
    with pytest.raises(RecipientRefused) as info:
        load_rules(rules_dir).resolve("Nobody@HumanMade.com")
    refused = info.value
    assert refused.smtp_reply.startswith("550 5.1.1")
    assert refused.smtp_reply == "550 5.1.1 <Nobody@HumanMade.com>: no such mailbox here"
    assert refused.reason == "no route"


def test_a_leading_plus_is_not_a_subaddress(rules_dir: Path) -> None:
    """`+support@` is its own (unknown) mailbox, not `support@` with a tag."""
    with pytest.raises(RecipientRefused) as info:
        load_rules(rules_dir).resolve("+support@altis-dxp.com")
    assert info.value.reason == "no route"


def decisions(table: RuleTable, recipients: list[str]) -> list[Decision]:
    """The decision for each recipient (all routable), for a message with no other features."""
    found, unrouted = table.decide_all(recipients, MessageContext())
    assert unrouted == []
    return found


def test_decide_all_splits_routed_and_unrouted(rules_dir: Path) -> None:
    """decide_all returns the routes found, in order, and the recipients without one."""
    routes, unrouted = load_rules(rules_dir).decide_all(
        [
            "sysops+db@humanmade.com",
            "alice@example.com",
            "SUPPORT@altis-dxp.com",
            "x@altis-dxp.com",
        ],
        MessageContext(),
    )
    assert [r.name for r in routes] == ["sysops", "support"]
    assert unrouted == ["alice@example.com", "x@altis-dxp.com"]


def test_is_ours_and_route_named(rules_dir: Path) -> None:
    """is_ours knows the desk's routed addresses; route_named finds a route by name."""
    table = load_rules(rules_dir)
    assert table.is_ours("Hosting+x@humanmade.com") is True
    assert table.is_ours("alice@humanmade.com") is False
    named = table.route_named("sysops")
    assert named is not None
    assert summary(named) == ("sysops", TicketType.INCIDENT, Priority.URGENT, True)
    assert table.route_named("nope") is None


# best_decision


def test_best_decision_highest_priority_wins(tmp_path: Path) -> None:
    """Among several routes the one with the highest priority wins, wherever it is."""
    folder = make_rules(
        tmp_path / "rules",
        {
            "a.toml": route_toml("low", ["low@d.example"], priority="low")
            + route_toml("normal", ["normal@d.example"], priority="normal"),
            "b.toml": route_toml("urgent", ["urgent@d.example"], priority="urgent")
            + route_toml("high", ["high@d.example"], priority="high"),
        },
    )
    every = decisions(load_rules(folder), [f"{p}@d.example" for p in Priority])
    assert best_decision(every).name == "urgent"
    assert best_decision(reversed(every)).name == "urgent"
    high_or_less = [d for d in every if d.name != "urgent"]
    assert best_decision(high_or_less).name == "high"


def test_best_decision_tie_goes_to_the_earlier_file(tmp_path: Path) -> None:
    """With equal priorities the route in the file earlier by name wins, whatever the order."""
    folder = make_rules(tmp_path / "rules", {})
    (folder / "b.toml").write_text(route_toml("from-b", ["b@d.example"], priority="high"))
    (folder / "a.toml").write_text(route_toml("from-a", ["a@d.example"], priority="high"))
    table = load_rules(folder)
    assert [r.name for r in table.routes] == ["from-a", "from-b"]
    both = decisions(table, ["a@d.example", "b@d.example"])
    assert best_decision(both).name == "from-a"
    assert best_decision(reversed(both)).name == "from-a"


def test_best_decision_tie_goes_to_the_earlier_route_in_a_file(tmp_path: Path) -> None:
    """With equal priorities in one file the route written first wins."""
    folder = make_rules(
        tmp_path / "rules",
        {
            "desk.toml": route_toml("first", ["first@d.example"], "task", "normal")
            + route_toml("second", ["second@d.example"], "incident", "normal")
        },
    )
    table = load_rules(folder)
    both = decisions(table, ["second@d.example", "first@d.example"])
    assert best_decision(both).name == "first"


def test_files_are_read_in_name_order_not_numeric_order(tmp_path: Path) -> None:
    """Files are ordered by name, so 10-x.toml comes before 9-x.toml."""
    folder = make_rules(
        tmp_path / "rules",
        {
            "9-x.toml": route_toml("nine", ["nine@d.example"]),
            "10-x.toml": route_toml("ten", ["ten@d.example"]),
        },
    )
    assert [r.name for r in load_rules(folder).routes] == ["ten", "nine"]
    assert [r.position for r in load_rules(folder).routes] == [0, 1]


def test_best_decision_of_nothing_is_an_error() -> None:
    """best_decision needs at least one decision."""
    with pytest.raises(ValueError, match="empty"):
        best_decision([])


# Load errors, each with its file and line


def test_toml_syntax_error_is_reported_at_tomllibs_line(tmp_path: Path) -> None:
    """A TOML syntax error is reported at the line tomllib names."""
    folder = make_rules(
        tmp_path / "rules", {"a.toml": route_toml("x", ["a@d.example"]) + "[[route]\n"}
    )
    [problem] = problems_of(folder)
    assert (str(folder / "a.toml"), 6) == (problem.file, problem.line)
    assert problem.message.startswith("not valid TOML: ")
    assert "line 6" in problem.message


def test_unknown_type_is_reported_at_the_type_line(tmp_path: Path) -> None:
    """An unknown type is reported at the line of the `type =` key, listing the known types."""
    folder = make_rules(
        tmp_path / "rules",
        {"a.toml": "# desk\n\n" + route_toml("x", ["a@d.example"], kind="questoin")},
    )
    expected = Problem(
        str(folder / "a.toml"),
        6,
        "type must be one of question, incident, problem, task, not 'questoin'",
    )
    assert [expected] == problems_of(folder)


def test_unknown_priority_is_reported_at_the_priority_line(tmp_path: Path) -> None:
    """An unknown priority is reported at the `priority =` line, listing the known ones."""
    folder = make_rules(
        tmp_path / "rules", {"a.toml": route_toml("x", ["a@d.example"], priority="asap")}
    )
    expected = Problem(
        str(folder / "a.toml"), 5, "priority must be one of low, normal, high, urgent, not 'asap'"
    )
    assert [expected] == problems_of(folder)


def test_missing_type_and_priority_are_reported_at_the_route(tmp_path: Path) -> None:
    """A route without type or priority is reported at its [[route]] line, once for each."""
    folder = make_rules(
        tmp_path / "rules",
        {"a.toml": '# desk\n[[route]]\nname = "x"\nrecipients = ["a@d.example"]\n'},
    )
    file = str(folder / "a.toml")
    expected = [Problem(file, 2, "route needs a type"), Problem(file, 2, "route needs a priority")]
    assert expected == problems_of(folder)


def test_missing_name_is_reported_at_the_route(tmp_path: Path) -> None:
    """A route without a name is reported at its [[route]] line."""
    folder = make_rules(
        tmp_path / "rules",
        {
            "a.toml": '\n\n[[route]]\nrecipients = ["a@d.example"]\n'
            'type = "task"\npriority = "low"\n'
        },
    )
    expected = Problem(str(folder / "a.toml"), 3, "route needs a name (a non-empty string)")
    assert [expected] == problems_of(folder)


def test_blank_name_is_reported_at_the_name_line(tmp_path: Path) -> None:
    """A route whose name is blank is reported at the `name =` line."""
    folder = make_rules(tmp_path / "rules", {"a.toml": route_toml("  ", ["a@d.example"])})
    expected = Problem(str(folder / "a.toml"), 2, "route needs a name (a non-empty string)")
    assert [expected] == problems_of(folder)


def test_a_route_without_recipients_or_conditions_is_reported_at_the_route(
    tmp_path: Path,
) -> None:
    """A route with neither recipients nor conditions would refine everything: refused."""
    folder = make_rules(
        tmp_path / "rules",
        {"a.toml": '# desk\n\n[[route]]\nname = "x"\ntype = "task"\npriority = "low"\n'},
    )
    expected = Problem(
        str(folder / "a.toml"),
        3,
        "a route without recipients needs at least one of senders, sender_domains, subject, "
        "headers",
    )
    assert [expected] == problems_of(folder)


def test_empty_recipients_are_reported_at_the_recipients_line(tmp_path: Path) -> None:
    """An empty recipients list is reported at the `recipients =` line."""
    folder = make_rules(tmp_path / "rules", {"a.toml": route_toml("x", [])})
    expected = Problem(
        str(folder / "a.toml"), 3, "recipients must be a non-empty list of addresses"
    )
    assert [expected] == problems_of(folder)


def test_page_that_is_not_a_bool_is_reported_at_its_line(tmp_path: Path) -> None:
    """`page = "yes"` is refused at the `page =` line."""
    folder = make_rules(
        tmp_path / "rules", {"a.toml": route_toml("x", ["a@d.example"]) + 'page = "yes"\n'}
    )
    expected = Problem(str(folder / "a.toml"), 6, "page must be true or false, not 'yes'")
    assert [expected] == problems_of(folder)


def test_unknown_key_in_a_route_is_reported_at_its_line(tmp_path: Path) -> None:
    """A misspelt key inside [[route]] is refused at its line, listing the known keys."""
    folder = make_rules(
        tmp_path / "rules", {"a.toml": route_toml("x", ["a@d.example"]) + "paeg = true\n"}
    )
    expected = Problem(
        str(folder / "a.toml"),
        6,
        "unknown key 'paeg' in [[route]] (known: ack, application, copy_participants, drop, "
        "headers, name, notify, page, priority, recipients, reject, sender_domains, senders, "
        "subject, tags, type)",
    )
    assert [expected] == problems_of(folder)


def test_unknown_top_level_key_is_reported(tmp_path: Path) -> None:
    """A key outside [[route]] is refused as an unknown top-level key."""
    folder = make_rules(
        tmp_path / "rules", {"a.toml": 'title = "desk"\n' + route_toml("x", ["a@d.example"])}
    )
    expected = Problem(
        str(folder / "a.toml"), 1, "unknown top-level key 'title' (expected [[route]])"
    )
    assert [expected] == problems_of(folder)


def test_route_that_is_not_an_array_of_tables_is_reported(tmp_path: Path) -> None:
    """`route = 5` is refused: routes must be written as [[route]] tables."""
    folder = make_rules(tmp_path / "rules", {"a.toml": "route = 5\n"})
    expected = Problem(str(folder / "a.toml"), 1, "route must be an array of tables: [[route]]")
    assert [expected] == problems_of(folder)


def test_recipient_that_is_not_an_address_is_reported_at_its_line(tmp_path: Path) -> None:
    """A recipient that is not an address is refused at the line that holds it."""
    folder = make_rules(
        tmp_path / "rules",
        {
            "a.toml": '[[route]]\nname = "x"\nrecipients = [\n  "a@d.example",\n'
            '  "not an address",\n]\ntype = "task"\npriority = "low"\n'
        },
    )
    expected = Problem(str(folder / "a.toml"), 5, "'not an address'" + NOT_AN_ADDRESS)
    assert [expected] == problems_of(folder)


def test_recipient_that_is_not_a_string_is_reported(tmp_path: Path) -> None:
    """A number in the recipients list is refused at the recipients line."""
    folder = make_rules(
        tmp_path / "rules",
        {"a.toml": '[[route]]\nname = "x"\nrecipients = [5]\ntype = "task"\npriority = "low"\n'},
    )
    expected = Problem(str(folder / "a.toml"), 3, "5" + NOT_AN_ADDRESS)
    assert [expected] == problems_of(folder)


def test_a_recipient_with_a_bad_subaddress_pattern_is_reported_at_its_line(
    tmp_path: Path,
) -> None:
    """`a+@d` and `a+x*@d` are not patterns: only `a+tag@d` and `a+*@d` are."""
    folder = make_rules(
        tmp_path / "rules",
        {
            "a.toml": '[[route]]\nname = "x"\nrecipients = [\n  "a+@d.example",\n'
            '  "a+x*@d.example",\n]\ntype = "task"\npriority = "low"\n'
        },
    )
    a = str(folder / "a.toml")
    assert problems_of(folder) == [
        Problem(a, 4, "'a+@d.example'" + NOT_AN_ADDRESS),
        Problem(a, 5, "'a+x*@d.example'" + NOT_AN_ADDRESS),
    ]


def test_duplicate_recipient_across_files_names_the_first_route(tmp_path: Path) -> None:
    """A recipient routed twice is refused at the second, naming the first route's file:line."""
    folder = make_rules(
        tmp_path / "rules",
        {
            "a.toml": "# first\n" + route_toml("first", ["help@d.example"]),
            "b.toml": "\n\n"
            + route_toml("other", ["other@d.example"])
            + "\n"
            + route_toml("second", ["x@d.example", "help@d.example"]),
        },
    )
    first = folder / "a.toml"
    expected = Problem(
        str(folder / "b.toml"),
        11,
        f"duplicate recipient 'help@d.example': already routed by 'first' at {first}:2",
    )
    assert [expected] == problems_of(folder)


def test_duplicate_recipient_differing_only_in_case_is_reported(tmp_path: Path) -> None:
    """Recipients are compared lower-cased, so Help@ and help@ are the same recipient."""
    folder = make_rules(
        tmp_path / "rules",
        {
            "a.toml": route_toml("first", ["help@d.example"]),
            "b.toml": route_toml("second", ["Help@D.example"]),
        },
    )
    expected = Problem(
        str(folder / "b.toml"),
        3,
        f"duplicate recipient 'help@d.example': already routed by 'first' at {folder / 'a.toml'}:1",
    )
    assert [expected] == problems_of(folder)


def test_duplicate_recipient_written_in_capitals_is_found_on_its_own_line(
    tmp_path: Path,
) -> None:
    """The line named is the one holding the duplicate as written, whatever its case."""
    folder = make_rules(
        tmp_path / "rules",
        {
            "a.toml": route_toml("first", ["help@d.example"]),
            "b.toml": (
                '[[route]]\nname = "second"\nrecipients = [\n  "x@d.example",\n'
                '  "HELP@D.example",\n]\ntype = "question"\npriority = "normal"\n'
            ),
        },
    )
    expected = Problem(
        str(folder / "b.toml"),
        5,
        f"duplicate recipient 'help@d.example': already routed by 'first' at {folder / 'a.toml'}:1",
    )
    assert [expected] == problems_of(folder)


def test_duplicate_route_name_is_reported_at_the_second_name(tmp_path: Path) -> None:
    """A route name used twice is refused at the second `name =`, naming the first."""
    folder = make_rules(
        tmp_path / "rules",
        {
            "a.toml": route_toml("desk", ["a@d.example"]),
            "b.toml": "\n" + route_toml("desk", ["b@d.example"]),
        },
    )
    expected = Problem(
        str(folder / "b.toml"),
        3,
        f"duplicate route name 'desk' (also at {folder / 'a.toml'}:2)",
    )
    assert [expected] == problems_of(folder)


def test_empty_folder_is_reported(tmp_path: Path) -> None:
    """A rules folder with no *.toml files is refused."""
    folder = make_rules(tmp_path / "rules", {"README.md": "# rules\n"})
    assert [Problem(str(folder), 0, "no *.toml rules files in the folder")] == problems_of(folder)


def test_missing_folder_is_reported(tmp_path: Path) -> None:
    """A rules folder that does not exist is refused."""
    folder = tmp_path / "absent"
    assert [Problem(str(folder), 0, "rules folder does not exist")] == problems_of(folder)


def test_table_without_any_route_is_reported(tmp_path: Path) -> None:
    """A table whose only file has no [[route]] at all is refused."""
    folder = make_rules(tmp_path / "rules", {"desk.toml": "# routes go here\n"})
    assert [Problem(str(folder), 0, "the rules table has no [[route]]")] == problems_of(folder)


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    """Every problem in every file is reported in one RulesError, in file and line order."""
    folder = make_rules(
        tmp_path / "rules",
        {
            "a.toml": route_toml("ok", ["ok@d.example"])
            + route_toml("bad", ["q@d.example"], kind="bogus", priority="nope")
            + "\n"
            + route_toml("worse", ["zz"], kind="task", priority="low"),
            "b.toml": "[[route\n",
            "c.toml": 'title = "x"\n' + route_toml("ok", ["ok2@d.example"]),
        },
    )
    a, b, c = (str(folder / n) for n in ("a.toml", "b.toml", "c.toml"))
    problems = problems_of(folder)
    expected = [
        (a, 9, "type must be one of question, incident, problem, task, not 'bogus'"),
        (a, 10, "priority must be one of low, normal, high, urgent, not 'nope'"),
        (a, 14, "'zz'" + NOT_AN_ADDRESS),
        (b, 1, "not valid TOML"),
        (c, 1, "unknown top-level key 'title' (expected [[route]])"),
        (c, 3, f"duplicate route name 'ok' (also at {a}:2)"),
    ]
    actual = [
        (p.file, p.line, "not valid TOML" if p.message.startswith("not valid TOML") else p.message)
        for p in problems
    ]
    assert expected == actual
    with pytest.raises(RulesError) as info:
        load_rules(folder)
    assert "\n".join(str(p) for p in problems) == str(info.value)


# Version


def test_version_is_stable_when_nothing_changes(rules_dir: Path) -> None:
    """Loading the same files twice gives the same version, a sha256 hex digest."""
    first = load_rules(rules_dir).version
    assert first == load_rules(rules_dir).version
    assert len(first) == 64
    assert set(first) <= set("0123456789abcdef")


def test_version_is_the_same_for_a_copy_in_another_folder(rules_dir: Path, tmp_path: Path) -> None:
    """The version depends on file names and bytes, not on where the folder is."""
    copy = tmp_path / "elsewhere"
    shutil.copytree(rules_dir, copy)
    assert load_rules(rules_dir).version == load_rules(copy).version


def test_version_changes_when_a_file_changes(rules_dir: Path) -> None:
    """Editing a rules file, even only a comment, changes the version."""
    before = load_rules(rules_dir).version
    desk = rules_dir / "desk.toml"
    desk.write_text(desk.read_text(encoding="utf-8") + "# edited\n", encoding="utf-8")
    assert before != load_rules(rules_dir).version


def test_version_changes_when_a_file_is_added_or_renamed(rules_dir: Path) -> None:
    """Adding a file or renaming one changes the version."""
    before = load_rules(rules_dir).version
    (rules_dir / "extra.toml").write_text(route_toml("extra", ["extra@altis-dxp.com"]))
    added = load_rules(rules_dir).version
    (rules_dir / "extra.toml").rename(rules_dir / "more.toml")
    renamed = load_rules(rules_dir).version
    assert len({before, added, renamed}) == 3


# Properties


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_resolve_returns_a_route_or_refuses(shipped: RuleTable, address: str) -> None:
    """RuleTable.resolve on any text returns one of its routes or raises RecipientRefused."""
    outcome: Route | RecipientRefused
    try:
        outcome = shipped.resolve(address)
    except RecipientRefused as refused:
        outcome = refused
    if isinstance(outcome, Route):
        assert outcome in shipped.routes
    else:
        assert outcome.smtp_reply.startswith(("550 5.7.1 ", "550 5.1.1 "))
        assert address == outcome.address


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_route_key_never_raises(address: str) -> None:
    """addresses.route_key accepts any text and ignores surrounding whitespace."""
    key = addresses.route_key(address)
    assert isinstance(key, str)
    assert key == addresses.route_key(f" \t{address}\r\n ")


@st.composite
def disguised(draw: st.DrawFn) -> tuple[str, str]:
    """A shipped recipient and the same address with random case and maybe a random +tag."""
    plain = draw(
        st.sampled_from([f"{mailbox}@{domain}" for mailbox, *_ in SHIPPED for domain in DOMAINS])
    )
    flips = draw(st.lists(st.booleans(), min_size=len(plain), max_size=len(plain)))
    cased = "".join(c.upper() if flip else c for c, flip in zip(plain, flips, strict=True))
    local, domain = cased.split("@")
    tag = draw(st.none() | st.text(max_size=30))
    return plain, (local if tag is None else f"{local}+{tag}") + "@" + domain


@settings(max_examples=200, deadline=None)
@given(disguised())
def test_case_and_tag_do_not_change_the_route(shipped: RuleTable, pair: tuple[str, str]) -> None:
    """A shipped address with random case and a random +tag resolves like the plain address."""
    plain, variant = pair
    assert shipped.resolve(plain) == shipped.resolve(variant)
