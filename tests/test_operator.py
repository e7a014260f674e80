"""What an operator trips over (issue 16): each item as it was seen, and what it must do now.

The items: the README's upgrade command must reach the service's database and every
db command names it (1); read-only commands create nothing (2); a bad SQLite path is
one line, exit 78 (3); `rules explain --message` names the table that filed the
message (4); rules errors point at the right file and codes match (5); readiness
means mail can be stored, and metrics are documented as they are (6); `pages test`
tells an unreachable URL from a refusal (7); deployment details (8).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, inspect

from maild.cli import main
from maild.config import load_settings
from maild.errors import RulesError
from maild.routing.rules import load_rules
from maild.store.database import describe
from maild.store.inbound import backlog
from maild.store.schema import head_revision
from tests.conftest import PG_URL, REPO, RunningMaild, mail, postgres_schema, wait_until
from tests.test_metrics import get, scrape, value

MAILD = [sys.executable, "-m", "maild"]


def invoke(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--config", str(config)], catch_exceptions=False)


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MAILD, *args], capture_output=True, text=True, timeout=120, check=False, env=env, cwd=cwd
    )


def one_line(text: str) -> str:
    """The whole stderr of a failed command: exactly one line (no traceback)."""
    assert text.count("\n") == 1, text
    assert text.endswith("\n"), text
    return text


# 1. The README's deployment and upgrade commands reach the service's database.


def _readme_block(heading: str, after: str = "") -> list[str]:
    """The commands of the first ```sh block under `heading` (after the text `after`)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    section = section[section.index(after) :] if after else section
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, f"no ```sh block under {heading!r}"
    lines = []
    for line in block.group(1).splitlines():
        command = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if command:
            lines.append(command)
    return lines


class Host:
    """A mail host in a temporary root: /etc, /var/lib and /etc/systemd/system under it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "etc" / "systemd" / "system").mkdir(parents=True)
        self.env = {
            k: v for k, v in os.environ.items() if k not in ("STATE_DIRECTORY", "MAILD_CONFIG")
        }
        self.output: list[str] = []  # what the README's maild commands printed

    def path(self, text: str) -> str:
        return re.sub(
            r"(?<![\w.])/(etc|var|opt|usr)/", lambda m: f"{self.root}/{m.group(1)}/", text
        )

    def shell(self, command: str) -> None:
        """One README command, as root on the host would run it."""
        words = shlex.split(command)
        if words[0] in ("python3", "ln") or words[:2] == ["systemctl", "daemon-reload"]:
            return  # the venv is this test's; no systemd to tell
        if words[0].endswith("/pip"):
            assert "-c" in words, f"{command}: not pinned"
            assert "constraints.txt" in words, f"{command}: not pinned"
            return
        if words[0] == "systemctl":
            return  # the caller starts the unit itself
        if words[0] == "maild":
            result = run(*[self.path(w) for w in words[1:]], env=self.env)
            assert result.returncode == 0, f"{command}: {result.stderr}"
            self.output.append(result.stdout)
            return
        assert words[0] in ("install", "cp"), f"a README step this test does not know: {command}"
        subprocess.run([self.path(w) for w in words], cwd=REPO, check=True)

    def unit(self) -> dict[str, list[str]]:
        """systemd/maild.service's [Service] settings (every value of each key)."""
        settings: dict[str, list[str]] = {}
        for line in (REPO / "systemd" / "maild.service").read_text().splitlines():
            key, sep, val = line.partition("=")
            if sep and not line.startswith("#"):
                settings.setdefault(key.strip(), []).append(val.strip())
        return settings

    def unit_env(self) -> dict[str, str]:
        """The environment systemd gives the service: StateDirectory, LoadCredential."""
        unit = self.unit()
        (state,) = unit["StateDirectory"]
        folder = self.root / "var" / "lib" / state
        folder.mkdir(parents=True, exist_ok=True)
        credentials = self.root / "run" / "credentials" / "maild.service"
        credentials.mkdir(parents=True, exist_ok=True)
        for entry in unit.get("LoadCredential", []):
            name, _, source = entry.partition(":")
            shutil.copy(self.path(source), credentials / name)
        return {
            **self.env,
            "STATE_DIRECTORY": str(folder),
            "CREDENTIALS_DIRECTORY": str(credentials),
        }

    def exec_command(self, key: str) -> list[str]:
        (command,) = self.unit()[key]
        words = shlex.split(command)
        assert words[0] == "/usr/local/bin/maild"  # the README's ln -s
        return [self.path(w) for w in words[1:]]


