"""Sans-IO password authentication primitives: SCRAM-SHA-256 (RFC 5802/7677) and MD5, both sides."""

# Error policy for everything that reads peer bytes: input that does not parse (bad grammar,
# non-UTF-8, bad base64, wrong lengths, a message arriving out of order) raises ProtocolViolation;
# input that parses but cannot authenticate (wrong proof or signature, nonce mismatch, wrong
# channel-binding data, a feature we do not offer such as channel binding or an authzid, a
# server "e=" error) raises AuthenticationFailed.  Postgres reports a few of the latter as
# protocol_violation (nonce and channel-binding mismatches, src/backend/libpq/auth-scram.c);
# both are FATAL to the session, and the split here follows "malformed vs. wrong".

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass, field

from proxy.errors import AuthenticationFailed, ProtocolViolation

__all__ = [
    "SCRAM_MECHANISM",
    "ScramClient",
    "ScramServer",
    "ScramVerifier",
    "md5_client_response",
    "md5_password_hash",
    "md5_verify",
    "scram_verifier",
]

SCRAM_MECHANISM = "SCRAM-SHA-256"

_KEY_LEN = 32  # SCRAM_KEY_LEN: SHA-256 digest size (src/include/common/scram-common.h)
_RAW_NONCE_LEN = 18  # SCRAM_RAW_NONCE_LEN: libpq and the backend both send 18 random bytes, base64
_DEFAULT_SALT_LEN = 16  # SCRAM_DEFAULT_SALT_LEN
_DEFAULT_ITERATIONS = 4096  # SCRAM_SHA_256_DEFAULT_ITERATIONS (and RFC 7677's minimum advice)
# Postgres keeps the iteration count in an int (scram_iterations GUC max is INT_MAX).
_MAX_ITERATIONS = 2**31 - 1
_MD5_SALT_LEN = 4  # AuthenticationMD5Password always carries 4 salt bytes
_MD5_PREFIX = "md5"
_MD5_HEX_LEN = 32


# --- helpers ------------------------------------------------------------------------------


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(value: str, what: str) -> bytes:
    """Strict base64 (RFC 5802 "base64" production); anything else is a protocol violation."""
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ProtocolViolation(f"malformed SCRAM message (invalid base64 in {what})") from None


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _is_printable(value: str) -> bool:
    # RFC 5802 §7: printable = %x21-2B / %x2D-7E (ASCII without ","); same as
    # is_scram_printable() in src/backend/libpq/auth-scram.c.
    return all(0x21 <= ord(ch) <= 0x7E and ch != "," for ch in value)


def _new_nonce() -> str:
    return _b64encode(secrets.token_bytes(_RAW_NONCE_LEN))


def _check_nonce_arg(nonce: str) -> str:
    if not nonce or not _is_printable(nonce):
        raise ValueError("a SCRAM nonce must be non-empty printable ASCII without ','")
    return nonce


def _check_key_arg(key: bytes, name: str) -> bytes:
    if len(key) != _KEY_LEN:
        raise ValueError(f"{name} must be {_KEY_LEN} bytes, got {len(key)}")
    return bytes(key)


def _parse_iterations(value: str, what: str) -> int:
    # int() alone would accept " 12", "1_000" and non-ASCII digits; Postgres uses strtol and
    # rejects trailing garbage and counts < 1 (read_server_first_message in fe-auth-scram.c).
    if not (value.isascii() and value.isdigit()):
        raise ProtocolViolation(f"malformed SCRAM message (invalid iteration count in {what})")
    count = int(value)
    if not 1 <= count <= _MAX_ITERATIONS:
        raise ProtocolViolation(f"malformed SCRAM message (iteration count out of range in {what})")
    return count


