"""The application: assemble every part from the settings, then supervise them together.

This package is the only place that knows every part of the broker. ``assemble`` builds
the components without I/O; ``Broker`` starts them and hands the long-running parts
(``run(stop)``) and the periodic ticks (``run_once``) to ``supervisor``: the first fatal
failure stops them all, and resources close last.
"""

from broker.app.assemble import Assembly, assemble
from broker.app.broker import Broker

__all__ = ["Assembly", "Broker", "assemble"]
