"""`maild agents`: accounts made, listed, disabled and re-passworded from the CLI; the
password stored only as an argon2 hash; every refusal names what is wrong."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlmodel import select

from maild.cli import main
from maild.config import load_settings
from maild.store.agents import password_hash_of, password_matches
from maild.store.database import Database
from maild.store.models import Agent
from tests.outbound.test_correspondence import DESK_SECTION

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _quiet(quiet_logging: None) -> None:
    """The CLI reconfigures logging."""


@pytest.fixture
def config(make_config: Callable[..., Path]) -> Path:
    return upgraded(make_config(DESK_SECTION))


def upgraded(config: Path) -> Path:
    """The config, its database made (`maild db upgrade`)."""
    done = CliRunner().invoke(main, ["db", "upgrade", "--config", str(config)])
    assert done.exit_code == 0, done.output
    return config


def run(config: Path, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, [*args[:2], "--config", str(config), *args[2:]], input=stdin)


def password_file(tmp_path: Path, text: str = PASSWORD + "\n") -> str:
    path = tmp_path / "password"
    path.write_text(text)
    return str(path)


def database(config: Path) -> Database:
    return Database(load_settings(config).database.url)


def test_an_agent_is_added_with_only_a_hash_of_its_password(config: Path, tmp_path: Path) -> None:
    done = run(
        config, "agents", "add", "Jo@Altis-DXP.com", "--name", "Jo",
        "--password-file", password_file(tmp_path),
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "agent jo@altis-dxp.com added" in done.output
    db = database(config)
    try:
        (agent,) = db.run_read(lambda s: s.exec(select(Agent)).all())
        found = db.run_read(lambda s: password_hash_of(s, "jo@altis-dxp.com"))
    finally:
        db.close()
    assert agent.email == "jo@altis-dxp.com"
    assert agent.password_hash.startswith("$argon2id$")
    assert PASSWORD not in agent.password_hash
    assert found is not None
    assert password_matches(found[1], PASSWORD) == (True, None)
    assert password_matches(found[1], PASSWORD + "x") == (False, None)


def test_the_list_never_shows_a_hash(config: Path, tmp_path: Path) -> None:
    run(config, "agents", "add", "jo@altis-dxp.com", "--password-file", password_file(tmp_path))
    listed = run(config, "agents", "list", "--json")
    assert listed.exit_code == 0, listed.output
    (view,) = json.loads(listed.output)
    assert set(view) == {"email", "name", "disabled", "created_at", "last_sign_in_at"}
    assert view["email"] == "jo@altis-dxp.com"
    assert view["disabled"] is False
    assert "argon2" not in listed.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["someone@customer.example"], "someone@customer.example is not one of [desk] agents"),
        (["not an address"], "EMAIL: 'not an address' is not an email address"),
    ],
)
def test_only_an_address_desk_agents_matches_gets_an_account(
    config: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    done = run(config, "agents", "add", *args, "--password-file", password_file(tmp_path))
    assert done.exit_code == 1
    assert message in done.output


def test_without_desk_agents_no_account_is_made(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = make_config()
    done = run(
        config, "agents", "add", "jo@altis-dxp.com", "--password-file", password_file(tmp_path)
    )
    assert done.exit_code == 78
    assert "[desk] agents lists nobody" in done.output


def test_a_short_password_or_a_second_account_is_refused(config: Path, tmp_path: Path) -> None:
    short = run(
        config, "agents", "add", "jo@altis-dxp.com",
        "--password-file", password_file(tmp_path, "short\n"),
    )  # fmt: skip
    assert short.exit_code == 1
    assert "at least 12 characters" in short.output
    run(config, "agents", "add", "jo@altis-dxp.com", "--password-file", password_file(tmp_path))
    again = run(
        config, "agents", "add", "JO@altis-dxp.com", "--password-file", password_file(tmp_path)
    )
    assert again.exit_code == 1
    assert "an agent jo@altis-dxp.com already exists" in again.output


def test_the_password_is_asked_twice_or_refused_without_a_terminal(config: Path) -> None:
    """CliRunner's input is not a terminal: the command says how to give the password."""
    done = run(config, "agents", "add", "jo@altis-dxp.com", stdin=f"{PASSWORD}\n{PASSWORD}\n")
    assert done.exit_code == 2
    assert "give --password-file FILE, or run this on a terminal" in done.output


def test_disable_enable_and_passwd(config: Path, tmp_path: Path) -> None:
    run(config, "agents", "add", "jo@altis-dxp.com", "--password-file", password_file(tmp_path))
    disabled = run(config, "agents", "disable", "jo@altis-dxp.com")
    assert disabled.exit_code == 0
    db = database(config)
    try:
        assert db.run_read(lambda s: password_hash_of(s, "jo@altis-dxp.com")) is None
        assert run(config, "agents", "enable", "jo@altis-dxp.com").exit_code == 0
        new = password_file(tmp_path, "a different long password\n")
        changed = run(config, "agents", "passwd", "jo@altis-dxp.com", "--password-file", new)
        assert changed.exit_code == 0, changed.output
        found = db.run_read(lambda s: password_hash_of(s, "jo@altis-dxp.com"))
    finally:
        db.close()
    assert found is not None
    assert password_matches(found[1], "a different long password")[0] is True
    assert password_matches(found[1], PASSWORD)[0] is False
    missing = run(config, "agents", "disable", "nobody@altis-dxp.com")
    assert missing.exit_code == 1
    assert "no agent nobody@altis-dxp.com" in missing.output


def test_an_unknown_account_costs_one_argon2_check_like_a_known_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """password_matches(None, …) verifies against a hash nobody's password makes, so an
    unknown address cannot be told from a wrong password by the time it takes."""
    from maild.store import agents

    checked: list[str] = []
    real = agents._HASHER

    class Counting:
        def verify(self, stored: str, password: str) -> bool:
            checked.append(stored)
            return real.verify(stored, password)

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    monkeypatch.setattr(agents, "_HASHER", Counting())
    stored = agents.hash_password(PASSWORD)
    assert password_matches(stored, "a wrong password here") == (False, None)
    assert password_matches(None, PASSWORD) == (False, None)
    assert checked == [stored, agents._DUMMY]
    assert agents._DUMMY.startswith("$argon2id$")