def _decode_message(data: bytes, what: str) -> str:
    # The backend handles SCRAM messages as C strings, so a NUL can never be meant; RFC 5802
    # messages are UTF-8.
    raw = bytes(data)
    if b"\x00" in raw:
        raise ProtocolViolation(f"malformed SCRAM message ({what} contains a NUL byte)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(f"malformed SCRAM message ({what} is not valid UTF-8)") from None


def _split_attrs(text: str, what: str) -> list[tuple[str, str]]:
    """``a=v,b=w`` into pairs; like read_any_attr() in auth-scram.c the name is one ASCII letter.

    Values may be empty (libpq sends ``n=``); a value never contains ``,`` (RFC 5802 §5.1), so
    ``",".join`` over the raw parts rebuilds the exact text.
    """
    attrs: list[tuple[str, str]] = []
    for part in text.split(","):
        name = part[:1]
        if len(part) < 2 or part[1] != "=" or not (name.isascii() and name.isalpha()):
            raise ProtocolViolation(f"malformed SCRAM message (attribute expected in {what})")
        attrs.append((name, part[2:]))
    return attrs


def _expect(attrs: list[tuple[str, str]], index: int, name: str, what: str) -> str:
    if index >= len(attrs) or attrs[index][0] != name:
        raise ProtocolViolation(f'malformed SCRAM message (attribute "{name}" expected in {what})')
    return attrs[index][1]


def _password_bytes(password: str) -> bytes:
    # surrogateescape lets a password read from a non-UTF-8 source (os.fsdecode, argv) keep its
    # original bytes, which is what Postgres hashes when the text is not UTF-8.
    try:
        return password.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError("password contains lone surrogates and cannot be encoded") from None


def _saslprep_prohibited(ch: str) -> bool:
    # RFC 4013 §2.3 prohibited output: tables C.1.2, C.2.1, C.2.2, C.3-C.9 of RFC 3454 (the
    # prohibited_output_ranges table of src/common/saslprep.c).
    return (
        stringprep.in_table_c12(ch)
        or stringprep.in_table_c21_c22(ch)
        or stringprep.in_table_c3(ch)
        or stringprep.in_table_c4(ch)
        or stringprep.in_table_c5(ch)
        or stringprep.in_table_c6(ch)
        or stringprep.in_table_c7(ch)
        or stringprep.in_table_c8(ch)
        or stringprep.in_table_c9(ch)
    )


def _saslprep(password: str) -> bytes:
    """The bytes Postgres feeds to PBKDF2 for ``password``: pg_saslprep(), or the raw password.

    Mirrors pg_saslprep() in src/common/saslprep.c and its callers (scram_build_secret() in
    scram-common.c, pg_fe_scram_init() in libpq): when SASLprep fails (not UTF-8, prohibited
    or unassigned characters, bidi rule, empty after mapping) the raw bytes are used instead of
    rejecting the password, because Postgres supports non-UTF-8 encodings.  Two Postgres quirks
    are kept on purpose so hashes match byte for byte: pure ASCII skips SASLprep entirely, and
    the prohibition and bidi checks look at the mapped string *before* NFKC normalization.
    """
    raw = _password_bytes(password)
    if raw.isascii():
        return raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw  # SASLPREP_INVALID_UTF8
    # 1) Map (RFC 4013 §2.1): non-ASCII spaces (C.1.2) to SPACE, B.1 characters to nothing.
    mapped = [" " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)]
    if not mapped:
        return raw  # "don't allow empty password"
    # 3) Prohibit, including unassigned code points (table A.1), on the mapped characters.
    if any(_saslprep_prohibited(ch) or stringprep.in_table_a1(ch) for ch in mapped):
        return raw
    # 4) Bidi (RFC 3454 §6): with any RandALCat, no LCat, and RandALCat first and last.
    if any(stringprep.in_table_d1(ch) for ch in mapped) and (
        any(stringprep.in_table_d2(ch) for ch in mapped)
        or not stringprep.in_table_d1(mapped[0])
        or not stringprep.in_table_d1(mapped[-1])
    ):
        return raw
    # 2) Normalize with NFKC; Postgres uses current Unicode tables, as unicodedata does.
    return unicodedata.normalize("NFKC", "".join(mapped)).encode("utf-8")


def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    # RFC 5802 §3: SaltedPassword := Hi(Normalize(password), salt, i), Hi being PBKDF2 with
    # HMAC-SHA-256 and one output block (scram_SaltedPassword() in scram-common.c).
    return hashlib.pbkdf2_hmac("sha256", _saslprep(password), salt, iterations, _KEY_LEN)


