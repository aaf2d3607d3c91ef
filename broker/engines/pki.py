"""PKI: an X.509 certificate from Vault's PKI engine, in one of two modes.

``sign`` (recommended, what the sidecar uses): the workload sends a CSR, Vault signs it at
``<mount>/sign/<role>``, and the private key never leaves the workload. ``issue`` (the
default, for callers that cannot make a key): Vault generates the key pair at
``<mount>/issue/<role>`` and returns the private key once, in the response.

Either way the names come from the role's templates (``common_name``, ``alt_names``,
``uri_sans``, e.g. ``spiffe://td/{workload}``), never from the request, and Vault's role
constrains them on top. In ``sign`` mode the broker also reads the CSR: it must be one
valid PEM CSR, self-signed by an accepted key, and ask for no name the role does not
template (asking for none is fine). Vault is then sent the templated names, not the
CSR's; the Vault role must set ``use_csr_common_name=false`` and ``use_csr_sans=false``,
or it would take the CSR's names instead and silently drop the templated SANs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from broker.engines.base import Engine, Mode, VaultRequest, text_ref
from broker.vault.paths import vault_path

if TYPE_CHECKING:
    from broker.engines.role import RoleSettings

_KEEP = (
    "certificate",
    "private_key",
    "private_key_type",
    "ca_chain",
    "issuing_ca",
    "serial_number",
    "expiration",
)
_NAMES = frozenset({"common_name", "alt_names", "uri_sans"})

# A CSR for a handful of names is 1-3 KiB (RSA 8192: ~2.5 KiB); anything larger is not a
# workload's CSR, and is refused before it is parsed.
MAX_CSR_BYTES = 8192
_PEM_TYPES = ("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")
_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_RSA_BITS = (2048, 8192)
KEYS_ACCEPTED = "RSA 2048-8192 bits, ECDSA P-256/P-384/P-521 or Ed25519"


@dataclass(frozen=True)
class Csr:
    """A CSR that parsed and verified, with every name it asks for as (kind, value);
    kind is ``CN``, ``DNS``, ``IP``, ``URI``, ``email`` or ``other``."""

    pem: str
    names: frozenset[tuple[str, str]]

    def __repr__(self) -> str:
        return f"Csr(names={sorted(self.names)!r})"


def read_csr(value: Any) -> Csr:
    """The ``csr`` caller parameter: one PEM CSR with a valid self-signature by an
    accepted key, at most ``MAX_CSR_BYTES``. Messages never repeat what was sent."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a PEM certificate signing request as a non-empty string")
    if len(value.encode()) > MAX_CSR_BYTES:
        raise ValueError(f"too long (at most {MAX_CSR_BYTES} bytes)")
    pem = value.strip()
    if not any(
        pem.startswith(f"-----BEGIN {t}-----")
        and pem.endswith(f"-----END {t}-----")
        and pem.count("-----BEGIN ") == 1
        for t in _PEM_TYPES
    ):
        hint = " (this is a private key: send a CSR, keep the key)" if "PRIVATE KEY" in pem else ""
        raise ValueError(
            "expected exactly one PEM block '-----BEGIN CERTIFICATE REQUEST-----'" + hint
        )
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
        key = csr.public_key()
        valid = csr.is_signature_valid
        names = _csr_names(csr)
    except Exception:  # hostile input: cryptography raises ValueError, InvalidVersion,
        # DuplicateExtension, UnsupportedGeneralNameType, ...: all mean the same to the
        # caller, and none may become a 500.
        raise ValueError("not a valid PEM certificate signing request") from None
    if not _accepted_key(key):
        raise ValueError(f"the CSR's key type is not accepted; use {KEYS_ACCEPTED}")
    if not valid:
        raise ValueError("the CSR's signature does not verify with its own public key")
    return Csr(pem=pem + "\n", names=names)


def _accepted_key(key: Any) -> bool:
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_BITS[0] <= key.key_size <= _RSA_BITS[1]
    if isinstance(key, ec.EllipticCurvePublicKey):
        return isinstance(key.curve, _CURVES)
    return isinstance(key, ed25519.Ed25519PublicKey)


