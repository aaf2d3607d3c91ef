"""The HTTP API (aiohttp): handlers decode, call one function, encode."""

from broker.api.app import build_app

__all__ = ["build_app"]
