"""Parity with vLLM's own OpenAI server: the same requests to `vllm serve` and to our deployment.

Two servers on the same model (SmolLM2-135M-Instruct, .cache/smollm2-135m-instruct) with the same
served name, context length, eager mode, KV cache and seed:

- reference: the real `vllm serve` as a subprocess (tests/_vllm_serve.py);
- ours: ray-single-gpu.py --device cpu deployed in-process on a local Ray (as test_api_http.py).

Every differential case sends one request to both and asserts the same HTTP status and, for greedy
(temperature 0) or seeded requests, the same JSON: the same keys at every level, the same value
types and the same values, except volatile ones (ids, `created`, `system_fingerprint`; `root`
on /v1/models), with floats (logprobs) within 1e-3. Error answers compare status, keys and the
error's `type`/`code`, never the message text. A failure shows both answers side by side.

vLLM-only serving flags (tool parsing) are one list, VLLM_FLAGS, passed to both servers; when our
deployment script refuses them (argparse), it is deployed without them and the cases that need
them say so in their failure. PARITY_SELF_CHECK=1 compares vllm serve with a second vllm serve
(every case must pass: a check of the suite itself).

Run (starts Ray and a server, so inside a loopback-only namespace):
    scripts/loopback.sh .venv/bin/python -m pytest tests/test_openai_parity.py -q -p no:cacheprovider
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import math
import os
from dataclasses import dataclass

import pytest
import requests

from _serve_fixtures import LOCAL_IP, deploy_script, free_port, local_ray
from _vllm_serve import VllmServer, vllm_serve

from common.demo_model import ensure_instruct_model

NAME = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 512
# Engine settings both servers get, spelled the same way (both CLIs take these flags).
SHARED_FLAGS = ["--served-model-name", NAME, "--max-model-len", str(MAX_MODEL_LEN),
                "--seed", "0", "--enforce-eager", "--kv-cache-memory-bytes", str(64 * 2**20)]
# vLLM serving flags: `tool_choice="auto"` needs a tool-call parser (SmolLM2 writes Hermes-style
# <tool_call> tags). Passed to both servers.
VLLM_FLAGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
TIMEOUT = 300
# PARITY_SELF_CHECK=1: "ours" is a second `vllm serve` instead of our deployment, which proves the
# suite itself (determinism, volatile fields, the cases) passes against vLLM.
SELF_CHECK = os.environ.get("PARITY_SELF_CHECK") == "1"
# Values that differ between any two answers, even from the same server.
VOLATILE = frozenset({"id", "created", "system_fingerprint"})
FLOAT_TOLERANCE = 1e-3

PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]   # PROMPT in SmolLM2's tokenizer
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
PLACE_SCHEMA = {"type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20},
                               "country": {"type": "string", "maxLength": 20}},
                "required": ["city", "country"], "additionalProperties": False}
TOOL_TURNS = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
]


def hellos(tokens: int) -> str:
    """A prompt of exactly `tokens` tokens in SmolLM2's tokenizer."""
    return " ".join(["hello"] * tokens)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- the two servers -----------------------------------------------------------------------------

@dataclass
class Ours:
    url: str
    vllm_flags_accepted: bool
    refusal: str = ""


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(ensure_instruct_model(quiet=True))


@pytest.fixture(scope="module")
def reference_started(model_dir):
    """`vllm serve` launched (not yet waited for), so it starts while Ray deploys ours."""
    server = VllmServer.start(model_dir, *SHARED_FLAGS, *VLLM_FLAGS)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ours(model_dir) -> Ours:
    if SELF_CHECK:   # the suite against vLLM itself: every case must pass
        with vllm_serve(model_dir, *SHARED_FLAGS, *VLLM_FLAGS) as other:
            yield Ours(other.url, True)
        return
    port = free_port()
    base = ["--device", "cpu", "--model", model_dir, "--host", LOCAL_IP, "--port", str(port),
            "--proxy-location", "HeadOnly", "--timeout", "300", "--num-replicas", "1",
            "--reasoning-parser", "none", *SHARED_FLAGS]

    def deploy(*argv: str) -> tuple[int, str]:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                return deploy_script("ray-single-gpu.py", *argv), stderr.getvalue()
        except SystemExit as exc:   # argparse refused a flag: before anything was deployed
            if exc.code != 2:
                raise
            return -2, stderr.getvalue()

    with local_ray():
        accepted, refusal = True, ""
        code, errors = deploy(*base, *VLLM_FLAGS)
        if code == -2:
            accepted, refusal = False, errors.strip().splitlines()[-1]
            code, errors = deploy(*base)
        assert code == 0, f"our deployment failed (exit {code}): {errors[-3000:]}"
        yield Ours(f"http://{LOCAL_IP}:{port}", accepted, refusal)


