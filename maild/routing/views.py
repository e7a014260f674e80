"""How the routing table routes a message, as `maild rules test` and `rules explain`
show it (and the HTTP API's /rules/test): the JSON shapes of the contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from maild.errors import RecipientRefused
from maild.routing.rules import MessageContext, RuleTable, best_decision


def routing_view(
    table: RuleTable, recipients: Sequence[str], context: MessageContext
) -> dict[str, Any]:
    """How the table routes a message: per recipient every route tried, and the decision."""
    per_recipient = []
    decisions = []
    for recipient in recipients:
        entry: dict[str, Any] = {"recipient": recipient}
        try:
            decision = table.decide(recipient, context)
        except RecipientRefused as refused:
            entry.update(accepted=False, reason=refused.reason, smtp_reply=refused.smtp_reply)
        else:
            decisions.append(decision)
            route = table.route_named(decision.name)
            assert route is not None  # a decision names a route of the table that made it
            entry.update(
                accepted=True,
                decision={**decision.as_dict(), "file": route.file, "line": route.line},
                steps=[
                    {"route": st.route, "file": st.file, "line": st.line, "outcome": st.outcome}
                    for st in table.explain(recipient, context)
                ],
            )
        per_recipient.append(entry)
    chosen = best_decision(decisions).as_dict() if decisions else None
    return {
        "rules_version": table.version,
        "sender": context.sender,
        "subject": context.subject,
        "recipients": per_recipient,
        "decision": chosen,
    }


def address_view(table: RuleTable, address: str, context: MessageContext) -> dict[str, Any]:
    """`maild rules test ADDRESS --json`: accepted or not, the decision and every route
    tried; or why the address is refused at RCPT."""
    (entry,) = routing_view(table, [address], context)["recipients"]
    result: dict[str, Any] = {"address": address, "accepted": entry["accepted"]}
    if entry["accepted"]:
        result.update(entry["decision"])
        result["steps"] = entry["steps"]
    else:
        result.update(reason=entry["reason"], smtp_reply=entry["smtp_reply"])
    return result
