"""The thin HTTP layer: routes, the error envelope, SSE framing, authentication."""
