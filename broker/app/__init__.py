"""The application: assemble every part from the settings, then supervise them together.

This package is the only place that knows every part of the broker. ``supervisor`` runs
the long-running parts (``run(stop)``) and the periodic ticks (``run_once``) as one list:
the first fatal failure stops them all, and resources close last.
"""