def test_the_readmes_deployment_and_upgrade_commands_reach_the_services_database(
    tmp_path: Path,
) -> None:
    """Seen: `maild db upgrade --config /etc/maild/config.toml` as root upgraded
    <config folder>/data/maild.db, not the unit's /var/lib/maild/maild.db, and the service
    then refused its old schema. The README's steps, run in a temporary root."""
    host = Host(tmp_path / "root")
    for command in _readme_block("## Running under systemd"):
        host.shell(command)
    config = host.root / "etc" / "maild" / "config.toml"
    assert (host.root / "etc" / "maild" / "templates" / "ack.txt").is_file()
    (host.root / "etc" / "maild" / "pagerduty-routing-key").write_text("0" * 32)  # "put the key"
    # "then edit: listen": this test's ports are its own
    text = config.read_text().replace('listen = "127.0.0.1:2525"', 'listen = "127.0.0.1:0"')
    config.write_text(text)
    service_db = host.root / "var" / "lib" / "maild" / "maild.db"
    unit_env = host.unit_env()
    # The service as an older maild left it: its database one revision behind.
    older = run("db", "upgrade", "--revision", "0005", "--config", str(config), env=unit_env)
    assert older.returncode == 0, older.stderr
    assert older.stdout.startswith(f"{service_db}: schema upgraded from empty to revision 0005")
    os.chown(service_db.parent, 65534, 65534)  # DynamicUser: the folder is the service's
    for path in service_db.parent.iterdir():
        os.chown(path, 65534, 65534)

    for command in _readme_block("## Running under systemd", after="**Upgrades.**"):
        host.shell(command)
    assert (
        host.output[-1]
        == f"{service_db}: schema upgraded from 0005 to revision {head_revision()}\n"
    )
    assert not (host.root / "etc" / "maild" / "data").exists()
    owners = {p.name: p.stat().st_uid for p in service_db.parent.iterdir()}
    assert set(owners.values()) == {65534}, (
        owners
    )  # root's run left nothing the service cannot open

    # The unit starts on the upgraded database.
    with subprocess.Popen(
        [*MAILD, *host.exec_command("ExecStart")],
        env=unit_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as served:
        assert served.stdout is not None
        started = ""
        deadline = time.monotonic() + 60
        while "maild started" not in started and time.monotonic() < deadline:
            line = served.stdout.readline()
            if not line:
                break
            started += line
        served.send_signal(signal.SIGTERM)
        served.communicate(timeout=60)
    assert "maild started" in started, started
    assert str(service_db) in started
    assert served.returncode == 0


def test_db_commands_name_the_database_without_its_password(
    tmp_path: Path, rules_dir: Path
) -> None:
    """db current and db upgrade say which database they touched; a URL's password is hidden."""
    url = "postgresql+psycopg://maild:s3cret-pw@127.0.0.1:1/maild"
    assert describe(url) == "postgresql+psycopg://maild:***@127.0.0.1:1/maild"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[database]\nurl = "{url}"\nbusy_timeout = "1s"\n[rules]\npath = "{rules_dir}"\n'
        "[pagerduty]\nenabled = false\n"
    )
    for args in (("db", "current"), ("db", "upgrade"), ("tickets", "list")):
        result = run(*args, "--config", str(config))
        assert result.returncode == 1
        assert "s3cret-pw" not in result.stdout + result.stderr
        assert "postgresql+psycopg://maild:***@127.0.0.1:1/maild" in one_line(result.stderr)


# 2. Read-only commands create nothing.

