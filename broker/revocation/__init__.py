"""Taking credentials back: the revocation worker that revokes an instance's leases and
confirms with Vault that they are gone (``worker``), and the reconciler that compares the
ledgers with Vault and settles what a crash or an outage left behind (``reconcile``)."""
