"""The desk console: HTML pages under /console, on the HTTP API's listener.

    GET  /console/                       → the queue
    GET  /console/sign-in                the form;  POST: sign in
    POST /console/sign-out
    GET  /console/tickets?status=…&q=…   the queue: filters in the URL, counts per status
    GET  /console/tickets/{id}           a ticket: thread, participants, pages, mail, events
    POST /console/tickets/{id}/reply     a public reply or an internal note (desk/reply.py)
    POST /console/tickets/{id}/change    status, priority, type, application, assignee, CCs
                                         (desk/actions.py: change_ticket, as tickets set)
    GET  /console/tickets/{id}/attachments/{n}   the bytes, as a download
    GET  /console/rules?address=…        the table as loaded, the last reload, rules test
    GET  /console/static/…               the stylesheet and the one small script

Every page but the sign-in form needs a session (auth.py); every POST needs the
session's CSRF token. Actions call the same functions as `maild tickets` and the
API, on the database's writer thread, and wake the outboxes as the API does.
Pages are Jinja2 templates with autoescape on: mail text is always text, and no
HTML from mail is ever rendered. The answer headers (`_SECURITY_HEADERS`) forbid
inline script, framing and sniffing. It works without JavaScript; console.js only
turns absolute times into relative ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formataddr
from pathlib import Path
from typing import Any

import structlog
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import func
from sqlmodel import Session, col, select
from starlette.applications import Starlette
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maild.config import Settings
from maild.console.auth import (
    COOKIE,
    PATH,
    SIGN_IN_COOKIE,
    Sessions,
    new_token,
    same,
    set_cookie,
)
from maild.desk.actions import Changes, DeskContext, NotAllowed, change_ticket, check_agent
from maild.desk.reply import MailOff, ReplyRefused, reply
from maild.enums import Priority, TicketStatus, TicketType
from maild.http.auth import client_address
from maild.http.tickets import download
from maild.outbound.correspondence import FileData
from maild.routing.rules import MessageContext, RuleTable
from maild.routing.views import address_view
from maild.store.agents import (
    SignedIn,
    end_session,
    password_hash_of,
    password_matches,
    purge_sessions,
    start_session,
)
from maild.store.database import Database
from maild.store.models import Ticket, utcnow
from maild.store.search import TooManyWords, words
from maild.store.tickets import (
    AttachmentNotFound,
    Filters,
    TicketNotFound,
    attachment_bytes,
    page_tickets,
    show_ticket,
)

log = structlog.get_logger("maild.console")

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50
STATUSES = [s.value for s in TicketStatus]
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class RulesStatus:
    """The routing table in force and its last reload, from the service."""

    table: RuleTable
    loaded_at: datetime | None
    problems: list[str]  # the last reload's, when it failed (the table in force is older)


@dataclass(frozen=True)
class ConsoleContext:
    """What the console works with, wired by the service (maild/service.py)."""

    database: Database
    settings: Settings
    desk: Callable[[], DeskContext]  # the desk's context with the rules in force now
    rules: Callable[[], RulesStatus]
    queued: Callable[[], None]  # wake the pager and mailer after writing outbox rows


class SecurityHeaders:
    """ASGI middleware: the console's answer headers on every answer (errors included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in _SECURITY_HEADERS.items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def _relative(value: str | None) -> str:
    """ "3 h ago" for an ISO time (console.js keeps it current; the title has the time)."""
    if not value:
        return ""
    then = datetime.fromisoformat(value)
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = max(0, int((datetime.now(UTC) - then).total_seconds()))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return "just now"


def _absolute(value: str | None) -> str:
    if not value:
        return ""
    then = datetime.fromisoformat(value)
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return then.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(value: int) -> str:
    if value < 1024:
        return f"{value} B"
    if value < 1024 * 1024:
        return f"{math.ceil(value / 1024)} KiB"
    return f"{value / (1024 * 1024):.1f} MiB"