def _csr_names(csr: x509.CertificateSigningRequest) -> frozenset[tuple[str, str]]:
    names: set[tuple[str, str]] = set()
    for attr in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        names.add(("CN", _text(attr.value)))
    for ext in csr.extensions:  # raises on a malformed or duplicate extension
        if not isinstance(ext.value, x509.SubjectAlternativeName):
            continue  # Vault's sign ignores the CSR's other extensions (e.g. CA:TRUE)
        for gn in ext.value:
            if isinstance(gn, x509.DNSName):
                names.add(("DNS", gn.value))
            elif isinstance(gn, x509.IPAddress):
                names.add(("IP", str(gn.value)))
            elif isinstance(gn, x509.UniformResourceIdentifier):
                names.add(("URI", gn.value))
            elif isinstance(gn, x509.RFC822Name):
                names.add(("email", gn.value))
            else:  # otherName, directoryName, registeredID: never templated
                names.add(("other", type(gn).__name__))
    return frozenset(names)


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def allowed_names(params: Mapping[str, str]) -> frozenset[tuple[str, str]]:
    """Every (kind, value) a CSR may ask for under these rendered templates; DNS names and
    email addresses lower-cased (they compare without case), URIs as they are."""
    cn = params["common_name"].lower()
    alt = [n.lower() for n in _split(params.get("alt_names"))]
    out = {("CN", n) for n in (cn, *alt)}
    for n in (cn, *alt):
        out.add(("email", n) if "@" in n else ("DNS", n))
    out |= {("URI", u) for u in _split(params.get("uri_sans"))}
    return frozenset(out)


def _folded(kind: str, value: str) -> tuple[str, str]:
    # ASCII-only folding: str.lower() maps e.g. the Kelvin sign to "k", which would let a
    # CSR name that is not the templated one pass as it.
    if kind in ("CN", "DNS", "email") and value.isascii():
        return (kind, value.lower())
    return (kind, value)


class PkiEngine(Engine):
    name = "pki"
    kind = "x509_certificate"
    modes = {
        # ``issue`` stays the default so that existing roles keep their meaning; new roles
        # should say ``mode: sign``.
        "issue": Mode(templates=_NAMES, required_templates=frozenset({"common_name"})),
        "sign": Mode(
            templates=_NAMES,
            required_templates=frozenset({"common_name"}),
            caller={"csr": read_csr},
            required_caller=frozenset({"csr"}),
        ),
    }

    def _signs(self, role: RoleSettings) -> bool:
        return self.mode(role) is self.modes["sign"]

    def check_role(self, role: RoleSettings) -> None:
        for param in ("alt_names", "uri_sans"):
            template = role.params.get(param)
            if template is not None and len(_split(template)) != len(template.split(",")):
                raise ValueError(f"params.{param}: a comma-separated list without empty entries")
        for uri in _split(role.params.get("uri_sans")):
            scheme, sep, rest = uri.partition(":")
            if not (scheme and sep and rest) or any(c.isspace() for c in uri):
                raise ValueError(
                    "params.uri_sans: each entry must be a URI, e.g. spiffe://td/{workload}"
                )

    def check_caller(
        self, role: RoleSettings, params: Mapping[str, str], caller: Mapping[str, Any]
    ) -> None:
        csr = caller.get("csr")
        if not isinstance(csr, Csr):
            return
        allowed = allowed_names(params)
        extra = sorted({kind for kind, value in csr.names if _folded(kind, value) not in allowed})
        if extra:
            may = ", ".join(f"{k} {v}" for k, v in sorted(allowed))
            raise ValueError(
                f"csr: it asks for {', '.join(extra)} names this role does not issue; a CSR "
                f"may ask only for {may}, or for no names at all (the certificate gets the "
                "role's names either way)"
            )

    def request(
        self, role: RoleSettings, params: Mapping[str, str], caller: Mapping[str, Any], ttl: int
    ) -> VaultRequest:
        body: dict[str, Any] = {
            "common_name": params["common_name"],
            "ttl": f"{ttl}s",
            "format": "pem",
            "exclude_cn_from_sans": False,
        }
        for param in ("alt_names", "uri_sans"):
            if params.get(param):
                body[param] = ",".join(_split(params[param]))
        if self._signs(role):
            body["csr"] = caller["csr"].pem
            return VaultRequest("POST", vault_path(role.mount, "sign", role.vault_role), body, True)
        return VaultRequest("POST", vault_path(role.mount, "issue", role.vault_role), body, True)

    def identifier(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, str] | None:
        return text_ref(data, serial_number="serial_number")

    def shape(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, Any]:
        keep = _KEEP_SIGNED if self._signs(role) else _KEEP
        return {k: data[k] for k in keep if k in data}


# A signed CSR's answer never carries a key; should Vault ever add one, it is not passed on.
_KEEP_SIGNED = tuple(k for k in _KEEP if k not in ("private_key", "private_key_type"))
