"""Serving certificates as Kubernetes delivers them, for the TLS tests of the broker and
the injector: a throwaway CA (``trustme``), a directory laid out like a mounted secret
volume and rotated the way the kubelet rotates it, and the certificate a new handshake
gets."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import trustme


class SecretVolume:
    """A directory laid out like a mounted Kubernetes secret: ``tls.crt`` and ``tls.key``
    (and ``ca.crt``) are symlinks through ``..data`` to a timestamped directory, swapped
    as a whole."""

    NAMES = ("tls.crt", "tls.key", "ca.crt")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir(parents=True, exist_ok=True)
        for name in self.NAMES:
            (root / name).symlink_to(Path("..data") / name)

    def write(self, cert: bytes, key: bytes, ca: bytes = b"") -> None:
        self.generation += 1
        data = self.root / f"..2026_12_02_{self.generation:04d}"
        data.mkdir()
        (data / "tls.crt").write_bytes(cert)
        (data / "tls.key").write_bytes(key)
        (data / "ca.crt").write_bytes(ca)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(data.name)
        os.replace(tmp, self.root / "..data")  # the one atomic step

    def put(self, leaf: trustme.LeafCert, ca: trustme.CA | None = None) -> None:
        self.write(leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes(),
                   ca.cert_pem.bytes() if ca is not None else b"")

    @property
    def cert_file(self) -> Path:
        return self.root / "tls.crt"

    @property
    def key_file(self) -> Path:
        return self.root / "tls.key"

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.crt"


def der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts ``ca`` (and the system's CAs, which never sign these)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def served(url: str, client_ssl: ssl.SSLContext) -> bytes:
    """The certificate (DER) a new handshake with ``https://HOST:PORT`` gets."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port), ssl=client_ssl)
    try:
        obj = writer.get_extra_info("ssl_object")
        return bytes(obj.getpeercert(binary_form=True))
    finally:
        writer.close()
        await writer.wait_closed()