def _people(values: Any) -> str:
    """A message's to or cc ({"name", "email"} each, or plain addresses) as one line."""
    shown = []
    for value in values or ():
        if isinstance(value, dict):
            email, name = str(value.get("email", "")), str(value.get("name", ""))
            shown.append(f"{name} <{email}>" if name else email)
        else:
            shown.append(str(value))
    return ", ".join(shown)


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["relative"] = _relative
    env.filters["absolute"] = _absolute
    env.filters["size"] = _size
    env.filters["people"] = _people
    return env


class Console:
    """The console's routes, bound to its context."""

    def __init__(self, context: ConsoleContext) -> None:
        self.context = context
        self.database = context.database
        self.sessions = Sessions(context.database, context.settings.console)
        self.env = environment()
        # argon2 checks one at a time: a flood of sign-ins (from many addresses, which the
        # limits do not stop) takes one core at most, never the mail's
        self._checking = asyncio.Semaphore(1)

    # Rendering.

    def page(
        self,
        request: Request,
        template: str,
        signed: SignedIn | None,
        status_code: int = 200,
        **values: Any,
    ) -> HTMLResponse:
        html = self.env.get_template(template).render(
            signed=signed,
            csrf=signed.csrf if signed else "",
            path=request.url.path,
            **values,
        )
        return HTMLResponse(html, status_code=status_code)

    def problem(
        self, request: Request, signed: SignedIn | None, status: int, message: str
    ) -> HTMLResponse:
        return self.page(
            request, "error.html", signed, status_code=status, status=status, message=message
        )

    # Session checks.

    async def signed_in(self, request: Request) -> SignedIn | Response:
        signed = await self.sessions.current(request)
        if signed is None:
            back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            target = f"{PATH}/sign-in?next={urllib.parse.quote(back, safe='')}"
            if request.method != "GET":
                target = f"{PATH}/sign-in"
            return RedirectResponse(target, status_code=303)
        return signed

    async def posted(self, request: Request) -> tuple[SignedIn, FormData] | Response:
        """The session and the form of a POST, its CSRF token checked; else the answer."""
        signed = await self.signed_in(request)
        if isinstance(signed, Response):
            return signed
        try:
            form = await request.form(max_files=20, max_fields=200)
        except (HTTPException, ValueError) as exc:
            return self.problem(request, signed, 400, f"the form could not be read: {exc}")
        token = form.get("csrf")
        if not same(token if isinstance(token, str) else None, signed.csrf):
            await form.close()
            log.warning(
                "console POST without its CSRF token refused",
                path=request.url.path,
                agent=signed.email,
                client=client_address(request),
            )
            return self.problem(
                request, signed, 403, "This form has expired or did not come from this page."
            )
        return signed, form

    # Signing in and out.

    async def sign_in_form(self, request: Request) -> Response:
        signed = await self.sessions.current(request)
        target = _next(request.query_params.get("next"))
        if signed is not None:
            return RedirectResponse(target, status_code=303)
        return self._sign_in_page(request, target)

    def _sign_in_page(
        self, request: Request, target: str, error: str = "", email: str = "", status: int = 200
    ) -> Response:
        token = new_token()
        response = self.page(
            request,
            "sign_in.html",
            None,
            status_code=status,
            sign_in_token=token,
            next=target,
            error=error,
            email=email,
        )
        set_cookie(request, response, SIGN_IN_COOKIE, token, max_age=3600)
        return response

    async def sign_in(self, request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=10)
        email = str(form.get("email") or "").strip()[:320]
        password = str(form.get("password") or "")
        target = _next(str(form.get("next") or ""))
        token = form.get("csrf")
        if not same(
            token if isinstance(token, str) else None, request.cookies.get(SIGN_IN_COOKIE, "")
        ):
            return self._sign_in_page(
                request, target, "The form expired; sign in again.", email, status=403
            )
        client = client_address(request)
        wait = self.sessions.retry_after(email, client)
        if wait is not None:
            log.warning("console sign-in refused: too many failures", email=email, client=client)
            response = self._sign_in_page(
                request,
                target,
                f"Too many failed sign-ins. Try again in {math.ceil(wait / 60)} min.",
                email,
                status=429,
            )
            response.headers["Retry-After"] = str(math.ceil(wait))
            return response
        found = await self.database.read(lambda s: password_hash_of(s, email))
        stored = found[1] if found else None
        async with self._checking:
            ok, new_hash = await asyncio.to_thread(password_matches, stored, password)
        cookie = None
        if ok and found is not None and not self._is_agent(email):
            log.warning("console sign-in of an account [desk] agents does not list", email=email)
            ok = False
        if ok and found is not None:
            agent_id, checked = found
            now = utcnow()
            idle, max_age = self.sessions.idle, self.sessions.max_age

            def begin(s: Session) -> str | None:
                purge_sessions(s, now, idle, max_age)  # expired rows go at each sign-in
                return start_session(
                    s, agent_id, client, now, checked_hash=checked, new_hash=new_hash
                )

            cookie = await self.database.write(begin)
        if cookie is None:
            self.sessions.failed(email, client)
            log.warning("console sign-in failed", email=email, client=client)
            return self._sign_in_page(
                request, target, "That email address and password do not match.", email, 401
            )
        log.info("console sign-in", email=email.lower(), client=client)
        response = RedirectResponse(target, status_code=303)
        set_cookie(
            request, response, COOKIE, cookie, max_age=int(self.sessions.max_age.total_seconds())
        )
        response.delete_cookie(SIGN_IN_COOKIE, path=PATH)
        return response

    def _is_agent(self, email: str) -> bool:
        """`[desk] agents` lists the address (an empty list lists nobody)."""
        agents = self.context.desk().agents
        if not agents:
            return False
        try:
            check_agent(email, agents, "email")
        except NotAllowed:
            return False
        return True

    async def sign_out(self, request: Request) -> Response:
        posted = await self.posted(request)
        if isinstance(posted, Response):
            return posted
        signed, form = posted
        await form.close()
        token = request.cookies.get(COOKIE, "")
        await self.database.write(lambda s: end_session(s, token))
        log.info("console sign-out", email=signed.email)
        response = RedirectResponse(f"{PATH}/sign-in", status_code=303)
        response.delete_cookie(COOKIE, path=PATH)
        return response

    # The queue.

    async def home(self, request: Request) -> Response:
        return RedirectResponse(f"{PATH}/tickets", status_code=303)

    async def queue(self, request: Request) -> Response:
        signed = await self.signed_in(request)
        if isinstance(signed, Response):
            return signed
        query = QueueQuery.parse(request.query_params, signed.email)
        if query.error:
            return self.problem(request, signed, 400, query.error)
        filters = query.filters()
        after = query.position()

        def read(session: Session) -> tuple[list[dict[str, Any]], Any, dict[str, int]]:
            views, last = page_tickets(session, filters, limit=PAGE_SIZE, after=after)
            return views, last, count_by_status(session, filters)

        views, last, counts = await self.database.read(read)
        next_url = query.url(cursor=_cursor(last)) if last else None
        return self.page(
            request,
            "queue.html",
            signed,
            tickets=views,
            counts=counts,
            total=sum(counts.values()),
            query=query,
            next_url=next_url,
            first_url=query.url(cursor=None) if query.cursor else None,
            statuses=STATUSES,
            types=[t.value for t in TicketType],
            priorities=[p.value for p in Priority],
        )

    # A ticket.

    async def ticket(self, request: Request) -> Response:
        signed = await self.signed_in(request)
        if isinstance(signed, Response):
            return signed
        ticket_id = _ticket_id(request)
        if ticket_id is None:
            return self.problem(request, signed, 404, "No such ticket.")
        try:
            view = await self.database.read(lambda s: show_ticket(s, ticket_id))
        except TicketNotFound:
            return self.problem(request, signed, 404, f"There is no ticket {ticket_id}.")
        desk = self.context.desk()
        notice = request.query_params.get("done", "")
        return self.page(
            request,
            "ticket.html",
            signed,
            ticket=view,
            notice=NOTICES.get(notice, ""),
            error=request.query_params.get("error", "")[:500],
            statuses=STATUSES,
            types=[t.value for t in TicketType],
            priorities=[p.value for p in Priority],
            sending=desk.mail is not None and desk.mail.sending,
            cc_people=[p for p in view["participants"] if p["role"] == "cc"],
        )

    def _back(self, ticket_id: int, **params: str) -> Response:
        query = urllib.parse.urlencode(params)
        return RedirectResponse(
            f"{PATH}/tickets/{ticket_id}" + (f"?{query}" if query else "") + "#actions",
            status_code=303,
        )

    async def reply(self, request: Request) -> Response:
        posted = await self.posted(request)
        if isinstance(posted, Response):
            return posted
        signed, form = posted
        try:
            return await self._reply(request, signed, form)
        finally:
            await form.close()  # uploads spooled to temporary files

    async def _reply(self, request: Request, signed: SignedIn, form: FormData) -> Response:
        ticket_id = _ticket_id(request)
        if ticket_id is None:
            return self.problem(request, signed, 404, "No such ticket.")
        body = str(form.get("body") or "")
        internal = form.get("kind") == "note"
        cc = _addresses(str(form.get("cc") or ""))
        files = []
        for upload in form.getlist("attachments"):
            if isinstance(upload, UploadFile) and upload.filename:
                data = await upload.read()
                files.append(
                    FileData(
                        upload.filename,
                        upload.content_type or "application/octet-stream",
                        data,
                    )
                )
        desk = self.context.desk()
        if desk.mail is None:
            return self._back(ticket_id, error="The desk's mail policy is not loaded.")
        agent = formataddr((signed.name, signed.email)) if signed.name else signed.email
        now = utcnow()
        policy = desk.mail

        def work(session: Session) -> None:
            reply(
                session,
                ticket_id,
                agent=agent,
                body=body,
                cc=cc,
                attachments=files,
                internal=internal,
                policy=policy,
                table=desk.table,
                now=now,
            )

        try:
            await self.database.write(work)
        except TicketNotFound:
            return self.problem(request, signed, 404, f"There is no ticket {ticket_id}.")
        except MailOff as exc:
            return self._back(ticket_id, error=str(exc))
        except ReplyRefused as exc:
            return self._back(
                ticket_id, error=str(exc).replace("--cc", "CC").replace("--attach", "Attachments")
            )
        self.context.queued()
        log.info(
            "console reply", ticket=ticket_id, agent=signed.email, internal=internal, cc=len(cc)
        )
        return self._back(ticket_id, done="note" if internal else "reply")

    async def change(self, request: Request) -> Response:
        posted = await self.posted(request)
        if isinstance(posted, Response):
            return posted
        signed, form = posted
        await form.close()
        ticket_id = _ticket_id(request)
        if ticket_id is None:
            return self.problem(request, signed, 404, "No such ticket.")
        try:
            changes = _changes(form)
        except ValueError as exc:
            return self._back(ticket_id, error=str(exc))
        desk = self.context.desk()

        def work(session: Session) -> bool:
            result = change_ticket(
                session, ticket_id, changes, by=signed.email, context=desk, via="console"
            )
            return bool(result.events) or result.page is not None or result.notice is not None

        try:
            check_agent(signed.email, desk.agents, "you")
            changed = await self.database.write(work)
        except TicketNotFound:
            return self.problem(request, signed, 404, f"There is no ticket {ticket_id}.")
        except NotAllowed as exc:
            return self._back(ticket_id, error=str(exc))
        if changed:
            self.context.queued()
        log.info("console change", ticket=ticket_id, agent=signed.email, changed=changed)
        return self._back(ticket_id, done="change" if changed else "same")

    async def attachment(self, request: Request) -> Response:
        signed = await self.signed_in(request)
        if isinstance(signed, Response):
            return signed
        ticket_id = _ticket_id(request)
        number = _int(request.path_params.get("number"))
        if ticket_id is None or number is None:
            return self.problem(request, signed, 404, "No such attachment.")
        try:
            attachment, data = await self.database.read(
                lambda s: attachment_bytes(s, ticket_id, number)
            )
        except (TicketNotFound, AttachmentNotFound) as exc:
            return self.problem(request, signed, 404, str(exc) or "No such ticket.")
        return download(data, attachment.filename, attachment.content_type, number)

    # The rules.

    async def rules(self, request: Request) -> Response:
        signed = await self.signed_in(request)
        if isinstance(signed, Response):
            return signed
        status = self.context.rules()
        params = request.query_params
        address = params.get("address", "").strip()[:320]
        sender = params.get("from", "").strip()[:320]
        subject = params.get("subject", "")[:998]
        header_text = params.get("headers", "")[:4000]
        result = None
        error = ""
        if address:
            headers = []
            for line in header_text.splitlines():
                if not line.strip():
                    continue
                name, sep, value = line.partition(":")
                if not sep or not name.strip():
                    error = f"Write each header as Name: value (not {line[:60]!r})."
                    break
                headers.append((name.strip(), value.strip()))
            if not error:
                context = MessageContext(sender=sender, subject=subject, headers=tuple(headers))
                result = address_view(status.table, address, context)
        return self.page(
            request,
            "rules.html",
            signed,
            table=status.table,
            loaded_at=status.loaded_at.isoformat() if status.loaded_at else None,
            problems=status.problems,
            address=address,
            sender=sender,
            subject=subject,
            headers=header_text,
            result=result,
            error=error,
        )


