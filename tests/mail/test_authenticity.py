"""Whether a mail is verifiably from an agent's domain: DKIM checked here, and the
receiving MTA's Authentication-Results, with forged ones ignored.

Keys are made here and DNS is answered by a dict through dkimpy's `dnsfunc`;
the dnspython path is run once against a small DNS server on loopback.
"""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import dkim
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from maild.config import resolver_address
from maild.mail.authenticity import (
    MAX_SIGNATURES,
    AuthPolicy,
    Verdict,
    verify_sender,
)
from maild.mail.parsing import MAX_HEADER_CHARS

DOMAIN = "altis-dxp.com"
MTA = "mx.altis-dxp.com"
SIGNED = [b"from", b"to", b"subject", b"date", b"message-id"]
DKIM_ONLY = AuthPolicy()
AR_ONLY = AuthPolicy(trusted_authserv_id=MTA, verify_dkim=False)


@dataclass
class Key:
    pem: bytes  # PKCS#1 private key, as dkim.sign takes it
    record: bytes  # the TXT record: v=DKIM1; k=rsa; p=<SubjectPublicKeyInfo, base64>


def make_key() -> Key:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(pem=pem, record=b"v=DKIM1; k=rsa; p=" + base64.b64encode(der))


@pytest.fixture(scope="module")
def key() -> Key:
    return make_key()


@dataclass
class Dns:
    """dkimpy's dnsfunc, answered from a dict; every name asked is recorded."""

    records: dict[str, bytes] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        text = name.decode().rstrip(".").lower()
        self.asked.append(text)
        return self.records.get(text)


@pytest.fixture
def dns_answers(key: Key) -> Dns:
    return Dns({f"sel._domainkey.{DOMAIN}": key.record})


def message(
    *,
    sender: str = f"Jo Bloggs <jo@{DOMAIN}>",
    body: bytes = b"Restarted the web tier; it is back.\r\n",
    top: bytes = b"",
) -> bytes:
    """A plain reply, CRLF throughout; `top` goes above its first field."""
    return (
        top + f"From: {sender}\r\n".encode() + b"To: support+t0k3n@altis-dxp.com\r\n"
        b"Subject: Re: [#42] Site down\r\n"
        b"Date: Thu, 03 Dec 2026 09:00:00 +0000\r\n"
        b"Message-ID: <reply-1@altis-dxp.com>\r\n"
        b"\r\n" + body
    )


def sign(raw: bytes, key: Key, domain: str = DOMAIN, **options: object) -> bytes:
    """The message with a DKIM-Signature by `domain` (selector `sel`) on top."""
    header = dkim.sign(raw, b"sel", domain.encode(), key.pem, include_headers=SIGNED, **options)
    return header + raw


def verify(raw: bytes, policy: AuthPolicy, dnsfunc: Dns | None = None) -> Verdict:
    return verify_sender(raw, DOMAIN, policy, dnsfunc=dnsfunc or Dns())


# DKIM


def test_a_valid_signature_by_the_agents_domain_is_verified(key: Key, dns_answers: Dns) -> None:
    """The signature's d= is the From domain and its key is published: verified."""
    verdict = verify(sign(message(), key), DKIM_ONLY, dns_answers)
    assert verdict == Verdict(verified=True, how=f"dkim d={DOMAIN} s=sel", reason="")
    assert dns_answers.asked == [f"sel._domainkey.{DOMAIN}"]


def test_domains_compare_without_case_and_a_final_dot(key: Key, dns_answers: Dns) -> None:
    """d=Altis-DXP.com and a From domain written `ALTIS-dxp.com.` are the same domain; an
    address is taken for its domain."""
    raw = sign(message(), key, domain="Altis-DXP.com")
    verdict = verify_sender(raw, "ALTIS-dxp.com.", DKIM_ONLY, dnsfunc=dns_answers)
    assert verdict.verified, verdict.reason
    assert verify_sender(raw, f"jo@{DOMAIN}", DKIM_ONLY, dnsfunc=dns_answers).verified
    assert verify_sender(raw, " ", DKIM_ONLY).reason == "no From domain to verify"


def test_a_body_altered_after_signing_is_not_verified(key: Key, dns_answers: Dns) -> None:
    """One word of the body changed in transit: the body hash no longer matches."""
    raw = sign(message(), key).replace(b"it is back", b"it is down")
    verdict = verify(raw, DKIM_ONLY, dns_answers)
    assert not verdict.verified
    assert verdict.how == ""
    assert verdict.reason.startswith(f"DKIM signature by {DOMAIN} does not verify: ")
    assert "body hash" in verdict.reason