@pytest.fixture(scope="module")
def reference(reference_started) -> str:
    reference_started.wait_ready()
    return reference_started.url


@pytest.fixture(scope="module")
def servers(reference_started, ours, reference):
    """(vllm serve URL, our deployment); arguments in this order so both start together."""
    return reference, ours


# ---- comparing answers ---------------------------------------------------------------------------

@dataclass
class Answer:
    status: int
    content_type: str
    body: object          # parsed JSON, or the text when not JSON

    @classmethod
    def of(cls, response: requests.Response) -> "Answer":
        try:
            body = response.json()
        except ValueError:
            body = response.text
        return cls(response.status_code, response.headers.get("content-type", ""), body)


def send(base: str, method: str, path: str, body: dict | None = None,
         stream: bool = False) -> requests.Response:
    return requests.request(method, f"{base}{path}", json=body, timeout=TIMEOUT, stream=stream)


def at_once(call, reference: str, ours: str):
    """call(reference) and call(ours) at the same time: each server's engine runs on its own
    core, and neither sees more than the one request, so the answers are those of one by one."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ref, got = pool.submit(call, reference), pool.submit(call, ours)
        return ref.result(), got.result()


def both(servers, method: str, path: str, body: dict | None = None):
    reference, ours = servers
    return at_once(lambda base: Answer.of(send(base, method, path, body)), reference, ours.url)


def shape(value):
    """Keys and value types, recursively: what 'the same JSON structure' means."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(v) for v in value]
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def differences(ref, got, *, values: bool, volatile=VOLATILE, path: str = "$") -> list[str]:
    """Where `got` (ours) differs from `ref` (vllm serve): missing/extra keys, types, lengths and
    (with values=True) values, skipping the values of `volatile` keys."""
    if isinstance(ref, dict) and isinstance(got, dict):
        out = []
        for key in sorted(set(ref) - set(got)):
            out.append(f"{path}.{key}: only in vllm serve ({_short(ref[key])})")
        for key in sorted(set(got) - set(ref)):
            out.append(f"{path}.{key}: only in ours ({_short(got[key])})")
        for key in sorted(set(ref) & set(got)):
            if key in volatile:
                if shape(ref[key]) != shape(got[key]):
                    out.append(f"{path}.{key}: type {shape(ref[key])} vs {shape(got[key])}")
                continue
            out += differences(ref[key], got[key], values=values, volatile=volatile,
                               path=f"{path}.{key}")
        return out
    if isinstance(ref, list) and isinstance(got, list):
        out = []
        if len(ref) != len(got):
            out.append(f"{path}: {len(ref)} items in vllm serve, {len(got)} in ours")
        for i, (a, b) in enumerate(zip(ref, got)):
            out += differences(a, b, values=values, volatile=volatile, path=f"{path}[{i}]")
        return out
    if shape(ref) != shape(got):
        return [f"{path}: vllm serve {_short(ref)} vs ours {_short(got)}"]
    if not values or ref == got:
        return []
    if isinstance(ref, float) or isinstance(got, float):
        if math.isclose(ref, got, rel_tol=0, abs_tol=FLOAT_TOLERANCE):
            return []
    return [f"{path}: vllm serve {_short(ref)} vs ours {_short(got)}"]


def _short(value, limit: int = 100) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


