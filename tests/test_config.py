"""Settings: defaults, refusal of unknown keys by file and line, relative paths, value parsers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from maild.config import (
    MIB,
    default_config_path,
    load_settings,
    parse_duration,
    parse_hostport,
    parse_size,
)
from maild.errors import ConfigError


@pytest.fixture(autouse=True)
def _no_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no systemd STATE_DIRECTORY unless they set one themselves."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)


def write(folder: Path, body: str, name: str = "config.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(body, encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


# Defaults


def test_empty_file_gives_the_documented_defaults(tmp_path: Path) -> None:
    """An empty config file listens on 127.0.0.1:2525 with a 25 MiB limit and nothing optional."""
    settings = load_settings(write(tmp_path, ""))
    assert settings.smtp.listen == "127.0.0.1:2525"
    assert settings.smtp.max_message_size == 25 * MIB
    assert settings.smtp.max_message_size == 26_214_400
    assert settings.smtp.hostname == ""
    assert settings.smtp.timeout == 300.0
    assert settings.smtp.shutdown_timeout == 30.0
    assert settings.lmtp.listen is None
    assert settings.database.busy_timeout == 5.0
    assert settings.log.format == "json"
    assert settings.log.level == "info"
    assert settings.pagerduty.enabled is True
    assert settings.pagerduty.routing_key is None
    assert settings.pagerduty.events_url == "https://events.pagerduty.com"
    assert settings.pagerduty.ca_file is None


def test_default_database_is_a_sqlite_file_in_the_config_folders_data(tmp_path: Path) -> None:
    """Without [database] url the database is <config folder>/data/maild.db."""
    settings = load_settings(write(tmp_path, ""))
    assert f"sqlite:///{tmp_path.resolve() / 'data' / 'maild.db'}" == settings.database.url


def test_default_rules_path_is_the_rules_folder_beside_the_config(tmp_path: Path) -> None:
    """Without [rules] path the rules folder is <config folder>/rules."""
    settings = load_settings(write(tmp_path, ""))
    assert tmp_path.resolve() / "rules" == settings.rules.path


def test_source_is_the_resolved_config_path(tmp_path: Path) -> None:
    """Settings remember the absolute path of the file they were read from."""
    path = write(tmp_path, "")
    assert path.resolve() == load_settings(path).source


def test_pagerduty_keys_are_accepted(tmp_path: Path) -> None:
    """[pagerduty] enabled, routing_key, events_url and ca_file are all read."""
    path = write(
        tmp_path,
        """
[pagerduty]
enabled = false
routing_key = "0123456789abcdef0123456789abcdef"
events_url = "https://events.eu.pagerduty.com"
ca_file = "/etc/ssl/certs/ca.pem"
""",
    )
    pagerduty = load_settings(path).pagerduty
    assert pagerduty.enabled is False
    assert pagerduty.key() == "0123456789abcdef0123456789abcdef"
    assert "0123456789abcdef" not in repr(pagerduty), "the routing key shows in a repr"
    assert pagerduty.events_url == "https://events.eu.pagerduty.com"
    assert Path("/etc/ssl/certs/ca.pem") == pagerduty.ca_file


def test_desk_keys_are_read_and_checked(tmp_path: Path) -> None:
    """[desk]: agents are patterns as allowed_senders are; sizes and durations take units;
    a wrong agent, link or resolver names its key and line."""
    path = write(
        tmp_path,
        """
