"""Backend connections: connect, TLS, startup and authentication, then the reply relay."""
