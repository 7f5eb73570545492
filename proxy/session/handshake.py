"""Client startup: TLS negotiation, the startup packet, and client authentication by the proxy."""

from __future__ import annotations

import secrets
import ssl
from dataclasses import dataclass

from proxy.config import UserAuth
from proxy.errors import AuthenticationFailed, InvalidAuthorization, ProtocolViolation
from proxy.session.client import ClientConnection
from proxy.wire.auth import SCRAM_MECHANISM, ScramServer, ScramVerifier, md5_verify
from proxy.wire.codes import AuthCode, FrontendCode
from proxy.wire.messages import (
    Authentication,
    CancelRequest,
    GSSENCRequest,
    NegotiateProtocolVersion,
    PasswordMessage,
    SASLInitialResponse,
    SSLRequest,
    StartupMessage,
    decode_startup_packet,
)


@dataclass(frozen=True)
class ScramKeys:
    """Keys recovered from a client's SCRAM proof: enough to log in to a backend as that user."""

    client_key: bytes
    server_key: bytes


async def read_startup(
    client: ClientConnection, tls: ssl.SSLContext | None, tls_required: bool
) -> StartupMessage | CancelRequest:
    """Answer SSL/GSS requests, then return the StartupMessage (or a CancelRequest)."""
    ssl_tried = gss_tried = False
    while True:
        packet = decode_startup_packet(await client.read_startup_packet())
        if isinstance(packet, SSLRequest):
            if ssl_tried:
                raise ProtocolViolation("duplicate SSL request")
            ssl_tried = True
            if tls is None:
                client.write(b"N")
                continue
            client.write(b"S")
            await client.start_tls(tls)
        elif isinstance(packet, GSSENCRequest):
            if gss_tried:
                raise ProtocolViolation("duplicate GSSAPI encryption request")
            gss_tried = True
            client.write(b"N")  # no GSSAPI: libpq then falls back to SSL or plain
        elif isinstance(packet, CancelRequest):
            return packet
        else:
            if tls_required and not client.tls:
                raise InvalidAuthorization(
                    "pgshift accepts only TLS connections", hint="Connect with sslmode=require (or stricter)."
                )
            unknown = tuple(k for k in packet.params if k.startswith("_pq_."))
            if packet.minor > 0 or unknown:
                # Like Postgres: speak 3.0 and name the protocol options we do not understand.
                client.write(NegotiateProtocolVersion(0, unknown).encode())
                params = {k: v for k, v in packet.params.items() if not k.startswith("_pq_.")}
                packet = StartupMessage(params)
            if "user" not in packet.params:
                raise ProtocolViolation("no PostgreSQL user name specified in startup packet")
            return packet


def _failed(user: str) -> AuthenticationFailed:
    # Exactly Postgres' wording (auth.c, auth_failed), so clients and tests cannot tell us apart.
    return AuthenticationFailed(f'password authentication failed for user "{user}"')


async def authenticate(client: ClientConnection, user: str, rule: UserAuth) -> ScramKeys | None:
    """Run the configured method; wrong credentials → 28P01 before any backend is contacted."""
    if rule.method == "trust":
        return None
    if rule.method == "reject":
        raise InvalidAuthorization(
            f'pgshift rejects connections for user "{user}"',
            hint="Add the user to [auth.users] in the pgshift config, or change [auth] method.",
        )
    if rule.method == "md5":
        assert rule.md5 is not None
        salt = secrets.token_bytes(4)
        client.write(Authentication(AuthCode.MD5_PASSWORD, salt).encode())
        response = PasswordMessage.decode(await _password_message(client)).password
        if not md5_verify(rule.md5, salt, response):
            raise _failed(user)
        return None
    assert rule.verifier is not None
    verifier = ScramVerifier.parse(rule.verifier)
    server = ScramServer(verifier)
    client.write(Authentication.sasl([SCRAM_MECHANISM]).encode())
    initial = SASLInitialResponse.decode(await _password_message(client))
    if initial.mechanism != SCRAM_MECHANISM:
        raise ProtocolViolation(f"client selected an invalid SASL authentication mechanism {initial.mechanism!r}")
    client.write(Authentication(AuthCode.SASL_CONTINUE, server.server_first(initial.data)).encode())
    final = await _password_message(client)
    try:
        server_final = server.server_final(final)
    except AuthenticationFailed:
        raise _failed(user) from None
    client.write(Authentication(AuthCode.SASL_FINAL, server_final).encode())
    return ScramKeys(server.client_key, verifier.server_key)


async def _password_message(client: ClientConnection) -> bytes:
    code, body = await client.read_message()
    if code != FrontendCode.PASSWORD:
        raise ProtocolViolation(f"expected password response, got message type {chr(code)!r}")
    return body
