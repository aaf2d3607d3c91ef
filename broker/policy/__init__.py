"""May this identity have that role, and for how long? Pure logic over plain data."""

from broker.policy.rules import Decision, decide
from broker.policy.templates import render_params

__all__ = ["Decision", "decide", "render_params"]