def test_a_header_altered_after_signing_is_not_verified(key: Key, dns_answers: Dns) -> None:
    """A signed Subject changed: the header signature no longer matches."""
    raw = sign(message(), key).replace(b"Site down", b"Site up")
    verdict = verify(raw, DKIM_ONLY, dns_answers)
    assert not verdict.verified
    assert verdict.reason.startswith(f"DKIM signature by {DOMAIN} does not verify: ")


def test_a_signature_by_another_domain_is_never_looked_up(key: Key) -> None:
    """A forger signs with their own domain: not verified, and their key is never asked
    for (nor anything else)."""
    answers = Dns({"sel._domainkey.forger.example": key.record})
    verdict = verify(sign(message(), key, domain="forger.example"), DKIM_ONLY, answers)
    assert not verdict.verified
    assert verdict.reason == f"no DKIM signature by {DOMAIN} (1 by other domains, not checked)"
    assert answers.asked == []


def test_fifty_signatures_by_other_domains_cost_no_dns_query(key: Key) -> None:
    """A hostile mail stacked with signatures of other domains asks DNS nothing."""
    raw = message()
    for n in range(50):
        raw = sign(raw, key, domain=f"d{n}.forger.example")
    answers = Dns()
    verdict = verify(raw, DKIM_ONLY, answers)
    assert not verdict.verified
    assert "50 by other domains" in verdict.reason
    assert answers.asked == []


def test_a_subdomains_signature_does_not_prove_the_parent(key: Key) -> None:
    """d=mail.altis-dxp.com for mail From altis-dxp.com: exact match only, never asked."""
    answers = Dns({f"sel._domainkey.mail.{DOMAIN}": key.record})
    verdict = verify(sign(message(), key, domain=f"mail.{DOMAIN}"), DKIM_ONLY, answers)
    assert not verdict.verified
    assert answers.asked == []


def test_a_signature_with_a_body_length_limit_is_refused(key: Key, dns_answers: Dns) -> None:
    """l= signs only the first bytes of the body, so anything can be appended: refused
    without a lookup, even though the signature itself is valid."""
    raw = sign(message(), key, length=True)
    assert b" l=" in raw or b";l=" in raw.replace(b" ", b"")
    verdict = verify(raw + b"Also, wire the money.\r\n", DKIM_ONLY, dns_answers)
    assert not verdict.verified
    assert "l=" in verdict.reason
    assert "refused" in verdict.reason
    assert dns_answers.asked == []


def test_an_rsa_sha1_signature_is_refused(key: Key, dns_answers: Dns) -> None:
    """RFC 8301: rsa-sha1 is never valid, however well it verifies."""
    raw = sign(message(), key, signature_algorithm=b"rsa-sha1")
    verdict = verify(raw, DKIM_ONLY, dns_answers)
    assert (
        verdict.reason
        == f"DKIM signature by {DOMAIN} uses rsa-sha1 (RFC 8301: never valid): refused"
    )
    assert dns_answers.asked == []


def test_no_signature_is_not_verified(dns_answers: Dns) -> None:
    verdict = verify(message(), DKIM_ONLY, dns_answers)
    assert verdict == Verdict(False, "", f"no DKIM signature by {DOMAIN}")
    assert dns_answers.asked == []


def test_a_signature_whose_key_is_not_published_is_not_verified(key: Key) -> None:
    """The selector's name has no TXT record: not verified, the reason names the key."""
    answers = Dns()
    verdict = verify(sign(message(), key), DKIM_ONLY, answers)
    assert not verdict.verified
    assert f"sel._domainkey.{DOMAIN}" in verdict.reason
    assert answers.asked == [f"sel._domainkey.{DOMAIN}"]


def test_a_signature_checked_against_another_key_is_not_verified(key: Key) -> None:
    """The domain publishes a different key than the one that signed."""
    answers = Dns({f"sel._domainkey.{DOMAIN}": make_key().record})
    verdict = verify(sign(message(), key), DKIM_ONLY, answers)
    assert not verdict.verified
    assert verdict.reason.startswith(f"DKIM signature by {DOMAIN} does not verify")


