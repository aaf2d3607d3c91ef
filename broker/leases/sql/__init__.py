"""The broker's SQL, as functions over a connection inside a transaction the caller holds
(``Database.transaction``), grouped by the ledger that runs them. ``common`` holds what
several share: the instance lock, the audit insert and the row-to-view conversions.

Concurrency: issuance locks the instance row (``FOR UPDATE`` on PostgreSQL; SQLite takes
the database write lock with ``BEGIN IMMEDIATE``) while it checks the tombstone and writes
the ``issuing`` row, and termination takes the same lock to mark the instance
``terminating``. So a lease is either recorded before the instance is marked (and the
revocation job sees it) or refused.
"""
