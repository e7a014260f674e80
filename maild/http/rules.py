"""The routing table over HTTP: GET /api/v1/rules/test, as `maild rules test --json`.

    GET /api/v1/rules/test?address=sysops@altis-dxp.com&from=ops@x.com&subject=Down

Answers 200 whether the address is accepted or not (`accepted` says; a refused one has
`reason` and `smtp_reply`). The table is the daemon's, as reloaded. A customer's token
gets 403: the table names the desk's internal addresses (notify) and files.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from maild.http.app import Api
from maild.http.auth import Reader
from maild.http.problems import PROBLEM_RESPONSES, ProblemError
from maild.routing.rules import MessageContext
from maild.routing.views import address_view

router = APIRouter(tags=["rules"], responses=PROBLEM_RESPONSES)


def _headers(values: list[str]) -> tuple[tuple[str, str], ...]:
    headers = []
    for index, value in enumerate(values):
        name, sep, text = value.partition("=")
        if not sep or not name.strip():
            message = "write NAME=VALUE, for example X-Priority=1"
            raise ProblemError(
                422,
                f"header: {message}",
                kind="invalid-request",
                errors=[{"field": f"header.{index}", "in": "query", "message": message}],
            )
        headers.append((name.strip(), text))
    return tuple(headers)


@router.get("/rules/test", summary="Where mail to ADDRESS goes: route, type, priority, page")
async def rules_test(
    who: Reader,
    api: Api,
    address: Annotated[str, Query(min_length=1, max_length=320, description="a recipient")],
    sender: Annotated[str, Query(alias="from", max_length=320, description="the From")] = "",
    subject: Annotated[str, Query(max_length=998)] = "",
    header: Annotated[list[str], Query(max_length=50, description="NAME=VALUE, repeatable")] = [],  # noqa: B006 (FastAPI copies a default)
) -> dict[str, Any]:
    if who.customer is not None:
        raise ProblemError(
            403,
            f"token {who.name!r} acts for a customer; the routing table is the desk's",
            kind="not-this-customer",
        )
    context = MessageContext(sender=sender, subject=subject, headers=_headers(header))
    return address_view(api.rules(), address, context)
