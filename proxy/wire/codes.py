"""Direction-typed message type codes of the Postgres v3 protocol (never a bare b"D")."""

from __future__ import annotations

from enum import IntEnum

# Protocol codes in the startup packet's version field (protocol.html, "Message Formats").
PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


class FrontendCode(IntEnum):
    """Type byte of a message sent by the client (frontend) after startup."""

    BIND = ord("B")
    CLOSE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    DESCRIBE = ord("D")
    EXECUTE = ord("E")
    FLUSH = ord("H")
    FUNCTION_CALL = ord("F")
    PARSE = ord("P")
    PASSWORD = ord("p")  # also SASLInitialResponse, SASLResponse, GSSResponse
    QUERY = ord("Q")
    SYNC = ord("S")
    TERMINATE = ord("X")


class BackendCode(IntEnum):
    """Type byte of a message sent by the server (backend)."""

    AUTHENTICATION = ord("R")
    BACKEND_KEY_DATA = ord("K")
    BIND_COMPLETE = ord("2")
    CLOSE_COMPLETE = ord("3")
    COMMAND_COMPLETE = ord("C")
    COPY_BOTH_RESPONSE = ord("W")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_IN_RESPONSE = ord("G")
    COPY_OUT_RESPONSE = ord("H")
    DATA_ROW = ord("D")
    EMPTY_QUERY_RESPONSE = ord("I")
    ERROR_RESPONSE = ord("E")
    FUNCTION_CALL_RESPONSE = ord("V")
    NEGOTIATE_PROTOCOL_VERSION = ord("v")
    NO_DATA = ord("n")
    NOTICE_RESPONSE = ord("N")
    NOTIFICATION_RESPONSE = ord("A")
    PARAMETER_DESCRIPTION = ord("t")
    PARAMETER_STATUS = ord("S")
    PARSE_COMPLETE = ord("1")
    PORTAL_SUSPENDED = ord("s")
    READY_FOR_QUERY = ord("Z")
    ROW_DESCRIPTION = ord("T")


class AuthCode(IntEnum):
    """Sub-code of an Authentication ('R') message."""

    OK = 0
    KERBEROS_V5 = 2
    CLEARTEXT_PASSWORD = 3
    MD5_PASSWORD = 5
    GSS = 7
    GSS_CONTINUE = 8
    SSPI = 9
    SASL = 10
    SASL_CONTINUE = 11
    SASL_FINAL = 12


class TxStatus(IntEnum):
    """Transaction status byte carried by ReadyForQuery."""

    IDLE = ord("I")
    IN_TRANSACTION = ord("T")
    FAILED = ord("E")


FRONTEND_CODES = frozenset(int(c) for c in FrontendCode)
BACKEND_CODES = frozenset(int(c) for c in BackendCode)