def test_a_failing_lookup_is_not_verified_and_says_so(key: Key) -> None:
    """The dnsfunc raises (a resolver down): not verified, no exception, and the reason
    says the lookup failed; the next signature of the domain is not tried."""
    asked: list[bytes] = []

    def broken(name: bytes, timeout: float = 5) -> bytes | None:
        asked.append(name)
        raise OSError("resolver unreachable")

    raw = sign(sign(message(), key), key)
    verdict = verify_sender(raw, DOMAIN, DKIM_ONLY, dnsfunc=broken)
    assert not verdict.verified
    assert verdict.reason.startswith(f"DNS lookup of sel._domainkey.{DOMAIN} failed")
    assert "resolver unreachable" in verdict.reason
    assert len(asked) == 1


def test_at_most_a_few_of_the_domains_signatures_are_checked(key: Key) -> None:
    """Many broken signatures by the domain: only MAX_SIGNATURES lookups."""
    raw = message()
    for _ in range(MAX_SIGNATURES + 4):
        raw = sign(raw, key)
    raw = raw.replace(b"it is back", b"it is gone")  # breaks every body hash
    answers = Dns({f"sel._domainkey.{DOMAIN}": key.record})
    verdict = verify(raw, DKIM_ONLY, answers)
    assert not verdict.verified
    assert len(answers.asked) <= MAX_SIGNATURES
    assert "4 more signatures" in verdict.reason


def test_a_good_signature_after_a_broken_one_still_counts(key: Key, dns_answers: Dns) -> None:
    """A mailing list's broken signature above the agent's good one does not hide it."""
    raw = sign(message(), key)
    stale = sign(message(body=b"other text\r\n"), key).split(b"\r\nFrom:", 1)[0] + b"\r\n"
    verdict = verify(stale + raw, DKIM_ONLY, dns_answers)
    assert verdict.verified, verdict.reason


def test_a_signature_that_leaves_from_unsigned_is_refused(key: Key, dns_answers: Dns) -> None:
    """A signature over the body and Subject only would prove nothing about the From."""
    dkim_obj = dkim.DKIM(message())
    header = dkim_obj.sign(b"sel", DOMAIN.encode(), key.pem, include_headers=[b"from"])
    tampered = header.replace(b"h=from", b"h=subject")
    verdict = verify(tampered + message(), DKIM_ONLY, dns_answers)
    assert not verdict.verified
    assert verdict.reason == f"DKIM signature by {DOMAIN} does not sign the From field: refused"
    assert dns_answers.asked == []


def test_two_from_fields_are_never_verified(key: Key, dns_answers: Dns) -> None:
    """A second From prepended to a validly signed mail: which one sent it is unclear."""
    raw = b"From: ceo@altis-dxp.com\r\n" + sign(message(sender="x@" + DOMAIN), key)
    verdict = verify(raw, AuthPolicy(trusted_authserv_id=MTA), dns_answers)
    assert not verdict.verified
    assert verdict.reason.startswith("2 From header fields")
    assert verify(b"Subject: no sender\r\n\r\nhi\r\n", DKIM_ONLY).reason == "no From header field"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([DKIM_ONLY, AR_ONLY]))
def test_any_bytes_give_a_verdict_never_an_exception(raw: bytes, policy: AuthPolicy) -> None:
    verdict = verify_sender(b"DKIM-Signature: v=1; d=altis-dxp.com; s=s\r\n" + raw, DOMAIN, policy)
    assert not verdict.verified
    assert "\n" not in verdict.reason
    assert verdict.reason


# Authentication-Results

RECEIVED = (
    b"Received: from mail-ed1.altis-dxp.com (mail-ed1.altis-dxp.com [192.0.2.7])\r\n"
    b"\tby mx.altis-dxp.com (Postfix) with ESMTPS id 4B8F4C1\r\n"
    b"\tfor <support@altis-dxp.com>; Thu,  3 Dec 2026 09:00:01 +0000 (UTC)\r\n"
)
UPSTREAM = b"Received: by mail-ed1.altis-dxp.com with SMTP id q1so; Thu, 3 Dec 2026\r\n"


def ar(value: str, authserv_id: str = MTA) -> bytes:
    return f"Authentication-Results: {authserv_id}; {value}\r\n".encode()


def test_the_mtas_dkim_pass_for_the_domain_is_verified() -> None:
    raw = message(top=RECEIVED + ar(f"dkim=pass header.d={DOMAIN}") + UPSTREAM)
    assert verify(raw, AR_ONLY) == Verdict(
        True, f"authentication-results {MTA} dkim=pass header.d={DOMAIN}", ""
    )