READ_ONLY = [
    ("tickets", "list"),
    ("tickets", "show", "1"),
    ("tickets", "close", "1"),
    ("tickets", "set", "1", "--priority", "low", "--by", "jo@altis-dxp.com"),
    ("tickets", "attachment", "1", "1"),
    ("inbound", "list"),
    ("inbound", "show", "1"),
    ("pages", "list"),
    ("acks", "list"),
    ("reprocess",),
    ("rules", "explain", "--message", "1"),
    ("rules", "replay"),
    ("db", "current"),
]


def test_read_only_commands_on_a_missing_database_exit_78_and_create_nothing(
    make_config: Callable[..., Path], database_url: str
) -> None:
    """Seen: `tickets list` on an empty PostgreSQL printed `no tickets` and created every
    table; `inbound list`, `pages list` and `db current` created data/maild.db."""
    config = make_config()
    name = describe(database_url)
    for args in READ_ONLY:
        result = invoke(config, *args)
        assert result.exit_code == 78, (args, result.output)
        assert result.stdout == ""
        assert name in one_line(result.stderr), args
        assert f"`maild db upgrade --config {config}`" in result.stderr, args
    if database_url.startswith("sqlite"):
        assert not (config.parent / "data").exists()
    else:
        engine = create_engine(database_url)
        try:
            assert inspect(engine).get_table_names() == []
        finally:
            engine.dispose()
    # serve, ingest and db upgrade may create it; then the same commands work
    assert invoke(config, "db", "upgrade").exit_code == 0
    assert invoke(config, "tickets", "list").stdout == "no tickets\n"


# 3. A bad SQLite path is one line naming it, exit 78.


def _config_for(tmp_path: Path, rules_dir: Path, db: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[smtp]\nlisten = "127.0.0.1:0"\n[database]\nurl = "sqlite:///{db}"\n'
        f'[rules]\npath = "{rules_dir}"\nwatch = false\n[pagerduty]\nenabled = false\n'
    )
    return config


COMMANDS = [("serve",), ("db", "upgrade"), ("db", "current"), ("tickets", "list")]


def refusals(config: Path) -> list[str]:
    """Each of COMMANDS on the config: each must exit 78 with one line; those lines."""
    lines = []
    for args in COMMANDS:
        result = run(*args, "--config", str(config))
        assert result.returncode == 78, (args, result.stderr)
        lines.append(one_line(result.stderr))
    return lines


@contextlib.contextmanager
def immutable(folder: Path) -> Iterator[None]:
    """The folder made immutable (root, who runs the tests, ignores permission bits)."""
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], check=False).returncode:
        pytest.skip("chattr +i is not available here: no way to make a folder unwritable to root")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


def test_a_sqlite_path_through_a_file_is_one_line_exit_78(tmp_path: Path, rules_dir: Path) -> None:
    """Seen: `url = "sqlite:////srv/maild/afile/maild.db"` ended serve and db upgrade with
    FileExistsError and a traceback."""
    (tmp_path / "afile").write_text("not a folder")
    config = _config_for(tmp_path, rules_dir, tmp_path / "afile" / "maild.db")
    for line in refusals(config):
        assert line.endswith(
            f"[database] url: {tmp_path}/afile/maild.db: {tmp_path}/afile is a file, not a folder\n"
        ), line


def test_an_unwritable_folder_is_one_line_naming_it_exit_78(
    tmp_path: Path, rules_dir: Path
) -> None:
    """Seen: an unwritable folder gave `unable to open database file`, without the path.
    (The folder is made immutable: root, who runs the tests, ignores permission bits.)"""
    folder = tmp_path / "locked"
    folder.mkdir()
    config = _config_for(tmp_path, rules_dir, folder / "maild.db")
    assert run("db", "upgrade", "--config", str(config)).returncode == 0
    with immutable(folder):
        for line in refusals(config):
            assert f"[database] url: {folder}/maild.db: the folder {folder} is not writable" in (
                line
            ), line


