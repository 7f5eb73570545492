"""Tests for proxy.wire.auth: RFC 7677 vectors, Postgres-made verifiers, round trips, fuzzing."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import AuthenticationFailed, ProtocolViolation
from proxy.wire.auth import (
    SCRAM_MECHANISM,
    ScramClient,
    ScramServer,
    ScramVerifier,
    md5_client_response,
    md5_password_hash,
    md5_verify,
    scram_verifier,
)

# --- RFC 7677 §3 test vector ----------------------------------------------------------------

RFC_PASSWORD = "pencil"
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

RFC_VERIFIER = scram_verifier(RFC_PASSWORD, salt=RFC_SALT, iterations=4096)
# A cheap verifier for tests that run many exchanges.
FAST_VERIFIER = scram_verifier("fast", salt=b"0123456789abcdef", iterations=2)


def _rfc_client() -> ScramClient:
    return ScramClient(RFC_PASSWORD, nonce=RFC_CLIENT_NONCE, username="user")


def test_rfc7677_client_side() -> None:
    client = _rfc_client()
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.client_final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert not client.finished
    client.verify_server_final(RFC_SERVER_FINAL)
    assert client.finished


def test_rfc7677_server_side() -> None:
    server = ScramServer(RFC_VERIFIER, nonce=RFC_SERVER_NONCE)
    assert server.server_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.server_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", RFC_SALT, 4096)
    assert server.client_key == hmac.digest(salted, b"Client Key", "sha256")


def test_rfc7677_client_rejects_forged_server_signature() -> None:
    client = _rfc_client()
    client.client_first()
    client.client_final(RFC_SERVER_FIRST)
    forged = b"v=" + base64.b64encode(bytes(32))
    with pytest.raises(AuthenticationFailed, match="signature"):
        client.verify_server_final(forged)
    assert not client.finished


def test_client_reports_server_error() -> None:
    client = _rfc_client()
    client.client_first()
    client.client_final(RFC_SERVER_FIRST)
    with pytest.raises(AuthenticationFailed, match="invalid-proof"):
        client.verify_server_final(b"e=invalid-proof")


# --- verifiers made by a real Postgres ----------------------------------------------------
# Produced by PostgreSQL 15.18 (CREATE ROLE ... PASSWORD '<pw>' with password_encryption =
# scram-sha-256, then SELECT rolpassword FROM pg_authid).  They pin pg_saslprep() behaviour:
# ASCII fast path, mapping, NFKC, and the fall-backs to the raw password.

POSTGRES_VERIFIERS = [
    (
        "secret",
        "SCRAM-SHA-256$4096:9RY3H9FKqMGNVIGtl4GAAA==$lFsf7L6Qnb1NBB2ymrsSCh0aTAF2EYLY1/hZuhkt5uQ="
        ":T9BBirmN9U4gCTo2Z9Nh57n5aVUDnke8cyW/59RnQOE=",
    ),
    (
        "p\u00e4ssw\u00f6rd",  # non-ASCII, already NFKC
        "SCRAM-SHA-256$4096:L8+GnTHT/3fYRnd8qRjO3g==$u+49wl5vp+oizJSQd3TnqONO4Bh+9X+jkMOF3Dxwxq0="
        ":hM4NMq4L+rzFy1ZdghlaseCfrp/aCKIkr8Rhk55eYiE=",
    ),
    (
        "\uff50\uff41\uff53\uff53",  # fullwidth letters: NFKC to "pass"
        "SCRAM-SHA-256$4096:f6UGp3S18b/dh5HtQ96kWw==$iwlJm6Vsj26vH480xiheXCS7ORnGU/DpFkRmzxt/Qjs="
        ":5kXAib8XWqvgGZQKF5zSLsfL9BBi3leFh1OwMR5Ykvs=",
    ),
    (
        "a\u00a0b\u00adc",  # NBSP maps to space, soft hyphen to nothing
        "SCRAM-SHA-256$4096:OoNZYcuq5nrBK7d5xlM+ug==$f/WPJdPOHHCQFeogXPtHiZeiZd6wIlU5hTfMBLt3z+Q="
        ":ymLzZW8bqXy7E40HIOoXXqCKXeRpILM4oa/rClutBk8=",
    ),
    (
        "cafe\u0301",  # NFKC composes to "café"
        "SCRAM-SHA-256$4096:DSX9vo2/79utwv6wBEz7kQ==$GKi6pM3oTCKw/17L5qVHRk4VkwXnOIlV6Uk7ig/aOHg="
        ":htV1Cxr9dXkcljYT26JPdKzJUBQUPfYZI/bzFc21Aos=",
    ),
    (
        "\u2168",  # ROMAN NUMERAL NINE: NFKC to "IX"
        "SCRAM-SHA-256$4096:BG8PNGUIT4HcLuHoObxvZg==$d8ESnmAd/rJQL3IEjBu80GAlYfoYj9HUxNDVUaJyynA="
        ":mf+hFC5lCxlLgLbaPYpXTy/THhB40r/YpzO1MoYKbd0=",
    ),
    (
        "a\u0340",  # prohibited (C.8) before NFKC, not after: Postgres checks before, uses raw
        "SCRAM-SHA-256$4096:c7bt8C3gGe20vqryLYPTYw==$ew9rG6XLLrFgY02rpi0GJcWKSd7hbO5wUPg6jKVdjRE="
        ":hH+vyp4Lvvh6kyhsdLm9/11oaH+gZJimMRvy2n14tsg=",
    ),
    (
        "\u00ad",  # empty after mapping: raw
        "SCRAM-SHA-256$4096:BiuQL52jkSug+Q9sDu0Irg==$OqI02W1OQG3dNEZRWHaAxULziWZ92uEI7K4lbBNfsxw="
        ":Jtwpq/L7ntkCpbt/iE8frYnMMYb4bFUVjQ2aby3Py7Q=",
    ),
    (
        "\u05d0a",  # bidi rule violated: raw
        "SCRAM-SHA-256$4096:mrn65Q21HgTMpHSXcdW+7A==$DMxDB/1xvgL93R06bd42hfZJJrUWGQyvM/gt8cFl8wo="
        ":Wfbbq8G28nRwuf6RfDrP8wDw8CnomH1GZdqtpOeukPs=",
    ),
    (
        "x\u0221",  # unassigned in Unicode 3.2 (table A.1): raw
        "SCRAM-SHA-256$4096:5Oi4x+4JDVG0Ud9iB0QGqQ==$QSsc28YMx0VcOFr5XyVPKHdVoqM/Tq37gKoJsPFMFQw="
        ":jElZr4oiq+3EkoAzPrdLiTERmMmh26tnB30snUvVGX4=",
    ),
    (
        "\ue000pw",  # private use (C.3): raw
        "SCRAM-SHA-256$4096:Jv58o5TRu5knfxu9/XmVhw==$D98svxxEIHFftc2TJYTR9lIWrWN4Aqzo/+4gEviyIZ8="
        ":xf3LoKb64VovlmGans9PBBMeQMO4Un2R8/Z2mXUdNlM=",
    ),
]


@pytest.mark.parametrize(("password", "stored"), POSTGRES_VERIFIERS)
def test_verifier_matches_postgres(password: str, stored: str) -> None:
    pg = ScramVerifier.parse(stored)
    assert str(pg) == stored
    assert scram_verifier(password, salt=pg.salt, iterations=pg.iterations) == pg


def test_verifier_matches_postgres_end_to_end() -> None:
    # A client holding the password authenticates against the Postgres-made verifier.
    password, stored = POSTGRES_VERIFIERS[3]
    server = ScramServer(ScramVerifier.parse(stored))
    client = ScramClient(password)
    client.verify_server_final(server.server_final(client.client_final(server.server_first(client.client_first()))))
    assert client.finished


# --- verifier text ------------------------------------------------------------------------


def test_verifier_defaults_and_round_trip() -> None:
    v = scram_verifier("hunter2")
    assert v.iterations == 4096
    assert len(v.salt) == 16
    assert len(v.stored_key) == len(v.server_key) == 32
    assert ScramVerifier.parse(str(v)) == v
    assert str(v).startswith(f"{SCRAM_MECHANISM}$4096:")
    assert scram_verifier("hunter2").salt != v.salt
    assert "stored_key" not in repr(v)
    assert base64.b64encode(v.stored_key).decode() not in repr(v)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md5a3556571e93b0d20722ba62be61e8c2d",
        "SCRAM-SHA-1$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$-1:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$ 4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA=$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 40 + "==:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=$",
        "SCRAM-SHA-256$99999999999:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
    ],
)
def test_verifier_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid SCRAM verifier"):
        ScramVerifier.parse(text)


@given(st.text())
def test_verifier_parse_fuzz(text: str) -> None:
    with contextlib.suppress(ValueError):
        ScramVerifier.parse(text)


# --- round trips and failures -------------------------------------------------------------


def _exchange(client: ScramClient, server: ScramServer) -> None:
    server_first = server.server_first(client.client_first())
    server_final = server.server_final(client.client_final(server_first))
    client.verify_server_final(server_final)


@settings(max_examples=40, deadline=None)
@given(password=st.text(min_size=1, max_size=40), salt=st.binary(min_size=1, max_size=32))
def test_round_trip_random_passwords(password: str, salt: bytes) -> None:
    verifier = scram_verifier(password, salt=salt, iterations=16)
    client = ScramClient(password)
    server = ScramServer(verifier)
    _exchange(client, server)
    assert client.finished
    assert hashlib.sha256(server.client_key).digest() == verifier.stored_key


def test_default_messages_look_like_libpq() -> None:
    client = ScramClient("pw")
    first = client.client_first()
    assert first.startswith(b"n,,n=,r=")
    nonce = first[len(b"n,,n=,r=") :]
    assert len(nonce) == 24 and len(base64.b64decode(nonce)) == 18
    server = ScramServer(FAST_VERIFIER)
    server_first = server.server_first(first)
    assert server_first.startswith(b"r=" + nonce)
    assert len(server_first.split(b",")[0]) == 2 + 24 + 24


def test_wrong_password_fails() -> None:
    client = ScramClient("not fast")
    server = ScramServer(FAST_VERIFIER)
    client_final = client.client_final(server.server_first(client.client_first()))
    with pytest.raises(AuthenticationFailed, match="password authentication failed"):
        server.server_final(client_final)
    with pytest.raises(RuntimeError):
        _ = server.client_key
    with pytest.raises(ProtocolViolation):  # the exchange is over
        server.server_final(client_final)


def test_pass_through_with_recovered_client_key() -> None:
    verifier = scram_verifier("s3cret\u00e9", iterations=64)
    front = ScramServer(verifier)
    _exchange(ScramClient("s3cret\u00e9"), front)

    # The proxy replays the client's ClientKey to a backend that stores the same verifier.
    relay = ScramClient(client_key=front.client_key, server_key=verifier.server_key)
    _exchange(relay, ScramServer(verifier))
    assert relay.finished


def _relay_after_client_final(client_key: bytes) -> ScramClient:
    relay = ScramClient(client_key=client_key, nonce="abc")
    relay.client_first()
    relay.client_final(b"r=abcSRV,s=c2FsdA==,i=8")
    return relay


def test_pass_through_without_server_key_skips_only_the_signature() -> None:
    verifier = scram_verifier("pw", iterations=8)
    front = ScramServer(verifier)
    _exchange(ScramClient("pw"), front)

    relay = ScramClient(client_key=front.client_key)  # no server_key: signature unverifiable
    _exchange(relay, ScramServer(verifier))
    assert relay.finished

    relay = _relay_after_client_final(front.client_key)
    relay.verify_server_final(b"v=" + base64.b64encode(bytes(32)))  # any well-formed v= passes
    assert relay.finished
    with pytest.raises(AuthenticationFailed):
        _relay_after_client_final(front.client_key).verify_server_final(b"e=other-error")
    with pytest.raises(ProtocolViolation):
        _relay_after_client_final(front.client_key).verify_server_final(b"v=AAAA")


def test_pass_through_with_wrong_server_key_fails() -> None:
    verifier = scram_verifier("pw", iterations=8)
    front = ScramServer(verifier)
    _exchange(ScramClient("pw"), front)
    relay = ScramClient(client_key=front.client_key, server_key=bytes(32))
    with pytest.raises(AuthenticationFailed, match="signature"):
        _exchange(relay, ScramServer(verifier))


def test_client_constructor_validation() -> None:
    with pytest.raises(ValueError):
        ScramClient()
    with pytest.raises(ValueError):
        ScramClient("pw", client_key=bytes(32))
    with pytest.raises(ValueError):
        ScramClient("pw", server_key=bytes(32))
    with pytest.raises(ValueError):
        ScramClient(client_key=b"short")
    with pytest.raises(ValueError):
        ScramClient("pw", nonce="has,comma")
    with pytest.raises(ValueError):
        ScramServer(FAST_VERIFIER, nonce="")


def test_username_is_escaped() -> None:
    assert ScramClient("pw", nonce="abc", username="a=b,c").client_first() == b"n,,n=a=3Db=2Cc,r=abc"


# --- gs2 header, channel binding, nonces ------------------------------------------------


def _final_for(server_first: bytes, cbind: bytes, proof: bytes = bytes(32)) -> bytes:
    nonce = server_first.split(b",")[0]
    return b"c=" + cbind + b"," + nonce + b",p=" + base64.b64encode(proof)


def test_server_accepts_y_flag_with_matching_binding() -> None:
    # "y" (client could bind, thinks we cannot) is fine since we never offer -PLUS; the
    # client-final must then carry c=eSws, base64 of "y,,", and the proof covers it.
    server = ScramServer(FAST_VERIFIER)
    server_first = server.server_first(b"y,,n=,r=abcdef")
    salted = hashlib.pbkdf2_hmac("sha256", b"fast", FAST_VERIFIER.salt, FAST_VERIFIER.iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    without_proof = b"c=eSws," + server_first.split(b",")[0]
    auth = b"n=,r=abcdef," + server_first + b"," + without_proof
    sig = hmac.digest(hashlib.sha256(client_key).digest(), auth, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, sig, strict=True))
    assert server.server_final(without_proof + b",p=" + base64.b64encode(proof)).startswith(b"v=")
    assert server.client_key == client_key


@pytest.mark.parametrize(("first", "cbind"), [(b"n,,n=,r=abc", b"eSws"), (b"y,,n=,r=abc", b"biws")])
def test_server_rejects_channel_binding_flag_mismatch(first: bytes, cbind: bytes) -> None:
    server = ScramServer(FAST_VERIFIER)
    server_first = server.server_first(first)
    with pytest.raises(AuthenticationFailed, match="channel-binding"):
        server.server_final(_final_for(server_first, cbind))


@pytest.mark.parametrize(
    "first",
    [
        b"p=tls-server-end-point,,n=,r=abc",  # channel binding required
        b"n,a=admin,n=,r=abc",  # authzid
        b"n,,m=ext,n=,r=abc",  # mandatory extension
    ],
)
def test_server_refuses_unsupported_features(first: bytes) -> None:
    with pytest.raises(AuthenticationFailed):
        ScramServer(FAST_VERIFIER).server_first(first)


@pytest.mark.parametrize(
    "first",
    [b"", b"x,,n=,r=abc", b"n", b"n,", b"n,,", b"n,,r=abc", b"n,,n=", b"n,,n=,r=", b"n,,n=,r=a b", b"p,,n=,r=a"],
)
def test_server_first_malformed(first: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        ScramServer(FAST_VERIFIER).server_first(first)


def test_server_ignores_optional_extensions() -> None:
    client = ScramClient("fast", nonce="abc")
    server = ScramServer(FAST_VERIFIER, nonce="SRV")
    first = client.client_first()
    assert server.server_first(first + b",x=ext") == b"r=abcSRV,s=MDEyMzQ1Njc4OWFiY2RlZg==,i=2"
    # Postgres' proof covers the extension, so build one that carries it.
    server2 = ScramServer(FAST_VERIFIER, nonce="SRV")
    server_first = server2.server_first(first)
    final = client.client_final(server_first)
    without_proof, _, _ = final.rpartition(b",p=")
    tampered = without_proof + b",x=ext" + final[len(without_proof) :]
    with pytest.raises(AuthenticationFailed):  # the proof does not cover "x=ext"
        server2.server_final(tampered)


def test_server_rejects_nonce_mismatch_and_trailing_garbage() -> None:
    server = ScramServer(FAST_VERIFIER, nonce="SRV")
    server.server_first(b"n,,n=,r=abc")
    with pytest.raises(AuthenticationFailed, match="nonce"):
        server.server_final(b"c=biws,r=abcXXX,p=" + base64.b64encode(bytes(32)))
    server = ScramServer(FAST_VERIFIER, nonce="SRV")
    server.server_first(b"n,,n=,r=abc")
    with pytest.raises(ProtocolViolation, match="garbage"):
        server.server_final(b"c=biws,r=abcSRV,p=" + base64.b64encode(bytes(32)) + b",x=1")


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=abc,s=c2FsdA==,i=4096",  # no server part
        b"r=xyzSRV,s=c2FsdA==,i=4096",  # not our prefix
    ],
)
def test_client_rejects_bad_server_nonce(server_first: bytes) -> None:
    client = ScramClient("pw", nonce="abc")
    client.client_first()
    with pytest.raises(AuthenticationFailed, match="nonce"):
        client.client_final(server_first)


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=abcS,s=,i=4096",
        b"r=abcS,s=!!!!,i=4096",
        b"r=abcS,s=c2FsdA==,i=0",
        b"r=abcS,s=c2FsdA==,i=-1",
        b"r=abcS,s=c2FsdA==,i=4096x",
        b"r=abcS,s=c2FsdA==,i=\xd9\xa3",
        b"r=abcS,s=c2FsdA==,i=99999999999",
        b"r=abcS,s=c2FsdA==",
        b"s=c2FsdA==,r=abcS,i=1",
        b"r=abc\x01,s=c2FsdA==,i=1",
        b"r=abcS,s=c2FsdA==,i=1\x00",
        b"\xff",
    ],
)
def test_client_final_malformed(server_first: bytes) -> None:
    client = ScramClient("pw", nonce="abc")
    client.client_first()
    with pytest.raises(ProtocolViolation):
        client.client_final(server_first)


def test_client_rejects_mandatory_extension() -> None:
    client = ScramClient("pw", nonce="abc")
    client.client_first()
    with pytest.raises(AuthenticationFailed, match="extension"):
        client.client_final(b"m=x,r=abcS,s=c2FsdA==,i=1")


def test_out_of_order_calls() -> None:
    client = ScramClient("pw", nonce="abc")
    with pytest.raises(ProtocolViolation):
        client.client_final(b"r=abcS,s=c2FsdA==,i=1")
    with pytest.raises(ProtocolViolation):
        client.verify_server_final(RFC_SERVER_FINAL)
    client.client_first()
    with pytest.raises(ProtocolViolation):
        client.client_first()
    server = ScramServer(FAST_VERIFIER)
    with pytest.raises(ProtocolViolation):
        server.server_final(RFC_CLIENT_FINAL)
    server.server_first(b"n,,n=,r=abc")
    with pytest.raises(ProtocolViolation):
        server.server_first(b"n,,n=,r=abc")


# --- MD5 ------------------------------------------------------------------------------------


def test_md5_password_hash() -> None:
    assert md5_password_hash("postgres", "secret") == "md5" + hashlib.md5(b"secretpostgres").hexdigest()
    # As stored by PostgreSQL 15.18 for CREATE ROLE md5user PASSWORD 'secret' (md5 encryption).
    assert md5_password_hash("md5user", "secret") == "md52aea419619857e8a27f0f7aa641db0c6"


def test_md5_response_and_verify() -> None:
    salt = b"\x01\x02\x03\x04"
    response = md5_client_response("postgres", "secret", salt)
    inner = hashlib.md5(b"secretpostgres").hexdigest().encode()
    assert response == b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
    assert not response.endswith(b"\x00")
    stored = md5_password_hash("postgres", "secret")
    assert md5_verify(stored, salt, response)
    assert not md5_verify(stored, b"\x01\x02\x03\x05", response)
    assert not md5_verify(stored, salt, md5_client_response("postgres", "Secret", salt))
    assert not md5_verify(stored, salt, md5_client_response("other", "secret", salt))
    assert not md5_verify(stored, salt, response + b"\x00")
    assert not md5_verify(str(RFC_VERIFIER), salt, response)  # a SCRAM secret cannot verify MD5
    with pytest.raises(ProtocolViolation):
        md5_client_response("postgres", "secret", b"\x01\x02\x03")


@given(st.binary(max_size=64))
def test_md5_verify_fuzz(response: bytes) -> None:
    assert md5_verify(md5_password_hash("u", "p"), b"salt", response) in (True, False)


# --- fuzzing: malformed input yields only our exception types -----------------------------

_ALLOWED = (ProtocolViolation, AuthenticationFailed)
_PROOF = base64.b64encode(bytes(32)).decode()
_JUNK = ["", "=", "ab", "\x00", "\u00e9", "\udcff"]  # "\udcff" becomes a lone 0xff byte


def _messages(prefixes: list[str], slots: list[list[str]]) -> st.SearchStrategy[bytes]:
    """Raw bytes, or near-valid messages: per slot, a valid value, a wrong one, junk or nothing."""

    def build(prefix: str, parts: tuple[str | None, ...]) -> bytes:
        return (prefix + ",".join(p for p in parts if p is not None)).encode("utf-8", "surrogateescape")

    def slot(options: list[str]) -> st.SearchStrategy[str | None]:
        # Mostly a listed value, so that whole messages often get through to the key checks.
        return (
            st.sampled_from([*options, None]) | st.sampled_from(options) | st.sampled_from(_JUNK) | st.just(options[0])
        )

    structured = st.builds(build, st.sampled_from(prefixes), st.tuples(*(slot(options) for options in slots)))
    return st.one_of(st.binary(max_size=80), structured)


_CLIENT_FIRSTS = _messages(
    ["n,,", "y,,", "p=tls-unique,,", "p,,", "n,a=u,", "n,", "x,,", ""],
    [["m=ext"], ["n=", "n=user", "n=a=2Cb"], ["r=abc", "r=", "r=a b", "r=ab\x7f"], ["x=ext"]],
)
_CLIENT_FINALS = _messages(
    [""],
    [
        ["c=biws", "c=eSws", "c=!!", "c="],
        ["r=abcSRV", "r=abc", "r="],
        ["x=ext"],
        ["p=" + _PROOF, "p=AAAA", "p=", "p=!!"],
        ["x=ext"],
    ],
)
_SERVER_FIRSTS = _messages(
    [""],
    [
        ["m=ext"],
        ["r=abcSRV", "r=abc", "r=xyz", "r=abc\x01", "r="],
        ["s=c2FsdA==", "s=", "s=!!"],
        ["i=1", "i=0", "i=-1", "i=x", "i=99999999999"],
        ["x=ext"],
    ],
)
_SERVER_FINALS = _messages([""], [["v=" + _PROOF, "v=AAAA", "v=", "v=!!", "e=invalid-proof"], ["x=ext"]])


@settings(max_examples=300, deadline=None)
@given(_CLIENT_FIRSTS)
def test_fuzz_server_first(data: bytes) -> None:
    with contextlib.suppress(*_ALLOWED):
        ScramServer(FAST_VERIFIER, nonce="SRV").server_first(data)


@settings(max_examples=300, deadline=None)
@given(_CLIENT_FINALS, st.sampled_from([b"n,,n=,r=abc", b"y,,n=,r=abc"]))
def test_fuzz_server_final(data: bytes, first: bytes) -> None:
    server = ScramServer(FAST_VERIFIER, nonce="SRV")
    server.server_first(first)
    with contextlib.suppress(*_ALLOWED):
        server.server_final(data)


@settings(max_examples=300, deadline=None)
@given(_SERVER_FIRSTS)
def test_fuzz_client_final(data: bytes) -> None:
    # Pass-through mode: no PBKDF2, so a fuzzed "i=" cannot make the test slow.
    client = ScramClient(client_key=bytes(32), nonce="abc")
    client.client_first()
    with contextlib.suppress(*_ALLOWED):
        client.client_final(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_client_final_with_password(data: bytes) -> None:
    client = ScramClient("pw", nonce="abc")
    client.client_first()
    with contextlib.suppress(*_ALLOWED):
        client.client_final(data)


@settings(max_examples=300, deadline=None)
@given(_SERVER_FINALS, st.booleans())
def test_fuzz_verify_server_final(data: bytes, with_server_key: bool) -> None:
    client = ScramClient(client_key=bytes(32), server_key=bytes(32) if with_server_key else None, nonce="abc")
    client.client_first()
    client.client_final(b"r=abcSRV,s=c2FsdA==,i=1")
    with contextlib.suppress(*_ALLOWED):
        client.verify_server_final(data)
