"""Is this raw message verifiably from this domain? DKIM checked here, or the MTA's word.

A From header is typed by whoever sends the mail, so an agent's reply by mail
(issue 18) counts only when its domain is proven. `verify_sender` answers
with a `Verdict` by either of two paths, and never raises: a message that
cannot be verified is filed as ordinary customer mail, with the reason.

**Authentication-Results** (RFC 8601), when `trusted_authserv_id` names the
MTA that receives our mail: `dkim=pass` whose `header.d` (else the domain of
`header.i`) is the domain, or `dmarc=pass` whose `header.from` is. Anyone can
write such a header into a message, so only the receiving MTA's own are read,
the ones at the top of the header section. Read from the top:

- the fields the delivering MTA puts above everything (Return-Path,
  Delivered-To, X-Original-To) are passed over;
- then the MTA's block: Authentication-Results with the trusted authserv-id,
  and what the same MTA adds in the same pass beside them (ARC-Seal,
  ARC-Message-Signature, ARC-Authentication-Results, Received-SPF), with at
  most one Received field, the MTA's own, and that only before the first
  trusted Authentication-Results (Postfix's milters put theirs just below its
  Received; other MTAs put theirs above it);
- the block ends at any other field: a second Received, a Received after a
  trusted Authentication-Results, an Authentication-Results with another id,
  a From or a Subject. A trusted Authentication-Results below it was written
  by the sender (or a hop before ours) and is ignored, with the reason.

A trusted header longer than maild reads whole (`MAX_HEADER_CHARS`) is
ignored too: cut short, `header.d=altis-dxp.com.forger.example` would read
`header.d=altis-dxp.com`.

What the position rule cannot catch: a sender talking to our MX directly,
whose message starts with a forged header right where the MTA puts its own.
RFC 8601 section 5 makes that the MTA's job: it must remove headers carrying
its own authserv-id before adding its own (the field guide records that
Postfix with OpenDKIM and OpenDMARC does), and maild must accept mail from
that MTA alone.

**DKIM**, checked here with dkimpy when `verify_dkim`: a signature counts
only when its `d=` is the domain. Signatures by other domains are never
looked up in DNS (a hostile mail with fifty of them costs no query), at most
`MAX_SIGNATURES` of the domain's are checked, and one with `l=` (it signs
only the first bytes of the body, so text can be appended), with rsa-sha1
(RFC 8301) or without the From field in `h=` is refused. The
key is fetched through `dnsfunc` (dkimpy's convention: a name in, the TXT
record's bytes or None out), by default dnspython asking `dns_resolver` (or
the system's resolver) with `dns_timeout`. A lookup that fails or times out
means not verified, and the reason says the lookup failed.

Domains are compared exactly, ignoring case: a signature by
`mail.altis-dxp.com` does not prove mail From `altis-dxp.com`, nor the
reverse (DMARC's relaxed alignment would accept it; an agent domain is a
list entry, and the proof must name it). A message with more than one From
field is never verified (which From is the agent?).

Meant for mail whose From is an agent's; the DNS lookup blocks, so call it
from the filing worker's thread, never on the event loop. A DKIM signature
proves who wrote a message, not that it was sent to us: a signed mail can be
re-sent as it is (replayed).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import authres
import dkim
import dkim.util
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from maild.config import resolver_address
from maild.mail.parsing import MAX_HEADER_CHARS, HeaderBlock, repair_header_line_breaks
from maild.mail.text import one_line

MAX_SIGNATURES = 3  # of the domain's own DKIM signatures checked, topmost first
MAX_REASON_CHARS = 500
DnsFunc = Callable[..., bytes | None]

# What the delivering MTA puts above everything when it hands a message over.
_DELIVERY_FIELDS = frozenset({"return-path", "delivered-to", "x-original-to"})
# What an MTA adds beside its Authentication-Results in the same pass.
_SAME_PASS_FIELDS = frozenset(
    {"arc-seal", "arc-message-signature", "arc-authentication-results", "received-spf"}
)


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """How a sender's domain may be proven; from `[desk]`."""

    trusted_authserv_id: str | None = None  # the receiving MTA whose Authentication-Results count
    verify_dkim: bool = True  # check DKIM signatures here, with dkimpy
    dns_resolver: str | None = None  # "host" or "host:port" (an IP address); None: the system's
    dns_timeout: float = 5.0  # seconds for one DKIM key lookup


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether the message is proven to come from the domain, how, or why not."""

    verified: bool
    how: str  # when verified: "dkim d=altis-dxp.com s=sel", "authentication-results mx ..."
    reason: str  # when not: why, on one line, safe to store and show


class _LookupFailed(Exception):
    """A DKIM key lookup got no answer (a timeout, SERVFAIL, no resolver), which is not
    the same as an answer without a key."""


def verify_sender(
    raw: bytes,
    from_domain: str,
    policy: AuthPolicy,
    *,
    dnsfunc: DnsFunc | None = None,
) -> Verdict:
    """Whether `raw` is verifiably from `from_domain`: by the trusted MTA's
    Authentication-Results, or by a DKIM signature of that domain. Never raises.

    `from_domain` may be given as an address: its domain is taken. `dnsfunc`
    replaces the DNS lookup of DKIM keys (tests answer from a dict); by default
    dnspython asks the resolver `policy` names.
    """
    try:
        return _verify(raw, from_domain, policy, dnsfunc)
    except Exception as error:  # a library's surprise must not stop filing
        return _unverified(f"verification failed: {_why(error)}")


def _verify(raw: bytes, from_domain: str, policy: AuthPolicy, dnsfunc: DnsFunc | None) -> Verdict:
    domain = _domain(from_domain.rpartition("@")[2])
    if not domain:
        return _unverified("no From domain to verify")
    head = HeaderBlock.from_raw(repair_header_line_breaks(raw)[0])
    froms = len(head.all("from"))
    if froms != 1:
        return _unverified(
            f"{froms} From header fields: which one wrote it cannot be told"
            if froms
            else "no From header field"
        )
    reasons: list[str] = []
    if policy.trusted_authserv_id:
        verdict = _by_authentication_results(head.fields, domain, policy.trusted_authserv_id)
        if verdict.verified:
            return verdict
        reasons.append(verdict.reason)
    if policy.verify_dkim:
        lookup = dnsfunc or dns_txt(policy.dns_resolver, policy.dns_timeout)
        verdict = _by_dkim(raw, domain, lookup, policy.dns_timeout)
        if verdict.verified:
            return verdict
        reasons.append(verdict.reason)
    if not reasons:
        reasons.append("neither DKIM checking nor a trusted authserv-id is configured")
    return _unverified("; ".join(reasons))


def _unverified(reason: str) -> Verdict:
    return Verdict(verified=False, how="", reason=one_line(reason, MAX_REASON_CHARS, controls=True))


def _domain(text: str) -> str:
    """A domain as compared here: trimmed, lower-case, without a final dot."""
    return text.strip().lower().rstrip(".")


# Authentication-Results


def _by_authentication_results(
    fields: list[tuple[str, str]], domain: str, trusted_id: str
) -> Verdict:
    trusted = _domain(trusted_id)
    block, below = _trusted_block(fields, trusted)
    reasons: list[str] = []
    for value in block:
        if len(value) >= MAX_HEADER_CHARS:  # cut where it was read: a cut can forge a domain
            reasons.append(f"Authentication-Results from {trusted} too long to read whole: ignored")
            continue
        try:
            header = authres.all_features().parse_value(value)
        except Exception as error:  # authres raises its own SyntaxError and plain ones
            reasons.append(
                f"unparseable Authentication-Results from {trusted} ignored ({_why(error)})"
            )
            continue
        if _domain(str(header.authserv_id)) != trusted:  # read differently by authres
            reasons.append(f"Authentication-Results naming {header.authserv_id} ignored")
            continue
        for result in header.results:
            how = _passes(result, domain)
            if how:
                return Verdict(
                    verified=True, how=f"authentication-results {trusted} {how}", reason=""
                )
            said = _said(result, domain)
            if said:
                reasons.append(f"Authentication-Results from {trusted}: {said}")
    if not block:
        reasons.append(f"no Authentication-Results from {trusted} at the top of the header")
    elif not reasons:
        reasons.append(f"Authentication-Results from {trusted} report no pass for {domain}")
    if below:
        reasons.append(
            f"{below} Authentication-Results from {trusted} below the receiving MTA's own"
            " fields ignored (a sender can write them)"
        )
    return _unverified("; ".join(reasons))


def _trusted_block(fields: list[tuple[str, str]], trusted: str) -> tuple[list[str], int]:
    """The trusted Authentication-Results values at the top (the rule in the module's
    docstring), and how many with the trusted id stand below them."""
    block: list[str] = []
    received = False
    end = len(fields)
    for index, (name, value) in enumerate(fields):
        key = name.lower()
        if key == "authentication-results" and _authserv_id(value) == trusted:
            block.append(value)
        elif key == "received" and not block and not received:
            received = True  # the MTA's own, before its results
        elif not (key in _SAME_PASS_FIELDS or (key in _DELIVERY_FIELDS and not received)):
            end = index
            break
    below = sum(
        1
        for name, value in fields[end:]
        if name.lower() == "authentication-results" and _authserv_id(value) == trusted
    )
    return block, below


def _authserv_id(value: str) -> str:
    """The authserv-id an Authentication-Results value starts with (before any `;`,
    comment or version), lower-case."""
    text = re.sub(r"\([^()]*\)", " ", value.split(";", 1)[0])
    words = text.split()
    return _domain(words[0]) if words else ""


def _passes(result: authres.AuthenticationResult, domain: str) -> str:
    """`dkim=pass header.d=DOMAIN` or `dmarc=pass header.from=DOMAIN` when the result
    proves the domain, else ""."""
    if str(result.result).lower() != "pass":
        return ""
    method = str(result.method).lower()
    if method == "dkim" and _property_domain(result, "d", "i") == domain:
        return f"dkim=pass header.d={domain}"
    if method == "dmarc" and _property_domain(result, "from") == domain:
        return f"dmarc=pass header.from={domain}"
    return ""


def _said(result: authres.AuthenticationResult, domain: str) -> str:
    """A DKIM or DMARC result about `domain` that is not a pass (`dmarc=fail
    header.from=altis-dxp.com`), for the reason; "" for anything else."""
    method = str(result.method).lower()
    names = {"dkim": ("d", "i"), "dmarc": ("from",)}.get(method)
    if names is None or _property_domain(result, *names) != domain:
        return ""
    return f"{method}={one_line(result.result, 40)} header.{names[0]}={domain}"


def _property_domain(result: authres.AuthenticationResult, *names: str) -> str:
    """The domain in the first `header.NAME` property present: `header.d=x.com` is
    x.com, `header.i=@x.com` and `header.from=a@x.com` are x.com. A property given
    twice with different values names no domain."""
    values: dict[str, set[str]] = {}
    for prop in result.properties:
        if str(prop.type).lower() == "header":
            value = str(prop.value).strip().strip("<>")
            values.setdefault(str(prop.name).lower(), set()).add(_domain(value.rpartition("@")[2]))
    for name in names:
        if name in values:
            found = values[name]
            return found.pop() if len(found) == 1 else ""
    return ""


# DKIM


def _by_dkim(raw: bytes, domain: str, dnsfunc: DnsFunc, timeout: float) -> Verdict:
    log = _Capture()
    try:
        checker = dkim.DKIM(raw, logger=log.logger, timeout=timeout)
    except Exception as error:  # MessageFormatError: a header line dkimpy cannot read
        return _unverified(f"DKIM signatures cannot be read: {_why(error)}")
    ours, others = _signatures_by(checker, domain)
    if not ours:
        more = f" ({others} by other domains, not checked)" if others else ""
        return _unverified(f"no DKIM signature by {domain}{more}")
    reasons: list[str] = []
    lookups = _Lookups(dnsfunc, domain)
    for index, tags in ours[:MAX_SIGNATURES]:
        refused = _refused(tags)
        if refused:
            reasons.append(f"DKIM signature by {domain} {refused}")
            continue
        log.messages.clear()
        lookups.name = ""
        try:
            good = checker.verify(idx=index, dnsfunc=lookups)
        except _LookupFailed as error:
            reasons.append(str(error))
            break  # the domain's DNS is not answering: the next signature would wait as long
        except Exception as error:  # dkimpy's DKIMException, and odd input's ValueError & co
            reasons.append(f"DKIM signature by {domain} does not verify: {_why(error)}")
            continue
        if good:
            selector = tags.get(b"s", b"").decode("ascii", "replace")
            return Verdict(verified=True, how=f"dkim d={domain} s={selector}", reason="")
        reasons.append(f"DKIM signature by {domain} does not verify: {_false_why(lookups, log)}")
    if len(ours) > MAX_SIGNATURES:
        reasons.append(f"{len(ours) - MAX_SIGNATURES} more signatures by {domain} not checked")
    return _unverified("; ".join(reasons))


def _signatures_by(
    checker: dkim.DKIM, domain: str
) -> tuple[list[tuple[int, dict[bytes, bytes]]], int]:
    """The domain's signatures as (dkimpy's idx, tags), topmost first, and how many
    other domains' there are. Nothing is looked up here."""
    ours: list[tuple[int, dict[bytes, bytes]]] = []
    others = 0
    signatures = (v for n, v in checker.headers if n.lower() == b"dkim-signature")
    for index, value in enumerate(signatures):  # dkimpy's idx counts these, in this order
        try:
            tags = dkim.util.parse_tag_value(value)
        except dkim.util.InvalidTagValueList:
            continue  # not a signature of anyone's; nothing to look up
        if _domain(tags.get(b"d", b"").decode("ascii", "replace")) == domain:
            ours.append((index, tags))
        else:
            others += 1
    return ours, others


