"""Prove a password is the one PostgreSQL stored, even where the server trusts every
login (as the CI PostgreSQL does): recompute the SCRAM-SHA-256 StoredKey."""

from __future__ import annotations

import base64
import hashlib
import hmac

import psycopg


def scram_password_matches(admin_url: str, role: str, password: str) -> bool:
    with psycopg.connect(admin_url) as conn:
        row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s",
                           (role,)).fetchone()
    if row is None or row[0] is None or not row[0].startswith("SCRAM-SHA-256$"):
        return False
    head, keys = row[0].split("$", 1)[1].split("$")
    iterations, salt_b64 = head.split(":")
    stored_b64, _server = keys.split(":")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt_b64),
                                 int(iterations))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), base64.b64decode(stored_b64))