def side_by_side(ref, got, width: int = 72, lines: int = 45) -> str:
    def column(value) -> list[str]:
        text = value if isinstance(value, str) else json.dumps(value, indent=1,
                                                               ensure_ascii=False)
        out = []
        for line in text.splitlines() or [""]:
            out += [line[i:i + width] for i in range(0, max(len(line), 1), width)]
        return out[:lines] + (["..."] if len(out) > lines else [])

    left, right = column(ref), column(got)
    rows = [f"{'vllm serve':<{width}} | ours", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        rows.append(f"{a:<{width}} | {b}")
    return "\n".join(rows)


def explain(what: str, ref: Answer, got: Answer, diffs: list[str], note: str = "") -> str:
    shown = diffs[:20] + ([f"... {len(diffs) - 20} more"] if len(diffs) > 20 else [])
    return (f"{what}: ours differs from vllm serve\n"
            + (f"note: {note}\n" if note else "")
            + f"status: vllm serve {ref.status}, ours {got.status}\n"
            + "".join(f"  {d}\n" for d in shown) + "\n"
            + side_by_side({"status": ref.status, "body": ref.body},
                           {"status": got.status, "body": got.body}))


def assert_same(what: str, ref: Answer, got: Answer, *, values: bool = True,
                volatile=VOLATILE, note: str = "") -> None:
    diffs = [] if ref.status == got.status else [f"status {ref.status} vs {got.status}"]
    if ref.status >= 400 or got.status >= 400:
        # Errors: vLLM's ErrorResponse keys, and its type/code, never the message text.
        diffs += differences(error_outline(ref.body), error_outline(got.body), values=True)
    else:
        diffs += differences(ref.body, got.body, values=values, volatile=volatile)
    assert not diffs, explain(what, ref, got, diffs, note)


def error_outline(body) -> object:
    """An error body reduced to what must match: its keys and value types everywhere, plus the
    error's `type` and `code` values."""
    if not isinstance(body, dict):
        return shape(body)
    outline = shape(body)
    error = body.get("error")
    if isinstance(error, dict):
        outline["error"] = {**shape(error),
                            **{k: error[k] for k in ("type", "code") if k in error}}
    return outline


def tools_note(ours: Ours) -> str:
    if ours.vllm_flags_accepted:
        return ""
    return (f"our deployment refused vLLM's serving flags {' '.join(VLLM_FLAGS)} "
            f"({ours.refusal}); it runs without them")


# ---- the cases -----------------------------------------------------------------------------------

SEEDED = {"temperature": 0.8, "seed": 1234, "max_tokens": 24}

COMPLETIONS = [
    ("plain", {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}),
    ("plain-chinese", {"prompt": "请简要介绍人工智能的发展历史", "max_tokens": 16,
                       "temperature": 0}),
    ("ignore-eos", {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}),
    ("token-ids", {"prompt": PROMPT_IDS, "max_tokens": 16, "temperature": 0}),
    ("batch-of-2", {"prompt": [PROMPT, "Once upon a time"], "max_tokens": 12,
                    "temperature": 0}),
    ("batch-token-ids", {"prompt": [PROMPT_IDS, [6403, 1980, 253, 655]], "max_tokens": 12,
                         "temperature": 0}),
    ("n-2-seeded", {"prompt": "Once upon a time", "n": 2, **SEEDED}),
    ("seeded", {"prompt": "Once upon a time", **SEEDED}),
    ("logprobs-2", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2}),
    ("echo", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "echo": True}),
    ("echo-logprobs", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "echo": True,
                       "logprobs": 1}),
    ("top-k", {"prompt": "Once upon a time", "top_k": 5, **SEEDED}),
    ("top-p", {"prompt": "Once upon a time", "top_p": 0.5, **SEEDED}),
    ("min-p", {"prompt": "Once upon a time", "min_p": 0.1, **SEEDED}),
    ("repetition-penalty", {"prompt": "Once upon a time", "repetition_penalty": 1.3,
                            **SEEDED}),
    ("presence-penalty", {"prompt": "Once upon a time", "presence_penalty": 1.0, **SEEDED}),
    ("frequency-penalty", {"prompt": "Once upon a time", "frequency_penalty": 1.0, **SEEDED}),
    ("stop-strings", {"prompt": PROMPT, "max_tokens": 32, "temperature": 0,
                      "stop": [".", "\n"]}),
    ("stop-string-include", {"prompt": PROMPT, "max_tokens": 32, "temperature": 0,
                             "stop": ["."], "include_stop_str_in_output": True}),
    ("max-tokens-1", {"prompt": PROMPT, "max_tokens": 1, "temperature": 0}),
    # prompt + max_tokens over the context: vLLM 0.32 answers with what fits (no error); older
    # releases refuse it with 400 (REFUSED_BEFORE_0_32).
    ("max-tokens-capped-at-context", {"prompt": hellos(MAX_MODEL_LEN - 20), "max_tokens": 64,
                                      "temperature": 0}),
    # No max_tokens: vLLM's default is the rest of the context.
    ("no-max-tokens", {"prompt": PROMPT, "temperature": 0, "stop": ["\n\n"]}),
]

# Cases vLLM < 0.32 refuses (400) where 0.32 answers 200: its TokenizeParams.max_input_tokens
# (vllm/renderers/params.py) is max_model_len - max_tokens, so prompt + max_tokens must fit;
# 0.32 allows the whole context to the prompt and clamps max_tokens (get_max_tokens). Parity
# holds either way: ours answers as `vllm serve` of the same release does.
REFUSED_BEFORE_0_32 = frozenset({"max-tokens-capped-at-context"})


