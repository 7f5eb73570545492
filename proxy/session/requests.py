"""What one client request asks for: its SQL (analysed, cached), the prepared statements it uses."""

from __future__ import annotations

from proxy.errors import ProtocolViolation
from proxy.sql import Analysis, AnalysisCache
from proxy.wire.codes import FrontendCode

RawFrame = tuple[int, bytes]  # (type code, the whole message as it arrived)

_Q = FrontendCode.QUERY.value
_P = FrontendCode.PARSE.value
_B = FrontendCode.BIND.value
_D = FrontendCode.DESCRIBE.value
_C = FrontendCode.CLOSE.value
_F = FrontendCode.FUNCTION_CALL.value


def _cstring(raw: bytes, pos: int) -> tuple[str, int]:
    end = raw.find(b"\x00", pos)
    if end < 0:
        raise ProtocolViolation("malformed message: unterminated string")
    return raw[pos:end].decode(errors="replace"), end + 1


class RequestInfo:
    """What scan() found; a slotted plain class (one per request, so cheap to build)."""

    __slots__ = (
        "analyses",
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
        self.analyses: list[Analysis] = []  # of the texts, then of the named statements used
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
        return self.analyses[0].label if self.analyses else "other"


def scan(frames: list[RawFrame], cache: AnalysisCache, known: dict[str, Analysis]) -> RequestInfo:
    """Decode only the messages that carry SQL or statement names (Query, Parse, Bind, Describe,
    Close, FunctionCall); everything else stays opaque. Offsets index the whole frame (its body
    starts at 5): no per-message copy. Parameter types of a Parse are not decoded: the frame is
    forwarded as it came, and Postgres checks them."""
    info = RequestInfo()
    parsed_here: set[str] = set()
    texts, analyses = info.texts, info.analyses
    for code, raw in frames:
        if code == _Q:
            if raw[-1] != 0:
                raise ProtocolViolation("malformed Query message: missing terminator")
            sql = raw[5:-1].decode(errors="replace")  # a Query body is the text and its NUL
            analysis = cache.get(sql)
            texts.append((sql, analysis))
            analyses.append(analysis)
            for name in analysis.deallocates:
                # DEALLOCATE of a statement the client prepared: it must exist where this runs
                # (after a flip the new primary may not have it yet), else Postgres says 26000.
                if name in known and name not in parsed_here:
                    info.needs.append(name)
        elif code == _P:
            # Statement name, then SQL text (inline: this runs for every extended-protocol request).
            stop = raw.find(b"\x00", 5)
            end = raw.find(b"\x00", stop + 1) if stop >= 0 else -1
            if end < 0:
                raise ProtocolViolation("malformed Parse message: unterminated string")
            name = raw[5:stop].decode(errors="replace")
            sql = raw[stop + 1 : end].decode(errors="replace")
            analysis = cache.get(sql)
            texts.append((sql, analysis))
            analyses.append(analysis)
            if name:
                info.parses.append((name, raw, analysis))
                parsed_here.add(name)
            else:
                info.unnamed_parsed = True
                info.unnamed_parse = raw
                parsed_here.add("")
        elif code == _B:
            stop = raw.find(b"\x00", 5)  # after the portal name: the statement name
            end = raw.find(b"\x00", stop + 1) if stop >= 0 else -1
            if end < 0:
                raise ProtocolViolation("malformed Bind message: unterminated string")
            _use(info, raw[stop + 1 : end].decode(errors="replace"), parsed_here, known)
        elif code == _D and raw[5:6] == b"S":
            _use(info, _cstring(raw, 6)[0], parsed_here, known)
        elif code == _C and raw[5:6] == b"S":
            info.closes.append(_cstring(raw, 6)[0])
        elif code == _F:
            info.function_call = True
    if info.used:
        analyses.extend(info.used)
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
