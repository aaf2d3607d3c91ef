"""The audit trail's services: verifying the chain (``verify``, pure; ``service``), signed
checkpoints of its head (who signs, when one is due, where it is written besides the
database: ``signers``, ``writer``, ``external``) and reading it out (``ocsf``).

The chain itself (each event's hash and link) is the ledgers' (``broker.leases.chain``);
this package checks it and signs its head with a key the database does not hold."""