def vllm_before(major: int, minor: int) -> bool:
    from common.layout import installed_versions
    from replica.versions import release

    installed = release(installed_versions()["vllm"] or "0")
    return tuple(int(x) for x in installed.split(".")[:2]) < (major, minor)


CHATS = [
    ("plain", {"messages": user("What is the capital of France?"), "max_tokens": 32,
               "temperature": 0}),
    ("system-turn", {"messages": [{"role": "system", "content": "Answer in one word."},
                                  *user("What is the capital of France?")],
                     "max_tokens": 16, "temperature": 0}),
    ("multi-turn", {"messages": [*user("Hi"), {"role": "assistant", "content": "Hello!"},
                                 *user("What is 2 + 2?")], "max_tokens": 24,
                    "temperature": 0}),
    ("max-completion-tokens", {"messages": user("Tell me a story."),
                               "max_completion_tokens": 12, "temperature": 0}),
    ("content-parts", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is the capital"},
        {"type": "text", "text": "of France?"}]}], "max_tokens": 24, "temperature": 0}),
    ("logprobs", {"messages": user("What is the capital of France?"), "max_tokens": 6,
                  "temperature": 0, "logprobs": True, "top_logprobs": 2}),
    ("seeded-n-2", {"messages": user("Tell me a story."), "n": 2, **SEEDED}),
    ("stop", {"messages": user("Count from 1 to 10."), "max_tokens": 48, "temperature": 0,
              "stop": ["5"]}),
    ("tool-call-history", {"messages": TOOL_TURNS, "max_tokens": 32, "temperature": 0}),
    ("tool-call-history-with-tools", {"messages": TOOL_TURNS, "tools": TOOLS,
                                      "max_tokens": 32, "temperature": 0}),
    ("json-schema", {"messages": user("Name a European capital and its country. "
                                      "Answer in JSON."),
                     "response_format": {"type": "json_schema", "json_schema": {
                         "name": "place", "schema": PLACE_SCHEMA}},
                     "max_tokens": 64, "temperature": 0}),
    ("json-object", {"messages": user("Give me a JSON object with a key 'answer'."),
                     "response_format": {"type": "json_object"}, "max_tokens": 48,
                     "temperature": 0}),
    ("tools-required", {"messages": user("What is the weather in Paris?"), "tools": TOOLS,
                        "tool_choice": "required", "max_tokens": 64, "temperature": 0}),
    ("tools-named", {"messages": user("What is the weather in Paris?"), "tools": TOOLS,
                     "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                     "max_tokens": 64, "temperature": 0}),
    ("tools-auto", {"messages": user("What is the weather in Paris?"), "tools": TOOLS,
                    "tool_choice": "auto", "max_tokens": 64, "temperature": 0}),
    ("tools-none", {"messages": user("What is the weather in Paris?"), "tools": TOOLS,
                    "tool_choice": "none", "max_tokens": 32, "temperature": 0}),
]

NEEDS_VLLM_FLAGS = {"tools-auto", "tool-call-history-with-tools"}

ERRORS = [
    # (id, path, body): vLLM's answer (status, ErrorResponse keys, type, code) is the truth.
    ("max-tokens-over-context", "/v1/completions",
     {"prompt": PROMPT, "max_tokens": MAX_MODEL_LEN + 100}),
    ("prompt-over-context", "/v1/completions",
     {"prompt": hellos(MAX_MODEL_LEN + 50), "max_tokens": 4}),
    ("chat-prompt-over-context", "/v1/chat/completions",
     {"messages": user(hellos(MAX_MODEL_LEN + 50)), "max_tokens": 4}),
    ("chat-max-tokens-over-context", "/v1/chat/completions",
     {"messages": user("hi"), "max_tokens": MAX_MODEL_LEN + 100}),
    ("max-tokens-string", "/v1/completions", {"prompt": PROMPT, "max_tokens": "five"}),
    ("temperature-string", "/v1/completions", {"prompt": PROMPT, "temperature": "hot"}),
    ("prompt-number", "/v1/completions", {"prompt": 42, "max_tokens": 4}),
    ("stop-number", "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "stop": 5}),
    ("n-string", "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "n": "two"}),
    ("logprobs-string", "/v1/completions", {"prompt": PROMPT, "max_tokens": 4,
                                            "logprobs": "yes"}),
    ("missing-prompt", "/v1/completions", {"max_tokens": 4}),
    ("unknown-model", "/v1/completions", {"model": "gpt-4", "prompt": PROMPT, "max_tokens": 4}),
    ("chat-unknown-model", "/v1/chat/completions",
     {"model": "gpt-4", "messages": user("hi"), "max_tokens": 4}),
    ("chat-messages-string", "/v1/chat/completions", {"messages": "hi", "max_tokens": 4}),
    ("chat-missing-messages", "/v1/chat/completions", {"max_tokens": 4}),
    ("chat-temperature-string", "/v1/chat/completions",
     {"messages": user("hi"), "temperature": "hot"}),
    ("chat-top-logprobs-without-logprobs", "/v1/chat/completions",
     {"messages": user("hi"), "max_tokens": 4, "top_logprobs": 2}),
]

STREAMS = [
    ("completion", "/v1/completions",
     {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}),
    ("completion-usage", "/v1/completions",
     {"prompt": PROMPT, "max_tokens": 16, "temperature": 0,
      "stream_options": {"include_usage": True}}),
    ("completion-stop-usage", "/v1/completions",
     {"prompt": PROMPT, "max_tokens": 32, "temperature": 0, "stop": ["\n"],
      "stream_options": {"include_usage": True}}),
    ("completion-seeded-n-2-usage", "/v1/completions",
     {"prompt": "Once upon a time", "n": 2, **SEEDED,
      "stream_options": {"include_usage": True}}),
    ("chat", "/v1/chat/completions",
     {"messages": user("What is the capital of France?"), "max_tokens": 24,
      "temperature": 0}),
    ("chat-usage", "/v1/chat/completions",
     {"messages": user("What is the capital of France?"), "max_tokens": 24,
      "temperature": 0, "stream_options": {"include_usage": True}}),
    ("chat-length-usage", "/v1/chat/completions",
     {"messages": user("Tell me a story."), "max_tokens": 10, "temperature": 0,
      "stream_options": {"include_usage": True}}),
    ("chat-tools-required-usage", "/v1/chat/completions",
     {"messages": user("What is the weather in Paris?"), "tools": TOOLS,
      "tool_choice": "required", "max_tokens": 64, "temperature": 0,
      "stream_options": {"include_usage": True}}),
]


def with_model(body: dict) -> dict:
    return {"model": NAME, **body}


@pytest.mark.parametrize("case, body", COMPLETIONS, ids=[c[0] for c in COMPLETIONS])
def test_completions(servers, case, body):
    ref, got = both(servers, "POST", "/v1/completions", with_model(body))
    expected = 400 if case in REFUSED_BEFORE_0_32 and vllm_before(0, 32) else 200
    assert ref.status == expected, f"vllm serve answered {ref.status}, not {expected}: {ref.body}"
    assert_same("POST /v1/completions", ref, got)


@pytest.mark.parametrize("case,body", CHATS, ids=[c[0] for c in CHATS])
def test_chat_completions(servers, case, body):
    ref, got = both(servers, "POST", "/v1/chat/completions", with_model(body))
    assert ref.status == 200, f"vllm serve refused the case: {ref.body}"
    note = tools_note(servers[1]) if case in NEEDS_VLLM_FLAGS else ""
    assert_same("POST /v1/chat/completions", ref, got, note=note)


def test_chat_json_schema_output_is_valid_json_for_the_schema(servers):
    import jsonschema

    body = with_model(dict(CHATS)["json-schema"])
    ref, got = both(servers, "POST", "/v1/chat/completions", body)
    for who, answer in (("vllm serve", ref), ("ours", got)):
        assert answer.status == 200, explain("json_schema", ref, got, [f"{who} failed"])
        content = answer.body["choices"][0]["message"]["content"]
        try:
            jsonschema.validate(json.loads(content), PLACE_SCHEMA)
        except (ValueError, jsonschema.ValidationError) as exc:
            raise AssertionError(explain("json_schema", ref, got,
                                         [f"{who}: not JSON for the schema: {exc}"])) from exc
    assert_same("json_schema", ref, got)


@pytest.mark.parametrize("path,body", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_errors_have_vllms_status_and_shape(servers, path, body):
    ref, got = both(servers, "POST", path, with_model(body))
    assert ref.status >= 400, f"vllm serve accepted the case: {ref.body}"
    assert_same(f"POST {path}", ref, got)


def test_error_shape_is_vllms_error_response(servers):
    """The reference's own shape, so a change of vLLM's ErrorResponse shows up here first."""
    ref, _ = both(servers, "POST", "/v1/completions", with_model({"prompt": 42}))
    assert set(ref.body) == {"error"}
    assert set(ref.body["error"]) == {"message", "type", "param", "code"}


# ---- streaming -----------------------------------------------------------------------------------

def read_stream(base: str, path: str, body: dict) -> Answer:
    """An SSE answer reduced to what must match: text per choice, finish reasons, usage,
    the [DONE] terminator and the set of chunk structures."""
    response = send(base, "POST", path, {**body, "stream": True}, stream=True)
    content_type = response.headers.get("content-type", "")
    if response.status_code != 200 or not content_type.startswith("text/event-stream"):
        return Answer.of(response)
    chunks, done, junk = [], False, []
    for line in response.iter_lines():
        if not line:
            continue
        if not line.startswith(b"data: "):
            junk.append(line.decode(errors="replace"))
            continue
        payload = line[len(b"data: "):]
        if payload == b"[DONE]":
            done = True
            continue
        chunks.append(json.loads(payload))
    return Answer(response.status_code, content_type.split(";")[0],
                  stream_summary(chunks, done, junk))


def stream_summary(chunks: list[dict], done: bool, junk: list[str]) -> dict:
    """What of a stream's chunks must match vllm serve's."""
    texts: dict[int, str] = {}
    tool_calls: dict[int, dict[int, dict]] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            i = choice.get("index", 0)
            delta = choice.get("delta")
            if delta is None:
                texts[i] = texts.get(i, "") + (choice.get("text") or "")
            else:
                texts[i] = texts.get(i, "") + (delta.get("content") or "")
                for call in delta.get("tool_calls") or []:
                    merge_tool_call_delta(tool_calls.setdefault(i, {}), call)
            if choice.get("finish_reason"):
                finish[i] = choice["finish_reason"]
    forms = [finish_without_text(c) for c in chunks]
    forms += [mid_stream_form(c) for c in chunks if finishes_with_text(c)]
    structures = sorted({json.dumps(shape(form), sort_keys=True) for form in forms})
    return {"text": {str(k): v for k, v in sorted(texts.items())},
            "finish_reason": {str(k): v for k, v in sorted(finish.items())},
            "tool_calls": {str(k): [calls[n] for n in sorted(calls)]
                           for k, calls in sorted(tool_calls.items())},
            "usage": usage, "done": done, "not_data_lines": junk,
            "chunk_structures": [json.loads(s) for s in structures]}


def merge_tool_call_delta(calls: dict[int, dict], delta: dict) -> None:
    """Adds one streamed tool-call delta to the call it continues. Arguments are compared whole,
    like text: how many tokens one delta carries depends on how far the client reading the
    engine's outputs lags (vLLM merges the outputs that queue up), not on the server."""
    call = calls.setdefault(delta.get("index", 0), {"function": {"arguments": ""}})
    for key, value in delta.items():
        if key in VOLATILE:
            continue
        if key != "function":
            call[key] = value
            continue
        for part, text in (value or {}).items():
            if part == "arguments":
                call["function"]["arguments"] += text or ""
            else:
                call["function"][part] = text


def finish_without_text(chunk: dict) -> dict:
    """A chunk whose choice finishes, without that choice's delta text: whether the last token's
    text rides in the finishing chunk or in one before it depends on how far the client reading
    the engine's outputs lags (vLLM merges the outputs that queue up), not on the server; the
    text itself is compared whole."""
    choices = []
    for choice in chunk.get("choices") or []:
        if choice.get("finish_reason") and isinstance(choice.get("delta"), dict):
            choice = {**choice, "delta": {k: v for k, v in choice["delta"].items()
                                          if k != "content"}}
        choices.append(choice)
    return {**chunk, "choices": choices} if "choices" in chunk else chunk


def choice_text(choice: dict) -> str:
    delta = choice.get("delta")
    return (choice.get("text") if delta is None else delta.get("content")) or ""


def finishes_with_text(chunk: dict) -> bool:
    return any(c.get("finish_reason") and choice_text(c) for c in chunk.get("choices") or [])


def mid_stream_form(chunk: dict) -> dict:
    """A finishing chunk that carries text as the text chunk it stands for: when the reader lags,
    vLLM merges every queued output into the finishing chunk, so a short answer can come as that
    chunk alone, with no text chunk before it. The form follows vLLM's serving code: a text chunk
    has no system_fingerprint, a null finish_reason, and a null stop_reason in completions but
    none in chat. Added on both sides, so a stream that had the text chunks gains nothing new."""
    def unfinished(choice: dict) -> dict:
        choice = {k: v for k, v in choice.items() if k != "stop_reason"}
        return {**choice, "finish_reason": None,
                **({"stop_reason": None} if "delta" not in choice else {})}
    return {**{k: v for k, v in chunk.items() if k != "system_fingerprint"},
            "choices": [unfinished(c) for c in chunk.get("choices") or []]}


def completion_chunk(text: str, finish_reason=None, stop_reason=None) -> dict:
    """Shaped as vLLM's completion stream writes it."""
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
             "choices": [{"index": 0, "text": text, "logprobs": None,
                          "finish_reason": finish_reason, "stop_reason": stop_reason}]}
    return {**chunk, "system_fingerprint": "fp"} if finish_reason else chunk


def chat_chunk(text: str, finish_reason=None, stop_reason=None) -> dict:
    """Shaped as vLLM's chat stream writes it: stop_reason only in the finishing chunk."""
    choice = {"index": 0, "delta": {"content": text}, "logprobs": None,
              "finish_reason": finish_reason}
    if finish_reason:
        choice["stop_reason"] = stop_reason
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [choice]}


@pytest.mark.parametrize("chunk", [completion_chunk, chat_chunk], ids=["completion", "chat"])
@pytest.mark.parametrize("merged", [[(" Paris.", "stop")], [(" Paris", None), (".", "stop")]],
                         ids=["all-in-the-finishing-chunk", "last-token-in-it"])
def test_stream_summary_ignores_how_queued_outputs_were_merged(chunk, merged):
    """No servers: the summary of a stream whose outputs vLLM merged (a lagging reader) is that
    of the same stream chunk by chunk."""
    one_by_one = [chunk(" Paris"), chunk("."), chunk("", "stop", "\n")]
    merged_chunks = [chunk(text, finish, "\n" if finish else None) for text, finish in merged]
    assert stream_summary(merged_chunks, True, []) == stream_summary(one_by_one, True, [])


@pytest.mark.parametrize("path,body", [c[1:] for c in STREAMS], ids=[c[0] for c in STREAMS])
def test_streaming(servers, path, body):
    reference, ours = servers
    ref, got = at_once(lambda base: read_stream(base, path, with_model(body)), reference,
                       ours.url)
    assert ref.status == 200 and ref.body["done"], f"vllm serve failed the case: {ref.body}"
    assert_same(f"POST {path} (stream)", ref, got)


# ---- tokenizer, models, version, health ----------------------------------------------------------

TOKENIZE = [
    ("prompt", "/tokenize", {"prompt": PROMPT}),
    ("prompt-no-special", "/tokenize", {"prompt": PROMPT, "add_special_tokens": False}),
    ("prompt-token-strs", "/tokenize", {"prompt": PROMPT, "return_token_strs": True}),
    ("chat-messages", "/tokenize", {"messages": user("hi")}),
    ("detokenize", "/detokenize", {"tokens": PROMPT_IDS}),
    ("detokenize-chat-ids", "/detokenize", {"tokens": [1, 4093, 198, 6004, 2]}),
    ("tokenize-unknown-model", "/tokenize", {"model": "gpt-4", "prompt": PROMPT}),
]


@pytest.mark.parametrize("path,body", [c[1:] for c in TOKENIZE], ids=[c[0] for c in TOKENIZE])
def test_tokenizer_endpoints(servers, path, body):
    ref, got = both(servers, "POST", path, with_model(body))
    assert_same(f"POST {path}", ref, got)


def test_models(servers):
    ref, got = both(servers, "GET", "/v1/models")
    assert ref.status == 200 and ref.body["data"][0]["id"] == NAME
    # `root` is the model's path as each server was given it.
    assert_same("GET /v1/models", ref, got, volatile=VOLATILE | {"root"})


def test_version(servers):
    ref, got = both(servers, "GET", "/version")
    assert_same("GET /version", ref, got)


def test_health_status(servers):
    reference, ours = servers
    ref = send(reference, "GET", "/health")
    got = send(ours.url, "GET", "/health")
    assert ref.status_code == got.status_code, (ref.status_code, ref.text[:300],
                                                got.status_code, got.text[:300])


def test_load_test_reports_the_runs_prefix_cache_hits(reference, tmp_path):
    """load_test.py --metrics-url reads vllm serve's own counters before and after its run: the
    second of two identical prompts finds the first's blocks in the prefix cache."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parent.parent / "load_test.py"),
         "--url", reference, "-n", "2", "-c", "1", "--endpoint", "/v1/completions",
         "--max-tokens", "2", "-p", " ".join(f"word{i}" for i in range(100)),
         "--model", NAME, "--metrics-url", f"{reference}/metrics", "--no-progress",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [replica] = json.loads(out.read_text())["prefix_cache"]
    assert replica["replica"] == f"{reference}/metrics"
    assert replica["queries"] > 100 and 0 < replica["hits"] < replica["queries"]
    assert "Prefix cache (this run" in proc.stdout and "All replicas:" in proc.stdout


# ---- only against our deployment: the OpenAI SDK -------------------------------------------------

@pytest.fixture(scope="module")
def client(ours):
    from openai import OpenAI

    return OpenAI(base_url=f"{ours.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def test_sdk_streams_a_chat_completion(client):
    stream = client.chat.completions.create(
        model=NAME, messages=user("What is the capital of France?"), max_tokens=24,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "Paris" in text, text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices
              and c.choices[0].finish_reason]
    assert finish and finish[-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].usage.total_tokens == (chunks[-1].usage.prompt_tokens
                                             + chunks[-1].usage.completion_tokens)


def test_sdk_structured_output(client):
    import jsonschema

    completion = client.chat.completions.create(
        model=NAME, messages=user("Name a European capital and its country. Answer in JSON."),
        max_tokens=64, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "place", "schema": PLACE_SCHEMA,
                                         "strict": True}})
    content = completion.choices[0].message.content
    try:
        jsonschema.validate(json.loads(content), PLACE_SCHEMA)
    except (ValueError, jsonschema.ValidationError) as exc:
        raise AssertionError(f"not JSON for the schema ({exc}): {content!r}") from exc
    assert completion.choices[0].finish_reason == "stop", completion


def test_sdk_tool_calling_round_trip(client):
    messages = user("What is the weather in Paris?")
    first = client.chat.completions.create(
        model=NAME, messages=messages, tools=TOOLS, max_tokens=64, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = first.choices[0].message
    assert message.tool_calls, f"named tool_choice, but no tool call: {message}"
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    # JSON, but not always the parameters' object: with the hermes parser vLLM 0.32 constrains
    # the call to <tool_call>{"name": ..., "arguments": ...}</tool_call> without applying the
    # parameters' schema to "arguments", and SmolLM2 writes {"arguments": "Paris"}.
    arguments = json.loads(call.function.arguments)
    city = arguments.get("city", "Paris") if isinstance(arguments, dict) else str(arguments)
    messages += [
        {"role": "assistant", "content": message.content or None,
         "tool_calls": [{"id": call.id, "type": "function",
                         "function": {"name": call.function.name,
                                      "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id,
         "content": json.dumps({"city": city, "weather": "sunny", "celsius": 21})},
    ]
    second = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS,
                                            max_tokens=48, temperature=0)
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length")
    assert isinstance(answer.message.content, str) and answer.message.content.strip()
    assert not answer.message.tool_calls


# ---- only against our deployment: the instruct model answers as an instruct model ----------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def post(url: str, body: dict) -> dict:
    response = requests.post(url, data=json.dumps(body), timeout=300,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    return response.json()


def chat(url: str, messages: list, **options) -> dict:
    return post(f"{url}/v1/chat/completions",
                {"model": NAME, "messages": messages, "temperature": 0, **options})


def test_greedy_chat_answers_the_question(ours):
    body = chat(ours.url, QUESTION, max_tokens=32)
    choice = body["choices"][0]
    assert "Paris" in choice["message"]["content"]
    # The answer ends on <|im_end|>, the EOS of generation_config.json, not on the token budget;
    # the EOS itself is not part of the text.
    assert choice["finish_reason"] == "stop"
    assert "<|im_end|>" not in choice["message"]["content"]
    assert body["model"] == NAME


def test_stop_string_cuts_the_greedy_completion(ours, tokenizer):
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    request = {"model": NAME, "prompt": prompt, "max_tokens": 32, "temperature": 0}
    full = post(f"{ours.url}/v1/completions", request)["choices"][0]["text"]
    assert "Paris" in full
    stopped = post(f"{ours.url}/v1/completions", {**request, "stop": [" Paris"]})["choices"][0]
    assert stopped["text"] == full[:full.index(" Paris")]
    assert stopped["finish_reason"] == "stop"


@pytest.mark.parametrize("messages", [
    QUESTION,  # the template adds SmolLM2's default system prompt
    [{"role": "system", "content": "Answer in one word."}, *QUESTION,
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}],
], ids=["default-system-prompt", "multi-turn"])
def test_server_prompt_is_the_models_chat_template(ours, tokenizer, messages):
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    body = chat(ours.url, messages, max_tokens=1)
    assert body["usage"]["prompt_tokens"] == len(expected)
