"""One-off Vault configuration with hvac: the dev server's mounts, roles and policies.

Used by ``broker dev`` and by the test harness, so that both run against the same setup.
Synchronous (hvac); callers run it in a thread. Production Vaults are configured by their
operators; ``deploy/vault-setup.md`` shows the same steps as CLI commands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

import hvac

BROKER_POLICY = "broker"
INSTANCE_POLICY = "broker-instance"
TOKEN_ROLE = "broker-instance"
PKI_MOUNT = "pki"
PKI_ROLE = "dev-cert"
PKI_DOMAIN = "workload.internal"
DB_MOUNT = "database"
DB_CONNECTION = "dev-postgres"
DB_ROLE = "dev-db"
TRANSIT_MOUNT = "transit"
AUDIT_KEY = "broker-audit"
OIDC_KEY = "broker"
OIDC_ROLE = "dev-oidc"  # an identity OIDC role: tokens for the instance's entity
OIDC_TTL = "5m"


def broker_policy(
    token_role: str = TOKEN_ROLE, transit_mount: str = TRANSIT_MOUNT, audit_key: str = AUDIT_KEY
) -> str:
    """What the broker's own token may do: mint instance tokens through one role, revoke
    them by accessor, renew, revoke and look up leases, and sign audit checkpoints with one
    transit key (and read its public keys). Nothing else."""
    return f"""
path "auth/token/create/{token_role}" {{ capabilities = ["update"] }}
path "auth/token/revoke-accessor" {{ capabilities = ["update"] }}
path "auth/token/lookup-accessor" {{ capabilities = ["update"] }}
path "sys/leases/renew" {{ capabilities = ["update"] }}
path "sys/leases/revoke" {{ capabilities = ["update"] }}
path "sys/leases/lookup" {{ capabilities = ["update"] }}
path "sys/leases/lookup/*" {{ capabilities = ["list", "sudo"] }}
path "sys/leases" {{ capabilities = ["read", "sudo"] }}
path "{transit_mount}/sign/{audit_key}" {{ capabilities = ["update"] }}
path "{transit_mount}/keys/{audit_key}" {{ capabilities = ["read"] }}
"""


def instance_policy(pki_mount: str = PKI_MOUNT, db_mount: str = DB_MOUNT) -> str:
    """What an instance token may read: the demo credential paths, nothing more."""
    return f"""
