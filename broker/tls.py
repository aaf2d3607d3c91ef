"""TLS files the broker's programs serve and trust, re-read when they change. A leaf: the
broker's HTTP server and the injector's webhook serve with ``CertificateReloader``; the
injector hands the agents the CA it reads with ``CaBundle``; the agent checks the CA it is
given with ``parse_ca_pem``.

Serving: cert-manager (or whoever rotates the certificate) rewrites the secret's files;
the kubelet swaps them in atomically behind a symlink. Every ``reload_s`` the files'
identity (inode, size, mtime, following symlinks) is compared with the last one loaded;
on a change both files are loaded into a fresh ``SSLContext``, and only a complete,
matching pair replaces the one in use. The listening socket keeps one server context
whose handshake callback hands each new connection the current context, so new
handshakes get the new certificate and connections already open are left alone. A pair
that does not load (half written, key and certificate from different rotations) keeps the
old one serving and is retried when the files change again.

Trusting: a CA bundle is public, so it may travel in a pod's spec (the agent's
``--ca-pem``); it must hold certificates and nothing else, never a key.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from broker.errors import ConfigError

log = logging.getLogger("broker.tls")

Stamp = tuple[tuple[int, int, int], ...]
# A CA bundle goes into every injected pod's spec: a few certificates, not a system store.
MAX_CA_BYTES = 64 * 1024
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")


def _stamp(*paths: Path) -> Stamp | None:
    try:
        stats = [os.stat(p) for p in paths]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("the key is encrypted; give an unencrypted key file")


def why_not_loaded(exc: Exception) -> str:
    """What went wrong loading a file, without its content."""
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    if isinstance(exc, ssl.SSLError):
        return f"{exc.reason or type(exc).__name__}".lower().replace("_", " ")
    return str(exc) or type(exc).__name__


def _context(cert_file: Path, key_file: Path) -> tuple[ssl.SSLContext, float]:
    """A server context for the pair, and the certificate's expiry (epoch seconds)."""
    try:
        leaf = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except ValueError:
        raise ValueError(f"{cert_file} does not start with a PEM certificate") from None
    key_file.open("rb").close()  # OpenSSL's own error would not say which file is missing
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file), password=_no_password)
    return context, leaf.not_valid_after_utc.timestamp()


class CertificateReloader:
    """The current certificate; ``check()`` is called every ``reload_s`` by the server.
    ``where`` names the configuration section in errors (``tls``, ``server.tls``)."""

    def __init__(self, cert_file: Path, key_file: Path, *, where: str = "tls") -> None:
        self._cert_file = cert_file
        self._key_file = key_file
        self._stamp = _stamp(cert_file, key_file)
        try:
            self._current, self.not_after = _context(cert_file, key_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"{where}: cannot load {cert_file} and {key_file}: {why_not_loaded(exc)}"
            ) from None
        self.reloads = 0
        self.failures = 0
        # The context the socket listens with: its only job is to hand every handshake
        # the current one.
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_context.load_cert_chain(str(cert_file), str(key_file), password=_no_password)
        self.server_context.sni_callback = self._select

    def _select(
        self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        # Called for every handshake, with or without SNI (server_name is then None).
        connection.context = self._current

    def check(self) -> bool:
        """Load the files again if they changed; True when a new pair is now served."""
        stamp = _stamp(self._cert_file, self._key_file)
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self._current, self.not_after = _context(self._cert_file, self._key_file)
        except (OSError, ValueError) as exc:
            self.failures += 1
            log.warning(
                "tls certificate not reloaded; the previous one is still served",
                extra={"error": why_not_loaded(exc), "cert_file": str(self._cert_file)},
            )
            return False
        self.reloads += 1
        log.info("tls certificate reloaded", extra={"cert_file": str(self._cert_file)})
        return True


def parse_ca_pem(text: str) -> str:
    """``text`` as a CA bundle: one or more PEM certificates and no other PEM block (a
    key in it would be published wherever the bundle goes). Returns the certificates
    re-encoded (comments and blank lines dropped); ``ValueError`` says what is wrong."""
    if len(text.encode()) > MAX_CA_BYTES:
        raise ValueError(f"larger than {MAX_CA_BYTES // 1024} KiB; expected a few CA certificates")
    kinds = _PEM_BLOCK.findall(text)
    if any("PRIVATE KEY" in kind for kind in kinds):
        raise ValueError("holds a private key; give the CA certificate(s) only")
    if not kinds:
        raise ValueError(
            "expected one or more PEM certificates (-----BEGIN CERTIFICATE-----), found none"
        )
    others = sorted({kind for kind in kinds if kind != "CERTIFICATE"})
    if others:
        raise ValueError(f"expected PEM certificates only, found {', '.join(others)}")
    try:
        certs = x509.load_pem_x509_certificates(text.encode())
    except ValueError:
        raise ValueError("a PEM certificate in it does not parse") from None
    if len(certs) != len(kinds):
        raise ValueError("a PEM certificate in it does not parse")
    pem = "".join(c.public_bytes(Encoding.PEM).decode() for c in certs)
    try:
        ssl.create_default_context(cadata=pem)
    except ssl.SSLError as exc:
        raise ValueError(f"OpenSSL refuses it as a CA bundle: {why_not_loaded(exc)}") from None
    return pem


def _read_ca(path: Path) -> str:
    with path.open("rb") as f:
        raw = f.read(MAX_CA_BYTES + 1)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("not PEM text (expected -----BEGIN CERTIFICATE-----)") from None
    return parse_ca_pem(text)


class CaBundle:
    """A CA bundle file, read at start (``ConfigError`` if it is missing or not a bundle)
    and again by ``current()`` whenever its stamp changes; a new content that is not a
    bundle keeps the previous one, with a warning."""

    def __init__(self, path: Path, *, where: str) -> None:
        self._path = path
        self._stamp = _stamp(path)
        try:
            self._pem = _read_ca(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}: {path}: {why_not_loaded(exc)}") from None
        self.reloads = 0
        self.failures = 0

    def current(self) -> str:
        """The bundle as PEM certificates; one ``stat`` when the file did not change."""
        stamp = _stamp(self._path)
        if stamp is None or stamp == self._stamp:
            return self._pem
        self._stamp = stamp
        try:
            self._pem = _read_ca(self._path)
        except (OSError, ValueError) as exc:
            self.failures += 1
            log.warning(
                "CA bundle not reloaded; the previous one is still used",
                extra={"error": why_not_loaded(exc), "ca_file": str(self._path)},
            )
            return self._pem
        self.reloads += 1
        log.info("CA bundle reloaded", extra={"ca_file": str(self._path)})
        return self._pem
