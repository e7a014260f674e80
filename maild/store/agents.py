"""The desk console's accounts and sessions: made by `maild agents`, checked by
maild/console/auth.py.

Passwords are hashed with argon2id (argon2-cffi's defaults: RFC 9106's second
recommended parameters, 64 MiB and 3 passes); a hash made with older parameters
is replaced at the next sign-in. A password is never logged or stored.

A session is 256 random bits in a cookie. As with API tokens (store/tokens.py),
only its SHA-256 is stored and a request's session is found by the hash of what
it sent. Each session has its own CSRF token, which every form of the console
carries. A session ends when signed out, after `idle` without a request, after
`max_age` in all, when its agent is disabled, or when the agent's password
changes.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from maild.errors import MaildError
from maild.mail import addresses
from maild.store.models import Agent, ConsoleSession, as_utc, table_of, utcnow
from maild.store.tokens import token_hash

MIN_PASSWORD = 12  # characters (NIST SP 800-63B asks at least 8; a desk reaches customers' data)
MAX_PASSWORD = 1024  # characters: argon2 takes any length; this bounds the work per attempt

_HASHER = PasswordHasher()
_SESSION = table_of(ConsoleSession)
# A hash of a password nobody has: checked when the account does not exist, so that an
# unknown address costs the same time as a wrong password.
_DUMMY = _HASHER.hash(secrets.token_urlsafe(16))


class AgentError(MaildError):
    """A `maild agents` request that cannot be done (the message says why)."""


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AgentError(f"the password must be at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise AgentError(f"the password must be at most {MAX_PASSWORD} characters")
    return password


def hash_password(password: str) -> str:
    return _HASHER.hash(check_password(password))


def _find(session: Session, email: str) -> Agent | None:
    return session.exec(select(Agent).where(Agent.email == addresses.normalize(email))).first()


def add_agent(session: Session, email: str, name: str, password: str) -> Agent:
    """A new account. The caller has checked `email` against [desk] agents."""
    email = addresses.normalize(email)
    if _find(session, email) is not None:
        raise AgentError(f"an agent {email} already exists (maild agents passwd changes it)")
    agent = Agent(email=email, name=name.strip(), password_hash=hash_password(password))
    session.add(agent)
    try:
        session.flush()
    except IntegrityError:  # added by someone else since the check above
        raise AgentError(f"an agent {email} already exists") from None
    return agent


def _existing(session: Session, email: str) -> Agent:
    agent = _find(session, email)
    if agent is None:
        raise AgentError(f"no agent {addresses.normalize(email)} (maild agents list shows them)")
    return agent


def set_password(session: Session, email: str, password: str) -> Agent:
    """A new password; the agent's sessions end (a stolen one stops working)."""
    agent = _existing(session, email)
    agent.password_hash = hash_password(password)
    agent.password_changed_at = utcnow()
    session.add(agent)
    _end_sessions(session, agent)
    return agent


def disable_agent(session: Session, email: str) -> Agent:
    """The account can no longer sign in, and its sessions end now. Its row stays: the
    tickets' events name it."""
    agent = _existing(session, email)
    if agent.disabled_at is None:
        agent.disabled_at = utcnow()
        session.add(agent)
    _end_sessions(session, agent)
    return agent


def enable_agent(session: Session, email: str) -> Agent:
    agent = _existing(session, email)
    agent.disabled_at = None
    session.add(agent)
    return agent


def _end_sessions(session: Session, agent: Agent) -> None:
    session.flush()
    session.execute(delete(_SESSION).where(_SESSION.c.agent_id == agent.id))


def agent_view(agent: Agent) -> dict[str, Any]:
    """An account as `agents list --json` shows it: never the hash."""
    return {
        "email": agent.email,
        "name": agent.name,
        "disabled": agent.disabled_at is not None,
        "created_at": as_utc(agent.created_at).isoformat(),
        "last_sign_in_at": (
            as_utc(agent.last_sign_in_at).isoformat() if agent.last_sign_in_at else None
        ),
    }


