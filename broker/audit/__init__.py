"""The audit trail's services: verifying the chain (``verify``, pure; ``service``)."""