def _client_key(salted: bytes) -> bytes:
    return _hmac(salted, b"Client Key")


def _server_key(salted: bytes) -> bytes:
    return _hmac(salted, b"Server Key")


# --- MD5 ----------------------------------------------------------------------------------


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_password_hash(user: str, password: str) -> str:
    """The value pg_authid stores for an MD5 password: ``"md5" + md5(password || user)``."""
    return _MD5_PREFIX + _md5_hex(_password_bytes(password) + _password_bytes(user))


def _md5_salted(stored_hex: str, salt: bytes) -> bytes:
    # Second round of the MD5 exchange: md5(hex of the stored hash || salt), with the "md5"
    # prefix (pg_password_sendauth() in fe-auth.c, md5_crypt_verify() in crypt.c).
    return (_MD5_PREFIX + _md5_hex(stored_hex.encode("ascii") + salt)).encode("ascii")


def md5_client_response(user: str, password: str, salt: bytes) -> bytes:
    """PasswordMessage payload for AuthenticationMD5Password, without the trailing NUL."""
    if len(salt) != _MD5_SALT_LEN:
        raise ProtocolViolation(f"MD5 salt must be {_MD5_SALT_LEN} bytes, got {len(salt)}")
    return _md5_salted(md5_password_hash(user, password)[len(_MD5_PREFIX) :], salt)


def md5_verify(stored_hash: str, salt: bytes, response: bytes) -> bool:
    """Server side: does ``response`` (no trailing NUL) answer ``salt`` for ``stored_hash``?

    A stored value that is not an MD5 hash (e.g. a SCRAM verifier) cannot verify an MD5
    response, so it yields False, as md5_crypt_verify() fails for it in src/backend/libpq/crypt.c.
    """
    hex_part = stored_hash[len(_MD5_PREFIX) :]
    if (
        not stored_hash.startswith(_MD5_PREFIX)
        or len(hex_part) != _MD5_HEX_LEN
        or any(ch not in "0123456789abcdef" for ch in hex_part)
    ):
        return False
    return hmac.compare_digest(_md5_salted(hex_part, salt), bytes(response))


# --- SCRAM verifier -----------------------------------------------------------------------


@dataclass(frozen=True)
class ScramVerifier:
    """A SCRAM-SHA-256 secret as pg_authid.rolpassword stores it.

    The keys are left out of repr(): StoredKey and ServerKey together let a holder impersonate
    the server, so they should not land in logs by accident.
    """

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.iterations <= _MAX_ITERATIONS:
            raise ValueError(f"SCRAM iteration count must be in 1..{_MAX_ITERATIONS}")
        if not self.salt:
            raise ValueError("SCRAM salt must not be empty")
        for name, key in (("stored_key", self.stored_key), ("server_key", self.server_key)):
            if len(key) != _KEY_LEN:
                raise ValueError(f"SCRAM {name} must be {_KEY_LEN} bytes, got {len(key)}")

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        """Read ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` (parse_scram_secret())."""
        try:
            mechanism, params, keys = text.split("$")
            iter_text, salt_b64 = params.split(":")
            stored_b64, server_b64 = keys.split(":")
        except ValueError:
            raise ValueError(
                "invalid SCRAM verifier: expected 'SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>'"
            ) from None
        if mechanism != SCRAM_MECHANISM:
            raise ValueError(f"invalid SCRAM verifier: unsupported mechanism {mechanism[:32]!r}")
        try:
            iterations = _parse_iterations(iter_text, "verifier")
            salt = _b64decode(salt_b64, "salt")
            stored_key = _b64decode(stored_b64, "StoredKey")
            server_key = _b64decode(server_b64, "ServerKey")
        except ProtocolViolation as exc:
            raise ValueError(f"invalid SCRAM verifier: {exc.message}") from None
        try:
            return cls(iterations, salt, stored_key, server_key)
        except ValueError as exc:
            raise ValueError(f"invalid SCRAM verifier: {exc}") from None

    def __str__(self) -> str:
        # Same layout as scram_build_secret() in src/common/scram-common.c.
        return (
            f"{SCRAM_MECHANISM}${self.iterations}:{_b64encode(self.salt)}"
            f"${_b64encode(self.stored_key)}:{_b64encode(self.server_key)}"
        )


