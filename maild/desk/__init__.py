"""The desk's side of a ticket: what agents do to it, shared by the CLI and the HTTP API."""
