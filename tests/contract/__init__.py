"""Contract tests: the broker's externally visible behaviour (HTTP answers, /openapi.json,
metric names, CLI help and exit codes, configuration error text) pinned in golden files
under ``golden/``, driven only through surfaces that survive a refactor.

Regenerate after an intended change with
``BROKER_UPDATE_GOLDEN=1 python -m pytest tests/contract`` and review the diff."""