def _refused(tags: dict[bytes, bytes]) -> str:
    """Why a signature is not even checked, or ""."""
    if b"l" in tags:
        return "has l= (it signs only part of the body, so text can be added): refused"
    if tags.get(b"a", b"").strip().lower() == b"rsa-sha1":
        return "uses rsa-sha1 (RFC 8301: never valid): refused"
    signed = {h.strip().lower() for h in tags.get(b"h", b"").split(b":")}
    if b"from" not in signed:
        return "does not sign the From field: refused"
    return ""


def _why(error: BaseException) -> str:
    """An exception as a reason: its type and first words, without the hashes dkimpy
    appends to "body hash mismatch (got ..., expected ...)"."""
    text = one_line(str(error), 200).split(" (got ", 1)[0]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _false_why(lookups: _Lookups, log: _Capture) -> str:
    """Why dkimpy's verify answered False: it says so only in its log, or not at all."""
    if lookups.name and lookups.answer is None:
        return f"no DKIM key published at {lookups.name}"
    if log.messages:
        return one_line(log.messages[-1], 200)
    return f"the signature does not match the key published at {lookups.name}"


class _Lookups:
    """dkimpy's dnsfunc, guarded: only the domain's own `_domainkey` names are asked
    (dkimpy asks for `s=` under `d=`, already checked), and any failure of the
    lookup itself becomes `_LookupFailed`, which dkimpy does not catch. Keeps the
    last name asked and its answer, for the reason."""

    def __init__(self, dnsfunc: DnsFunc, domain: str) -> None:
        self._dnsfunc = dnsfunc
        self._suffix = f"._domainkey.{domain}"
        self.name = ""
        self.answer: bytes | None = None

    def __call__(self, name: bytes, timeout: float = 5.0) -> bytes | None:
        self.name, self.answer = _domain(name.decode("ascii", "replace")), None
        if not self.name.endswith(self._suffix):
            return None
        try:
            self.answer = self._dnsfunc(name, timeout=timeout)
        except Exception as error:
            raise _LookupFailed(f"DNS lookup of {self.name} failed: {_why(error)}") from error
        return self.answer


class _Capture(logging.Handler):
    """A logger private to one call (not registered, so nothing propagates to maild's
    logs) that keeps what dkimpy says at WARNING and above: its only word on some
    failures."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.logger = logging.Logger("maild.dkim", logging.WARNING)
        self.logger.addHandler(self)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# DNS


def dns_txt(resolver: str | None, timeout: float) -> DnsFunc:
    """The production dnsfunc: the TXT record at a name, by dnspython, through
    `resolver` ("host:port") or the system's; None when the name has none."""

    def lookup(name: bytes, timeout: float = timeout) -> bytes | None:
        try:
            answer = _resolver(resolver, timeout).resolve(
                dns.name.from_text(name.decode("ascii")),
                dns.rdatatype.TXT,
                search=False,
                lifetime=timeout,
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None  # a name without the record: "no key", not a failed lookup
        for record in answer:
            return b"".join(record.strings)
        return None

    return lookup


def _resolver(address: str | None, timeout: float) -> dns.resolver.Resolver:
    if address is None:
        found = dns.resolver.Resolver()
    else:
        host, port = resolver_address(address)
        found = dns.resolver.Resolver(configure=False)
        found.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
    found.timeout = found.lifetime = timeout
    return found
