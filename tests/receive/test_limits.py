"""SMTP abuse limits over real loopback sockets: connections, recipients, errors, idle time."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlmodel import select
from structlog.testing import capture_logs

from maild import metrics
from maild.config import load_settings
from maild.errors import ConfigError
from maild.store.models import Inbound
from tests.conftest import Client, RunningMaild, mail

HOST = b"mx.test.invalid"  # the hostname make_config sets
TOO_MANY_CONNECTIONS = b"421 4.7.0 " + HOST + b" Too many connections, try again later\r\n"
TOO_MANY_FROM_IP = b"421 4.7.0 Too many connections from your address, try again later\r\n"
TOO_MANY_ERRORS = b"421 4.7.0 Too many errors, closing connection\r\n"


def refused(reason: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value("maild_recipients_refused_total", {"reason": reason}) or 0
    )


def inbound_rows(maild: RunningMaild) -> list[Inbound]:
    return maild.service.database.run_read(lambda s: list(s.exec(select(Inbound)).all()))


# Settings


def test_limits_have_documented_defaults(tmp_path: Path) -> None:
    """Without the keys: 100 connections, 20 per address, 100 recipients, 10 errors."""
    path = tmp_path / "config.toml"
    path.write_text("", encoding="utf-8")
    smtp = load_settings(path).smtp
    limits = (
        smtp.max_connections,
        smtp.max_connections_per_ip,
        smtp.max_recipients,
        smtp.max_errors,
    )
    assert limits == (100, 20, 100, 10)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "max_connections = -1",
            "[smtp] max_connections: Input should be greater than or equal to 0",
        ),
        (
            "max_connections_per_ip = 2.5",
            "[smtp] max_connections_per_ip: Input should be a valid integer",
        ),
        ('max_recipients = "100"', "[smtp] max_recipients: Input should be a valid integer"),
        ("max_errors = true", "[smtp] max_errors: Input should be a valid integer"),
    ],
)
def test_bad_limit_names_file_line_and_key(tmp_path: Path, line: str, message: str) -> None:
    """A limit that is not a whole number >= 0 is a config error naming the file and line."""
    path = tmp_path / "config.toml"
    path.write_text(f'[smtp]\nlisten = "127.0.0.1:2525"\n{line}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}:3: {message}"


# Connections


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
def test_connection_beyond_max_connections_gets_421_and_others_keep_working(
    limited: Callable[..., RunningMaild],
    connect: Callable[..., Client],
    protocol: str,
) -> None:
    """With 3 connections open the 4th gets 421 and is closed before any greeting; the 3 go on."""
    maild = limited(max_connections="3")
    port = maild.service.addresses[protocol][1]
    before = refused("too_many_connections")
    clients = [connect(port) for _ in range(3)]
    assert [client.reply()[:3] for client in clients] == [b"220"] * 3
    with capture_logs() as logs:
        extra = connect(port)
        assert extra.reply() == TOO_MANY_CONNECTIONS
        assert extra.reply() == b""
    assert [client.say(b"NOOP")[:3] for client in clients] == [b"250"] * 3
    (listener,) = [lst for lst in maild.service.listeners if lst.protocol == protocol]
    assert len(listener.connections) == 3
    assert refused("too_many_connections") - before == 1
    (entry,) = [e for e in logs if e["event"] == "connection refused"]
    assert (entry["reason"], entry["limit"]) == ("too_many_connections", 3)


def test_closing_a_connection_lets_a_new_one_in(
    limited: Callable[..., RunningMaild],
    connect: Callable[..., Client],
) -> None:
    """Once one of the max_connections hangs up, the next connection is greeted."""
    maild = limited(max_connections="2")
    first, second = connect(maild.smtp_port), connect(maild.smtp_port)
    assert (first.reply()[:3], second.reply()[:3]) == (b"220", b"220")
    assert connect(maild.smtp_port).reply() == TOO_MANY_CONNECTIONS
    assert first.say(b"QUIT")[:3] == b"221"
    assert first.reply() == b""  # the server counts the connection out before it closes
    assert len(maild.service.listeners[0].connections) == 1
    third = connect(maild.smtp_port)
    assert third.reply()[:3] == b"220"
    assert third.say(b"EHLO client.example")[:3] == b"250"


def test_connection_limit_is_counted_per_listener(
    limited: Callable[..., RunningMaild],
    connect: Callable[..., Client],
) -> None:
    """A full SMTP listener does not stop the LMTP listener from greeting."""
    maild = limited(max_connections="1")
    assert connect(maild.smtp_port).reply()[:3] == b"220"
    assert connect(maild.smtp_port).reply() == TOO_MANY_CONNECTIONS
    assert connect(maild.lmtp_port).reply()[:3] == b"220"


def test_connection_beyond_max_connections_per_ip_gets_421_other_addresses_do_not(
    limited: Callable[..., RunningMaild],
    connect: Callable[..., Client],
) -> None:
    """A third connection from 127.0.0.1 gets 421 while 127.0.0.2 is still greeted."""
    maild = limited(max_connections_per_ip="2")
    before = refused("too_many_connections_per_ip")
    clients = [connect(maild.smtp_port) for _ in range(2)]
    assert [client.reply()[:3] for client in clients] == [b"220"] * 2
    with capture_logs() as logs:
        extra = connect(maild.smtp_port)
        assert extra.reply() == TOO_MANY_FROM_IP
        assert extra.reply() == b""
    assert connect(maild.smtp_port, source="127.0.0.2").reply()[:3] == b"220"
    assert [client.say(b"NOOP")[:3] for client in clients] == [b"250"] * 2
    assert refused("too_many_connections_per_ip") - before == 1
    (entry,) = [e for e in logs if e["event"] == "connection refused"]
    assert (
        entry["reason"],
        entry["peer"].rpartition(":")[0],
    ) == ("too_many_connections_per_ip", "127.0.0.1")


def test_zero_means_no_connection_limit(
    limited: Callable[..., RunningMaild],
    connect: Callable[..., Client],
) -> None:
    """max_connections = 0 and max_connections_per_ip = 0 turn both limits off."""
    maild = limited(max_connections="0", max_connections_per_ip="0")
    clients = [connect(maild.smtp_port) for _ in range(25)]
    assert [client.reply()[:3] for client in clients] == [b"220"] * 25


# Recipients


def test_rcpt_beyond_max_recipients_gets_452_and_data_goes_to_the_others(
    limited: Callable[..., RunningMaild],
) -> None:
    """The 4th and 5th RCPT get 452 4.5.3; the message is stored for the first 3 only."""
    maild = limited(max_recipients="3")
    rcpts = [f"support+{n}@altis-dxp.com" for n in range(5)]
    before = refused("too_many_recipients")
    with maild.smtp() as client:
        client.mail("alice@customer.example")
        replies = [client.rcpt(rcpt) for rcpt in rcpts]
        code, _ = client.data(mail("Many recipients").as_bytes())
    too_many = (452, b"4.5.3 Too many recipients")
    assert replies == [(250, b"2.1.5 OK")] * 3 + [too_many] * 2
    assert code == 250
    assert refused("too_many_recipients") - before == 2
    (row,) = inbound_rows(maild)
    assert row.rcpt_tos == rcpts[:3]


def test_the_rest_of_the_recipients_go_in_the_next_transaction(
    limited: Callable[..., RunningMaild],
) -> None:
    """smtplib hears 452 for the extra recipients and can send them again on the same connection."""
    maild = limited(max_recipients="2")
    rcpts = [f"support+{n}@altis-dxp.com" for n in range(3)]
    with maild.smtp() as client:
        refusals = client.send_message(mail("Split"), "alice@customer.example", rcpts)
        assert refusals == {rcpts[2]: (452, b"4.5.3 Too many recipients")}
        assert client.send_message(mail("Split"), "alice@customer.example", rcpts[2:]) == {}
    assert sorted(row.rcpt_tos for row in inbound_rows(maild)) == [rcpts[:2], rcpts[2:]]


# Errors


def test_too_many_bad_commands_get_421_and_the_connection_closed(
    limited: Callable[..., RunningMaild],
    connect: Callable[..., Client],
) -> None:
    """With max_errors = 3, the 4th 5xx reply is replaced by 421 and the connection closes."""
    maild = limited(max_errors="3")
    before = refused("too_many_errors")
    client = connect(maild.smtp_port)
    assert client.reply()[:3] == b"220"
    with capture_logs() as logs:
        replies = [
            client.say(line)[:3]
            for line in (b"EHLO client.example", b"FOO", b"MAIL", b"NOOP", b"RCPT TO:<a@b.example>")
        ]
        assert replies == [b"250", b"500", b"501", b"250", b"503"]
        assert client.say(b"BAR") == TOO_MANY_ERRORS
        assert client.reply() == b""
    assert refused("too_many_errors") - before == 1
    (entry,) = [e for e in logs if e["event"] == "too many errors; connection closed"]
    assert (entry["reason"], entry["errors"], entry["limit"]) == ("too_many_errors", 4, 3)


def test_refused_recipients_count_as_errors(
    limited: Callable[..., RunningMaild],
    connect: Callable[..., Client],
) -> None:
    """A client guessing mailboxes is cut off after max_errors 550 refusals."""
    maild = limited(max_errors="2")
    client = connect(maild.smtp_port)
    client.reply()
    client.say(b"EHLO client.example")
    assert client.say(b"MAIL FROM:<alice@customer.example>")[:3] == b"250"
    guesses = [client.say(b"RCPT TO:<guess%d@altis-dxp.com>" % n)[:3] for n in range(2)]
    assert guesses == [b"550", b"550"]
    assert client.say(b"RCPT TO:<guess2@altis-dxp.com>") == TOO_MANY_ERRORS
    assert client.reply() == b""
    assert inbound_rows(maild) == []


def test_commands_pipelined_after_the_last_error_are_not_run(
    limited: Callable[..., RunningMaild],
    connect: Callable[..., Client],
) -> None:
    """A whole transaction sent in one go behind the budget-breaking command is never stored."""
    maild = limited(max_errors="1")
    client = connect(maild.smtp_port)
    client.reply()
    client.sock.sendall(
        b"EHLO client.example\r\nFOO\r\nBAR\r\nMAIL FROM:<alice@customer.example>\r\n"
        b"RCPT TO:<support@altis-dxp.com>\r\nDATA\r\nSubject: sneaky\r\n\r\nhi\r\n.\r\n"
    )
    replies = [client.reply()[:3] for _ in range(3)]
    assert replies == [b"250", b"500", b"421"]
    assert client.reply() == b""
    assert inbound_rows(maild) == []


def test_reply_to_the_end_of_data_never_counts_as_an_error(
    limited: Callable[..., RunningMaild],
    connect: Callable[..., Client],
) -> None:
    """A 552 for an oversized message is not charged: with max_errors = 1 the session goes on."""
    maild = limited(max_errors="1", max_message_size="10000")
    client = connect(maild.smtp_port)
    client.reply()
    client.say(b"EHLO client.example")
    assert client.say(b"FOO")[:3] == b"500"  # the whole budget
    client.say(b"MAIL FROM:<alice@customer.example>")
    client.say(b"RCPT TO:<support@altis-dxp.com>")
    assert client.say(b"DATA")[:3] == b"354"
    assert client.say(b"Subject: big\r\n\r\n" + b"y" * 20_000 + b"\r\n.")[:3] == b"552"
    assert client.say(b"NOOP")[:3] == b"250"
    assert client.say(b"BAR") == TOO_MANY_ERRORS


# Idle timeout


def test_idle_connection_gets_421_after_the_timeout_and_is_closed(
    limited: Callable[..., RunningMaild],
    connect: Callable[..., Client],
) -> None:
    """A client that says nothing for [smtp] timeout hears 421 4.4.2 and is disconnected."""
    maild = limited(timeout='"0.5s"')
    started = time.monotonic()
    client = connect(maild.smtp_port)
    assert client.reply()[:3] == b"220"
    assert client.reply() == b"421 4.4.2 " + HOST + b" Timeout, closing connection\r\n"
    assert client.reply() == b""
    assert time.monotonic() - started >= 0.4
    assert maild.service.listeners[0].connections == set()