[desk]
agents = ["*@Altis-DXP.com", "jo@humanmade.com"]
trusted_authserv_id = "mx.altis-dxp.com"
dns_resolver = "127.0.0.1:5353"
dns_timeout = "2s"
name = "Altis Support"
ticket_url = "https://desk.example/tickets/{id}"
copy_attachments_max = "5 MiB"
max_copies_per_address_per_hour = 3
""",
    )
    desk = load_settings(path).desk
    assert desk.agents == ["*@altis-dxp.com", "jo@humanmade.com"]
    assert (desk.trusted_authserv_id, desk.dns_resolver, desk.dns_timeout) == (
        "mx.altis-dxp.com", "127.0.0.1:5353", 2.0,
    )  # fmt: skip
    assert (desk.copy_attachments_max, desk.max_copies_per_address_per_hour) == (5 * MIB, 3)
    assert desk.copy_participants is True
    assert desk.verify_dkim is True
    defaults = load_settings(write(tmp_path / "empty", "")).desk
    assert (defaults.agents, defaults.copy_attachments_max) == ([], 10 * MIB)
    for body, key in [
        ('agents = ["staff"]', "agents"),
        ('ticket_url = "https://desk.example/tickets"', "ticket_url"),
        ('dns_resolver = "127.0.0.1:dns"', "dns_resolver"),
        ('dns_resolver = "dns.example"', "dns_resolver"),
    ]:
        wrong = write(tmp_path / key, f"[desk]\n{body}\n")
        assert config_error(wrong).startswith(f"{wrong}:2: [desk] {key}: "), config_error(wrong)


def test_sizes_and_durations_with_units_are_read_from_the_file(tmp_path: Path) -> None:
    """max_message_size and the durations accept the unit forms the parsers accept."""
    path = write(
        tmp_path,
        """
[smtp]
max_message_size = "10MB"
timeout = "5m"
shutdown_timeout = "250ms"

[processing]
parse_timeout = "1h"
""",
    )
    settings = load_settings(path)
    assert settings.smtp.max_message_size == 10_000_000
    assert settings.smtp.timeout == 300.0
    assert settings.smtp.shutdown_timeout == 0.25
    assert settings.processing.parse_timeout == 3600.0


# Refusals


def test_unknown_key_is_refused_with_file_line_and_section(tmp_path: Path) -> None:
    """A misspelt key is refused naming the file, its line and `[section] key`."""
    path = write(tmp_path, '# maild\n\n[smtp]\nhostname = "mx.example"\nlistne = "0.0.0.0:25"\n')
    assert f"{path}:5: [smtp] listne: unknown key" == config_error(path)


def test_unknown_section_is_refused_with_file_and_line(tmp_path: Path) -> None:
    """A misspelt section is refused naming the file, the section's line and the section."""
    path = write(tmp_path, '[smtp]\nlisten = "127.0.0.1:25"\n\n[smtpp]\nlisten = "x"\n')
    assert f"{path}:4: [smtpp]: unknown section" == config_error(path)


def test_unknown_top_level_key_is_refused_with_its_line(tmp_path: Path) -> None:
    """A key written above any section is refused as an unknown key with its line number."""
    path = write(tmp_path, '# forgot the [smtp] header\n\nlisten = "0.0.0.0:25"\n')
    assert f"{path}:3: listen: unknown key" == config_error(path)


def test_unknown_sub_table_is_refused_with_its_line(tmp_path: Path) -> None:
    """An unknown `[section.table]` is refused naming its line and `[section] table`."""
    path = write(tmp_path, '[smtp.tls]\ncert = "x.pem"\n')
    assert f"{path}:1: [smtp] tls: unknown key" == config_error(path)


def test_source_key_in_the_file_is_refused(tmp_path: Path) -> None:
    """`source` is filled in by maild and may not be set in the file."""
    path = write(tmp_path, '\nsource = "/elsewhere.toml"\n')
    assert f"{path}:2: source: unknown key" == config_error(path)


def test_invalid_listen_address_names_the_key(tmp_path: Path) -> None:
    """A listen value that is not host:port is refused naming `[smtp] listen` and its line."""
    path = write(tmp_path, '[smtp]\nlisten = "nonsense"\n')
    expected = (
        f'{path}:2: [smtp] listen: \'nonsense\' is not "host:port" (for example "127.0.0.1:2525")'
    )
    assert expected == config_error(path)


def test_invalid_lmtp_listen_address_names_the_key(tmp_path: Path) -> None:
    """[lmtp] listen is checked like [smtp] listen."""
    path = write(tmp_path, '[lmtp]\nlisten = "host:99999"\n')
    expected = (
        f'{path}:2: [lmtp] listen: \'host:99999\' is not "host:port" (for example "127.0.0.1:2525")'
    )
    assert expected == config_error(path)


