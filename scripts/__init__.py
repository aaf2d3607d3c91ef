"""Build, lint and supply-chain scripts (``python -m scripts.NAME``)."""
