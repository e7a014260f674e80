"""The tickets over HTTP: list, show, open, answer and change them, and their attachments.

    GET   /api/v1/tickets                              list (filters, cursor pages)
    GET   /api/v1/tickets/{id}                         one ticket, as `tickets show --json`
    GET   /api/v1/tickets/{id}/attachments/{n}         attachment n's exact bytes
    POST  /api/v1/tickets                              open a ticket (the dashboard's form)
    POST  /api/v1/tickets/{id}/messages                an agent's reply or note, or a
                                                       customer's reply
    PATCH /api/v1/tickets/{id}                         status, priority, type, application,
                                                       assignee (as `tickets set`)

Every route is the CLI's code behind an HTTP door: the JSON shapes are store/tickets.py's
(`tickets list/show --json`), an agent's answer is desk/reply.reply (`tickets reply`), a
change is desk/actions.change_ticket (`tickets set`), and a new ticket or a customer's
reply is a message filed by filing/intake through desk/submit.py, as mail is.

Tokens with a customer (`--customer`) act for that customer only:
- they see, list and download only tickets where a participant matches their pattern
  (the list's query says so itself); any other ticket is 404, as one that does not
  exist; internal notes are left out of what they see and search;
- they open tickets only for a requester their pattern matches, post only as such an
  author, never as an agent, never an internal note (403);
- they cannot change tickets (PATCH: 403): a dashboard's "mark solved" is the desk's
  decision here.

Writes take an `Idempotency-Key` header (store/idempotency.py): the same request again
with the same key gets the first answer (with `Idempotent-Replayed: true`) and does
nothing twice; the same key with another request is 422; on PostgreSQL a second
daemon's request with a key still in flight waits for it and gets its answer (or 409
when the first failed meanwhile: retry).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.headerregistry import Address as HeaderAddress
from email.utils import formataddr
from typing import Annotated, Any, Literal
from urllib.parse import quote

import structlog
from fastapi import APIRouter, Header, Query, Request
from fastapi import Path as PathParam
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from starlette.responses import JSONResponse, Response

from maild.desk.actions import Changes, DeskContext, NotAllowed, change_ticket, check_agent
from maild.desk.reply import MailOff, ReplyRefused, ReplyResult, reply
from maild.desk.submit import (
    CustomerReply,
    NewTicket,
    SubmitFailed,
    SubmitRefused,
    Unroutable,
    compose_reply,
    compose_ticket,
    file_reply,
    file_ticket,
    thread_of,
)
from maild.enums import Priority, TicketStatus, TicketType
from maild.filing.intake import Filed, FilingContext
from maild.filing.processing import log_results
from maild.http.app import API_V1, Api
from maild.http.auth import Principal, Reader, Writer, client_address
from maild.http.problems import PROBLEM_RESPONSES, Problem, ProblemError
from maild.mail import addresses
from maild.mail.addresses import Address
from maild.mail.message_ids import message_id_hash
from maild.outbound.correspondence import DeskPolicy, FileData
from maild.store.idempotency import (
    MAX_KEY_LENGTH,
    Answer,
    KeyReused,
    recorded,
    request_hash,
    run_keyed,
)
from maild.store.models import Message, OutmailRecipient, utcnow
from maild.store.search import MAX_WORDS, TooManyWords, words
from maild.store.tickets import (
    AttachmentNotFound,
    Filters,
    TicketNotFound,
    attachment_bytes,
    page_tickets,
    participant_emails,
    show_ticket,
)

log = structlog.get_logger("maild.http")

MAX_ID = 2**31 - 1  # ids are SQL INTEGER: 32 bits on PostgreSQL
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_FILES = 100  # attachments in one request
MAX_CC = 100  # checked again against [outbound] max_recipients
MAX_TEXT = 1_000_000  # characters of a description or body (what a stored text keeps)
MAX_SUBJECT = 998  # a header line

router = APIRouter(tags=["tickets"], responses=PROBLEM_RESPONSES)


# Request bodies. Extra members are refused (422 naming them): a typo is never ignored.


_SURROGATE = re.compile("[\ud800-\udfff]")


def _storable(value: str) -> str:
    """Text every database can store (PostgreSQL's text holds no NUL) and UTF-8 can write."""
    if "\x00" in value or _SURROGATE.search(value):
        raise ValueError("must not hold NUL or a lone surrogate (\\ud800 to \\udfff)")
    return value


def _no_controls(value: str) -> str:
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029" for c in value):
        raise ValueError("must be one line without control characters")
    return value


def _email(value: str) -> str:
    if not addresses.is_address(value):
        raise ValueError("not an email address (one plain address, like ann@example.com)")
    try:  # what the mail maild writes can carry, as it is (no comment, no second `@`)
        written = HeaderAddress(addr_spec=value.strip()).addr_spec
    except (ValueError, IndexError, TypeError, HeaderParseError):
        written = ""
    if written != value.strip():
        raise ValueError("not an address a mail header can carry as it is")
    return addresses.normalize(value)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


_CONTENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$")


def _content_type(value: str) -> str:
    media = value.split(";", 1)[0].strip().lower()
    if not _CONTENT_TYPE.match(media):
        raise ValueError("not a media type (type/subtype, like application/pdf)")
    return media


Storable = Annotated[str, AfterValidator(_storable)]
Email = Annotated[Storable, Field(max_length=320), AfterValidator(_email)]
OneLine = Annotated[Storable, AfterValidator(_no_controls)]
Text = Annotated[Storable, Field(min_length=1, max_length=MAX_TEXT), AfterValidator(_not_blank)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Person(_Strict):
    email: Email
    name: Annotated[OneLine, Field(max_length=256)] = ""


class File(_Strict):
    filename: Annotated[Storable, Field(min_length=1, max_length=1000)]
    content_type: Annotated[str, Field(max_length=255), AfterValidator(_content_type)] = (
        "application/octet-stream"
    )
    content_base64: str


class TicketForm(_Strict):
    """POST /tickets: a new ticket, as the dashboard's form gives it."""

    requester: Person
    type: TicketType
    priority: Priority
    application: Annotated[OneLine, Field(max_length=255)] | None = None
    subject: Annotated[OneLine, Field(min_length=1, max_length=MAX_SUBJECT)]
    description: Text
    cc: Annotated[list[Email], Field(max_length=MAX_CC)] = []
    attachments: Annotated[list[File], Field(max_length=MAX_FILES)] = []


class MessageForm(_Strict):
    """POST /tickets/{id}/messages: an agent's reply or internal note, or a customer's reply."""

    author: Person
    body: Text
    cc: Annotated[list[Email], Field(max_length=MAX_CC)] = []
    internal: bool = False
    attachments: Annotated[list[File], Field(max_length=MAX_FILES)] = []


class TicketChange(_Strict):
    """PATCH /tickets/{id}: what to change; `by` the agent who changes it (required)."""

    by: Email
    status: TicketStatus | None = None
    priority: Priority | None = None
    type: TicketType | None = None
    application: Annotated[OneLine, Field(max_length=255)] | None = None
    assignee: Email | None = None  # null: nobody
    remove_cc: Annotated[list[Email], Field(max_length=50)] = []  # CCs taken off the ticket


# Shared steps.


TicketId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="the ticket's id")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_KEY_LENGTH,
        pattern=r"^[\x21-\x7e]+$",
        description="any 1 to 255 visible ASCII characters, new for each write; a retry "
        "with the same key and body gets the first answer",
    ),
]


