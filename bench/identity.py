"""CPU cost of identity: token verification per core, and policy evaluation with 1,000 rules.

Everything runs in one process, on one thread, with no event loop and no network; the
process is pinned to a single CPU (``os.sched_setaffinity``) where the OS allows it, so the
rates below are what ONE core does.

1. Verification. Keys are generated at start: RSA 2048 (RS256) and P-256 (ES256). Each
   token looks like a Kubernetes service-account token: a ``kid`` header and 9 top-level
   claims (iss, aud, sub, iat, nbf, exp, jti, azp and a nested ``kubernetes.io`` object
   naming the namespace, node, pod and service account). One verification is the broker's pure path,
   exactly what ``IdentityVerifier.verify`` does minus the awaits: ``inspect_token``, the
   issuer lookup by ``iss``, the key lookup by ``kid``, ``verify_signed`` with a fresh
   ``datetime.now(UTC)``. The same token and key then go through ``jwt.decode`` alone
   (PyJWT's own checks of signature, exp, iat, nbf, aud, iss), so the broker's overhead
   over bare PyJWT shows. The two are measured in alternating rounds so that drift in CPU
   clock speed hits both. Target: >= 5,000 verifications/s per core for each algorithm.
2. Policy. ``decide`` with 1,000 rules of 2 conditions each:
   - glob, last: a glob on the claim path ``kubernetes.io.namespace`` (holds for every
     rule) and an exact on the identity's ``workload`` (fails for all but the last rule),
     so every rule is tried and both of its conditions evaluated before the last grants;
   - regex, last: the same with a distinct regex per condition (2,000 patterns);
   - glob, first: the same rules as the first case with the granting rule moved first,
     the common case.
   Reported as the median microseconds per decision and decisions/s.

Every loop is bounded both in time and in count. Results go to ``.bench/identity.json``.

    python bench/identity.py [--seconds 3] [--rules 1000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cryptography
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker.engines.role import RoleSettings  # noqa: E402
from broker.identity.model import Identity  # noqa: E402
from broker.identity.settings import IssuerSettings  # noqa: E402
from broker.identity.verify import inspect_token, verify_signed  # noqa: E402
from broker.policy.rules import decide  # noqa: E402
from broker.policy.settings import ClaimMatch, Rule  # noqa: E402

TARGET_PER_S = 5000
AUDIENCE = "credential-broker"
ISSUER_URL = "https://oidc.cluster.example.internal"
ROUNDS = 3  # rounds per verification contender; each gets seconds / ROUNDS per round
WARMUP_S = 0.3
WARMUP_MAX = 2000
MAX_VERIFY_OPS = 200_000  # per contender and algorithm, over all rounds
MAX_POLICY_OPS = 2_000_000  # per policy case
BATCH_TARGET_S = 0.001  # calls between two clock reads


# -- timing --------------------------------------------------------------------------------


def measure(fn: Callable[[], Any], seconds: float, max_ops: int) -> tuple[int, float, list[float]]:
    """Call ``fn`` until ``seconds`` have passed or ``max_ops`` calls were made.

    Calls are timed in batches of about a millisecond (one call per batch when a call is
    slower than that). Returns the number of calls, the wall time they took and the
    per-call time of every batch."""
    # Warm-up, which also sizes the batches.
    n = 0
    start = time.perf_counter()
    while n < WARMUP_MAX and time.perf_counter() - start < WARMUP_S:
        fn()
        n += 1
    per_call = (time.perf_counter() - start) / n
    batch = max(1, min(1000, int(BATCH_TARGET_S / per_call)))

    done = 0
    samples: list[float] = []
    elapsed = 0.0
    while done < max_ops and elapsed < seconds:
        k = min(batch, max_ops - done)
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        dt = time.perf_counter() - t0
        samples.append(dt / k)
        done += k
        elapsed += dt
    return done, elapsed, samples


def summary(runs: list[tuple[int, float, list[float]]]) -> dict[str, float]:
    ops = sum(r[0] for r in runs)
    wall = sum(r[1] for r in runs)
    samples = sorted(s for r in runs for s in r[2])
    return {
        "ops": ops,
        "seconds": wall,
        "per_s": ops / wall,
        "median_us": statistics.median(samples) * 1e6,
        "p99_us": samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))] * 1e6,
    }


def pin_to_one_cpu() -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "NOT pinned (os.sched_setaffinity unavailable on this platform)"
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        return f"NOT pinned (sched_setaffinity failed: {exc.strerror})"
    return f"pinned to CPU {cpu} (os.sched_setaffinity)"


# -- verification --------------------------------------------------------------------------


def issuer_settings() -> IssuerSettings:
    return IssuerSettings(
        name="k8s",
        issuer=ISSUER_URL,
        jwks_uri=f"{ISSUER_URL}/openid/v1/jwks",
        algorithms=("RS256", "ES256"),
        instance_claim=("kubernetes.io", "pod", "uid"),
        workload_claim=("kubernetes.io", "serviceaccount", "name"),
        max_token_lifetime=3600,
    )


def realistic_token(private_key: Any, alg: str, kid: str) -> tuple[str, str]:
    """A token shaped like a projected service-account token; returns (token, pod uid)."""
    now = int(time.time())
    pod_uid = "7f3c2a9e-5b1d-4c8e-9a6f-2d4b8e1c0a37"
    claims = {
        "iss": ISSUER_URL,
        "aud": [AUDIENCE],
        "sub": "system:serviceaccount:payments-prod:checkout",
        "iat": now,
        "nbf": now,
        "exp": now + 1800,
        "jti": secrets.token_hex(16),
        "kubernetes.io": {
            "namespace": "payments-prod",
            "node": {"name": "node-a-17", "uid": "0c1d2e3f-4a5b-6c7d-8e9f-a0b1c2d3e4f5"},
            "pod": {"name": "checkout-6d9f7c8b5-x2kqp", "uid": pod_uid},
            "serviceaccount": {
                "name": "checkout",
                "uid": "9e8d7c6b-5a49-3827-1605-f4e3d2c1b0a9",
            },
        },
        "azp": "checkout",
    }
    token = jwt.encode(claims, private_key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})
    return token, pod_uid


def bench_verification(seconds: float) -> tuple[list[dict[str, Any]], Identity]:
    settings = issuer_settings()
    keys = {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
    }
    rows = []
    identity: Identity | None = None
    for alg, private_key in keys.items():
        kid = f"{alg.lower()}-{secrets.token_hex(4)}"
        public_key = private_key.public_key()
        token, pod_uid = realistic_token(private_key, alg, kid)
        by_iss = {settings.issuer: settings}
        by_kid = {kid: public_key}
        max_bytes = settings.max_token_bytes

        def broker_path(
            token: str = token, by_iss: dict = by_iss, by_kid: dict = by_kid, mb: int = max_bytes
        ) -> Identity:
            unverified = inspect_token(token, max_bytes=mb)
            issuer = by_iss[unverified.issuer]
            key = by_kid[unverified.kid]
            return verify_signed(
                token, unverified, issuer, key, audience=AUDIENCE, now=datetime.now(UTC)
            )

        def pyjwt_alone(token: str = token, key: Any = public_key, alg: str = alg) -> Any:
            return jwt.decode(
                token, key=key, algorithms=[alg], audience=AUDIENCE, issuer=ISSUER_URL
            )

        # Both paths must accept the token before their speed means anything.
        identity = broker_path()
        assert identity.instance_id == pod_uid and identity.workload == "checkout", identity
        assert pyjwt_alone()["kubernetes.io"]["pod"]["uid"] == pod_uid

        broker_runs, pyjwt_runs = [], []
        per_round = seconds / ROUNDS
        for _ in range(ROUNDS):
            broker_runs.append(measure(broker_path, per_round, MAX_VERIFY_OPS // ROUNDS))
            pyjwt_runs.append(measure(pyjwt_alone, per_round, MAX_VERIFY_OPS // ROUNDS))
        b, p = summary(broker_runs), summary(pyjwt_runs)
        rows.append(
            {
                "alg": alg,
                "key": "RSA 2048" if alg == "RS256" else "EC P-256",
                "token_bytes": len(token),
                "broker": b,
                "pyjwt": p,
                "overhead_x": p["per_s"] / b["per_s"],
                "target_per_s": TARGET_PER_S,
                "pass": b["per_s"] >= TARGET_PER_S,
            }
        )
    assert identity is not None
    return rows, identity


# -- policy --------------------------------------------------------------------------------


def glob_rules(n: int, *, granting_first: bool) -> list[Rule]:
    """n rules; every one's glob holds for the identity, only one's exact does."""
    rules = [
        Rule(
            name=f"team-{i:04d}",
            issuer="k8s",
            match=(
                ClaimMatch(claim=("kubernetes.io", "namespace"), glob="payments-*"),
                ClaimMatch(identity="workload", exact=f"svc-{i:04d}"),
            ),
            allow=("db",),
            max_ttl=900,
        )
        for i in range(n - 1)
    ]
    granting = Rule(
        name="checkout",
        issuer="k8s",
        match=(
            ClaimMatch(claim=("kubernetes.io", "namespace"), glob="payments-*"),
            ClaimMatch(identity="workload", exact="checkout"),
        ),
        allow=("db",),
        max_ttl=900,
    )
    return [granting, *rules] if granting_first else [*rules, granting]


def regex_rules(n: int) -> list[Rule]:
    """n rules with distinct patterns; every first regex holds, only the last second one."""
    rules = [
        Rule(
            name=f"team-{i:04d}",
            issuer="k8s",
            match=(
                ClaimMatch(
                    claim=("kubernetes.io", "namespace"),
                    regex=rf"(?:payments|team{i:04d})-(?:prod|staging|dev)",
                ),
                ClaimMatch(identity="workload", regex=rf"svc-{i:04d}(?:-[a-z0-9]+)?"),
            ),
            allow=("db",),
            max_ttl=900,
        )
        for i in range(n - 1)
    ]
    rules.append(
        Rule(
            name="checkout",
            issuer="k8s",
            match=(
                ClaimMatch(
                    claim=("kubernetes.io", "namespace"),
                    regex=r"(?:payments|checkout)-(?:prod|staging|dev)",
                ),
                ClaimMatch(identity="workload", regex=r"checkout(?:-[a-z0-9]+)?"),
            ),
            allow=("db",),
            max_ttl=900,
        )
    )
    return rules


def bench_policy(identity: Identity, n_rules: int, seconds: float) -> list[dict[str, Any]]:
    roles = {"db": RoleSettings(engine="database", mount="database", vault_role="dev-db")}
    cases = [
        ("glob+exact, grant by last rule", glob_rules(n_rules, granting_first=False)),
        ("regex+regex, grant by last rule", regex_rules(n_rules)),
        ("glob+exact, grant by first rule", glob_rules(n_rules, granting_first=True)),
    ]
    rows = []
    for label, rules in cases:

        def one(rules: list[Rule] = rules) -> Any:
            return decide(identity, "db", 600, roles=roles, rules=rules)

        d = one()
        assert d.allowed and d.rule == "checkout" and d.ttl == 600, d
        s = summary([measure(one, seconds, MAX_POLICY_OPS)])
        rows.append({"case": label, "rules": len(rules), "conditions_per_rule": 2, **s})
    return rows


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    ap.add_argument("--rules", type=int, default=1000)
    args = ap.parse_args()
    if not 0 < args.seconds <= 60 or not 1 <= args.rules <= 100_000:
        raise SystemExit("--seconds must be in (0, 60] and --rules in [1, 100000]")

    pinned = pin_to_one_cpu()
    gc.collect()
    verify_rows, identity = bench_verification(args.seconds)
    policy_rows = bench_policy(identity, args.rules, args.seconds)

    from cryptography.hazmat.backends.openssl.backend import backend

    env = {
        "cpu": pinned,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "pyjwt": jwt.__version__,
        "cryptography": cryptography.__version__,
        "openssl": backend.openssl_version_text(),
        "machine": platform.machine(),
    }
    print(
        f"\none process, one thread, no event loop; {pinned}\n"
        f"Python {env['python']}  PyJWT {env['pyjwt']}  cryptography {env['cryptography']}"
        f"  {env['openssl']}  ({env['cpu_count']} CPUs on the machine)"
    )
    print(f"\ntoken verification, {args.seconds:g} s per path and algorithm")
    print(
        f"{'alg':6} {'key':9} {'bytes':>5} | {'broker/s':>9} {'p50us':>7} | "
        f"{'pyjwt/s':>9} {'p50us':>7} | {'cost x':>6} | target"
    )
    for r in verify_rows:
        b, p = r["broker"], r["pyjwt"]
        verdict = "PASS" if r["pass"] else "FAIL"
        print(
            f"{r['alg']:6} {r['key']:9} {r['token_bytes']:>5} | {b['per_s']:9.0f} "
            f"{b['median_us']:7.1f} | {p['per_s']:9.0f} {p['median_us']:7.1f} | "
            f"{r['overhead_x']:6.2f} | >= {TARGET_PER_S}/s {verdict}"
        )
    print(
        "broker = inspect_token + issuer/key lookup + verify_signed; pyjwt = jwt.decode alone\n"
        "cost x = pyjwt/s / broker/s (1.00 = the broker adds nothing)"
    )
    print(f"\npolicy decide(), {args.seconds:g} s per case, 2 conditions per rule")
    print(f"{'case':32} {'rules':>6} | {'p50us':>9} {'p99us':>9} | {'decisions/s':>11}")
    for r in policy_rows:
        print(
            f"{r['case']:32} {r['rules']:>6} | {r['median_us']:9.2f} {r['p99_us']:9.2f} | "
            f"{r['per_s']:11.0f}"
        )

    out = ROOT / ".bench"
    out.mkdir(exist_ok=True)
    (out / "identity.json").write_text(
        json.dumps(
            {"environment": env, "verification": verify_rows, "policy": policy_rows}, indent=2
        )
    )
    print(f"\nwrote {out / 'identity.json'}")


if __name__ == "__main__":
    main()
