"""The daemon: every component built from the settings and wired in one place.

Start order: rules and acknowledgement templates (refuse to start on a broken
table or template, or on a paging route without a PagerDuty routing key),
database (reachable, schema present), pager, mailer and webhooks (send what an
earlier run left pending), processor (picks up what an earlier run left `received`),
then the listeners. Stop order is the reverse: stop
accepting, let open SMTP transactions finish (bounded by [smtp]
shutdown_timeout), commit what the spool holds, let the processor finish its
batch, let page, mail and webhook attempts in flight finish, close the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.engine import make_url

from maild import metrics
from maild.config import Settings, parse_hostport
from maild.desk.actions import DeskContext
from maild.errors import ConfigError, RulesError
from maild.filing.processing import Processor
from maild.http.health import CachedCheck
from maild.outbound.acks import AckPolicy
from maild.outbound.correspondence import DeskPolicy
from maild.outbound.mailer import Mailer, SmtpClient
from maild.outbound.pager import EventsClient, Pager
from maild.outbound.paging import EscalationPolicy
from maild.outbound.webhooks import WebhookSender
from maild.receive import systemd
from maild.receive.smtp import DataBudget, Handler, Listener, SessionLimits
from maild.receive.spool import Spool
from maild.routing.rules import RuleTable, load_rules
from maild.store.database import Database

if TYPE_CHECKING:  # imported when [http] listen is set: fastapi and uvicorn load only then
    from starlette.applications import Starlette

    from maild.http.server import HttpServer

log = structlog.get_logger("maild.service")
WATCH_DEBOUNCE_MS = 200  # an editor's save is often several writes
# The health checks' view of storage: a write younger than STORAGE_FRESH seconds that
# worked says mail can be stored; otherwise they write a probe row first (while writes
# fail, at most every PROBE_INTERVAL seconds).
STORAGE_FRESH = 30.0
PROBE_INTERVAL = 2.0
READY_TIMEOUT = 2.0  # the probes' database check gives up after this (or busy_timeout)


def check_paging(settings: Settings, table: RuleTable) -> None:
    """Refuse a table that pages on-call when pages could not be sent."""
    pagerduty = settings.pagerduty
    paging = [r for r in table.routes if r.page]
    if not paging or not pagerduty.enabled:
        return
    where = f"{settings.source}: [pagerduty]" if settings.source else "[pagerduty]"
    if not pagerduty.key():
        route = paging[0]
        raise ConfigError(
            f"{where} routing_key: route {route.name!r} ({route.file}:{route.line}) pages "
            "on-call (page = true) but no routing key is set; set routing_key or "
            "routing_key_file, or set enabled = false to record its pages as withheld"
        )
    if pagerduty.ca_file is not None and not pagerduty.ca_file.is_file():
        raise ConfigError(f"{where} ca_file: {pagerduty.ca_file}: no such file")


class Service:
    """maild serve: listeners, spool, processor and database for one settings file."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rules: RuleTable = load_rules(settings.rules.path)
        check_paging(settings, self.rules)
        self.policy = EscalationPolicy.from_settings(settings)
        self.acks = AckPolicy.from_settings(settings.outbound)
        self.correspondence = DeskPolicy.from_settings(settings, self.acks)
        self.database = Database(settings.database.url, settings.database.busy_timeout)
        claimer = f"{socket.gethostname()}:{settings.source or ''}"[:255]
        self.webhooks: WebhookSender | None = None
        if settings.webhook:
            try:
                self.webhooks = WebhookSender(self.database, settings.webhook, claimer)
            except ValueError as exc:  # an unreadable or invalid ca_file
                raise ConfigError(f"{settings.source}: {exc}") from None
        self.pager: Pager | None = None
        if settings.pagerduty.enabled and settings.pagerduty.key():
            try:
                client = EventsClient(settings.pagerduty)
            except (OSError, ValueError) as exc:  # an unreadable or invalid ca_file
                raise ConfigError(f"[pagerduty] ca_file: {exc}") from None
            self.pager = Pager(
                self.database,
                client,
                settings.pagerduty,
                claimer,
                webhooks=self.correspondence.webhooks,
                on_event=self.webhooks.notify if self.webhooks is not None else None,
            )
        self.mailer: Mailer | None = None
        if self.acks.enabled:
            try:
                smtp_client = SmtpClient(settings.outbound, settings.smtp.hostname or None)
            except (OSError, ValueError) as exc:  # an unreadable or invalid ca_file
                raise ConfigError(f"[outbound] ca_file: {exc}") from None
            self.mailer = Mailer(self.database, smtp_client, settings.outbound, claimer)
            if not Path(self.acks.templates.folder).is_dir():
                log.warning(
                    "the templates folder does not exist: acknowledgements use maild's "
                    "built-in text (copy templates/ there, or set [outbound] templates)",
                    templates=self.acks.templates.folder,
                )
        self.processor = Processor(
            self.database,
            rules=lambda: self.rules,
            workers=settings.processing.worker_count(),
            parse_timeout=settings.processing.parse_timeout,
            poll_interval=settings.processing.poll_interval,
            policy=self.policy,
            on_filed=self._outbox_queued,
            acks=lambda: self.acks,
            log=(settings.log.format, settings.log.level),
            desk=lambda: self.correspondence,
        )
        self.spool = Spool(self.database, on_stored=self.processor.notify)
        self._probe_lock = asyncio.Lock()
        self.listeners: list[Listener] = []
        self.addresses: dict[str, tuple[str, int]] = {}
        self._stop = asyncio.Event()
        self._watchdog: asyncio.Task[None] | None = None
        self._ready = False
        self.http: HttpServer | None = None
        # The probes' "does the database answer": cached 1 s, one at a time, off the loop.
        self.database_check = CachedCheck(
            self.database.check,
            timeout=min(READY_TIMEOUT, settings.database.busy_timeout),
            name="db-check",
        )
        self.rules_problems: list[str] = []  # of the last reload that failed, until one works
        self.rules_loaded_at = datetime.now(UTC)  # when the table in force was loaded
        self._watch_stop = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    def desk(self) -> DeskContext:
        """What the desk's actions need (desk/actions.py), with the rules current now."""
        return DeskContext(
            self.rules, self.policy, tuple(self.settings.desk.agents), self.correspondence
        )

    def reload_rules(self, trigger: str = "sighup") -> bool:
        """Swap in the rules table from disk; on any problem keep the current one.
        `trigger` (sighup, watch) labels maild_rules_reloads_total."""
        systemd.notify("RELOADING=1", systemd.monotonic_usec())
        try:
            ok = self._load_rules()
            ok = self._load_templates() and ok
            metrics.RELOADS.labels(trigger, "ok" if ok else "failed").inc()
            return ok
        finally:
            systemd.notify("READY=1", f"STATUS={self._status()}")

    def _load_templates(self) -> bool:
        try:
            acks = AckPolicy.from_settings(self.settings.outbound)
        except ConfigError as exc:
            log.error("templates reload failed; keeping the previous templates", problem=str(exc))
            return False
        self.acks, self.correspondence = acks, DeskPolicy.from_settings(self.settings, acks)
        return True

    def _load_rules(self) -> bool:
        try:
            table = load_rules(self.settings.rules.path)
            check_paging(self.settings, table)
        except (RulesError, ConfigError) as exc:
            problems = [str(p) for p in exc.problems] if isinstance(exc, RulesError) else [str(exc)]
            self.rules_problems = problems
            log.error(
                "rules reload failed; keeping the previous table",
                problems=problems,
                version=self.rules.version,
            )
            return False
        self.rules = table
        self.rules_problems = []
        self.rules_loaded_at = datetime.now(UTC)
        log.info("rules reloaded", version=table.version, routes=len(table.routes))
        return True

    async def _watch_rules(self) -> None:
        """Reload when a rules file changes; a broken file keeps the table in force."""
        import watchfiles

        folder = self.settings.rules.path
        try:
            async for changes in watchfiles.awatch(
                folder,
                stop_event=self._watch_stop,
                debounce=WATCH_DEBOUNCE_MS,
                recursive=False,
                watch_filter=lambda _change, path: path.endswith(".toml"),
            ):
                log.info("rules files changed", files=sorted({Path(p).name for _, p in changes}))
                self.reload_rules("watch")
        except Exception as exc:  # the folder vanished, inotify limits: SIGHUP still works
            log.error(
                "rules watcher stopped; reload with SIGHUP", folder=str(folder), error=str(exc)
            )

    def _outbox_queued(self, *_: object) -> None:
        if self.pager is not None:
            self.pager.notify()
        if self.mailer is not None:
            self.mailer.notify()
        if self.webhooks is not None:
            self.webhooks.notify()

    async def start(self) -> None:
        """Bring everything up; if any step fails, take down what was started and raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        await asyncio.to_thread(self.database.check)
        await asyncio.to_thread(self.database.ensure_schema, self.settings.source or "CONFIG")
        if self.pager is not None:
            await self.pager.start()
        if self.mailer is not None:
            await self.mailer.start()
        if self.webhooks is not None:
            await self.webhooks.start()
        self.processor.start()
        smtp = self.settings.smtp
        hostname = smtp.hostname or await asyncio.to_thread(socket.getfqdn)
        passed = systemd.passed_sockets()  # socket activation: systemd holds port 25
        if self.settings.console.enabled and not (self.settings.http.listen or "http" in passed):
            raise ConfigError(
                f"{self.settings.source or 'the config'}: [console] enabled = true needs "
                "[http] listen: the console is served on the HTTP listener"
            )
        wanted = [("smtp", smtp.listen)]
        if self.settings.lmtp.listen or "lmtp" in passed:
            wanted.append(("lmtp", self.settings.lmtp.listen or "127.0.0.1:0"))
        limits = SessionLimits(
            max_errors=smtp.max_errors,
            max_junk_commands=smtp.max_junk_commands,
            max_session_time=smtp.max_session_time,
            data_budget=DataBudget(smtp.max_data_memory),  # one for every listener
        )
        for protocol, listen in wanted:
            listener = Listener(
                protocol,
                Handler(
                    protocol, lambda: self.rules, self.spool, max_recipients=smtp.max_recipients
                ),
                hostname=hostname,
                max_message_size=smtp.max_message_size,
                timeout=smtp.timeout,
                max_connections=smtp.max_connections,
                max_connections_per_ip=smtp.max_connections_per_ip,
                limits=limits,
            )
            host, port = parse_hostport(listen)
            self.addresses[protocol] = await listener.start(host, port, passed.get(protocol))
            self.listeners.append(listener)
            metrics.UP.labels(protocol).set(1)
        if self.settings.http.listen or "http" in passed:
            self.http = self._http_server()
            self.addresses["http"] = await self.http.start(passed.get("http"))
        self._ready = True
        log.info(
            "maild started",
            listen={k: f"{h}:{p}" for k, (h, p) in self.addresses.items()},
            database=make_url(self.settings.database.url).render_as_string(hide_password=True),
            rules=str(self.settings.rules.path),
            rules_version=self.rules.version,
            routes=len(self.rules.routes),
        )
        if not self.settings.pagerduty.enabled:
            log.warning(
                "paging disabled ([pagerduty] enabled = false): pages are recorded as withheld",
                paging_routes=[r.name for r in self.rules.routes if r.page],
            )
        elif self.pager is not None:
            log.info(
                "paging on",
                events_url=self.settings.pagerduty.events_url,
                source=self.policy.source,
            )
        if self.mailer is not None:
            log.info(
                "acknowledgements on",
                smarthost=self.settings.outbound.smarthost,
                sender=self.acks.from_address,
                templates=self.acks.templates.folder,
            )
        else:
            log.info("acknowledgements off: no [outbound] smarthost")
        if self.settings.webhook:
            log.info(
                "webhooks on",
                webhooks={h.name: h.events for h in self.settings.webhook},
            )
        if self.settings.rules.watch:
            self._watcher = asyncio.create_task(self._watch_rules(), name="maild-rules-watch")
        systemd.notify("READY=1", f"STATUS={self._status()}")
        interval = systemd.watchdog_interval()
        if interval is not None:
            self._watchdog = asyncio.create_task(self._heartbeat(interval), name="maild-watchdog")

    def _http_server(self) -> HttpServer:
        """The HTTP listener: /metrics, /healthz, /readyz, and the API (maild/http)."""
        from maild.http import rules as rules_api
        from maild.http import tickets as tickets_api
        from maild.http.app import ApiContext, Ops, build_app
        from maild.http.server import HttpServer

        app = build_app(
            Ops(health=self._health, ready=self._readiness, backlog=self._backlog),
            ApiContext(
                database=self.database,
                settings=self.settings,
                rules=lambda: self.rules,
                queued=self._outbox_queued,
                desk=self.desk,
            ),
            self.settings.http,
            routers=[tickets_api.router, rules_api.router],
            console=self._console() if self.settings.console.enabled else None,
        )
        return HttpServer(app, self.settings.http)

    def _console(self) -> Starlette:
        """The desk console's pages (maild/console), mounted at /console."""
        from maild.console.app import ConsoleContext, RulesStatus, build_console

        return build_console(
            ConsoleContext(
                database=self.database,
                settings=self.settings,
                desk=self.desk,
                rules=lambda: RulesStatus(
                    self.rules, self.rules_loaded_at, list(self.rules_problems)
                ),
                queued=self._outbox_queued,
            )
        )

    def _status(self) -> str:
        listening = ", ".join(f"{k} on {h}:{p}" for k, (h, p) in self.addresses.items())
        return f"accepting mail: {listening}; rules {self.rules.version[:12]}"

    async def _heartbeat(self, interval: float) -> None:
        """WATCHDOG=1 from the event loop itself: a stuck loop misses it and systemd restarts us."""
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _backlog(self) -> dict[str, int]:
        from maild.store.inbound import backlog

        return await self.database.read(backlog)

    async def _health(self) -> dict[str, Any]:
        """What /healthz reports: each check, and the backlogs."""
        checks: dict[str, str] = {}
        for listener in self.listeners:
            checks[f"listener_{listener.protocol}"] = "ok" if listener.serving else "closed"
        checks["database"] = await self.database_check()
        backlog: dict[str, int] | None = None
        if checks["database"] == "ok":
            try:
                backlog = await asyncio.wait_for(self._backlog(), 5)
            except Exception as exc:
                checks["database"] = f"{type(exc).__name__}: {exc}"[:300]
        checks["storage"] = await self._storage()
        status = "ok" if all(v == "ok" for v in checks.values()) and self._ready else "failing"
        rules = {
            "version": self.rules.version,
            "routes": len(self.rules.routes),
            # A broken file does not stop mail (the last good table routes it), so it
            # does not fail the check; it is shown until a reload succeeds.
            "reload_problems": list(self.rules_problems),
        }
        return {"status": status, "checks": checks, "backlog": backlog, "rules": rules}

    async def _readiness(self) -> dict[str, Any]:
        """What /readyz reports: ready while maild accepts mail and can store it."""
        if not self._ready:
            return {"status": "not ready", "reason": "starting or stopping"}
        database = await self.database_check()
        if database != "ok":
            reason = f"mail cannot be stored: the database does not answer: {database}"
            return {"status": "not ready", "reason": reason}
        storage = await self._storage()
        if storage != "ok":
            return {"status": "not ready", "reason": f"mail cannot be stored: {storage}"}
        return {"status": "ready"}

    async def _storage(self) -> str:
        """ "ok" when mail can be stored now, else why not: the disk under a SQLite database
        has room for the largest message, and the last write (a spool commit, or the
        probe written here when that is stale or failed) worked."""
        full = self._disk_too_full()
        if full:
            return full
        storage = self.spool.storage
        loop = asyncio.get_running_loop()
        stale = loop.time() - storage.at >= (PROBE_INTERVAL if not storage.ok else STORAGE_FRESH)
        if stale and not self._probe_lock.locked():
            async with self._probe_lock:
                with contextlib.suppress(Exception):  # recorded in spool.storage
                    await self.spool.probe()
        return "ok" if storage.ok else storage.error or "the last write failed"

    def _disk_too_full(self) -> str:
        """Why the disk of a SQLite database cannot take the largest message, or ""."""
        path = self.database.file
        if path is None:
            return ""
        needed = 2 * self.settings.smtp.max_message_size  # the WAL, then the database file
        try:
            stat = os.statvfs(path.parent)
        except OSError as exc:
            return f"cannot read free space of {path.parent}: {exc.strerror or exc}"
        free = stat.f_bavail * stat.f_frsize
        if free < needed:
            return (
                f"disk nearly full: {free // 1024} KiB free in {path.parent}, a message of "
                f"[smtp] max_message_size needs up to {needed // 1024} KiB"
            )
        return ""

    async def stop(self) -> None:
        self._ready = False
        log.info("maild stopping")
        systemd.notify("STOPPING=1", "STATUS=stopping: finishing open transactions")
        if self._watchdog is not None:
            self._watchdog.cancel()  # systemd stops expecting heartbeats after STOPPING=1
        if self._watcher is not None:
            self._watch_stop.set()
            await self._watcher
        for listener in self.listeners:
            listener.stop_accepting()
        timeout = self.settings.smtp.shutdown_timeout
        cut: Sequence[int] = await asyncio.gather(*(lst.drain(timeout) for lst in self.listeners))
        if sum(cut):
            log.warning(
                "open transactions cut at shutdown; their senders will retry", transactions=sum(cut)
            )
        try:  # a hung database: its senders had their 451 at busy_timeout already
            async with asyncio.timeout(self.database.busy_timeout + 1):
                await self.spool.drain()
        except TimeoutError:
            log.warning("spool commits still hanging at shutdown; their senders got 451")
        await self.processor.stop(grace=timeout)
        if self.pager is not None:
            await self.pager.stop(grace=self.settings.pagerduty.timeout)
        if self.mailer is not None:
            await self.mailer.stop(grace=self.settings.outbound.timeout)
        if self.webhooks is not None:
            await self.webhooks.stop(grace=max(h.timeout for h in self.settings.webhook))
        for listener in self.listeners:
            metrics.UP.labels(listener.protocol).set(0)
        if self.http is not None:
            await self.http.stop()
        self.database_check.close()
        await asyncio.to_thread(self.database.close)
        log.info("maild stopped")

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (SIGHUP reloads the rules), stop."""
        loop = asyncio.get_running_loop()
        # Handlers first: a SIGTERM while starting stops maild cleanly once it has started.
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload_rules)
        try:
            await self.start()
            try:
                await self._stop.wait()
            finally:
                await self.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