def test_invalid_size_names_the_key(tmp_path: Path) -> None:
    """A max_message_size that is not a size is refused naming the key and its line."""
    path = write(tmp_path, '[smtp]\nhostname = "mx"\nmax_message_size = "lots"\n')
    expected = (
        f"{path}:3: [smtp] max_message_size: 'lots' is not a size such as 26214400 or \"25 MiB\""
    )
    assert expected == config_error(path)


def test_out_of_range_worker_count_names_the_key(tmp_path: Path) -> None:
    """[processing] workers above 64 is refused naming the key and its line."""
    path = write(tmp_path, "\n[processing]\nworkers = 100\n")
    expected = f"{path}:3: [processing] workers: Input should be less than or equal to 64"
    assert expected == config_error(path)


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    """A file that is not TOML is refused naming the file and the parser's line."""
    path = write(tmp_path, '[smtp]\nlisten = "127.0.0.1:25\n')
    message = config_error(path)
    assert message.startswith(f"{path}: not valid TOML: ")
    assert "line 2" in message


def test_missing_file_says_so(tmp_path: Path) -> None:
    """A config path that does not exist is refused saying there is no such file."""
    path = tmp_path / "absent.toml"
    assert f"{path}: no such config file (set --config or MAILD_CONFIG)" == config_error(path)


# Relative and absolute paths


def test_relative_rules_path_resolves_against_the_config_folder(tmp_path: Path) -> None:
    """[rules] path "../shared/rules" is taken from the config's folder."""
    path = write(tmp_path / "etc", '[rules]\npath = "../shared/rules"\n')
    assert tmp_path.resolve() / "shared" / "rules" == load_settings(path).rules.path


def test_absolute_rules_path_is_kept(tmp_path: Path) -> None:
    """An absolute [rules] path is used as written."""
    path = write(tmp_path, '[rules]\npath = "/srv/maild/rules"\n')
    assert Path("/srv/maild/rules") == load_settings(path).rules.path


def test_relative_ca_file_resolves_against_the_config_folder(tmp_path: Path) -> None:
    """[pagerduty] ca_file "certs/ca.pem" is taken from the config's folder."""
    path = write(tmp_path, '[pagerduty]\nca_file = "certs/ca.pem"\n')
    assert tmp_path.resolve() / "certs" / "ca.pem" == load_settings(path).pagerduty.ca_file


def test_relative_sqlite_url_resolves_against_the_config_folder(tmp_path: Path) -> None:
    """sqlite:///relative.db names a file in the config's folder."""
    path = write(tmp_path, '[database]\nurl = "sqlite:///relative.db"\n')
    expected = f"sqlite:///{tmp_path.resolve() / 'relative.db'}"
    assert expected == load_settings(path).database.url


def test_relative_sqlite_url_with_a_driver_resolves_too(tmp_path: Path) -> None:
    """sqlite+pysqlite:///relative.db is a relative file like sqlite:///relative.db."""
    path = write(tmp_path, '[database]\nurl = "sqlite+pysqlite:///relative.db"\n')
    expected = f"sqlite+pysqlite:///{tmp_path.resolve() / 'relative.db'}"
    assert expected == load_settings(path).database.url


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////var/lib/maild/maild.db",
        "sqlite:///:memory:",
        "postgresql+psycopg://maild@db.internal/maild",
    ],
)
def test_absolute_sqlite_and_postgresql_urls_are_kept(tmp_path: Path, url: str) -> None:
    """Absolute SQLite paths, in-memory SQLite and PostgreSQL URLs are used as written."""
    path = write(tmp_path, f'[database]\nurl = "{url}"\n')
    assert url == load_settings(path).database.url