path "{pki_mount}/issue/{PKI_ROLE}" {{ capabilities = ["update"] }}
path "{db_mount}/creds/{DB_ROLE}" {{ capabilities = ["read"] }}
path "identity/oidc/token/{OIDC_ROLE}" {{ capabilities = ["read"] }}
"""


@dataclass(frozen=True)
class OidcRole:
    name: str
    client_id: str  # the ``aud`` of its tokens: what an IAM OIDC provider lists
    issuer: str  # the ``iss`` of its tokens: <issuer>/v1/identity/oidc


@dataclass(frozen=True)
class DevVault:
    broker_token: str = field(repr=False)  # never in a test's failure output
    database_configured: bool
    ca_pem: str
    oidc: OidcRole  # the dev-oidc role's audience and issuer


def _vault_connection_url(postgres_url: str) -> tuple[str, str | None, str | None]:
    parts = urlsplit(postgres_url.replace("postgresql+psycopg://", "postgresql://"))
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 5432
    db = (parts.path or "/postgres").lstrip("/") or "postgres"
    user = unquote(parts.username) if parts.username else "postgres"
    password = unquote(parts.password) if parts.password else None
    if password:
        url = f"postgresql://{{{{username}}}}:{{{{password}}}}@{host}:{port}/{db}?sslmode=disable"
        return url, user, password
    return f"postgresql://{quote(user)}@{host}:{port}/{db}?sslmode=disable", None, None


def bootstrap_dev(
    addr: str,
    root_token: str,
    *,
    postgres_url: str | None,
    instance_token_ttl: int = 24 * 3600,
    role_max_ttl: int = 3600,
) -> DevVault:
    client = hvac.Client(url=addr, token=root_token, timeout=30)
    mounts = client.sys.list_mounted_secrets_engines()["data"]

    if f"{PKI_MOUNT}/" not in mounts:
        client.sys.enable_secrets_engine("pki", path=PKI_MOUNT, config={"max_lease_ttl": "87600h"})
        client.secrets.pki.generate_root(
            type="internal",
            common_name="broker dev root CA",
            extra_params={"ttl": "87600h", "key_type": "ec", "key_bits": 256},
            mount_point=PKI_MOUNT,
        )
    client.secrets.pki.create_or_update_role(
        PKI_ROLE,
        extra_params={
            "allowed_domains": [PKI_DOMAIN],
            "allow_subdomains": True,
            "allow_bare_domains": False,
            "allow_ip_sans": False,
            "allow_any_name": False,
            "enforce_hostnames": True,
            "key_type": "ec",
            "key_bits": 256,
            "ttl": "10m",
            "max_ttl": f"{role_max_ttl}s",
            "generate_lease": True,
            "no_store": False,
            "server_flag": True,
            "client_flag": True,
        },
        mount_point=PKI_MOUNT,
    )
    ca_pem = client.secrets.pki.read_ca_certificate(mount_point=PKI_MOUNT)

    database_configured = False
    if postgres_url:
        if f"{DB_MOUNT}/" not in mounts:
            client.sys.enable_secrets_engine("database", path=DB_MOUNT)
        url, user, password = _vault_connection_url(postgres_url)
        extra = {"username": user, "password": password} if user else {}
        client.secrets.database.configure(
            DB_CONNECTION,
            "postgresql-database-plugin",
            connection_url=url,
            allowed_roles=[DB_ROLE],
            verify_connection=True,
            mount_point=DB_MOUNT,
            password_authentication="scram-sha-256",
            **extra,
        )
        client.secrets.database.create_role(
            DB_ROLE,
            DB_CONNECTION,
            creation_statements=[
                "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
                "VALID UNTIL '{{expiration}}';",
            ],
            default_ttl="10m",
            max_ttl=f"{role_max_ttl}s",
            mount_point=DB_MOUNT,
        )
        database_configured = True

    ensure_audit_key(client)
    oidc = _oidc_role(client, addr, OIDC_ROLE, key=OIDC_KEY, ttl=OIDC_TTL)
    client.sys.create_or_update_policy(INSTANCE_POLICY, instance_policy())
    client.sys.create_or_update_policy(BROKER_POLICY, broker_policy())
    client.write(
        f"auth/token/roles/{TOKEN_ROLE}",
        allowed_policies=[INSTANCE_POLICY],
        # Further instance policies (one per credential family) are named broker-instance-*.
        allowed_policies_glob=[f"{INSTANCE_POLICY}-*"],
        disallowed_policies=["root", BROKER_POLICY],
        # Instance tokens may carry an entity alias (vault.entity_alias: workload), which
        # gives them the identity entity an OIDC token for cloud federation needs. Only
        # the broker creates tokens through this role, and it names the alias.
        allowed_entity_aliases=["*"],
        orphan=True,
        renewable=False,
        token_explicit_max_ttl=f"{instance_token_ttl}s",
        token_type="service",
        token_no_default_policy=True,
    )
    created = client.auth.token.create(
        policies=[BROKER_POLICY],
        no_parent=True,
        ttl="768h",
        renewable=True,
        display_name="broker",
        meta={"purpose": "broker"},
    )
    return DevVault(
        broker_token=created["auth"]["client_token"],
        database_configured=database_configured,
        ca_pem=ca_pem,
        oidc=oidc,
    )


def ensure_audit_key(client: hvac.Client, mount: str = TRANSIT_MOUNT, key: str = AUDIT_KEY) -> None:
    """The transit engine and the Ed25519 key that signs audit checkpoints (the key never
    leaves Vault; the broker asks transit to sign)."""
    if f"{mount}/" not in client.sys.list_mounted_secrets_engines()["data"]:
        client.sys.enable_secrets_engine("transit", path=mount)
    client.write(f"{mount}/keys/{key}", type="ed25519")


def configure_oidc_role(
    addr: str,
    token: str,
    role: str,
    *,
    key: str = "broker",
    ttl: str = "5m",
    issuer: str | None = None,
) -> OidcRole:
    """An OIDC key and role in Vault's identity engine, whose tokens an instance token
    (with an entity) reads at ``identity/oidc/token/<role>`` to federate with a cloud.
    ``issuer`` is the URL the cloud fetches keys from (default: Vault's own address)."""
    client = hvac.Client(url=addr, token=token, timeout=30)
    return _oidc_role(client, addr, role, key=key, ttl=ttl, issuer=issuer)


def _oidc_role(
    client: hvac.Client, addr: str, role: str, *, key: str, ttl: str, issuer: str | None = None
) -> OidcRole:
    if issuer is not None:
        client.write("identity/oidc/config", issuer=issuer)
    client.write(
        f"identity/oidc/key/{key}",
        algorithm="RS256",
        allowed_client_ids=["*"],
        rotation_period="24h",
        verification_ttl="24h",
    )
    # Vault sets ``aud`` to the role's generated client_id, and the key must allow it.
    client.write(f"identity/oidc/role/{role}", key=key, ttl=ttl)
    data = client.read(f"identity/oidc/role/{role}")["data"]
    config = client.read("identity/oidc/config")["data"]
    base = config.get("issuer") or addr
    return OidcRole(name=role, client_id=data["client_id"], issuer=f"{base}/v1/identity/oidc")


def token_auth_accessor(addr: str, token: str) -> str:
    """The token auth mount's accessor: entity aliases of instance tokens live on it."""
    client = hvac.Client(url=addr, token=token, timeout=30)
    return str(client.sys.list_auth_methods()["data"]["token/"]["accessor"])


def ensure_workload_entity(addr: str, token: str, alias: str) -> str:
    """Create (or find) the entity of a workload's instance tokens ahead of their first
    use, so that its id, the ``sub`` of their OIDC tokens, can be pinned in an IAM trust
    policy. Returns the entity id."""
    client = hvac.Client(url=addr, token=token, timeout=30)
    accessor = token_auth_accessor(addr, token)
    found = client.write("identity/lookup/entity", alias_name=alias, alias_mount_accessor=accessor)
    if isinstance(found, dict) and found.get("data"):  # 204 (no such entity): a Response
        return str(found["data"]["id"])
    entity = client.write("identity/entity", metadata={"broker_alias": alias})["data"]["id"]
    client.write("identity/entity-alias", name=alias, canonical_id=entity, mount_accessor=accessor)
    return str(entity)
