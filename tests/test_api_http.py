"""The API over real HTTP: real vLLM CPU engine on the demo model behind real Ray Serve."""
from __future__ import annotations

import json
import time

import pytest
import requests

from _serve_fixtures import (LOCAL_IP, read_sse, cpu_args, demo_model, deploy_script, free_port, health,
                             send_and_hang_up,
                             local_ray, wait_until)

import ray

MAX_MODEL_LEN = 4096
GUIDE_KEYS = {"id", "object", "created", "model", "node", "choices", "usage"}


@pytest.fixture(scope="module")
def service():
    port = free_port()
    with local_ray():
        # The demo model's template opens <think> like R1's; these tests read plain content.
        code = deploy_script("ray-single-gpu.py", *cpu_args(
            port, "--num-replicas", "1", "--max-model-len", str(MAX_MODEL_LEN),
            "--reasoning-parser", "none"))
        assert code == 0
        yield f"http://{LOCAL_IP}:{port}"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model())


def post(url: str, body, headers: dict | None = None, **kwargs) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(url, data=data, timeout=120,
                         headers={"Content-Type": "application/json", **(headers or {})},
                         **kwargs)


def test_post_root_answers_the_guides_json_exactly(service, tokenizer):
    prompt = "请简要介绍人工智能的发展历史"
    before = int(time.time())
    response = post(f"{service}/", {"prompt": prompt, "max_tokens": 16, "ignore_eos": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == GUIDE_KEYS
    # Serve's proxy returns its request ID (the client's X-Request-Id when sent) as a header.
    assert body["id"] == "cmpl-" + response.headers["x-request-id"]
    assert body["object"] == "text_completion"
    assert isinstance(body["created"], int) and before - 1 <= body["created"] <= time.time() + 1
    assert body["model"] == "DeepSeek-R1"
    assert body["node"] in {n["NodeID"] for n in ray.nodes()}
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert set(choice) == {"text", "index", "finish_reason"}
    assert isinstance(choice["text"], str) and choice["index"] == 0
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert usage["prompt_tokens"] == len(tokenizer.encode(prompt))
    assert usage["completion_tokens"] == 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + 16


def test_sampling_options_are_accepted_and_seeded_output_repeats(service):
    body = {"prompt": "hello", "max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 7,
            "stop": ["\n\n"]}
    first = post(f"{service}/", body).json()
    second = post(f"{service}/", body).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


def test_stream_answers_sse_chunks_ending_with_done(service):
    response = post(f"{service}/", {"prompt": "hello", "max_tokens": 12, "stream": True,
                                    "ignore_eos": True}, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = read_sse(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all(c["node"] and c["model"] == "DeepSeek-R1" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    non_stream = post(f"{service}/", {"prompt": "hello", "max_tokens": 12, "ignore_eos": True,
                                      "temperature": 0}).json()
    greedy = read_sse(post(f"{service}/", {"prompt": "hello", "max_tokens": 12, "stream": True,
                                           "ignore_eos": True, "temperature": 0}, stream=True))
    text = "".join(c["choices"][0]["text"] for c in greedy[:-1])
    assert text == non_stream["choices"][0]["text"]


def test_openai_sdk_completions_chat_models_and_streaming(service):
    from openai import OpenAI

    client = OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == ["DeepSeek-R1"]

    completion = client.completions.create(model="DeepSeek-R1", prompt="hello", max_tokens=5,
                                           extra_body={"ignore_eos": True})
    assert completion.object == "text_completion"
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].finish_reason == "length"

    stream = client.completions.create(model="DeepSeek-R1", prompt="hello", max_tokens=6,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].choices == []
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)

    chat = client.chat.completions.create(
        model="DeepSeek-R1", messages=[{"role": "user", "content": "你好"}], max_tokens=7,
        extra_body={"ignore_eos": True})
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str)
    assert chat.usage.completion_tokens == 7
    # The chat template wraps the message, so the prompt is longer than the message alone.
    assert chat.usage.prompt_tokens > 3

    chat_stream = client.chat.completions.create(
        model="DeepSeek-R1", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        stream=True, extra_body={"ignore_eos": True})
    deltas = list(chat_stream)
    assert deltas[0].choices[0].delta.role == "assistant"
    assert deltas[-1].choices[0].finish_reason == "length"


BAD_REQUESTS = [
    # (name, method, path, raw body, expected status, words the message must contain)
    ("invalid json", "POST", "/", b'{"prompt": "x",', 400, "invalid JSON"),
    ("empty body", "POST", "/", b"", 400, "empty"),
    ("array body", "POST", "/", b'["x"]', 400, "JSON object"),
    ("non utf8", "POST", "/", b'{"prompt": "\xff\xfe"}', 400, "UTF-8"),
    ("deep nesting", "POST", "/", b'{"prompt":' + b"[" * 100000 + b"]" * 100000 + b"}", 400,
     "deep"),
    ("missing prompt", "POST", "/", b'{"max_tokens": 5}', 400, "prompt: field required"),
    ("empty prompt", "POST", "/", b'{"prompt": "", "max_tokens": 5}', 400, "prompt"),
    ("blank prompt", "POST", "/", b'{"prompt": "   ", "max_tokens": 5}', 400, "prompt"),
    ("prompt wrong type", "POST", "/", b'{"prompt": 42, "max_tokens": 5}', 400, "prompt"),
    ("max_tokens string", "POST", "/", b'{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    ("max_tokens float", "POST", "/", b'{"prompt": "x", "max_tokens": 1.5}', 400, "max_tokens"),
    ("max_tokens zero", "POST", "/", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("max_tokens negative", "POST", "/", b'{"prompt": "x", "max_tokens": -3}', 400, "max_tokens"),
    ("max_tokens huge", "POST", "/", b'{"prompt": "x", "max_tokens": 99999999999}', 400,
     "max_model_len"),
    ("temperature negative", "POST", "/", b'{"prompt": "x", "temperature": -1}', 400,
     "temperature"),
    ("temperature nan", "POST", "/", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("top_p zero", "POST", "/", b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    ("top_p above one", "POST", "/", b'{"prompt": "x", "top_p": 1.5}', 400, "top_p"),
    ("stream not bool", "POST", "/", b'{"prompt": "x", "stream": "yes"}', 400, "stream"),
    ("unknown field", "POST", "/", b'{"prompt": "x", "promtp": "y"}', 400, "promtp: unknown"),
    ("wrong method", "GET", "/", b"", 405, "POST"),
    ("unknown model", "POST", "/v1/completions", b'{"model": "gpt-4", "prompt": "x"}', 404,
     "gpt-4"),
    ("chat no messages", "POST", "/v1/chat/completions", b'{"messages": []}', 400, "message"),
]


@pytest.mark.parametrize("name,method,path,body,status,words", BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_gets_a_clear_4xx(service, name, method, path, body, status, words):
    response = requests.request(method, f"{service}{path}", data=body, timeout=60,
                                headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    # vLLM's ErrorResponse shape, on its own endpoints and on the guide's POST / alike.
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert words.lower() in error["message"].lower(), error["message"]


def test_unknown_path_is_404(service):
    assert requests.post(f"{service}/nope", data=b"{}", timeout=60).status_code == 404


def test_max_tokens_over_the_context_is_refused(service):
    response = post(f"{service}/", {"prompt": "hello", "max_tokens": MAX_MODEL_LEN + 1})
    assert response.status_code == 400
    assert "max_tokens" in response.json()["error"]["message"]


def test_oversize_body_is_413(service):
    response = post(f"{service}/", b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}')
    assert response.status_code == 413


def test_replica_keeps_serving_after_bad_input(service):
    assert health(service)["engine_alive"]
    assert post(f"{service}/", {"prompt": "still there?", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("path, stream", [("/", False), ("/", True), ("/v1/completions", False)],
                         ids=["whole", "stream", "v1-whole"])
def test_client_disconnect_aborts_the_engine_request(service, path, stream):
    before = health(service)["engine_aborted_requests"]
    # Long enough (about 4k tokens, ignore_eos) that only an abort finishes it within seconds.
    body = {"prompt": "hello", "max_tokens": MAX_MODEL_LEN - 16, "ignore_eos": True,
            "stream": stream}
    if path != "/":
        body["model"] = health(service)["model"]
    send_and_hang_up(service + path, body, stream,
                     lambda: health(service)["engine_unfinished_requests"] > 0)
    wait_until(lambda: (lambda h: h["engine_aborted_requests"] > before and
                        h["engine_unfinished_requests"] == 0)(health(service)),
               timeout=30, what="engine request aborted")


def test_health_is_vllms_and_every_answer_names_its_node(service):
    response = requests.get(f"{service}/health", timeout=30)
    assert response.status_code == 200
    assert response.headers["x-serve-node"] in {n["NodeID"] for n in ray.nodes()}
    status = health(service)
    assert status["node"] == response.headers["x-serve-node"]
    assert status["replica_nodes"] == {status["node"]: 1}


@pytest.fixture(scope="module")
def secure(service):
    """A second application on the same cluster, behind an API key."""
    port = int(service.rsplit(":", 1)[1])
    code = deploy_script("ray-single-gpu.py", *cpu_args(
        port, "--num-replicas", "1", "--app-name", "secure", "--route-prefix", "/secure",
        "--api-key", "s3cret-key"))
    assert code == 0
    yield f"{service}/secure"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "s3cret-key"},
                                     {"Authorization": "Basic s3cret-key"}],
                         ids=["none", "wrong", "no-scheme", "basic"])
def test_api_key_required_everywhere_but_health(secure, headers):
    for method, path, body in [("POST", "/", {"prompt": "x", "max_tokens": 2}),
                               ("GET", "/v1/models", None),
                               ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})]:
        response = requests.request(method, f"{secure}{path}", json=body, headers=headers,
                                    timeout=60)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["type"] == "UnauthorizedError"
        assert response.headers["www-authenticate"] == "Bearer"
    assert requests.get(f"{secure}/health", timeout=60).status_code == 200


def test_api_key_accepted_by_clients(secure):
    from openai import OpenAI

    headers = {"Authorization": "Bearer s3cret-key"}
    assert post(f"{secure}/", {"prompt": "x", "max_tokens": 2},
                headers=headers).status_code == 200
    client = OpenAI(base_url=f"{secure}/v1", api_key="s3cret-key", max_retries=0)
    assert client.models.list().data[0].id == "DeepSeek-R1"
    import load_test

    assert load_test.main(["--url", secure, "-c", "2", "-n", "4", "--max-tokens", "2",
                           "--api-key", "s3cret-key", "--no-progress"]) == 0
    assert load_test.main(["--url", secure, "-c", "1", "-n", "2", "--max-tokens", "2",
                           "--no-progress"]) != 0  # no key: 401s counted as failures


@pytest.mark.parametrize("script", ["ray-single-gpu.py", "ray-force-multi.py", "ray-product",
                                    "ray-placement-group.py"])
def test_gpu_deployment_on_a_cluster_without_gpus_says_how_to_run_the_demo(service, script,
                                                                           capsys):
    assert deploy_script(script, "--model", demo_model(), "--timeout", "5") == 1
    err = capsys.readouterr().err
    assert "no GPU" in err and "--device cpu" in err
