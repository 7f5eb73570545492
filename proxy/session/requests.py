"""What one client request asks for: its SQL (analysed, cached), the prepared statements it uses."""

from __future__ import annotations

from proxy.errors import ProtocolViolation
from proxy.sql import Analysis, AnalysisCache
from proxy.wire.codes import FrontendCode
from proxy.wire.messages import Parse

RawFrame = tuple[int, bytes]  # (type code, the whole message as it arrived)

_Q = FrontendCode.QUERY.value
_P = FrontendCode.PARSE.value
_B = FrontendCode.BIND.value
_D = FrontendCode.DESCRIBE.value
_C = FrontendCode.CLOSE.value
_F = FrontendCode.FUNCTION_CALL.value


def _cstring(body: bytes, pos: int) -> tuple[str, int]:
    end = body.find(b"\x00", pos)
    if end < 0:
        raise ProtocolViolation("malformed message: unterminated string")
    return body[pos:end].decode(errors="replace"), end + 1


class RequestInfo:
    """What scan() found; a slotted plain class (one per request, so cheap to build)."""

    __slots__ = (
        "closes",
        "function_call",
        "needs",
        "parses",
        "texts",
        "unnamed_parse",
        "unnamed_parsed",
        "unnamed_used",
        "used",
    )

    def __init__(self) -> None:
        self.texts: list[tuple[str, Analysis]] = []  # SQL of Query/Parse messages
        self.used: list[Analysis] = []  # of named statements executed, parsed earlier
        self.parses: list[tuple[str, bytes, Analysis]] = []  # (name, Parse frame, analysis)
        self.needs: list[str] = []  # named statements used but not parsed here
        self.closes: list[str] = []  # named statements the client closes
        self.unnamed_parsed = False
        self.unnamed_parse: bytes | None = None  # the last Parse of the unnamed statement, as sent
        self.unnamed_used = False  # Bind/Describe of the unnamed statement without a Parse here
        self.function_call = False

    @property
    def kind(self) -> str:
        """A label for latency metrics: what the request's first statement does."""
        if self.texts:
            return self.texts[0][1].kind.value
        return self.used[0].kind.value if self.used else "other"

    @property
    def analyses(self) -> list[Analysis]:
        if not self.used:
            return [a for _, a in self.texts]
        return [a for _, a in self.texts] + self.used


def scan(frames: list[RawFrame], cache: AnalysisCache, known: dict[str, Analysis]) -> RequestInfo:
    """Decode only the messages that carry SQL or statement names (Query, Parse, Bind, Describe,
    Close, FunctionCall); everything else stays opaque."""
    info = RequestInfo()
    parsed_here: set[str] = set()
    for code, raw in frames:
        body = raw[5:]
        if code == _Q:
            if body[-1:] != b"\x00":
                raise ProtocolViolation("malformed Query message: missing terminator")
            sql = body[:-1].decode(errors="replace")  # a Query body is the text and its NUL
            info.texts.append((sql, cache.get(sql)))
        elif code == _P:
            parse = Parse.decode(body)
            analysis = cache.get(parse.sql)
            info.texts.append((parse.sql, analysis))
            if parse.name:
                info.parses.append((parse.name, raw, analysis))
                parsed_here.add(parse.name)
            else:
                info.unnamed_parsed = True
                info.unnamed_parse = raw
                parsed_here.add("")
        elif code == _B:
            _portal, pos = _cstring(body, 0)
            name, _ = _cstring(body, pos)
            _use(info, name, parsed_here, known)
        elif code == _D and body[:1] == b"S":
            _use(info, _cstring(body, 1)[0], parsed_here, known)
        elif code == _C and body[:1] == b"S":
            info.closes.append(_cstring(body, 1)[0])
        elif code == _F:
            info.function_call = True
    return info


def _use(info: RequestInfo, name: str, parsed_here: set[str], known: dict[str, Analysis]) -> None:
    if name in parsed_here:
        return
    if not name:
        info.unnamed_used = True
        return
    info.needs.append(name)
    analysis = known.get(name)
    if analysis is not None:
        info.used.append(analysis)