def test_a_folder_named_as_the_database_and_a_folder_that_cannot_be_made(
    tmp_path: Path, rules_dir: Path
) -> None:
    """The other paths SQLite cannot use are one line naming them too, exit 78: a folder
    given where the database file goes, and missing folders under an immutable one."""
    (tmp_path / "maild.db").mkdir()
    config = _config_for(tmp_path, rules_dir, tmp_path / "maild.db")
    for line in refusals(config):
        assert line.endswith(
            f"[database] url: {tmp_path}/maild.db is a folder; name a file in it (…/maild.db)\n"
        ), line
    locked = tmp_path / "locked"
    locked.mkdir()
    with immutable(locked):
        config = _config_for(tmp_path, rules_dir, locked / "new" / "maild.db")
        result = run("db", "upgrade", "--config", str(config))
        assert result.returncode == 78, result.stderr
        assert (
            f"[database] url: {locked}/new/maild.db: cannot create the folder {locked}/new: "
            in (one_line(result.stderr))
        )


def test_a_postgresql_database_that_does_not_exist_exits_78_naming_it(
    tmp_path: Path, rules_dir: Path
) -> None:
    """A wrong database name in the URL is a config error (78), not an empty desk."""
    if not PG_URL:
        pytest.skip("a missing PostgreSQL database: needs MAILD_TEST_DATABASE_URL")
    from sqlalchemy.engine import make_url

    url = make_url(PG_URL).set(database="maild_no_such_database")
    config = tmp_path / "config.toml"
    config.write_text(
        f'[database]\nurl = "{url.render_as_string(hide_password=False)}"\n'
        f'[rules]\npath = "{rules_dir}"\n[pagerduty]\nenabled = false\n'
    )
    for args in (("tickets", "list"), ("db", "current"), ("db", "upgrade")):
        result = run(*args, "--config", str(config))
        assert result.returncode == 78, (args, result.stderr)
        assert f"there is no database {describe(str(url))}: " in one_line(result.stderr), args


# 4. rules explain --message names the table that filed the message.

BILLING_ON_SUPPORT = """
[[route]]
name = "billing"
recipients = ["support@altis-dxp.com"]
subject = "(?i)invoice"
type = "task"
priority = "low"
"""


def test_explain_of_a_stored_message_names_the_table_that_filed_it(
    make_config: Callable[..., Path], rules_dir: Path
) -> None:
    """Seen: after a route was added, explain printed the new route for a message filed
    earlier by `support`, and its JSON showed the new table's version without a word."""
    config = make_config()
    with RunningMaild(load_settings(config)) as maild:
        invoice = mail("Invoice 2291 is wrong")
        maild.send(invoice, ["support@altis-dxp.com"])
        maild.send(invoice, ["support@altis-dxp.com"])  # an MTA's retry: a duplicate
        maild.settle()
        old = maild.service.rules.version
        (ticket,) = maild.tickets()
    assert ticket["rule"] == "support"
    (rules_dir / "00-billing.toml").write_text(BILLING_ON_SUPPORT)
    new = load_rules(rules_dir).version
    text = invoke(config, "rules", "explain", "--message", "1")
    assert text.exit_code == 0, text.output
    assert text.stdout.splitlines()[0] == (
        f"filed by `support` into ticket #{ticket['id']} (table {old[:12]}); "
        f"today's table ({new[:12]}) would choose `billing`"
    )
    view = json.loads(invoke(config, "rules", "explain", "--message", "1", "--json").stdout)
    assert view["filed"]["route"] == "support"
    assert view["filed"]["rules_version"] == old
    assert (view["rules_version"], view["table_changed"]) == (new, True)
    assert view["decision"]["route"] == "billing"
    (rules_dir / "00-billing.toml").unlink()
    same = invoke(config, "rules", "explain", "--message", "1")
    assert same.stdout.splitlines()[0] == (
        f"filed by `support` into ticket #{ticket['id']} (table {old[:12]}, today's table)"
    )
    again = invoke(config, "rules", "explain", "--message", "2")  # the copy: a duplicate
    assert again.stdout.splitlines()[0] == (
        "not filed by a route (no ticket message); today's table would choose `support`"
    )
    assert (
        json.loads(invoke(config, "rules", "explain", "--message", "2", "--json").stdout)[
            "table_changed"
        ]
        is None
    )


# 5. Rules errors: the file the admin touched, no knock-on errors, matching exit codes.

