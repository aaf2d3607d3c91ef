"""Command-line entry points: ``broker`` (run the service) and ``brokerctl`` (admin)."""
