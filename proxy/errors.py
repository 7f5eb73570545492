"""The rooted error hierarchy; client-visible errors carry a SQLSTATE."""

from __future__ import annotations


class PgShiftError(Exception):
    """Root of every error pgshift raises on purpose.

    ``sqlstate`` is what a client sees if this error reaches it (the session layer is the one
    place that turns an exception into an ErrorResponse); ``severity`` is FATAL when the error
    ends the client's session.
    """

    sqlstate = "XX000"
    severity = "ERROR"

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint


class ConfigError(PgShiftError):
    """The configuration file or a command-line argument is invalid."""

    sqlstate = "F0000"  # config_file_error


class ProtocolViolation(PgShiftError):
    """Bytes on the wire that do not follow the v3 protocol (framing, sizes, unknown codes)."""

    sqlstate = "08P01"  # protocol_violation
    severity = "FATAL"


class FeatureNotSupported(PgShiftError):
    """A valid request pgshift deliberately does not serve (e.g. protocol version 2)."""

    sqlstate = "0A000"
    severity = "FATAL"


class AuthenticationFailed(PgShiftError):
    """The client's credentials were rejected by the proxy."""

    sqlstate = "28P01"  # invalid_password
    severity = "FATAL"


class InvalidAuthorization(PgShiftError):
    """No authentication rule admits this client (like a missing pg_hba.conf line)."""

    sqlstate = "28000"  # invalid_authorization_specification
    severity = "FATAL"


class BackendUnavailable(PgShiftError):
    """A backend could not be reached, or its connection was lost."""

    sqlstate = "08006"  # connection_failure
    severity = "FATAL"


class BackendAuthFailed(PgShiftError):
    """The proxy could not authenticate to a backend with the credentials it holds."""

    sqlstate = "28P01"
    severity = "FATAL"


class ClusterError(PgShiftError):
    """A local throw-away Postgres cluster (tests, demo) could not be set up or driven."""


class BackendRejected(PgShiftError):
    """A backend answered with an ErrorResponse during startup; the client sees its fields as-is."""

    severity = "FATAL"

    def __init__(self, backend: str, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", "backend rejected the connection"))
        self.backend = backend
        self.fields = fields
        self.sqlstate = fields.get("C", "08006")


class AdminShutdown(PgShiftError):
    """The proxy is shutting down; same SQLSTATE and text as Postgres' own shutdown."""

    sqlstate = "57P01"  # admin_shutdown
    severity = "FATAL"

    def __init__(self) -> None:
        super().__init__("terminating connection due to administrator command")


class ControlError(PgShiftError):
    """A routing change that cannot be made as asked (the admin API answers 4xx with the message).

    ``status`` is the HTTP status the admin API uses for it.
    """

    status = 400


class VersionConflict(ControlError):
    """Another change (here or on another instance) made a newer routing version first."""

    status = 409


class StoreUnavailable(ControlError):
    """The control store cannot be read or written; the running routing stays as it is."""

    status = 503


class ProxyBug(PgShiftError):
    """A bug in pgshift itself: the session it happened in ends (and only that one)."""

    sqlstate = "XX000"  # internal_error
    severity = "FATAL"

    def __init__(self) -> None:
        super().__init__("pgshift internal error; see the proxy log")