def test_the_mtas_dkim_pass_by_header_i_is_verified() -> None:
    raw = message(top=RECEIVED + ar(f"dkim=pass header.i=@{DOMAIN}") + UPSTREAM)
    assert verify(raw, AR_ONLY).verified


def test_the_mtas_dmarc_pass_for_the_domain_is_verified() -> None:
    raw = message(top=RECEIVED + ar(f"dmarc=pass (p=reject dis=none) header.from={DOMAIN}"))
    assert verify(raw, AR_ONLY) == Verdict(
        True, f"authentication-results {MTA} dmarc=pass header.from={DOMAIN}", ""
    )


def test_a_dmarc_fail_is_not_verified_and_says_so() -> None:
    raw = message(top=RECEIVED + ar(f"dmarc=fail (p=reject) header.from={DOMAIN}"))
    verdict = verify(raw, AR_ONLY)
    assert not verdict.verified
    assert f"Authentication-Results from {MTA}: dmarc=fail header.from={DOMAIN}" in verdict.reason


def test_a_pass_for_another_domain_proves_nothing() -> None:
    """dkim=pass for the forger's own domain, dmarc=pass for a subdomain: neither counts."""
    raw = message(
        top=RECEIVED
        + ar("dkim=pass header.d=forger.example")
        + ar(f"dmarc=pass header.from=mail.{DOMAIN}")
    )
    verdict = verify(raw, AR_ONLY)
    assert not verdict.verified
    assert f"report no pass for {DOMAIN}" in verdict.reason


def test_an_untrusted_authserv_id_is_ignored() -> None:
    """The same header from a server we do not run counts for nothing."""
    raw = message(top=RECEIVED + ar(f"dmarc=pass header.from={DOMAIN}", "mx.forger.example"))
    verdict = verify(raw, AR_ONLY)
    assert not verdict.verified
    assert f"no Authentication-Results from {MTA} at the top" in verdict.reason


def test_authserv_ids_compare_without_case() -> None:
    raw = message(top=RECEIVED + ar(f"dmarc=pass header.from={DOMAIN}", "MX.Altis-DXP.com"))
    assert verify(raw, AR_ONLY).verified


def test_a_forged_trusted_header_below_the_upstream_received_is_ignored() -> None:
    """The sender wrote `mx.altis-dxp.com; dmarc=pass` into their mail: it stands below
    the hop before ours, and below our MTA's own (dmarc=fail) header."""
    forged = ar(f"dmarc=pass header.from={DOMAIN}")
    raw = message(top=RECEIVED + ar(f"dmarc=fail header.from={DOMAIN}") + UPSTREAM + forged)
    verdict = verify(raw, AR_ONLY)
    assert not verdict.verified
    assert "1 Authentication-Results from" in verdict.reason
    assert "below the receiving MTA's own fields ignored" in verdict.reason


def test_a_forged_trusted_header_below_the_mtas_received_when_it_writes_above() -> None:
    """An MTA that puts its results above its Received: a trusted header below that
    Received came with the message (sent straight to our MX), and is ignored."""
    forged = ar(f"dkim=pass header.d={DOMAIN}")
    raw = message(top=ar("dkim=none") + RECEIVED + forged)
    verdict = verify(raw, AR_ONLY)
    assert not verdict.verified
    assert "below the receiving MTA's own fields ignored" in verdict.reason


def test_a_forged_trusted_header_after_other_fields_is_ignored() -> None:
    """Anything that is not the MTA's work (here an X-Mailer) ends the trusted block."""
    forged = ar(f"dkim=pass header.d={DOMAIN}")
    raw = message(top=RECEIVED + b"X-Mailer: Forger 1.0\r\n" + forged)
    assert not verify(raw, AR_ONLY).verified


def test_a_second_received_ends_the_block() -> None:
    """Trusted results below two Received fields were there before our MTA's hop."""
    raw = message(top=RECEIVED + UPSTREAM + ar(f"dmarc=pass header.from={DOMAIN}"))
    assert not verify(raw, AR_ONLY).verified