def test_paths_do_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config named by a relative path still resolves against its own folder, not the cwd."""
    write(tmp_path / "conf", '[rules]\npath = "rules"\n[database]\nurl = "sqlite:///db/m.db"\n')
    monkeypatch.chdir(tmp_path)
    settings = load_settings(Path("conf/config.toml"))
    assert tmp_path.resolve() / "conf" / "rules" == settings.rules.path
    assert f"sqlite:///{tmp_path.resolve() / 'conf' / 'db' / 'm.db'}" == settings.database.url


def test_state_directory_moves_the_default_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd the default database lives in $STATE_DIRECTORY."""
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/maild")
    settings = load_settings(write(tmp_path, ""))
    assert settings.database.url == "sqlite:////var/lib/maild/maild.db"


def test_state_directory_with_several_folders_uses_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd joins several StateDirectory= folders with colons; the first one is used."""
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/maild:/var/lib/other")
    settings = load_settings(write(tmp_path, ""))
    assert settings.database.url == "sqlite:////var/lib/maild/maild.db"


def test_state_directory_does_not_override_an_explicit_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit [database] url wins over $STATE_DIRECTORY."""
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/maild")
    path = write(tmp_path, '[database]\nurl = "postgresql+psycopg://maild@db/maild"\n')
    assert load_settings(path).database.url == "postgresql+psycopg://maild@db/maild"


# MAILD_CONFIG


def test_default_config_path_honours_maild_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """MAILD_CONFIG names the config file when it is set."""
    monkeypatch.setenv("MAILD_CONFIG", "/opt/maild/desk.toml")
    assert Path("/opt/maild/desk.toml") == default_config_path()


def test_default_config_path_without_maild_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without MAILD_CONFIG the config file is /etc/maild/config.toml."""
    monkeypatch.delenv("MAILD_CONFIG", raising=False)
    assert Path("/etc/maild/config.toml") == default_config_path()


def test_default_config_path_with_empty_maild_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty MAILD_CONFIG counts as unset."""
    monkeypatch.setenv("MAILD_CONFIG", "")
    assert Path("/etc/maild/config.toml") == default_config_path()


# parse_size, parse_duration, parse_hostport


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (26_214_400, 26_214_400),
        (1, 1),
        ("25 MiB", 25 * 1024 * 1024),
        ("10MB", 10_000_000),
        ("512k", 512_000),
        ("512 KiB", 524_288),
        ("1 GiB", 1024**3),
        ("2g", 2_000_000_000),
        ("100 b", 100),
        ("4096", 4096),
        ("1.5k", 1500),
        (" 3 mib ", 3 * 1024 * 1024),
    ],
)
def test_parse_size_accepts_numbers_and_units(value: Any, expected: int) -> None:
    """parse_size turns ints and strings with decimal or binary units into bytes."""
    assert expected == parse_size(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "must be positive"),
        (-1, "must be positive"),
        ("0 MiB", "must be positive"),
        (True, "expected a size"),
        (False, "expected a size"),
        ("lots", "is not a size"),
        ("", "is not a size"),
        ("-5 MB", "is not a size"),
        ("10 TB", "is not a size"),
        (None, "is not a size"),
    ],
)
def test_parse_size_refuses_non_sizes(value: Any, message: str) -> None:
    """parse_size refuses zero, negatives, booleans and garbage with a ValueError."""
    with pytest.raises(ValueError, match=message):
        parse_size(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (30, 30.0),
        (1.5, 1.5),
        ("30", 30.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("250ms", 0.25),
        (" 2 H ", 7200.0),
    ],
)
def test_parse_duration_accepts_numbers_and_units(value: Any, expected: float) -> None:
    """parse_duration turns numbers and strings with ms/s/m/h/d into seconds."""
    assert expected == parse_duration(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", "is not a duration"),
        ("-5s", "is not a duration"),
        ("", "is not a duration"),
        (0, "must be positive"),
        (-1, "must be positive"),
        ("0ms", "must be positive"),
        (True, "expected a duration"),
    ],
)
def test_parse_duration_refuses_non_durations(value: Any, message: str) -> None:
    """parse_duration refuses words, zero, negatives and booleans with a ValueError."""
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:2525", ("127.0.0.1", 2525)),
        ("[::1]:25", ("::1", 25)),
        ("[2001:db8::1]:587", ("2001:db8::1", 587)),
        ("mx.example.com:0", ("mx.example.com", 0)),
        (" localhost:65535 ", ("localhost", 65535)),
    ],
)
def test_parse_hostport_accepts_host_and_port(value: str, expected: tuple[str, int]) -> None:
    """parse_hostport splits host:port and bracketed IPv6 addresses."""
    assert expected == parse_hostport(value)


