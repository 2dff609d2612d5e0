"""The guide's POST / on top of vLLM's /v1/completions: its request model, response shaping and error bodies."""
from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Optional, Union

import msgspec
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      ValidationError, field_validator)

MAX_STOP_SEQUENCES = 16
MAX_NUMBER = 2**63 - 1


class ApiError(Exception):
    """A client-visible error, in the shape of vLLM's ErrorResponse so that every endpoint of a
    replica fails alike: {"error": {"message", "type", "param", "code"}}, code = HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        # vLLM's names: BadRequestError, NotFoundError, ServiceUnavailableError, ...
        return HTTPStatus(self.status).phrase.replace(" ", "").replace("-", "") + "Error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


# Seconds a client is told to wait after a 503 (overload, or a replica being replaced).
RETRY_AFTER_S = 5


def unavailable(message: str) -> ApiError:
    """A 503 that tells the client when to retry."""
    return ApiError(503, message, headers={"retry-after": str(RETRY_AFTER_S)})


class SamplingFields(BaseModel):
    """The sampling options POST / takes (the rest of vLLM's are on /v1/completions)."""

    model_config = ConfigDict(extra="forbid")

    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = Field(default=None, ge=-MAX_NUMBER, le=MAX_NUMBER)
    stream: StrictBool = False
    ignore_eos: StrictBool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        if isinstance(value, list):
            if len(value) > MAX_STOP_SEQUENCES:
                raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
            if any(not s for s in value):
                raise ValueError("stop sequences must not be empty")
        elif value == "":
            raise ValueError("stop sequence must not be empty")
        return value


class GenerateRequest(SamplingFields):
    """POST / : the guide's request."""

    prompt: StrictStr = Field(min_length=1)
    max_tokens: StrictInt = Field(default=256, ge=1, le=MAX_NUMBER)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty or only whitespace")
        return value


def validation_message(exc: ValidationError) -> str:
    """One readable line naming each offending field."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("function-after",))
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif err.get("type") == "missing":
            msg = "field required"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_body(body: bytes, model: type[BaseModel], max_bytes: int) -> Any:
    """Bytes -> validated request model, or an ApiError naming the problem."""
    if len(body) > max_bytes:
        raise ApiError(413, f"request body is {len(body)} bytes; the limit is {max_bytes}")
    if not body.strip():
        raise ApiError(400, "request body is empty; send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") \
            from None
    except RecursionError:
        raise ApiError(400, "invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, validation_message(exc)) from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


_SAMPLING = ("temperature", "top_p", "stop", "seed", "ignore_eos")


def completion_payload(request: GenerateRequest, model: str) -> dict[str, Any]:
    """The /v1/completions body that answers a POST /: the guide's fields, the served model."""
    payload: dict[str, Any] = {"model": model, "prompt": request.prompt,
                               "max_tokens": request.max_tokens, "stream": request.stream}
    # Only what the client set, so that vLLM's defaults (generation_config.json) rule the rest.
    payload.update({name: getattr(request, name) for name in _SAMPLING
                    if name in request.model_fields_set})
    if request.stream:
        payload["stream_options"] = {"include_usage": True}
    return payload


def _choices(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"text": c.get("text", ""), "index": c.get("index", 0),
             "finish_reason": c.get("finish_reason")} for c in data.get("choices") or []]


def _usage(data: dict[str, Any] | None) -> dict[str, int]:
    data = data or {}
    prompt, completion = int(data.get("prompt_tokens") or 0), int(data.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def guide_body(completion: dict[str, Any], node: str) -> dict[str, Any]:
    """vLLM's text_completion as the guide shows it: its keys, in its order, and `node`."""
    return {"id": completion.get("id"), "object": "text_completion",
            "created": completion.get("created"), "model": completion.get("model"),
            "node": node, "choices": _choices(completion), "usage": _usage(completion.get("usage"))}


def _guide_chunk(chunk: dict[str, Any], node: str) -> dict[str, Any]:
    return {"id": chunk.get("id"), "object": "text_completion", "created": chunk.get("created"),
            "model": chunk.get("model"), "node": node, "choices": _choices(chunk)}


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# msgspec (a vLLM dependency) parses and writes an event several times faster than json: a
# stream's every token passes here, on the event loop that also feeds vLLM's other streams.
_decode_event = msgspec.json.Decoder().decode
_encode_event = msgspec.json.Encoder().encode


class GuideStream:
    """vLLM's /v1/completions event stream reshaped into the guide's, fed as the bytes arrive:
    each chunk in the guide's keys, and the usage (vLLM's own last chunk) inside the chunk that
    carries the finish_reason. Synchronous, so the replica reshapes inside vLLM's own send."""

    def __init__(self, node: str):
        self.node = node
        self._buffer = b""
        self._finishing: dict[str, Any] | None = None

    def feed(self, data: bytes) -> bytes:
        """The guide's events for the frames `data` completes (b"" while none is complete)."""
        self._buffer += data
        *frames, self._buffer = self._buffer.split(b"\n\n")
        out = []
        for frame in frames:
            if not frame.startswith(b"data: "):
                continue  # keep-alive comments
            payload = frame[len(b"data: "):]
            if payload == b"[DONE]":
                out.append(self.close() + SSE_DONE)
                continue
            chunk = _decode_event(payload)
            if not chunk.get("choices"):
                if self._finishing is not None and chunk.get("usage"):
                    self._finishing["usage"] = _usage(chunk["usage"])
                elif "error" in chunk:
                    out.append(sse(chunk))
                continue
            shaped = _guide_chunk(chunk, self.node)
            if any(c["finish_reason"] is not None for c in shaped["choices"]):
                self._finishing = shaped  # usage follows in vLLM's next chunk
            else:
                out.append(b"data: " + _encode_event(shaped) + b"\n\n")
        return b"".join(out)

    def close(self) -> bytes:
        """The finishing chunk still held back for its usage (b"" if none)."""
        finishing, self._finishing = self._finishing, None
        return sse(finishing) if finishing is not None else b""