def _field(name: str, message: str, where: str = "body") -> dict[str, Any]:
    return {"field": name, "in": where, "message": message}


def _invalid(
    name: str, message: str, where: str = "body", kind: str = "invalid-request"
) -> ProblemError:
    return ProblemError(422, f"{name}: {message}", kind=kind, errors=[_field(name, message, where)])


def _forbidden(message: str, name: str | None = None) -> ProblemError:
    errors = [_field(name, message)] if name else None
    return ProblemError(403, message, kind="not-this-customer", errors=errors)


def _not_found(ticket_id: int) -> ProblemError:
    return ProblemError(404, f"no ticket {ticket_id}")


def filing_context(desk: DeskContext) -> FilingContext:
    """What filing needs, from the desk's context (the daemon's policies, rules now)."""
    mail = desk.mail
    return FilingContext(desk.table, desk.policy, mail.acks if mail is not None else None, mail)


def _mail_policy(desk: DeskContext) -> DeskPolicy:
    assert desk.mail is not None, "the daemon always builds the desk's mail policy"
    return desk.mail


def _decode(index: int, file: File) -> bytes:
    text = file.content_base64
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        pass
    try:  # base64 wrapped in lines, as MIME writes it
        return binascii.a2b_base64("".join(text.split()), strict_mode=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"attachments.{index}.content_base64", "not base64") from None