def scram_verifier(password: str, *, iterations: int = _DEFAULT_ITERATIONS, salt: bytes | None = None) -> ScramVerifier:
    """Build the verifier Postgres would store for ``password`` (scram_build_secret())."""
    if salt is None:
        salt = secrets.token_bytes(_DEFAULT_SALT_LEN)
    if not 1 <= iterations <= _MAX_ITERATIONS:
        raise ValueError(f"SCRAM iteration count must be in 1..{_MAX_ITERATIONS}")
    salted = _salted_password(password, salt, iterations)
    return ScramVerifier(iterations, bytes(salt), _sha256(_client_key(salted)), _server_key(salted))


# --- SCRAM client -------------------------------------------------------------------------

# Exchange states shared by client and server.
_START, _FIRST, _FINAL, _DONE, _FAILED = range(5)

_GS2_NO_CB = "n,,"  # gs2 header when channel binding is not used; base64 "biws"


def _escape_saslname(name: str) -> str:
    # RFC 5802 §5.1: "," and "=" in a username are sent as "=2C" and "=3D".
    return name.replace("=", "=3D").replace(",", "=2C")


class ScramClient:
    """Client side. Either a password, or (pass-through) a client_key (+ optional server_key) recovered elsewhere.

    Call client_first(), client_final(server_first) and verify_server_final(server_final) once
    each, in that order; a call out of order raises ProtocolViolation, since in a proxy it means
    the peer sent a message at the wrong point of the exchange.

    Pass-through mode (``client_key`` given) skips PBKDF2: the proof is ClientKey XOR
    HMAC(H(ClientKey), AuthMessage).  Without a ``server_key`` as well, the server's signature
    cannot be checked and verify_server_final() only checks that the message is well formed and
    not an error -- so the backend is *not* authenticated to us in that mode.  Pass
    ``server_key`` (ScramVerifier.server_key) whenever it is known.

    ``username`` is optional and only goes into the ``n=`` attribute: Postgres ignores it and
    takes the user from the startup packet, so libpq sends it empty (RFC test vectors need it).
    """

    def __init__(
        self,
        password: str | None = None,
        *,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
        nonce: str | None = None,
        username: str = "",
    ) -> None:
        if (password is None) == (client_key is None):
            raise ValueError("ScramClient needs exactly one of password or client_key")
        if password is not None and server_key is not None:
            raise ValueError("server_key only applies with client_key; a password yields its own")
        if password is not None:
            _password_bytes(password)  # fail now, not in the middle of the exchange
        self._password = password
        self._client_key = None if client_key is None else _check_key_arg(client_key, "client_key")
        self._server_key = None if server_key is None else _check_key_arg(server_key, "server_key")
        self._nonce = _new_nonce() if nonce is None else _check_nonce_arg(nonce)
        self._first_bare = f"n={_escape_saslname(username)},r={self._nonce}"
        self._expected_signature: bytes | None = None
        self._state = _START

    @property
    def finished(self) -> bool:
        """True once verify_server_final() has accepted the server's final message.

        A server that reports AuthenticationOk before this is true skipped its proof (libpq
        refuses that too); the session layer should treat it as a failure.
        """
        return self._state == _DONE

    def client_first(self) -> bytes:
        """The SASLInitialResponse data: ``n,,n=,r=<nonce>``."""
        if self._state != _START:
            raise ProtocolViolation("SCRAM client-first-message already sent")
        self._state = _FIRST
        return (_GS2_NO_CB + self._first_bare).encode("utf-8")

    def client_final(self, server_first: bytes) -> bytes:
        """Answer the server-first-message (AuthenticationSASLContinue data) with our proof."""
        if self._state != _FIRST:
            raise ProtocolViolation("unexpected SCRAM server-first-message")
        self._state = _FAILED  # until this message proves acceptable
        what = "server-first-message"
        text = _decode_message(server_first, what)
        attrs = _split_attrs(text, what)
        if attrs[0][0] == "m":
            raise AuthenticationFailed("server requires an unsupported mandatory SCRAM extension")
        nonce = _expect(attrs, 0, "r", what)
        salt = _b64decode(_expect(attrs, 1, "s", what), "salt")
        iterations = _parse_iterations(_expect(attrs, 2, "i", what), what)
        # Anything after "i" is an optional extension (RFC 5802 §7), which we ignore.
        if not _is_printable(nonce):
            raise ProtocolViolation("malformed SCRAM message (non-printable characters in nonce)")
        # The server must extend our nonce (RFC 5802 §5.1); libpq checks the prefix too.  We also
        # require a non-empty server part, since replaying our own nonce adds no freshness.
        if len(nonce) <= len(self._nonce) or not nonce.startswith(self._nonce):
            raise AuthenticationFailed("SCRAM server nonce does not extend the client nonce")
        if not salt:
            raise ProtocolViolation("malformed SCRAM message (empty salt)")

        server_key: bytes | None
        if self._password is not None:
            salted = _salted_password(self._password, salt, iterations)
            client_key, server_key = _client_key(salted), _server_key(salted)
        else:
            assert self._client_key is not None  # guaranteed by __init__
            client_key, server_key = self._client_key, self._server_key

        without_proof = f"c={_b64encode(_GS2_NO_CB.encode('ascii'))},r={nonce}"
        auth_message = f"{self._first_bare},{text},{without_proof}".encode()
        proof = _xor(client_key, _hmac(_sha256(client_key), auth_message))
        if server_key is not None:
            self._expected_signature = _hmac(server_key, auth_message)
        self._state = _FINAL
        return f"{without_proof},p={_b64encode(proof)}".encode("ascii")

    def verify_server_final(self, server_final: bytes) -> None:
        """Check the server-final-message (AuthenticationSASLFinal data)."""
        if self._state != _FINAL:
            raise ProtocolViolation("unexpected SCRAM server-final-message")
        self._state = _FAILED
        what = "server-final-message"
        attrs = _split_attrs(_decode_message(server_final, what), what)
        name, value = attrs[0]
        if name == "e":
            # RFC 5802 §7 server-error; the value is the server's reason, e.g. "invalid-proof".
            raise AuthenticationFailed(f"SCRAM server reported an error: {value[:100]}")
        signature = _b64decode(_expect(attrs, 0, "v", what), "server signature")
        if len(signature) != _KEY_LEN:
            raise ProtocolViolation("malformed SCRAM message (invalid server signature length)")
        # Further attributes are extensions (RFC 5802 §7) and are ignored.
        if self._expected_signature is not None and not hmac.compare_digest(signature, self._expected_signature):
            raise AuthenticationFailed("SCRAM server signature is invalid")
        self._state = _DONE