SUPPORT_TYPO = """
[[route]]
name = "support"
recipients = ["support@altis-dxp.com", "support@humanmade.com"]
subject = "(?i)invoice"
type = "task"
priority = "low"
"""


def test_a_duplicate_route_name_is_blamed_on_the_file_just_written_alone(rules_dir: Path) -> None:
    """Seen: `name = "support"` in 10-billing.toml was reported at desk.toml:7, plus two
    "no route without conditions takes it" errors caused by the first."""
    desk = rules_dir / "desk.toml"
    os.utime(desk, (time.time() - 86400, time.time() - 86400))  # shipped yesterday
    billing = rules_dir / "10-billing.toml"
    billing.write_text(SUPPORT_TYPO)
    desk_line = next(
        n for n, line in enumerate(desk.read_text().splitlines(), 1) if 'name = "support"' in line
    )
    with pytest.raises(RulesError) as info:
        load_rules(rules_dir)
    assert [str(p) for p in info.value.problems] == [
        f"{billing}:3: duplicate route name 'support' (also at {desk}:{desk_line})"
    ]


def test_rules_check_exits_78_like_serve_and_rules_test(
    make_config: Callable[..., Path], rules_dir: Path
) -> None:
    """Seen: `rules check` exited 1 where `rules test` and `serve` exit 78; `rules test`
    said "nothing was changed", though it never changes anything."""
    config = make_config()
    (rules_dir / "broken.toml").write_text('[[route]]\nname = "x"\ntype = "?"\n')
    checked = invoke(config, "rules", "check")
    tested = invoke(config, "rules", "test", "support@altis-dxp.com")
    served = run("serve", "--config", str(config))
    assert (checked.exit_code, tested.exit_code, served.returncode) == (78, 78, 78)
    assert "nothing was changed" not in tested.stderr + checked.stderr


def test_rules_test_shows_every_route_tried(
    make_config: Callable[..., Path], rules_dir: Path
) -> None:
    """The README promises every route tried; the text output showed only the winner."""
    (rules_dir / "00-billing.toml").write_text(BILLING_ON_SUPPORT)
    result = invoke(make_config(), "rules", "test", "support@altis-dxp.com", "--subject", "hello")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("support@altis-dxp.com: route 'support'")
    tried = [line.split()[0] for line in lines[1:]]
    assert tried == ["billing", "support", "hosting", "sysops"]
    assert "subject does not match" in lines[1]
    assert lines[2].endswith(": wins")


def test_the_rules_guide_refers_to_no_missing_document() -> None:
    """rules/README.md pointed at a "routing rules v2 spec" that is not in the repository."""
    text = (REPO / "rules" / "README.md").read_text(encoding="utf-8")
    assert not re.search(r"\bspec\b", text, re.I)


# 6. Readiness means mail can be stored now; the metrics are documented as they are.