def _files(files: list[File], policy: DeskPolicy) -> tuple[FileData, ...]:
    """The attachments decoded; 422 for one that is not base64 or all together over
    [smtp] max_message_size."""
    decoded = []
    total = 0
    for index, file in enumerate(files):
        data = _decode(index, file)
        total += len(data)
        if total > policy.max_attachment_size:
            raise _invalid(
                "attachments",
                f"more than a message may carry ([smtp] max_message_size = "
                f"{policy.max_attachment_size} bytes)",
            )
        decoded.append(FileData(file.filename, file.content_type, data))
    return tuple(decoded)


def _not_ours(email: str, desk: DeskContext, name: str) -> None:
    """422 when `email` is one of the desk's own addresses (a route's, or the sender of its
    mail): mail from it would come back to the desk."""
    sender = _mail_policy(desk).acks.from_address
    if desk.table.is_ours(email) or (
        sender and addresses.route_key(email) == addresses.route_key(sender)
    ):
        raise _invalid(name, f"{email} is one of the desk's own addresses")


def _copies(cc: list[str], desk: DeskContext) -> tuple[Address, ...]:
    """The `cc` addresses, none of the desk's own, at most [outbound] max_recipients."""
    limit = _mail_policy(desk).acks.limits.max_recipients
    unique = list(dict.fromkeys(cc))
    if len(unique) > limit:
        raise _invalid("cc", f"more than [outbound] max_recipients = {limit} addresses")
    for index, email in enumerate(cc):
        if desk.table.is_ours(email):
            raise _invalid(f"cc.{index}", f"{email} is one of the desk's own addresses")
    return tuple(Address("", email) for email in unique)


async def _visible(api: Api, who: Principal, ticket_id: int) -> None:
    """404 unless the ticket exists and the token may see it."""
    try:
        emails = await api.database.read(lambda s: participant_emails(s, ticket_id))
    except TicketNotFound:
        raise _not_found(ticket_id) from None
    if not who.sees(emails):
        raise _not_found(ticket_id)


def _via(who: Principal) -> str:
    return f"api; token={who.name}"


async def _write(
    api: Api,
    who: Principal,
    request: Request,
    key: str | None,
    work: Callable[[Session], Answer],
) -> Answer:
    """`work` in one transaction on the writer thread; under an Idempotency-Key, its
    answer recorded with it (or the answer recorded before, for a retry)."""
    if key is None:
        try:
            return await api.database.write(work)
        except IntegrityError:
            raise _conflict() from None
    digest = request_hash(request.method, request.url.path, await request.body())
    now = utcnow()
    try:
        return await api.database.write(lambda s: run_keyed(s, who.name, key, digest, work, now))
    except KeyReused:
        raise _reused() from None
    except IntegrityError:  # PostgreSQL: another transaction recorded this key meanwhile
        pass
    try:
        found = await api.database.read(lambda s: recorded(s, who.name, key, digest, now))
    except KeyReused:
        raise _reused() from None
    if found is None:
        raise _conflict()
    return found


def _reused() -> ProblemError:
    message = "this key was used for another request (method, path or body): use a new key"
    return ProblemError(
        422,
        message,
        kind="idempotency-key-reused",
        errors=[_field("Idempotency-Key", message, "header")],
    )


def _conflict() -> ProblemError:
    return ProblemError(
        409,
        "another request changed the same thing at the same moment; send it again",
        kind="conflict",
        headers={"Retry-After": "1"},
    )


def _answer(answer: Answer, location: str | None = None) -> JSONResponse:
    headers = dict(answer.headers)
    if location:
        headers["Location"] = location
    if answer.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(answer.body, status_code=answer.status, headers=headers)