NOTICES = {
    "reply": "Your reply is stored and queued to be mailed.",
    "note": "Your internal note is stored. No mail is sent.",
    "change": "The ticket is changed.",
    "same": "Nothing changed: the ticket already was as asked.",
}


def _next(target: str | None) -> str:
    """A redirect target inside the console only (never another site)."""
    inside = bool(target) and str(target).startswith(f"{PATH}/")
    if inside and target and "\\" not in target and all(c.isprintable() for c in target):
        return target
    return f"{PATH}/tickets"


def _int(value: Any) -> int | None:
    try:
        number = int(str(value))
    except ValueError:
        return None
    return number if 1 <= number <= 2**31 - 1 else None


def _ticket_id(request: Request) -> int | None:
    return _int(request.path_params.get("ticket_id"))


def _addresses(text: str) -> list[str]:
    """Addresses written one per line or separated by commas or spaces."""
    return [part for part in text.replace(",", " ").replace(";", " ").split() if part]


def _changes(form: FormData) -> Changes:
    def chosen(name: str) -> str | None:
        value = form.get(name)
        return value.strip() if isinstance(value, str) and value.strip() else None

    status = chosen("status")
    priority = chosen("priority")
    type_ = chosen("type")
    assignee = chosen("assignee")
    application = form.get("application")
    remove = [str(v) for v in form.getlist("remove_cc") if isinstance(v, str) and v.strip()]
    try:
        return Changes(
            status=TicketStatus(status) if status else None,
            priority=Priority(priority) if priority else None,
            type=TicketType(type_) if type_ else None,
            application=application.strip()[:255]
            if isinstance(application, str) and application.strip()
            else None,
            assignee=assignee,
            unassign="assignee" in form and assignee is None,  # emptied: nobody
            remove_cc=tuple(remove),
        )
    except ValueError as exc:
        raise ValueError(f"Not a choice the desk knows: {exc}") from None


