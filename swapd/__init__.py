"""swapd: a zero-downtime process-swap supervisor for Python services."""

__version__ = "0.1.0"
