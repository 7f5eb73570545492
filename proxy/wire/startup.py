"""The frontend side of connection startup as a sans-IO generator (psycopg's generators style).

The generator yields ``bytes`` to send, or ``None`` to ask for the next backend message, which the
driver sends back in as ``(code, body)``. It returns a ``StartupResult`` once the backend is
ReadyForQuery. One asyncio driver (backends/connection.py) runs it; tests drive it by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from proxy.errors import BackendAuthFailed, BackendRejected, ProtocolViolation
from proxy.wire.auth import SCRAM_MECHANISM, ScramClient, md5_client_response
from proxy.wire.codes import AuthCode, BackendCode
from proxy.wire.messages import (
    Authentication,
    BackendKeyData,
    ErrorResponse,
    ParameterStatus,
    PasswordMessage,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    StartupMessage,
    frame,
)

Message = tuple[int, bytes]
StartupSteps = Generator[bytes | None, Message | None, "StartupResult"]


@dataclass(frozen=True)
class Credentials:
    """What the proxy may answer a backend's authentication request with."""

    password: Callable[[], str | None] = lambda: None  # looked up only if the backend asks
    scram_client_key: bytes | None = None  # SCRAM pass-through (client authenticated to us)
    scram_server_key: bytes | None = None


@dataclass
class StartupResult:
    parameters: dict[str, str] = field(default_factory=dict)
    key: BackendKeyData | None = None
    tx_status: int = ord("I")
    notices: list[bytes] = field(default_factory=list)  # raw NoticeResponse frames to relay


def backend_startup(backend: str, params: dict[str, str], creds: Credentials) -> StartupSteps:
    """Log in to a backend: StartupMessage, authentication, then collect parameters and key."""
    user = params.get("user", "")
    yield StartupMessage(params).encode()
    result = StartupResult()
    scram: ScramClient | None = None
    while True:
        msg = yield None
        assert msg is not None
        code, body = msg
        if code == BackendCode.AUTHENTICATION:
            auth = Authentication.decode(body)
            if auth.code == AuthCode.OK:
                continue
            if auth.code == AuthCode.CLEARTEXT_PASSWORD:
                yield PasswordMessage(_password(backend, user, creds).encode()).encode()
            elif auth.code == AuthCode.MD5_PASSWORD:
                if len(auth.data) != 4:
                    raise ProtocolViolation(f"backend {backend!r} sent a malformed MD5 salt")
                response = md5_client_response(user, _password(backend, user, creds), auth.data)
                yield PasswordMessage(response).encode()
            elif auth.code == AuthCode.SASL:
                if SCRAM_MECHANISM not in auth.sasl_mechanisms():
                    raise BackendAuthFailed(
                        f"backend {backend!r} offers SASL mechanisms {auth.sasl_mechanisms()}, "
                        f"pgshift supports {SCRAM_MECHANISM} only"
                    )
                if creds.scram_client_key is not None:
                    scram = ScramClient(client_key=creds.scram_client_key, server_key=creds.scram_server_key)
                else:
                    scram = ScramClient(_password(backend, user, creds))
                yield SASLInitialResponse(SCRAM_MECHANISM, scram.client_first()).encode()
            elif auth.code == AuthCode.SASL_CONTINUE and scram is not None:
                yield SASLResponse(scram.client_final(auth.data)).encode()
            elif auth.code == AuthCode.SASL_FINAL and scram is not None:
                scram.verify_server_final(auth.data)
            else:
                raise BackendAuthFailed(
                    f"backend {backend!r} asks for authentication method {auth.code.name}, "
                    "which pgshift does not support (use scram-sha-256, md5, password or trust)"
                )
        elif code == BackendCode.PARAMETER_STATUS:
            ps = ParameterStatus.decode(body)
            result.parameters[ps.name] = ps.value
        elif code == BackendCode.BACKEND_KEY_DATA:
            result.key = BackendKeyData.decode(body)
        elif code == BackendCode.READY_FOR_QUERY:
            result.tx_status = ReadyForQuery.decode(body).status
            return result
        elif code == BackendCode.ERROR_RESPONSE:
            raise BackendRejected(backend, ErrorResponse.decode(body).fields)
        elif code == BackendCode.NOTICE_RESPONSE:
            result.notices.append(frame(code, body))
        elif code == BackendCode.NEGOTIATE_PROTOCOL_VERSION:
            continue  # we ask for 3.0 with no _pq_ options; a newer server just confirms that
        else:
            raise ProtocolViolation(f"backend {backend!r} sent unexpected message {chr(code)!r} during startup")


def _password(backend: str, user: str, creds: Credentials) -> str:
    password = creds.password()
    if password is None:
        raise BackendAuthFailed(
            f"backend {backend!r} asks for a password for user {user!r}, and pgshift has none",
            hint=f"Set password in [backends.{backend}] (or env:VAR), add a ~/.pgpass line, "
            "or authenticate clients with scram-sha-256 for SCRAM pass-through.",
        )
    return password