def _location(ticket_id: Any) -> str | None:
    return f"{API_V1}/tickets/{ticket_id}" if isinstance(ticket_id, int) else None


def _after_filing(api: Api, filed: list[Filed]) -> None:
    if filed:
        log_results(filed)
        api.queued()


# Reading.


Status = Literal["open", "closed", "all", "pending", "solved"]


@dataclass(frozen=True)
class _Cursor:
    updated_at: datetime
    id: int

    def encode(self) -> str:
        text = f"{self.updated_at.isoformat()}|{self.id}"
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> _Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            when, _, number = raw.partition("|")
            updated = datetime.fromisoformat(when).astimezone(UTC)
            ticket_id = int(number)
        except (ValueError, OverflowError, UnicodeDecodeError, binascii.Error):
            raise _invalid("cursor", "not a cursor this API gave", "query") from None
        if "+" not in when or not 1 <= ticket_id <= MAX_ID:  # ours are UTC, with +00:00
            raise _invalid("cursor", "not a cursor this API gave", "query")
        return cls(updated, ticket_id)


def _utc(value: datetime) -> datetime:
    """A time in UTC (no offset: UTC already); 422 past the years a datetime holds."""
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise _invalid("updated_since", "out of range", "query") from None


class TicketPage(BaseModel):
    tickets: list[dict[str, Any]]
    next_cursor: str | None = Field(
        description="pass as `cursor` for the next page; null on the last page"
    )


@router.get(
    "/tickets",
    summary="Tickets, most recently updated first, a page at a time",
    response_model=TicketPage,
)
async def list_tickets(
    who: Reader,
    api: Api,
    status: Annotated[
        Status, Query(description="open = open+pending, closed = solved+closed")
    ] = "all",
    type_: Annotated[TicketType | None, Query(alias="type")] = None,
    priority: Priority | None = None,
    application: Annotated[Storable | None, Query(max_length=1000)] = None,
    requester: Annotated[Storable | None, Query(max_length=320)] = None,
    participant: Annotated[
        Storable | None,
        Query(max_length=320, description="on the ticket, or wrote one of its messages"),
    ] = None,
    assignee: Annotated[Storable | None, Query(max_length=320)] = None,
    unassigned: bool = False,
    q: Annotated[
        Storable | None,
        Query(
            max_length=4000, description=f"words one message has, all of them (at most {MAX_WORDS})"
        ),
    ] = None,
    updated_since: Annotated[
        datetime | None, Query(description="updated at or after (ISO 8601; UTC when no offset)")
    ] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> dict[str, Any]:
    if assignee is not None and unassigned:
        raise _invalid("unassigned", "cannot be combined with assignee", "query")
    if q is not None:
        try:
            words(q)
        except TooManyWords as exc:
            raise _invalid("q", str(exc), "query") from None
    after = _Cursor.decode(cursor) if cursor is not None else None
    since = _utc(updated_since) if updated_since is not None else None
    filters = Filters(
        status=status,
        type_=type_.value if type_ else None,
        priority=priority.value if priority else None,
        participant=participant,
        application=application,
        search=q,
        assignee=assignee,
        unassigned=unassigned,
        requester=requester,
        updated_since=since,
        customer=who.customer,
    )
    position = (after.updated_at, after.id) if after else None
    views, last = await api.database.read(
        lambda s: page_tickets(s, filters, limit=limit, after=position)
    )
    return {
        "tickets": views,
        "next_cursor": _Cursor(*last).encode() if last is not None else None,
    }


@router.get(
    "/tickets/{ticket_id}",
    summary="One ticket: messages, participants, events, pages, acknowledgements",
    responses={404: {"model": Problem, "description": "no such ticket, or not this token's"}},
)
async def get_ticket(ticket_id: TicketId, who: Reader, api: Api) -> dict[str, Any]:
    public_only = who.customer is not None
    try:
        view = await api.database.read(lambda s: show_ticket(s, ticket_id, public_only=public_only))
    except TicketNotFound:
        raise _not_found(ticket_id) from None
    if not who.sees(p["email"] for p in view["participants"]):
        raise _not_found(ticket_id)
    return view


# What a browser may show of an attachment: anything else is served as plain bytes.
SAFE_TYPES = frozenset(
    {
        "application/pdf",
        "application/zip",
        "application/gzip",
        "application/json",
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "text/plain",
        "text/csv",
    }
)


def content_disposition(filename: str, number: int) -> str:
    """`attachment` with the name (RFC 6266): an ASCII fallback with no quote, backslash,
    percent sign, control or path character, and `filename*` (RFC 8187) for the rest."""
    name = re.split(r"[/\\]", filename)[-1]
    name = "".join(c for c in name if c.isprintable()).strip().lstrip(".") or f"attachment-{number}"
    fallback = "".join(c if c.isascii() and c not in '"\\%;' else "_" for c in name)
    disposition = f'attachment; filename="{fallback}"'
    if fallback != name:
        disposition += f"; filename*=UTF-8''{quote(name, safe='')}"
    return disposition


def safe_content_type(stored: str) -> str:
    media = stored.split(";", 1)[0].strip().lower()
    return media if media in SAFE_TYPES else "application/octet-stream"


def download(data: bytes, filename: str, content_type: str, number: int) -> Response:
    """An attachment's exact bytes as a download, never rendered (the API and the console):
    a safe name and type, nosniff, and a sandbox should a browser open it all the same."""
    return Response(
        data,
        media_type=safe_content_type(content_type),
        headers={
            "Content-Disposition": content_disposition(filename, number),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": "private, no-store",
        },
    )


@router.get(
    "/tickets/{ticket_id}/attachments/{number}",
    summary="Attachment NUMBER of a ticket (as numbered in the ticket's messages), byte for byte",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the exact bytes"},
        404: {"model": Problem, "description": "no such ticket or attachment, or not this token's"},
    },
)
async def get_attachment(
    ticket_id: TicketId,
    number: Annotated[int, PathParam(ge=1, le=MAX_ID)],
    who: Reader,
    api: Api,
) -> Response:
    def read(session: Session) -> tuple[str, str, bytes]:
        if not who.sees(participant_emails(session, ticket_id)):
            raise TicketNotFound(ticket_id)
        attachment, data = attachment_bytes(
            session, ticket_id, number, public_only=who.customer is not None
        )
        return attachment.filename, attachment.content_type, data

    try:
        filename, content_type, data = await api.database.read(read)
    except TicketNotFound:
        raise _not_found(ticket_id) from None
    except AttachmentNotFound:
        raise ProblemError(404, f"ticket {ticket_id} has no attachment {number}") from None
    return download(data, filename, content_type, number)