class Proxy:
    """A TCP proxy to PostgreSQL that can be cut (its port then refuses connections)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with contextlib.suppress(OSError):  # wakes the blocked accept(); close alone would not
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def proxied_postgres(tmp_path: Path) -> Iterator[tuple[str, Proxy]]:
    if not PG_URL:
        pytest.skip("a database that refuses connections: needs MAILD_TEST_DATABASE_URL")
    from sqlalchemy.engine import make_url

    real = make_url(PG_URL)
    proxy = Proxy((real.host or "127.0.0.1", real.port or 5432))
    with postgres_schema(PG_URL) as url:
        yield str(make_url(url).set(host="127.0.0.1", port=proxy.port)), proxy
    proxy.cut()


def test_readyz_fails_while_the_database_refuses_connections(
    tmp_path: Path, rules_dir: Path, proxied_postgres: tuple[str, Proxy]
) -> None:
    """Seen: with the database refusing connections, /healthz gave 503 but /readyz said
    {"status": "ready"} while every DATA got 451."""
    url, proxy = proxied_postgres
    config = tmp_path / "config.toml"
    config.write_text(
        f'[smtp]\nlisten = "127.0.0.1:0"\n[http]\nlisten = "127.0.0.1:0"\n'
        f'[database]\nurl = "{url}"\nbusy_timeout = "1s"\n'
        f'[rules]\npath = "{rules_dir}"\nwatch = false\n[pagerduty]\nenabled = false\n'
    )
    with RunningMaild(load_settings(config)) as maild:
        assert get(maild, "/readyz")[0] == 200
        proxy.cut()
        with pytest.raises(Exception, match="451"):
            maild.send(mail("refused"), ["support@altis-dxp.com"])
        status, body = get(maild, "/readyz")
        assert status == 503, body
        assert json.loads(body)["reason"].startswith("mail cannot be stored: ")


def test_watcher_reloads_are_counted_apart_from_sighup(
    make_config: Callable[..., Path], rules_dir: Path
) -> None:
    """maild_rules_reloads_total was documented as SIGHUP reloads but also counted the
    watcher's; now a `trigger` label tells them apart."""
    config = make_config('[http]\nlisten = "127.0.0.1:0"\n', watch=True)
    with RunningMaild(load_settings(config)) as maild:
        before = scrape(maild)
        maild.service.reload_rules()  # what SIGHUP calls
        (rules_dir / "billing.toml").write_text(BILLING_ON_SUPPORT)
        wait_until(
            lambda: (
                value(scrape(maild), "maild_rules_reloads_total", trigger="watch", result="ok")
                > value(before, "maild_rules_reloads_total", trigger="watch", result="ok")
            ),
            10,
            "the watcher's reload",
        )
        after = scrape(maild)
    assert (
        value(after, "maild_rules_reloads_total", trigger="sighup", result="ok")
        - value(before, "maild_rules_reloads_total", trigger="sighup", result="ok")
    ) == 1


def test_the_readme_lists_every_backlog_and_rules_reload_label(
    make_config: Callable[..., Path],
) -> None:
    """The README's metrics and /healthz example left out the acknowledgements backlog."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    config = make_config()
    with RunningMaild(load_settings(config)) as maild:
        queues = maild.service.database.run_read(backlog)
    row = next(line for line in readme.splitlines() if line.startswith("| `maild_backlog`"))
    healthz = readme[readme.index("GET /healthz") :][:600]
    for queue in queues:
        assert f"`{queue}`" in row, queue
        assert f'"{queue}"' in healthz, queue
    reloads = next(line for line in readme.splitlines() if "`maild_rules_reloads_total`" in line)
    assert "`trigger`" in reloads
    assert "`watch`" in reloads
    assert "`sighup`" in reloads


# 7. `pages test` against an unreachable URL.


def test_pages_test_names_an_unreachable_url_and_does_not_blame_pagerduty(
    make_config: Callable[..., Path],
) -> None:
    """Seen: "PagerDuty did not accept the test event: ConnectError ... Connection refused",
    which sounds as if PagerDuty refused, and never named the URL."""
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    url = f"https://127.0.0.1:{port}"
    config = make_config(
        f'[pagerduty]\nrouting_key = "{"0" * 32}"\nevents_url = "{url}"\ntimeout = "2s"\n'
    )
    result = invoke(config, "pages", "test")
    assert result.exit_code == 1
    assert one_line(result.stderr).startswith(f"maild: could not reach {url}: ")
    assert "PagerDuty" not in result.stderr


@pytest.mark.parametrize(("code", "says"), [(500, "a temporary failure"), (400, "refused")])
def test_pages_test_tells_a_temporary_failure_from_a_refusal(
    make_config: Callable[..., Path], tmp_path: Path, code: int, says: str
) -> None:
    """A 5xx (or 408, 429) is PagerDuty's trouble, to try again; other 4xx a refusal."""
    from tests.fake_events import FakeEvents

    with FakeEvents(tmp_path / "events") as events:
        events.fail_always(code, "injected")
        config = make_config(
            f'[pagerduty]\nrouting_key = "{"0" * 32}"\nevents_url = "{events.url}"\n'
            f'ca_file = "{events.ca_file}"\ntimeout = "2s"\n'
        )
        result = invoke(config, "pages", "test")
    assert result.exit_code == 1
    line = one_line(result.stderr)
    if code == 500:
        assert line.startswith(f"maild: {events.url} answered 500, a temporary failure"), line
    else:
        assert line.startswith(
            f"maild: PagerDuty refused the test event ({events.url} answered 400): "
        ), line


