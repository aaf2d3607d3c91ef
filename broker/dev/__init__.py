"""``broker dev``: the whole system on one laptop (OpenBao dev server, SQLite, a local
identity issuer and demo roles). Also used by the test harness to start OpenBao."""
