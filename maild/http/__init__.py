"""maild over HTTP: one ASGI application served by uvicorn inside the daemon's loop.

server.py    HttpServer: uvicorn embedded (no signal handling), the socket, TLS,
             and the per-connection limits (connections, head and body timeouts)
app.py       build_app: /metrics, /healthz, /readyz and the API under /api/v1;
             ApiContext (what routes work with) and the `Api` dependency
auth.py      bearer tokens → Principal (name, scope, customer); `Reader`, `Writer`
limits.py    the body size cap; failed authentications per client address
problems.py  RFC 9457 problem+json for every error under /api/
health.py    CachedCheck: the probes' database check, off the loop, cached 1 s
"""
