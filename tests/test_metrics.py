"""The HTTP listener: /metrics counters move with the mail, /healthz and /readyz tell the truth."""

from __future__ import annotations

import json
import smtplib
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from maild.config import load_settings
from tests.conftest import RunningMaild, mail

Sample = tuple[str, tuple[tuple[str, str], ...]]


@pytest.fixture
def served(make_config: Callable[..., Path]) -> Iterator[RunningMaild]:
    config = make_config('[http]\nlisten = "127.0.0.1:0"\n')
    with RunningMaild(load_settings(config)) as running:
        yield running


def get(maild: RunningMaild, path: str, method: str = "GET") -> tuple[int, str]:
    port = maild.service.addresses["http"][1]
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (http://)
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(maild: RunningMaild) -> dict[Sample, float]:
    status, text = get(maild, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Sample, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_with_accepted_refused_and_filed_mail(served: RunningMaild) -> None:
    """One accepted message, two refused recipients and one ticket show up as deltas."""
    before = scrape(served)
    with served.smtp() as client:
        client.mail("alice@customer.example")
        assert client.rcpt("nobody@altis-dxp.com")[0] == 550
        assert client.rcpt("someone@elsewhere.example")[0] == 550
        client.rset()
    served.send(mail("Counted"), ["support@altis-dxp.com"])
    served.settle()
    after = scrape(served)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("maild_messages_received_total", protocol="smtp") == 1
    assert delta("maild_recipients_refused_total", reason="unknown_mailbox") == 1
    assert delta("maild_recipients_refused_total", reason="relay") == 1
    assert delta("maild_messages_processed_total", outcome="created") == 1
    assert delta("maild_tickets_created_total", type="question", priority="normal") == 1
    assert delta("maild_processing_seconds_count") == 1
    assert value(after, "maild_backlog", queue="inbound") == 0
    assert value(after, "maild_listener_up", protocol="smtp") == 1


def test_sysops_mail_counts_a_withheld_page_when_paging_is_off(served: RunningMaild) -> None:
    """With paging off, a sysops@ ticket counts an urgent incident and a withheld page."""
    before = scrape(served)
    served.send(mail("Site down", to="sysops@altis-dxp.com"), ["sysops@altis-dxp.com"])
    served.settle()
    after = scrape(served)
    for name, labels in (
        ("maild_tickets_created_total", {"type": "incident", "priority": "urgent"}),
        ("maild_pages_total", {"action": "trigger", "result": "withheld"}),
    ):
        assert value(after, name, **labels) - value(before, name, **labels) == 1


def test_rules_reloads_are_counted_by_result(served: RunningMaild, rules_dir: Path) -> None:
    """A good reload counts ok; a broken table counts failed (and keeps the old table)."""
    before = scrape(served)
    assert served.service.reload_rules() is True
    (rules_dir / "broken.toml").write_text('[[route]]\nname = "x"\ntype = "nonsense"\n')
    assert served.service.reload_rules() is False
    after = scrape(served)
    assert (
        value(after, "maild_rules_reloads_total", trigger="sighup", result="ok")
        - value(before, "maild_rules_reloads_total", trigger="sighup", result="ok")
        == 1
    )
    assert (
        value(after, "maild_rules_reloads_total", trigger="sighup", result="failed")
        - value(before, "maild_rules_reloads_total", trigger="sighup", result="failed")
        == 1
    )


def test_healthz_and_readyz_are_ok_while_serving(served: RunningMaild) -> None:
    """Both answer 200; /healthz names its checks and the backlogs."""
    status, body = get(served, "/healthz")
    report = json.loads(body)
    assert (status, report["status"]) == (200, "ok")
    assert report["checks"] == {"listener_smtp": "ok", "database": "ok", "storage": "ok"}
    assert report["backlog"] == {
        "inbound": 0,
        "failed": 0,
        "pages": 0,
        "acknowledgements": 0,
        "webhooks": 0,
    }
    assert get(served, "/readyz") == (200, '{"status": "ready"}\n')


def test_healthz_fails_when_a_listener_is_closed(served: RunningMaild) -> None:
    """A closed SMTP listener turns /healthz to 503, naming it."""
    served.service.listeners[0].stop_accepting()
    status, body = get(served, "/healthz")
    report = json.loads(body)
    assert (status, report["status"]) == (503, "failing")
    assert report["checks"]["listener_smtp"] == "closed"
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP("127.0.0.1", served.smtp_port, timeout=5)


def test_unknown_paths_and_methods_are_refused(served: RunningMaild) -> None:
    """404 for other paths, 405 for other methods, 400 for a request that is not HTTP."""
    assert get(served, "/nope")[0] == 404
    assert get(served, "/metrics", method="POST")[0] == 405
    port = served.service.addresses["http"][1]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"garbage")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