def _cursor(last: tuple[datetime, int]) -> str:
    updated, ticket_id = last
    return f"{updated.isoformat()}~{ticket_id}"


@dataclass
class QueueQuery:
    """The queue's filters, as the URL carries them (a view can be bookmarked)."""

    status: str = "open"
    type: str = ""
    priority: str = ""
    application: str = ""
    requester: str = ""
    assignee: str = ""
    mine: bool = False
    unassigned: bool = False
    q: str = ""
    cursor: str = ""
    me: str = ""
    error: str = ""

    @classmethod
    def parse(cls, params: Any, me: str) -> QueueQuery:
        def get(name: str, limit: int = 320) -> str:
            return str(params.get(name, "")).strip()[:limit]

        query = cls(
            status=get("status") or "open",
            type=get("type"),
            priority=get("priority"),
            application=get("application", 255),
            requester=get("requester"),
            assignee=get("assignee"),
            mine=get("mine") in ("1", "on", "true"),
            unassigned=get("unassigned") in ("1", "on", "true"),
            q=get("q", 1000),
            cursor=get("cursor", 100),
            me=me,
        )
        if query.status not in ("open", "closed", "all", *STATUSES):
            query.error = f"Unknown status {query.status!r}."
        elif query.type and query.type not in [t.value for t in TicketType]:
            query.error = f"Unknown type {query.type!r}."
        elif query.priority and query.priority not in [p.value for p in Priority]:
            query.error = f"Unknown priority {query.priority!r}."
        elif query.q:
            try:
                words(query.q)
            except TooManyWords as exc:
                query.error = str(exc)
        if query.cursor and query.position() is None:
            query.error = "That page link is not valid any more; start from the first page."
        if any("\x00" in v for v in (query.q, query.application, query.requester)):
            query.error = "The filters cannot hold NUL characters."
        return query

    def filters(self) -> Filters:
        assignee = self.me if self.mine else (self.assignee or None)
        return Filters(
            status=self.status,
            type_=self.type or None,
            priority=self.priority or None,
            application=self.application or None,
            requester=self.requester or None,
            assignee=assignee,
            unassigned=self.unassigned and not self.mine,
            search=self.q or None,
        )

    def position(self) -> tuple[datetime, int] | None:
        if not self.cursor:
            return None
        when, _, number = self.cursor.rpartition("~")
        try:
            updated = datetime.fromisoformat(when)
            ticket_id = int(number)
        except ValueError:
            return None
        if updated.tzinfo is None:
            updated = updated.replace(tzinfo=UTC)
        return updated, ticket_id

    def params(self, **changes: Any) -> dict[str, str]:
        values = {
            "status": self.status,
            "type": self.type,
            "priority": self.priority,
            "application": self.application,
            "requester": self.requester,
            "assignee": self.assignee,
            "mine": "1" if self.mine else "",
            "unassigned": "1" if self.unassigned else "",
            "q": self.q,
            "cursor": self.cursor,
        }
        values.update({k: ("" if v is None else str(v)) for k, v in changes.items()})
        return {k: v for k, v in values.items() if v}

    def url(self, **changes: Any) -> str:
        return f"{PATH}/tickets?" + urllib.parse.urlencode(self.params(**changes))