# Opening a ticket.


@router.post(
    "/tickets",
    status_code=201,
    summary="Open a ticket, filed as mail to the desk address of its type and priority",
    responses={201: {"description": "the ticket, as GET /tickets/{id} shows it"}},
)
async def create_ticket(
    form: TicketForm,
    who: Writer,
    api: Api,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    if who.customer is not None and not addresses.sender_matches(
        who.customer, form.requester.email
    ):
        raise _forbidden(
            f"token {who.name!r} acts for {who.customer}; it cannot open a ticket for "
            f"{form.requester.email}",
            "requester.email",
        )
    desk = api.desk_context()
    _not_ours(form.requester.email, desk, "requester.email")
    context = filing_context(desk)
    new = NewTicket(
        requester=Address(form.requester.name, form.requester.email),
        type=form.type,
        priority=form.priority,
        subject=form.subject,
        description=form.description,
        application=form.application.strip() if form.application is not None else None,
        cc=_copies(form.cc, desk),
        attachments=_files(form.attachments, _mail_policy(desk)),
    )
    now = utcnow()
    try:
        composed = await asyncio.to_thread(
            compose_ticket, context, new, via=_via(who), peer=client_address(request), now=now
        )
    except SubmitRefused as exc:
        raise _invalid(exc.field, str(exc), kind="no-route") from None
    filed: list[Filed] = []
    public_only = who.customer is not None

    def work(session: Session) -> Answer:
        done = file_ticket(session, context, composed, new)
        assert done.ticket_id is not None
        filed.append(done)
        return Answer(201, show_ticket(session, done.ticket_id, public_only=public_only))

    try:
        answer = await _write(api, who, request, idempotency_key, work)
    except SubmitFailed as exc:
        log.error("a ticket from the API was not filed", error=str(exc), token=who.name)
        raise ProblemError(500, f"the ticket was not filed: {exc}") from None
    _after_filing(api, filed)
    return _answer(answer, _location(answer.body.get("id")))


# Answering one.


def _reply_refused(exc: ReplyRefused) -> ProblemError:
    """desk/reply's refusal, named by the API's fields rather than the CLI's options."""
    text = str(exc)
    for option, name in (("--from", "author.email"), ("--cc", "cc"), ("--attach", "attachments")):
        if text.startswith(f"{option}: "):
            return _invalid(name, text.removeprefix(f"{option}: "))
    return _invalid("body", text)


def _recipients(session: Session, outmail_id: int | None) -> list[dict[str, Any]]:
    if outmail_id is None:
        return []
    rows = session.exec(
        select(OutmailRecipient)
        .where(OutmailRecipient.outmail_id == outmail_id)
        .order_by(col(OutmailRecipient.id))
    ).all()
    return [{"email": r.email, "status": r.status, "error": r.error} for r in rows]


def _agent_answer(result: ReplyResult) -> dict[str, Any]:
    body = result.as_dict()
    body["mail"] = (
        [
            {
                "kind": result.kind,
                "outmail": result.outmail_id,
                "status": result.status,
                "reason": result.reason,
                "recipients": result.recipients,
            }
        ]
        if result.outmail_id is not None
        else []
    )
    return body


def _customer_answer(
    session: Session, filed: Filed, message_id: str, added: list[str]
) -> dict[str, Any]:
    """A customer's reply as `tickets reply --json` shapes an agent's, plus the mail it
    caused (copies to the other participants, the route's notification)."""
    pk = session.exec(
        select(Message.id).where(Message.message_id_hash == message_id_hash(message_id))
    ).first()
    return {
        "ticket": filed.ticket_id,
        "message": pk,
        "message_id": f"<{message_id}>",
        "kind": filed.kind,
        "outmail": None,
        "status": None,
        "reason": None,
        "recipients": [],
        "added_participants": added,
        "mail": [
            {
                "kind": m.kind,
                "outmail": m.outmail_id,
                "status": m.status,
                "reason": m.reason,
                "recipients": _recipients(session, m.outmail_id),
            }
            for m in filed.mail
        ],
    }


@router.post(
    "/tickets/{ticket_id}/messages",
    status_code=201,
    summary="An agent's reply (mailed) or internal note, or a customer's reply (filed as mail)",
    responses={
        201: {"description": "the message stored and the mail it queued"},
        404: {"model": Problem, "description": "no such ticket, or not this token's"},
        409: {
            "model": Problem,
            "description": "maild sends no mail, or the ticket's desk address has no route now",
        },
    },
)
async def post_message(
    ticket_id: TicketId,
    form: MessageForm,
    who: Writer,
    api: Api,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    desk = api.desk_context()
    policy = _mail_policy(desk)
    author = Address(form.author.name, form.author.email)
    _not_ours(author.email, desk, "author.email")
    agent = policy.is_agent(author.email)
    if who.customer is not None:
        if not addresses.sender_matches(who.customer, author.email):
            raise _forbidden(
                f"token {who.name!r} acts for {who.customer}; it cannot post as {author.email}",
                "author.email",
            )
        if agent:
            raise _forbidden(
                f"token {who.name!r} acts for a customer; it cannot post as one of [desk] agents",
                "author.email",
            )
        if form.internal:
            raise _forbidden(
                "an internal note is the desk's; a customer's token cannot write one", "internal"
            )
    elif form.internal and not agent:
        raise _invalid(
            "internal",
            f"an internal note is an agent's; {author.email} is not one of [desk] agents",
        )
    await _visible(api, who, ticket_id)
    cc = _copies(form.cc, desk)
    files = _files(form.attachments, policy)
    now = utcnow()
    filed: list[Filed] = []
    if agent:
        sender = formataddr((author.name, author.email)) if author.name else author.email

        def work(session: Session) -> Answer:
            try:
                result = reply(
                    session,
                    ticket_id,
                    agent=sender,
                    body=form.body,
                    cc=[a.email for a in cc],
                    attachments=files,
                    internal=form.internal,
                    policy=policy,
                    table=desk.table,
                    now=now,
                )
            except TicketNotFound:
                raise _not_found(ticket_id) from None
            except MailOff as exc:
                raise ProblemError(409, str(exc), kind="mail-off") from None
            except ReplyRefused as exc:
                raise _reply_refused(exc) from None
            return Answer(201, _agent_answer(result))

    else:
        context = filing_context(desk)
        try:
            thread = await api.database.read(lambda s: thread_of(s, policy, desk.table, ticket_id))
        except TicketNotFound:
            raise _not_found(ticket_id) from None
        except Unroutable as exc:
            raise ProblemError(409, str(exc), kind="no-route") from None
        form_reply = CustomerReply(author, form.body, cc, files)
        composed = await asyncio.to_thread(
            compose_reply,
            context,
            thread,
            form_reply,
            via=_via(who),
            peer=client_address(request),
            now=now,
        )

        def work(session: Session) -> Answer:
            done, added = file_reply(session, context, composed, thread, form_reply, now)
            filed.append(done)
            return Answer(201, _customer_answer(session, done, composed.message_id, added))

    try:
        answer = await _write(api, who, request, idempotency_key, work)
    except SubmitFailed as exc:
        log.error("a reply from the API was not filed", error=str(exc), token=who.name)
        raise ProblemError(500, f"the reply was not filed: {exc}") from None
    if agent:
        api.queued()
    _after_filing(api, filed)
    return _answer(answer, _location(ticket_id))


# Changing one.


@router.patch(
    "/tickets/{ticket_id}",
    summary="Change a ticket's status, priority, type, application, assignee or CCs (tickets set)",
    responses={
        200: {"description": "the ticket as changed, as GET /tickets/{id} shows it"},
        403: {"model": Problem, "description": "a customer's token (it cannot change tickets)"},
        404: {"model": Problem, "description": "no such ticket"},
    },
)
async def patch_ticket(
    ticket_id: TicketId,
    change: TicketChange,
    who: Writer,
    api: Api,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    if who.customer is not None:
        raise ProblemError(
            403,
            f"token {who.name!r} acts for a customer; changing tickets is the desk's",
            kind="not-this-customer",
        )
    given = change.model_fields_set
    for name in ("status", "priority", "type", "application"):
        if name in given and getattr(change, name) is None:
            raise _invalid(name, "must not be null (leave it out to keep it)")
    if not given - {"by", "remove_cc"} and not change.remove_cc:
        message = (
            "nothing to change: give status, priority, type, application, assignee or remove_cc"
        )
        raise ProblemError(422, message, kind="invalid-request", errors=[_field("", message)])
    desk = api.desk_context()
    try:
        by = check_agent(change.by, desk.agents, "by")
    except NotAllowed as exc:
        raise _invalid("by", str(exc).removeprefix("by: ")) from None
    changes = Changes(
        status=change.status,
        priority=change.priority,
        type=change.type,
        application=change.application,
        assignee=change.assignee,
        unassign="assignee" in given and change.assignee is None,
        remove_cc=tuple(change.remove_cc),
    )
    queued: list[bool] = []

    def work(session: Session) -> Answer:
        try:
            result = change_ticket(
                session, ticket_id, changes, by=by, context=desk, via=f"token {who.name}"
            )
        except TicketNotFound:
            raise _not_found(ticket_id) from None
        except NotAllowed as exc:
            text = str(exc)
            name = next((n for n in ("assignee", "remove_cc") if text.startswith(n)), "application")
            raise _invalid(name, text.removeprefix(f"{name}: ")) from None
        # a page, a notice, or (any change: ticket.updated) webhook events to send
        queued.append(bool(result.events) or result.page is not None or result.notice is not None)
        return Answer(200, show_ticket(session, ticket_id))

    answer = await _write(api, who, request, idempotency_key, work)
    if any(queued):
        api.queued()
    return _answer(answer)
