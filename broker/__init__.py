"""Ephemeral credential broker: workload identity in, short-lived Vault credentials out."""

__version__ = "0.1.0"