def count_by_status(session: Session, filters: Filters) -> dict[str, int]:
    """How many tickets of each status the filters select, whatever status they ask."""
    every = dataclasses.replace(filters, status="all")
    rows = session.exec(
        select(Ticket.status, func.count())
        .where(*every.conditions(session))
        .group_by(col(Ticket.status))
    ).all()
    found = {status: int(count) for status, count in rows}
    return {status: found.get(status, 0) for status in STATUSES}


def build_console(context: ConsoleContext) -> Starlette:
    """The console's ASGI application, mounted at /console by http/app.py."""
    console = Console(context)
    get: list[str] = ["GET"]
    post: list[str] = ["POST"]
    routes = [
        Route("/", console.home, methods=get),
        Route("/sign-in", console.sign_in_form, methods=get),
        Route("/sign-in", console.sign_in, methods=post),
        Route("/sign-out", console.sign_out, methods=post),
        Route("/tickets", console.queue, methods=get),
        Route("/tickets/{ticket_id}", console.ticket, methods=get),
        Route("/tickets/{ticket_id}/reply", console.reply, methods=post),
        Route("/tickets/{ticket_id}/change", console.change, methods=post),
        Route("/tickets/{ticket_id}/attachments/{number}", console.attachment, methods=get),
        Route("/rules", console.rules, methods=get),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(SecurityHeaders)
    return app