def test_a_postfix_style_block_with_arc_is_read() -> None:
    """As Postfix with OpenARC, OpenDMARC and OpenDKIM writes them: the delivery fields,
    its Received, then its results interleaved with ARC fields, comments, quoted
    header.b values and a folded header; the dkim=pass is the third result header."""
    top = (
        b"Return-Path: <jo@altis-dxp.com>\r\n"
        b"Delivered-To: support@altis-dxp.com\r\n"
        + RECEIVED
        + ar("arc=none smtp.client-ip=192.0.2.7")
        + b"ARC-Seal: i=1; a=rsa-sha256; d=altis-dxp.com; s=arc; t=1; cv=none; b=AAAA\r\n"
        b"ARC-Authentication-Results: i=1; mx.altis-dxp.com; dmarc=pass header.from=x\r\n"
        + ar("spf=pass smtp.mailfrom=altis-dxp.com")
        + b"Authentication-Results: mx.altis-dxp.com;\r\n"
        b"\tdkim=pass (2048-bit key; unprotected) header.d=altis-dxp.com header.i=@altis-dxp.com"
        b' header.b="WJwanzQJ";\r\n'
        b"\tdkim=pass (2048-bit key) header.d=mailer.example header.b=tfTnNq0O\r\n" + UPSTREAM
    )
    verdict = verify(message(top=top), AR_ONLY)
    assert verdict.verified, verdict.reason
    assert verdict.how == f"authentication-results {MTA} dkim=pass header.d={DOMAIN}"


def test_an_unparseable_trusted_header_is_ignored_with_a_reason() -> None:
    raw = message(top=RECEIVED + ar(f"dkim=pass header.d={DOMAIN}; dkim"))
    verdict = verify(raw, AR_ONLY)
    assert not verdict.verified
    assert "unparseable Authentication-Results" in verdict.reason


def test_a_trusted_header_too_long_to_read_whole_is_ignored() -> None:
    """Header values are read up to MAX_HEADER_CHARS. A result cut there could read
    `header.d=altis-dxp.com` where the MTA wrote `header.d=altis-dxp.com.forger.example`
    (a forger's many signatures make the header that long): such a value is ignored."""
    head, tail = f"{MTA}; dkim=pass (", f") header.d={DOMAIN}"
    size = MAX_HEADER_CHARS - len(head) - len(tail)
    comment = "".join(" " if (i + 1) % 70 == 0 else "x" for i in range(size - 1)) + "x"
    value = head + comment + tail + ".forger.example"
    field = ("Authentication-Results: " + value.replace(" ", "\r\n ") + "\r\n").encode()
    verdict = verify(message(top=RECEIVED + field), AR_ONLY)
    assert not verdict.verified
    assert verdict.reason.startswith(f"Authentication-Results from {MTA} too long to read whole")


def test_a_header_dkimpy_cannot_read_keeps_the_other_reason() -> None:
    """A stray line without a colon in the header: dkimpy refuses the whole message, the
    verdict says so next to what the MTA said."""
    top = RECEIVED + ar(f"dmarc=fail header.from={DOMAIN}") + b"not a header line\r\n"
    verdict = verify(message(top=top), AuthPolicy(trusted_authserv_id=MTA))
    assert not verdict.verified
    assert f"dmarc=fail header.from={DOMAIN}; DKIM signatures cannot be read: " in verdict.reason


def test_without_a_trusted_authserv_id_results_are_ignored_entirely() -> None:
    """No trusted_authserv_id: even a perfect header from our MTA's name counts nothing."""
    raw = message(top=RECEIVED + ar(f"dmarc=pass header.from={DOMAIN}"))
    verdict = verify(raw, AuthPolicy(verify_dkim=False))
    assert not verdict.verified
    assert verdict.reason == "neither DKIM checking nor a trusted authserv-id is configured"
    assert not verify(raw, DKIM_ONLY).verified


def test_with_verify_dkim_off_only_the_mtas_word_counts(key: Key, dns_answers: Dns) -> None:
    """A validly signed mail without the MTA's header: not verified, DNS never asked."""
    verdict = verify(sign(message(), key), AR_ONLY, dns_answers)
    assert not verdict.verified
    assert dns_answers.asked == []


def test_either_path_suffices_and_both_reasons_are_given(key: Key, dns_answers: Dns) -> None:
    """With both paths on, a DKIM pass verifies even when the MTA said dmarc=fail; when
    both fail the reason has both."""
    both = AuthPolicy(trusted_authserv_id=MTA)
    fail = RECEIVED + ar(f"dmarc=fail header.from={DOMAIN}")
    assert verify(fail + sign(message(), key), both, dns_answers).verified
    verdict = verify(message(top=fail), both, dns_answers)
    assert not verdict.verified
    assert verdict.reason == (
        f"Authentication-Results from {MTA}: dmarc=fail header.from={DOMAIN};"
        f" no DKIM signature by {DOMAIN}"
    )


