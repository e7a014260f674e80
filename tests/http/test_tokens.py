"""`maild tokens`: a token is printed once, stored as a hash, listed without it, revoked at
once; the running daemon takes what the CLI made."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx2
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text

from maild.cli import main
from maild.store.tokens import TOKEN_PREFIX, looks_like_token
from tests.conftest import RunningMaild, wait_until
from tests.http.conftest import bearer, http_url, problem


@pytest.fixture(autouse=True)
def _quiet(quiet_logging: None) -> None:
    """The CLI runs in this process beside the daemon: its logs stay off stdout."""


def cli(maild: RunningMaild, *args: str) -> Result:
    config = maild.settings.source
    assert config is not None
    return CliRunner().invoke(main, [*args, "--config", str(config)], catch_exceptions=False)


def created(maild: RunningMaild, name: str, *options: str) -> str:
    result = cli(maild, "tokens", "create", name, *options, "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert list(body) == ["name", "token"]
    assert body["name"] == name
    token: str = body["token"]
    return token


def test_create_prints_the_token_once_and_stores_only_its_sha256(served: RunningMaild) -> None:
    """--json prints {"name", "token"}; the token is maild_ and 256 random bits; the table
    holds its SHA-256 and nowhere the token itself."""
    token = created(served, "dashboard", "--scope", "write", "--customer", "*@Customer.example")
    assert token.startswith(TOKEN_PREFIX)
    assert looks_like_token(token)
    assert len(token) == len(TOKEN_PREFIX) + 43  # 32 bytes, URL-safe base64
    rows = served.service.database.run_read(
        lambda s: s.execute(text("SELECT * FROM api_token")).mappings().all()
    )
    assert len(rows) == 1
    row = dict(rows[0])
    assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in repr(row)
    assert (row["name"], row["scope"], row["customer"]) == (
        "dashboard",
        "write",
        "*@customer.example",
    )


def test_plain_create_prints_the_token_alone_on_stdout(served: RunningMaild) -> None:
    """Without --json, stdout is the token (for `TOKEN=$(maild tokens create ...)`); the note
    about it goes to stderr."""
    result = cli(served, "tokens", "create", "ci", "--scope", "read")
    assert result.exit_code == 0
    assert looks_like_token(result.stdout.strip())
    assert "not shown again" in result.stderr


def test_a_duplicate_name_exits_1_naming_it(served: RunningMaild) -> None:
    """A second token of the same name is refused, revoked or not: names stay for audit."""
    created(served, "dashboard", "--scope", "read")
    again = cli(served, "tokens", "create", "dashboard", "--scope", "write")
    assert (again.exit_code, again.stderr) == (
        1,
        "maild: a token named 'dashboard' already exists\n",
    )
    assert cli(served, "tokens", "revoke", "dashboard").exit_code == 0
    after = cli(served, "tokens", "create", "dashboard", "--scope", "write")
    assert after.exit_code == 1
    assert "already exists (revoked" in after.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bad name", "--scope", "read"], "is not a token name"),
        (["ok", "--scope", "read", "--customer", "not-an-address"], "not an address or *@domain"),
    ],
)
def test_bad_names_and_customers_are_refused(
    served: RunningMaild, args: list[str], message: str
) -> None:
    """A name with a space, a customer that is neither an address nor *@domain: exit 1."""
    result = cli(served, "tokens", "create", *args)
    assert result.exit_code == 1
    assert message in result.stderr


def test_list_shows_scope_customer_and_use_never_the_token(served: RunningMaild) -> None:
    """tokens list --json: name, scope, customer, created, last used, revoked; a request
    with the token sets last_used_at; neither the token nor its hash is shown."""
    token = created(served, "dashboard", "--scope", "read", "--customer", "alice@customer.example")
    before = json.loads(cli(served, "tokens", "list", "--json").stdout)
    assert [(t["name"], t["scope"], t["customer"], t["last_used_at"]) for t in before] == [
        ("dashboard", "read", "alice@customer.example", None)
    ]
    with httpx2.Client(base_url=http_url(served), timeout=30) as http:
        assert http.get("/api/v1/whoami", headers=bearer(token)).status_code == 200

    def used() -> object:
        return json.loads(cli(served, "tokens", "list", "--json").stdout)[0]["last_used_at"]

    wait_until(used, 10, "last_used_at")
    listing = cli(served, "tokens", "list")
    assert "alice@customer.example" in listing.stdout
    for output in (listing.stdout, cli(served, "tokens", "list", "--json").stdout):
        assert token not in output
        assert hashlib.sha256(token.encode()).hexdigest() not in output


def test_a_revoked_token_fails_on_the_next_request(served: RunningMaild) -> None:
    """Revoking in another process takes effect at once: no cache holds the token."""
    token = created(served, "dashboard", "--scope", "read")
    with httpx2.Client(base_url=http_url(served), timeout=30) as http:
        assert http.get("/api/v1/whoami", headers=bearer(token)).json() == {
            "name": "dashboard",
            "scope": "read",
            "customer": None,
        }
        result = cli(served, "tokens", "revoke", "dashboard")
        assert (result.exit_code, result.stdout) == (0, "token 'dashboard' revoked\n")
        refused = http.get("/api/v1/whoami", headers=bearer(token))
    assert refused.status_code == 401
    assert problem(refused)["type"] == "urn:maild:problem:invalid-token"
    listed = json.loads(cli(served, "tokens", "list", "--json").stdout)
    assert listed[0]["revoked_at"] is not None


def test_revoking_an_unknown_token_exits_1(served: RunningMaild) -> None:
    result = cli(served, "tokens", "revoke", "nobody")
    assert (result.exit_code, result.stderr) == (1, "maild: no token named 'nobody'\n")


def test_tokens_on_a_missing_database_exit_78(tmp_path: Path, rules_dir: Path) -> None:
    """Like every command but serve, ingest and db upgrade: no database is created."""
    config = tmp_path / "config.toml"
    config.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path}/none/maild.db"\n[rules]\npath = "{rules_dir}"\n'
    )
    result = CliRunner().invoke(main, ["tokens", "list", "--config", str(config)])
    assert result.exit_code == 78
    assert "maild db upgrade" in result.stderr
