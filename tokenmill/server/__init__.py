"""The HTTP layer: routes, SSE, errors, lifecycle. Knows runners and protocol, never an engine."""

from tokenmill.server.app import create_app

__all__ = ["create_app"]
