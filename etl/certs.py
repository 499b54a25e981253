"""What a TLS server presents, whether this machine trusts it, and what would make it trusted.

`check` needs more than aiohttp's "certificate verify failed": the chain as
presented (read with verification off, so it is there even when trust fails),
OpenSSL's own reason, and a trial answering "would pointing `ca_bundle` at the
presented chain fix it?". Everything here is blocking socket work, meant to run
in a thread; every socket has the caller's timeout.
"""

from __future__ import annotations

import base64
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from etl.transport import SAVE_CERTS_HINT, trust_bundle

MAX_PROXY_HEAD_BYTES = 16384


class ProxyRefused(OSError):
    """The proxy answered CONNECT with something other than 200."""


@dataclass(frozen=True)
class TlsReport:
    """One https host as this machine sees it."""

    host: str
    port: int
    chain: list[x509.Certificate]  # as presented, leaf first
    chain_complete: bool  # False: this Python could read only the leaf
    error: str | None  # OpenSSL's verification message; None when trusted
    ca_bundle_fixes: bool  # trusting the presented chain makes verification pass
    trusted_error: str | None = None  # OpenSSL's message with the presented chain trusted: what ca_bundle cannot fix

    @property
    def trusted(self) -> bool:
        return self.error is None


def open_connection(host: str, port: int, proxy: str | None, timeout: float) -> socket.socket:
    """A TCP connection to host:port, tunnelled through an http:// proxy with CONNECT when one is given."""
    if proxy is None:
        return socket.create_connection((host, port), timeout=timeout)
    parts = urlsplit(proxy)
    sock = socket.create_connection((parts.hostname or "", parts.port or 80), timeout=timeout)
    try:
        request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        if parts.username:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            request += f"Proxy-Authorization: Basic {base64.b64encode(credentials.encode()).decode()}\r\n"
        sock.sendall((request + "\r\n").encode("latin-1"))
        status_line = _read_head(sock).split("\r\n", 1)[0]
        if status_line.split()[1:2] != ["200"]:
            raise ProxyRefused(f"the proxy answered CONNECT {host}:{port} with {status_line!r}")
    except BaseException:
        sock.close()
        raise
    return sock


def _read_head(sock: socket.socket) -> str:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1024)
        if not chunk or len(head) > MAX_PROXY_HEAD_BYTES:
            raise ProxyRefused(f"the proxy closed the connection or sent no complete answer to CONNECT: {head[:80]!r}")
        head += chunk
    return head.decode("latin-1")


def inspect_tls(host: str, port: int, proxy: str | None, timeout: float, context: ssl.SSLContext) -> TlsReport:
    """Read the presented chain, verify it with `context`, and on failure try trusting the chain itself."""
    chain, complete = presented_chain(host, port, proxy, timeout)
    error = verification_error(host, port, proxy, timeout, context)
    fixes, trusted_error = False, None
    if error is not None and chain:
        trial = ssl.create_default_context()
        trust_bundle(trial, cadata=chain_pem(chain))
        trusted_error = verification_error(host, port, proxy, timeout, trial)
        fixes = trusted_error is None
    return TlsReport(host, port, chain, complete, error, fixes, trusted_error)


def presented_chain(host: str, port: int, proxy: str | None, timeout: float) -> tuple[list[x509.Certificate], bool]:
    """The certificates the server sends, leaf first, whether or not they are trusted."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with open_connection(host, port, proxy, timeout) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
        ders = _unverified_chain(tls)
        complete = ders is not None
        if ders is None:
            leaf = tls.getpeercert(binary_form=True)
            ders = [leaf] if leaf else []
    return [x509.load_der_x509_certificate(der) for der in ders], complete


def _unverified_chain(tls: ssl.SSLSocket) -> list[bytes] | None:
    """The whole presented chain as DER: public from Python 3.13, on the C object since 3.10."""
    getter = getattr(tls, "get_unverified_chain", None) or getattr(
        getattr(tls, "_sslobj", None), "get_unverified_chain", None
    )
    if getter is None:
        return None
    chain = getter() or []
    return [item if isinstance(item, bytes) else item.public_bytes(ssl._ssl.ENCODING_DER) for item in chain]  # type: ignore[attr-defined]


def verification_error(
    host: str, port: int, proxy: str | None, timeout: float, context: ssl.SSLContext
) -> str | None:
    """OpenSSL's reason for not trusting the server with `context` (host name included); None when trusted.

    Any other TLS failure (no common protocol, not TLS at all) is raised as ssl.SSLError.
    """
    try:
        with open_connection(host, port, proxy, timeout) as raw, context.wrap_socket(raw, server_hostname=host):
            return None
    except ssl.SSLCertVerificationError as exc:
        return str(exc.verify_message or exc.reason or exc)


def chain_pem(chain: list[x509.Certificate]) -> str:
    """PEM blocks, each preceded by its subject and fingerprint (OpenSSL skips text between blocks)."""
    blocks = []
    for cert in chain:
        pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        blocks.append(f"# subject: {subject(cert)}\n# issuer: {issuer(cert)}\n# sha256: {fingerprint(cert)}\n{pem}")
    return "".join(blocks)


def subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def issuer(cert: x509.Certificate) -> str:
    return cert.issuer.rfc4514_string() or "(empty issuer)"


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def describe(cert: x509.Certificate, now: datetime | None = None) -> list[str]:
    """Subject, issuer, validity and SHA-256 fingerprint, one line each."""
    now = now or datetime.now(UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if end < now:
        state = "EXPIRED"
    elif start > now:
        state = "NOT YET VALID"
    else:
        state = f"expires in {(end - now).days} days"
    return [
        f"subject  {subject(cert)}",
        f"issuer   {issuer(cert)}",
        f"valid    {start:%Y-%m-%d} to {end:%Y-%m-%d} ({state})",
        f"sha256   {fingerprint(cert)}",
    ]


def is_self_signed(cert: x509.Certificate) -> bool:
    """Issued by itself: same name and its own key verifies its signature."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def host_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses the certificate is valid for."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*names.get_values_for_type(x509.DNSName), *(str(ip) for ip in names.get_values_for_type(x509.IPAddress))]