@pytest.mark.parametrize(
    "value", ["host", "host:99999", "host:65536", ":25", "[::1]", "host:", "host:-1", "host:smtp"]
)
def test_parse_hostport_refuses_what_is_not_host_and_port(value: str) -> None:
    """parse_hostport refuses a missing host or port and ports outside 0-65535."""
    with pytest.raises(ValueError, match='is not "host:port"'):
        parse_hostport(value)


def test_routing_key_comes_from_the_systemd_credential_when_the_config_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoadCredential=pagerduty-routing-key: the key file in $CREDENTIALS_DIRECTORY is used."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "pagerduty-routing-key").write_text("0123456789abcdef0123456789abcdef\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    path = write(tmp_path, "[pagerduty]\nenabled = true\n")
    pagerduty = load_settings(path).pagerduty
    assert pagerduty.key() == "0123456789abcdef0123456789abcdef"
    assert credentials / "pagerduty-routing-key" == pagerduty.routing_key_file
    explicit = write(tmp_path, '[pagerduty]\nrouting_key = "abcdef0123456789abcdef0123456789"\n')
    assert load_settings(explicit).pagerduty.key() == "abcdef0123456789abcdef0123456789"


KEY = "0123456789abcdef0123456789abcdef"


def test_secret_file_errors_name_the_file_line_and_key(tmp_path: Path) -> None:
    """Both given, unreadable, empty and (for PagerDuty) malformed key files are refused by key."""
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    both = write(tmp_path, f'[pagerduty]\nrouting_key = "{KEY}"\nrouting_key_file = "{key_file}"\n')
    assert config_error(both) == (
        f"{both}:3: [pagerduty] routing_key_file: set routing_key or routing_key_file, not both"
    )
    missing = write(tmp_path, '[pagerduty]\nrouting_key_file = "nope.key"\n')
    assert config_error(missing) == (
        f"{missing}:2: [pagerduty] routing_key_file: {tmp_path / 'nope.key'}: "
        "No such file or directory"
    )
    key_file.write_text("too-short\n")
    short = write(tmp_path, f'[pagerduty]\nrouting_key_file = "{key_file}"\n')
    assert config_error(short) == (
        f"{short}:2: [pagerduty] routing_key_file: {key_file}: an Events API v2 routing key is "
        "32 letters and digits; this one has 9 characters (copy the service integration's "
        "key again)"
    )
    key_file.write_text("\n")
    empty = write(tmp_path, f'[outbound]\nsecret_file = "{key_file}"\n')
    assert config_error(empty) == f"{empty}:2: [outbound] secret_file: {key_file} is empty"


def test_a_bad_credential_names_the_section_without_a_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A malformed systemd credential is reported against its key, with no invented line."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "pagerduty-routing-key").write_text("short\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    path = write(tmp_path, "[pagerduty]\nenabled = true\n")
    assert config_error(path).startswith(
        f"{path}: [pagerduty] routing_key_file: {credentials / 'pagerduty-routing-key'}: "
        "an Events API v2 routing key is 32 letters and digits"
    )


def test_outbound_secret_and_password_come_from_systemd_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoadCredential=outbound-secret and smarthost-password fill [outbound] secret and password."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "outbound-secret").write_text("a-long-enough-secret-value\n")
    (credentials / "smarthost-password").write_text("pw\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    path = write(
        tmp_path,
        '[outbound]\nsmarthost = "127.0.0.1:25"\nfrom = "Desk <desk@x.example>"\n'
        'username = "maild"\n',
    )
    outbound = load_settings(path).outbound
    assert outbound.secret is not None
    assert outbound.secret.get_secret_value() == "a-long-enough-secret-value"
    assert outbound.password is not None
    assert outbound.password.get_secret_value() == "pw"
