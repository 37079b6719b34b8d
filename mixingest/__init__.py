"""
mixingest: a Mixpanel-compatible event-ingestion daemon.

The unmodified Mixpanel SDKs post to it; every event it answers C{1} for is
durably stored on a queue (the local journal, Redis or Kestrel) first.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
