"""The audit trail's services: signed checkpoints of the chain head (who signs, when one
is due, where it is written besides the database) and reading the trail out (OCSF).

The chain itself (each event's hash and link) is the ledgers' (``broker.leases.chain``);
this package signs its head with a key the database does not hold."""