# --- SCRAM server -------------------------------------------------------------------------


class ScramServer:
    """Server side over a stored verifier.

    Call server_first(client_first) then server_final(client_final), once each; out-of-order
    calls raise ProtocolViolation.  Channel binding is never offered (only SCRAM-SHA-256, not
    -PLUS, should be advertised), so gs2 flags "n" and "y" are accepted and "p" is refused.
    """

    def __init__(self, verifier: ScramVerifier, *, nonce: str | None = None) -> None:
        self._verifier = verifier
        self._server_nonce = _new_nonce() if nonce is None else _check_nonce_arg(nonce)
        self._state = _START
        self._gs2_header = ""
        self._client_nonce = ""
        self._first_bare = ""
        self._server_first = ""
        self._client_key: bytes | None = None

    def server_first(self, client_first: bytes) -> bytes:
        """Parse the SASLInitialResponse data and return the server-first-message."""
        if self._state != _START:
            raise ProtocolViolation("unexpected SCRAM client-first-message")
        self._state = _FAILED
        what = "client-first-message"
        text = _decode_message(client_first, what)
        # gs2-cbind-flag, as read_client_first_message() in auth-scram.c reads it.
        flag = text[:1]
        if flag == "p":
            if text.startswith("p="):
                raise AuthenticationFailed("client requires SCRAM channel binding, but it is not supported")
            raise ProtocolViolation("malformed SCRAM message (invalid channel-binding flag)")
        if flag not in ("n", "y"):
            raise ProtocolViolation("malformed SCRAM message (unexpected channel-binding flag)")
        if text[1:2] != ",":
            raise ProtocolViolation("malformed SCRAM message (comma expected after channel-binding flag)")
        if text[2:3] == "a":
            raise AuthenticationFailed("client uses SCRAM authorization identity, but it is not supported")
        if text[2:3] != ",":
            raise ProtocolViolation("malformed SCRAM message (comma expected after gs2 header)")
        bare = text[3:]
        attrs = _split_attrs(bare, what)
        if attrs[0][0] == "m":
            raise AuthenticationFailed("client requires an unsupported mandatory SCRAM extension")
        _expect(attrs, 0, "n", what)  # ignored: Postgres takes the user from the startup packet
        client_nonce = _expect(attrs, 1, "r", what)
        # Trailing optional extensions are ignored, as in Postgres.
        if not client_nonce or not _is_printable(client_nonce):
            raise ProtocolViolation("malformed SCRAM message (empty or non-printable nonce)")

        self._gs2_header = text[:3]
        self._client_nonce = client_nonce
        self._first_bare = bare
        v = self._verifier
        # build_server_first_message(): r=<client nonce><server nonce>,s=<salt>,i=<iterations>
        self._server_first = f"r={client_nonce}{self._server_nonce},s={_b64encode(v.salt)},i={v.iterations}"
        self._state = _FIRST
        return self._server_first.encode("ascii")

    def server_final(self, client_final: bytes) -> bytes:
        """Check the client-final-message (SASLResponse data); return the server-final-message."""
        if self._state != _FIRST:
            raise ProtocolViolation("unexpected SCRAM client-final-message")
        self._state = _FAILED
        what = "client-final-message"
        text = _decode_message(client_final, what)
        attrs = _split_attrs(text, what)
        channel_binding = _expect(attrs, 0, "c", what)
        final_nonce = _expect(attrs, 1, "r", what)
        # Optional extensions may sit between "r" and "p"; "p" must come last
        # (read_client_final_message() in auth-scram.c).
        proof_index = next((i for i in range(2, len(attrs)) if attrs[i][0] == "p"), None)
        if proof_index is None:
            raise ProtocolViolation('malformed SCRAM message (attribute "p" expected in client-final-message)')
        if proof_index != len(attrs) - 1:
            raise ProtocolViolation("malformed SCRAM message (garbage at end of client-final-message)")
        proof = _b64decode(attrs[proof_index][1], "proof")
        if len(proof) != _KEY_LEN:
            raise ProtocolViolation("malformed SCRAM message (malformed proof in client-final-message)")
        # Without channel binding the c= data must be exactly base64 of the gs2 header the
        # client sent first ("biws" for "n,,", "eSws" for "y,,"): this is what detects a
        # downgrade of the flag in transit.
        _b64decode(channel_binding, "channel-binding data")
        if channel_binding != _b64encode(self._gs2_header.encode("ascii")):
            raise AuthenticationFailed("unexpected SCRAM channel-binding attribute in client-final-message")
        if final_nonce != self._client_nonce + self._server_nonce:
            raise AuthenticationFailed("SCRAM nonce mismatch")

        without_proof = text[: len(text) - len(attrs[proof_index][1]) - len(",p=")]
        auth_message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        v = self._verifier
        # verify_client_proof(): ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage), and
        # H(ClientKey) must equal StoredKey.
        client_key = _xor(proof, _hmac(v.stored_key, auth_message))
        if not hmac.compare_digest(_sha256(client_key), v.stored_key):
            raise AuthenticationFailed("password authentication failed")
        self._client_key = client_key
        self._state = _DONE
        return b"v=" + _b64encode(_hmac(v.server_key, auth_message)).encode("ascii")

    @property
    def client_key(self) -> bytes:
        """The client's ClientKey, recovered from its proof; for SCRAM pass-through to a backend.

        Raises RuntimeError before a successful server_final(): asking earlier is a bug in the
        caller, not something a peer can cause.
        """
        if self._client_key is None:
            raise RuntimeError("ScramServer.client_key is only known after a successful server_final()")
        return self._client_key