# The real dnspython path


class TinyDns:
    """A UDP DNS server on 127.0.0.1: answers TXT at the names it holds, NXDOMAIN for
    the rest; or, `silent`, reads queries and never answers."""

    def __init__(self, records: dict[str, bytes], *, silent: bool = False) -> None:
        self.records = records
        self.silent = silent
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                wire, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            self.queries += 1
            if self.silent:
                continue
            query = dns.message.from_wire(wire)
            response = dns.message.make_response(query)
            question = query.question[0]
            record = self.records.get(question.name.to_text().rstrip(".").lower())
            if record is None or question.rdtype != dns.rdatatype.TXT:
                response.set_rcode(dns.rcode.NXDOMAIN)
            else:
                chunks = [record[i : i + 255] for i in range(0, len(record), 255)]
                txt = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)
                response.answer.append(dns.rrset.from_rdata(question.name, 300, txt))
            response.flags |= dns.flags.AA
            self.sock.sendto(response.to_wire(), peer)


@pytest.fixture
def tiny_dns(request: pytest.FixtureRequest, key: Key) -> Iterator[TinyDns]:
    server = TinyDns({f"sel._domainkey.{DOMAIN}": key.record}, silent=request.param)
    server.thread.start()
    yield server
    server.stopping.set()
    server.thread.join()
    server.sock.close()


@pytest.mark.parametrize("tiny_dns", [False], indirect=True)
def test_the_dnspython_lookup_through_a_configured_resolver(key: Key, tiny_dns: TinyDns) -> None:
    """No dnsfunc: dnspython asks dns_resolver ("127.0.0.1:PORT") for the key, which is
    longer than one TXT string (split in 255-byte chunks and joined back)."""
    policy = AuthPolicy(dns_resolver=f"127.0.0.1:{tiny_dns.port}", dns_timeout=2.0)
    verdict = verify_sender(sign(message(), key), DOMAIN, policy)
    assert verdict.verified, verdict.reason
    assert tiny_dns.queries == 1
    upper = verify_sender(sign(message(), key, domain=DOMAIN.upper()), "ALTIS-DXP.COM", policy)
    assert upper.verified  # the name is asked as the signature writes it; DNS ignores case
    nxdomain = verify_sender(
        dkim.sign(message(), b"gone", DOMAIN.encode(), key.pem, include_headers=SIGNED) + message(),
        DOMAIN,
        policy,
    )
    assert not nxdomain.verified
    assert "gone._domainkey.altis-dxp.com" in nxdomain.reason


@pytest.mark.parametrize("tiny_dns", [True], indirect=True)
def test_a_resolver_that_never_answers_times_out(key: Key, tiny_dns: TinyDns) -> None:
    """dns_timeout=0.5 against a server that reads and never answers: not verified
    within about that time, and the reason says the lookup failed."""
    policy = AuthPolicy(dns_resolver=f"127.0.0.1:{tiny_dns.port}", dns_timeout=0.5)
    verdict = verify_sender(sign(message(), key), DOMAIN, policy)
    assert not verdict.verified
    assert verdict.reason.startswith(f"DNS lookup of sel._domainkey.{DOMAIN} failed")
    assert tiny_dns.queries >= 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("10.0.0.53:5353", ("10.0.0.53", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        (" 192.0.2.1 ", ("192.0.2.1", 53)),
    ],
)
def test_resolver_addresses(text: str, expected: tuple[str, int]) -> None:
    assert resolver_address(text) == expected


@pytest.mark.parametrize("text", ["", "dns.example", "1.2.3.4:0", "1.2.3.4:x", "[::1", "[::1]x"])
def test_bad_resolver_addresses(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (ipaddress and int say different things)
        resolver_address(text)


def test_a_bad_resolver_setting_is_a_failed_lookup_not_an_exception(key: Key) -> None:
    verdict = verify_sender(sign(message(), key), DOMAIN, AuthPolicy(dns_resolver="dns.example"))
    assert not verdict.verified
    assert verdict.reason.startswith(f"DNS lookup of sel._domainkey.{DOMAIN} failed")
