"""The webhook's serving certificate, reloaded when its files change.

cert-manager (or whoever rotates the certificate) rewrites the secret's files; the kubelet
swaps them in atomically behind a symlink. Every ``reload_s`` the files' identity
(inode, size, mtime, following symlinks) is compared with the last one loaded; on a
change both files are loaded into a fresh ``SSLContext``, and only a complete, matching
pair replaces the one in use. The listening socket keeps one server context whose
handshake callback hands each new connection the current context, so new handshakes get
the new certificate and connections already open are left alone. A pair that does not
load (half written, key and certificate from different rotations) keeps the old one
serving and is retried when the files change again.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

from cryptography import x509

from broker.errors import ConfigError

log = logging.getLogger("broker.injector.tls")

Stamp = tuple[tuple[int, int, int], ...]


def _stamp(*paths: Path) -> Stamp | None:
    try:
        stats = [os.stat(p) for p in paths]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def _context(cert_file: Path, key_file: Path) -> tuple[ssl.SSLContext, float]:
    """A server context for the pair, and the certificate's expiry (epoch seconds)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    leaf = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return context, leaf.not_valid_after_utc.timestamp()


class CertificateReloader:
    """The current certificate; ``check()`` is called every ``tls.reload_s`` by the
    server."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self._cert_file = cert_file
        self._key_file = key_file
        self._stamp = _stamp(cert_file, key_file)
        try:
            self._current, self.not_after = _context(cert_file, key_file)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"tls: cannot load {cert_file} and {key_file}: {type(exc).__name__}"
            ) from None
        self.reloads = 0
        self.failures = 0
        # The context the socket listens with: its only job is to hand every handshake
        # the current one.
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_context.load_cert_chain(str(cert_file), str(key_file))
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
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.failures += 1
            log.warning(
                "tls certificate not reloaded; the previous one is still served",
                extra={"error": type(exc).__name__, "cert_file": str(self._cert_file)},
            )
            return False
        self.reloads += 1
        log.info("tls certificate reloaded", extra={"cert_file": str(self._cert_file)})
        return True
