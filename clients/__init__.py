"""Clients of the logand service (HTTP client, best-of-k, trainer adapters).

The wire types live in :mod:`service.protocol` and the utility math in :mod:`service.utility`;
both import without torch, so clients can use them directly.
"""
