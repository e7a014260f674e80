"""The `maild` command: one module per command group, what they share in common.py.

The only place that turns errors into exit codes.

Exit codes: 0 done; 1 the thing asked for failed or was not found; 2 usage;
78 (EX_CONFIG) the config or rules are wrong. `maild ingest` follows sysexits
for MTAs: 0 stored, 65 too large, 67 unknown recipient, 75 try again later.
"""

from maild.cli import (
    acks,
    agents,
    db,
    filing,
    inbound,
    pages,
    reply,
    rules,
    serve,
    tickets,
    tokens,
    webhooks,
)
from maild.cli.common import main

__all__ = [
    "acks",
    "agents",
    "db",
    "filing",
    "inbound",
    "main",
    "pages",
    "reply",
    "rules",
    "serve",
    "tickets",
    "tokens",
    "webhooks",
]