def list_agents(session: Session) -> list[dict[str, Any]]:
    return [agent_view(a) for a in session.exec(select(Agent).order_by(col(Agent.email)))]


# Signing in.


@dataclass(frozen=True)
class SignedIn:
    """A console session as a request sees it."""

    agent_id: int
    email: str
    name: str
    csrf: str

    @property
    def display(self) -> str:
        return self.name or self.email


def password_hash_of(session: Session, email: str) -> tuple[int, str] | None:
    """The enabled account of `email`: its id and password hash; else None."""
    agent = _find(session, email) if addresses.is_address(email) else None
    if agent is None or agent.disabled_at is not None or agent.id is None:
        return None
    return agent.id, agent.password_hash


def password_matches(stored: str | None, password: str) -> tuple[bool, str | None]:
    """Whether `password` is the one `stored` hashes (None: an unknown account, checked
    against a hash nobody's password makes, in the same time); and a new hash when the
    stored one was made with older parameters. CPU only (about 50 ms): off the event loop
    and off the writer thread."""
    if len(password) > MAX_PASSWORD:
        return False, None
    try:
        _HASHER.verify(stored or _DUMMY, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False, None
    if stored is None:
        return False, None
    return True, _HASHER.hash(password) if _HASHER.check_needs_rehash(stored) else None


def start_session(
    session: Session,
    agent_id: int,
    client: str,
    now: datetime,
    *,
    checked_hash: str,
    new_hash: str | None = None,
) -> str | None:
    """A new session for the agent whose password matched `checked_hash`; the cookie's
    value (shown once, never stored). None when the account was disabled or its password
    changed since it was checked."""
    agent = session.get(Agent, agent_id)
    if agent is None or agent.disabled_at is not None or agent.password_hash != checked_hash:
        return None
    token = secrets.token_urlsafe(32)
    session.add(
        ConsoleSession(
            token_hash=token_hash(token),
            agent_id=agent_id,
            csrf=secrets.token_urlsafe(32),
            created_at=now,
            seen_at=now,
            client=client[:64],
        )
    )
    agent.last_sign_in_at = now
    if new_hash is not None:
        agent.password_hash = new_hash
    session.add(agent)
    return token


def find_session(
    session: Session,
    token: str,
    now: datetime,
    idle: timedelta,
    max_age: timedelta,
    touch_after: timedelta = timedelta(minutes=1),
) -> tuple[SignedIn | None, bool]:
    """The live session of this cookie, and whether its seen_at is due to be written
    (at most once a `touch_after`: never a write per page)."""
    if not token or len(token) > 100:
        return None, False
    found = session.exec(
        select(ConsoleSession, Agent)
        .join(Agent, col(Agent.id) == col(ConsoleSession.agent_id))
        .where(ConsoleSession.token_hash == token_hash(token))
    ).first()
    if found is None:
        return None, False
    row, agent = found
    seen = as_utc(row.seen_at)
    if agent.disabled_at is not None or now - seen > idle or now - as_utc(row.created_at) > max_age:
        return None, False
    assert agent.id is not None
    signed = SignedIn(agent_id=agent.id, email=agent.email, name=agent.name, csrf=row.csrf)
    return signed, now - seen > touch_after


def touch_session(session: Session, token: str, now: datetime) -> None:
    session.execute(
        update(_SESSION).where(_SESSION.c.token_hash == token_hash(token)).values(seen_at=now)
    )


def end_session(session: Session, token: str) -> None:
    session.execute(delete(_SESSION).where(_SESSION.c.token_hash == token_hash(token)))


def purge_sessions(session: Session, now: datetime, idle: timedelta, max_age: timedelta) -> int:
    """Delete expired sessions; how many."""
    done = session.execute(
        delete(_SESSION).where(
            (_SESSION.c.seen_at < now - idle) | (_SESSION.c.created_at < now - max_age)
        )
    )
    return int(getattr(done, "rowcount", 0) or 0)