# 8. Deployment details.


def test_the_paging_key_file_is_the_one_the_unit_loads() -> None:
    """The README's paging snippet used /etc/maild/pagerduty.key; the unit loads
    /etc/maild/pagerduty-routing-key."""
    unit = (REPO / "systemd" / "maild.service").read_text()
    (source,) = re.findall(r"^LoadCredential=pagerduty-routing-key:(\S+)$", unit, re.M)
    for document in ("README.md", "config.example.toml"):
        text = (REPO / document).read_text(encoding="utf-8")
        named = set(re.findall(r"/etc/maild/pagerduty[\w.-]*", text))
        assert named == {source}, (document, named)


def test_serve_warns_at_start_when_the_templates_folder_is_missing(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Seen: with acknowledgements on, serve logged a templates folder that did not exist
    and silently used the built-in text."""
    missing = tmp_path / "no-templates"
    config = make_config(
        f'[outbound]\nsmarthost = "127.0.0.1:1"\nfrom = "Support <support@altis-dxp.com>"\n'
        f'secret = "{"s" * 32}"\ntemplates = "{missing}"\n'
    )
    with subprocess.Popen(
        [*MAILD, "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as served:
        assert served.stdout is not None
        lines: list[str] = []
        while not any("maild started" in line for line in lines):
            line = served.stdout.readline()
            if not line:
                break
            lines.append(line)
        served.send_signal(signal.SIGTERM)
        lines += served.communicate(timeout=60)[0].splitlines()  # the rest of the start
    assert any("maild started" in line for line in lines), "".join(lines)
    warnings = [json.loads(line) for line in lines if "templates folder" in line]
    assert len(warnings) == 1, "".join(lines)
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["templates"] == str(missing)


def _marked(lines: list[str], index: int) -> bool:
    """Whether the comment block above line `index` marks its value as not the default."""
    i = index - 1
    while i >= 0 and lines[i].startswith("#"):
        if "Example value" in lines[i] or "Changed for `make run`" in lines[i]:
            return True
        i -= 1
    return False


def test_config_example_shows_defaults_except_where_marked(tmp_path: Path) -> None:
    """Its header said the values shown are the defaults, but `format = "console"` and
    `enabled = false` were not."""
    example = REPO / "config.example.toml"
    lines = example.read_text(encoding="utf-8").splitlines()
    shutil.copy(example, tmp_path / "example.toml")
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    shutil.copytree(REPO / "templates", tmp_path / "templates")
    (tmp_path / "empty.toml").write_text("[pagerduty]\nenabled = false\n")
    shown = load_settings(tmp_path / "example.toml")
    default = load_settings(tmp_path / "empty.toml")
    section = ""
    checked = 0
    for index, line in enumerate(lines):
        if line.startswith("["):
            section = line.strip("[]")
            continue
        match = re.match(r"^(\w+) = ", line)
        if not match or _marked(lines, index):
            continue
        key = match.group(1)
        key = "from_" if key == "from" else key
        if (section, key) == ("pagerduty", "enabled"):
            raise AssertionError("[pagerduty] enabled = false is shown unmarked")
        assert getattr(getattr(shown, section), key) == getattr(getattr(default, section), key), (
            f"config.example.toml:{index + 1}: [{section}] {key} is not the default"
        )
        checked += 1
    assert checked > 20
    tomllib.loads(example.read_text(encoding="utf-8"))  # still valid TOML


def test_tickets_show_writes_a_nameless_sender_without_a_double_space(maild: RunningMaild) -> None:
    """Seen: `From:  <alice@customer.example>` when the sender has no display name."""
    maild.send(mail("No name", frm="alice@customer.example"), ["support@altis-dxp.com"])
    maild.settle()
    (ticket,) = maild.tickets()
    shown = maild.ticket(ticket["id"])
    assert shown["messages"][0]["from"]["name"] == ""
    result = invoke(maild.settings.source, "tickets", "show", str(ticket["id"]))
    assert "From: <alice@customer.example>" in result.stdout.splitlines()