def _beyond_trust(error: str | None, report: TlsReport) -> str | None:
    """A wrong name or dates, in words: what no trust store fixes."""
    error = (error or "").lower()
    if "mismatch" in error and report.chain:
        leaf = report.chain[0]
        return f"the certificate is for {', '.join(host_names(leaf)) or subject(leaf)}, not {report.host}"
    if "expired" in error or "not yet valid" in error:
        return "a certificate of the chain is outside its validity dates"
    return None


def diagnosis(report: TlsReport) -> str:
    """Which certificate is missing or wrong, in words: the root, an intermediate, the name, the dates."""
    if not report.chain:
        return "the server presented no certificate"
    top = report.chain[-1]
    if (wrong := _beyond_trust(report.error, report)) is not None:
        return wrong
    if is_self_signed(top):
        if len(report.chain) == 1:
            return "the server's certificate is self-signed: it is its own root, and that root is not in the trust store"
        return f"the root {subject(top)} that the server sends is not in the trust store"
    if is_ca(top):
        return f"the root CA {issuer(top)} is missing from the trust store (the presented chain stops at the intermediate {subject(top)})"
    return (
        f"the certificate of its issuer {issuer(top)} (an intermediate, or a private root CA) is missing: "
        "the server sends only its own certificate, and the trust store does not hold its issuer"
    )


def explain(report: TlsReport) -> list[str]:
    """OpenSSL's reason, what it means, and every presented certificate, for a chain that is not trusted."""
    found = diagnosis(report)
    lines = [f"OpenSSL: {report.error}", found]
    if (wrong := _beyond_trust(report.trusted_error, report)) is not None and wrong != found:  # once the issuer is trusted
        lines.append(f"with its issuer trusted, {wrong}")
    lines.append("presented chain:")
    for index, cert in enumerate(report.chain):
        lines += [f"  [{index}]", *(f"      {line}" for line in describe(cert))]
    if not report.chain_complete:
        lines.append("  (this Python shows only the leaf certificate; `openssl s_client -showcerts` shows all)")
    return lines


def fix_hint(report: TlsReport, config_keys: str, save_certs: str | None, ca_bundle: str = "") -> str:
    """What to do: trust the saved chain when that works, else what only the CA or the server can fix.

    A `ca_bundle` already set is added to, never replaced: it may hold the CA another host needs.
    """
    if (beyond := _unfixable_hint(report.error, report, config_keys)) is not None:
        return beyond
    if (beyond := _unfixable_hint(report.trusted_error, report, config_keys)) is not None:
        return f"{beyond}. Then trust {issuer(report.chain[-1])} too: its certificate, from the CA or the API's owners, in [api].ca_bundle"
    untrusted = f"{issuer(report.chain[-1])} is not a CA this machine trusts: " if report.chain else ""
    if ca_bundle:
        return _add_to_bundle_hint(report, untrusted, save_certs, ca_bundle)
    if report.ca_bundle_fixes and save_certs:
        return (
            f'{untrusted}this run saves the presented chain to {save_certs}: review it and set [api].ca_bundle = "{save_certs}"; '
            "trusting it makes this step pass"
        )
    if report.ca_bundle_fixes:
        return f"{untrusted}{SAVE_CERTS_HINT}; trusting the presented chain makes this step pass"
    missing = issuer(report.chain[-1]) if report.chain else "the issuing CA"
    return (
        f"ca_bundle with the presented chain would not fix this: get the certificate of {missing} from the CA or the "
        "API's owners (the server should also send its intermediates), and point [api].ca_bundle at it"
    )


def _add_to_bundle_hint(report: TlsReport, untrusted: str, save_certs: str | None, ca_bundle: str) -> str:
    """fix_hint's words for a configured ca_bundle that lacks the server's issuer."""
    lacking = f"{untrusted}[api].ca_bundle ({ca_bundle}) does not hold it"
    if not report.ca_bundle_fixes:
        missing = issuer(report.chain[-1]) if report.chain else "the issuing CA"
        return (
            f"{lacking}, and the presented chain would not fix this: get the certificate of {missing} from the CA or "
            f"the API's owners (the server should also send its intermediates), and add them to {ca_bundle}"
        )
    saved = (
        f"this run saves the presented chain to {save_certs}" if save_certs
        else "run `python -m etl check --save-certs chain.pem`"
    )
    return (
        f"{lacking}: {saved}, review the certificates, and add them to {ca_bundle} (keep the ones it holds: "
        "other hosts may need them); trusting the presented chain makes this step pass"
    )


def _unfixable_hint(error: str | None, report: TlsReport, config_keys: str) -> str | None:
    """What to do about a wrong name or dates: the only fixes are in the config or on the server."""
    error = (error or "").lower()
    if "mismatch" in error:
        names = ", ".join(host_names(report.chain[0])) if report.chain else "none"
        return f"use a host name the certificate names ({names}) in {config_keys}; ca_bundle cannot fix this"
    if "expired" in error or "not yet valid" in error:
        return "the API's owners must renew the certificate (or this machine's clock is wrong); ca_bundle cannot fix this"
    return None


def saved_pem(reports: list[TlsReport]) -> str:
    """The chains of several hosts in one PEM file, each headed by the host that presented it."""
    return "".join(f"# presented by {report.host}:{report.port}\n{chain_pem(report.chain)}" for report in reports)
