"""DeepSeek-R1's architecture on the real path: the project's tiny DeepSeek-V3-shaped model (MLA
attention, a dense first layer then routed + shared experts, R1's chat template; random weights,
common/demo_model.ensure_r1_model) deployed with ray-single-gpu.py on a real vLLM CPU engine behind
real Ray Serve, checked over HTTP: the guide's POST /, the deepseek_r1 reasoning parser that
`--reasoning-parser auto` picks, the engine's numbers against transformers' DeepseekV3, and the
planner's KV bytes per token against the KV cache vLLM sized."""
from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
import time
from pathlib import Path

import pytest
import requests

from _serve_fixtures import (LOCAL_IP, read_sse, TEST_DEVICE, cpu_args, deploy_script, free_port,
                             local_ray)

import ray

from common import demo_model, planner
from common.demo_model import ensure_r1_model

MODEL = "DeepSeek-R1"
MAX_MODEL_LEN = 512
KV_CACHE_BYTES = 64 * 2**20
GUIDE_KEYS = {"id", "object", "created", "model", "node", "choices", "usage"}
# vLLM's CPU platform runs MLA models with 16-token KV blocks (its MLA decode kernel's only size).
CPU_MLA_BLOCK = 16
ON_CPU = TEST_DEVICE == "cpu"


def r1_folder() -> str:
    return str(ensure_r1_model(quiet=True))


def deploy_args(port: int) -> list[str]:
    # cpu_args names the Qwen2 demo model; the later --model wins (argparse).
    extra = ["--model", r1_folder(), "--num-replicas", "1", "--max-model-len", str(MAX_MODEL_LEN),
             "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]
    if ON_CPU:
        # On processors with AMX vLLM would pick AMX_MLA, which runs bfloat16 only, for the
        # project's float32 CPU engine: the reference CPU_MLA backend runs on every x86-64 CPU.
        extra += ["--attention-backend", "CPU_MLA"]
    return cpu_args(port, *extra)


@pytest.fixture(scope="module")
def service():
    port = free_port()
    with local_ray():
        started = time.monotonic()
        # --reasoning-parser is left at its default (auto): the chat template decides.
        assert deploy_script("ray-single-gpu.py", *deploy_args(port)) == 0
        print(f"R1-shaped replica ready in {time.monotonic() - started:.0f} s")
        yield f"http://{LOCAL_IP}:{port}"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(r1_folder())


def post(url: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(url, json=body, timeout=120, **kwargs)


def read_ok_sse(response: requests.Response) -> list:
    assert response.status_code == 200, response.text
    return read_sse(response)


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


# --------------------------------------------------------------------------- the built model

def test_built_model_is_deepseek_v3_with_r1_tokens_and_template(tokenizer):
    from replica.server import reasoning_parser_for

    folder = Path(r1_folder())
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "auto_map" not in config and "quantization_config" not in config
    # MLA with R1's latent (512 + 64) and head dims; a dense first layer, then MoE layers.
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (512, 64)
    assert (config["qk_nope_head_dim"], config["v_head_dim"]) == (128, 128)
    assert config["q_lora_rank"] and config["first_k_dense_replace"] == 1
    assert config["num_hidden_layers"] == 3
    assert (config["n_routed_experts"], config["num_experts_per_tok"],
            config["n_shared_experts"]) == (8, 2, 1)
    assert (config["topk_method"], config["scoring_func"]) == ("noaux_tc", "sigmoid")
    weights = safetensors_header(folder / "model.safetensors")
    assert {meta["dtype"] for meta in weights.values()} == {"BF16", "F32"}  # no fp8
    assert {name for name, meta in weights.items() if meta["dtype"] == "F32"} == {
        f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in (1, 2)}
    assert sum(f.stat().st_size for f in folder.iterdir()) < 10 * 2**20
    # The tokenizer covers the embedding; R1's own bos/eos ids.
    assert len(tokenizer) <= config["vocab_size"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1) == (
        config["bos_token_id"], config["eos_token_id"])
    # vLLM's deepseek_r1 parser finds both tags as single vocabulary entries.
    vocab = tokenizer.get_vocab()
    for tag in ("<think>", "</think>"):
        assert tag in vocab and tokenizer.tokenize(f"a{tag}b") == ["a", tag, "b"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "<think>x</think>hello"},
         {"role": "user", "content": "again"}], tokenize=False, add_generation_prompt=True)
    assert prompt == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>hi<｜Assistant｜>hello"
                      "<｜end▁of▁sentence｜><｜User｜>again<｜Assistant｜><think>\n")
    assert reasoning_parser_for("auto", str(folder)) == "deepseek_r1"


def test_planner_counts_the_checkpoints_parameters():
    folder = Path(r1_folder())
    tensors = safetensors_header(folder / "model.safetensors")
    params = sum(math.prod(meta["shape"]) for meta in tensors.values())
    footprint = planner.read_checkpoint(folder)
    assert footprint.mla and footprint.model_type == "deepseek_v3"
    # Dense first layer, MLA everywhere, 8 routed + 1 shared experts and the float32 routing
    # bias after it: the planner's count from config.json is the checkpoint's.
    assert footprint.params == params


def fake_writer(calls: list):
    def write(out: Path, seed: int) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
    return write


def test_builder_builds_once_where_the_env_says(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(demo_model, "_write_r1_model", fake_writer(calls))
    target = tmp_path / "r1"
    monkeypatch.setenv("DEEPSEEK_SERVE_R1_MODEL_DIR", str(target))
    assert ensure_r1_model(quiet=True) == target
    assert ensure_r1_model(quiet=True) == target
    assert len(calls) == 1
    assert (target / demo_model.R1_MARKER).read_text().strip() == demo_model.R1_MODEL_VERSION
    assert not [p for p in tmp_path.iterdir() if ".build-" in p.name]
    # A stale version is rebuilt; a folder this module did not write is never replaced.
    (target / demo_model.R1_MARKER).write_text("0\n")
    assert ensure_r1_model(quiet=True) == target and len(calls) == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "weights.bin").write_text("x")
    with pytest.raises(RuntimeError, match="not an R1-shaped model"):
        ensure_r1_model(foreign, quiet=True)
    assert len(calls) == 2


def test_interrupted_build_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    def interrupted(out: Path, seed: int) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_model, "_write_r1_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_r1_model(tmp_path / "r1", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_build_all_includes_r1(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(demo_model, "ensure_demo_model", lambda *a, **k: built.append("demo"))
    monkeypatch.setattr(demo_model, "ensure_instruct_model", lambda *a, **k: built.append("instruct"))
    monkeypatch.setattr(demo_model, "ensure_r1_model", lambda path, **k: built.append(path))
    assert demo_model.main(["--build", "all", "--quiet", "--r1-path", str(tmp_path)]) == 0
    assert built == ["demo", str(tmp_path), "instruct"]
    assert demo_model.main(["--build", "r1", "--quiet", "--r1-path", "x"]) == 0
    assert built[-1] == "x"


# --------------------------------------------------------------------------- the deployment

def test_post_root_answers_the_guides_json(service, tokenizer):
    prompt = "请简要介绍人工智能的发展历史"
    before = int(time.time())
    response = post(f"{service}/", {"prompt": prompt, "max_tokens": 16, "ignore_eos": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == GUIDE_KEYS
    assert body["id"] == "cmpl-" + response.headers["x-request-id"]
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert isinstance(body["created"], int) and before - 1 <= body["created"] <= time.time() + 1
    assert body["node"] in {n["NodeID"] for n in ray.nodes()}
    [choice] = body["choices"]
    assert set(choice) == {"text", "index", "finish_reason"}
    assert isinstance(choice["text"], str) and choice["index"] == 0
    assert choice["finish_reason"] == "length"
    # R1's tokenizer puts BOS in front of a completion prompt.
    prompt_tokens = len(tokenizer.encode(prompt))
    assert tokenizer.encode(prompt)[0] == tokenizer.bos_token_id
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 16,
                             "total_tokens": prompt_tokens + 16}


def test_engine_matches_transformers_deepseek_v3(service, tokenizer):
    """Prompt (prefill: MLA without weight absorption) and generated tokens (decode: absorbed
    MLA through the CPU kernel, MoE with noaux_tc routing) scored by vLLM equal transformers'
    DeepseekV3ForCausalLM in float32."""
    if not ON_CPU:
        pytest.skip("compares the float32 CPU engine")
    import torch
    from transformers import AutoModelForCausalLM

    prompt_ids = tokenizer.encode("The quick brown fox. 请简要解释相对论。")
    response = post(f"{service}/v1/completions", {
        "model": MODEL, "prompt": prompt_ids, "max_tokens": 12, "temperature": 0,
        "ignore_eos": True, "logprobs": 0, "prompt_logprobs": 0, "return_token_ids": True})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    generated = choice["token_ids"]
    assert len(generated) == 12
    engine = [next(iter(entry.values()))["logprob"] if entry else None
              for entry in choice["prompt_logprobs"]]
    engine = engine[1:] + choice["logprobs"]["token_logprobs"]
    model = AutoModelForCausalLM.from_pretrained(r1_folder(), dtype=torch.float32).eval()
    sequence = prompt_ids + generated
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([sequence])).logits[0].float(), -1)
    reference = [logprobs[i - 1, sequence[i]].item() for i in range(1, len(sequence))]
    assert engine == pytest.approx(reference, abs=1e-3)
    # Greedy: every generated token is transformers' argmax too.
    assert generated == [int(logprobs[i - 1].argmax()) for i in
                         range(len(prompt_ids), len(sequence))]


def chat_body(tokenizer, question: str, bias: dict[str, float], **extra) -> dict:
    logit_bias = {str(tokenizer.convert_tokens_to_ids(t)): b for t, b in bias.items()}
    return {"model": MODEL, "messages": [{"role": "user", "content": question}],
            "max_tokens": 24, "temperature": 0, "ignore_eos": True, "logit_bias": logit_bias,
            **extra}


def raw_text(service: str, body: dict, prompt_token_ids: list[int], token_ids: list[int]) -> str:
    """What the engine generates for the chat's own prompt, without any parser: the same
    sampling through /v1/completions."""
    completion = {key: value for key, value in body.items() if key != "messages"}
    response = post(f"{service}/v1/completions",
                    {**completion, "prompt": prompt_token_ids, "return_token_ids": True})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["token_ids"] == token_ids  # the same generation
    return choice["text"]


def chat_and_raw(service: str, body: dict) -> tuple[dict, str]:
    response = post(f"{service}/v1/chat/completions", {**body, "return_token_ids": True})
    assert response.status_code == 200, response.text
    answer = response.json()
    choice = answer["choices"][0]
    return choice["message"], raw_text(service, body, answer["prompt_token_ids"],
                                       choice["token_ids"])


def streamed(service: str, body: dict) -> tuple[str, str]:
    events = read_ok_sse(post(f"{service}/v1/chat/completions", {**body, "stream": True},
                           stream=True))
    assert events[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in events[:-1] if c["choices"]]
    reasoning = [d["reasoning"] for d in deltas if d.get("reasoning")]
    content = [d["content"] for d in deltas if d.get("content")]
    return "".join(reasoning), "".join(content)


def test_no_end_of_thinking_means_all_of_the_answer_is_reasoning(service, tokenizer):
    """The template opens <think>; with </think> (and <think>) banned, the deepseek_r1 parser
    returns every generated character as reasoning and no content, whole or streamed."""
    body = chat_body(tokenizer, "请简要介绍人工智能的发展历史", {"<think>": -100, "</think>": -100})
    message, raw = chat_and_raw(service, body)
    assert raw and "think>" not in raw
    assert message["reasoning"] == raw
    assert message["content"] is None
    reasoning, content = streamed(service, body)
    assert (reasoning, content) == (raw, "")


def test_end_of_thinking_splits_reasoning_from_content(service, tokenizer):
    """A logit bias on </think> (presence and frequency penalties keep it to one) makes the model
    close its reasoning after its first token: the text before </think> is the reasoning, the
    text after it the content, whole or streamed."""
    # Greedy with these weights: "!</think>gea..." for any bias from 3.25 to 4 (at 3 "!ngu</think>").
    body = chat_body(tokenizer, "请简要介绍人工智能的发展历史",
                     {"<think>": -100, "</think>": 3.6}, presence_penalty=2.0,
                     frequency_penalty=2.0)
    message, raw = chat_and_raw(service, body)
    assert raw.count("</think>") == 1, raw
    before, _, after = raw.partition("</think>")
    # A random-weight model may end its reasoning in the middle of a UTF-8 character: vLLM's
    # stream then drops the held-back bytes (they arrive in the delta of </think> alone, which
    # the parser skips), so a reasoning ending in U+FFFD could not be compared whole.
    assert before and after and not before.endswith("\ufffd"), raw
    assert (message["reasoning"], message["content"]) == (before, after)
    assert streamed(service, body) == (before, after)


def kv_cache_tokens_logged() -> list[int]:
    """The KV cache size vLLM logged in this Ray session's worker logs ("CPU KV cache size" in
    vLLM 0.32, "GPU KV cache size" before)."""
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    found = []
    for path in glob.glob(os.path.join(logs, "worker-*")):
        with open(path, errors="replace") as f:
            found += [int(m.replace(",", "")) for m in
                      re.findall(r"[CG]PU KV cache size: ([\d,]+) tokens", f.read())]
    return found


def test_planner_kv_bytes_per_token_is_the_engines(service):
    """vLLM sizes the replica's KV cache from --kv-cache-memory-bytes: the tokens it says fit are
    what the planner's bytes per token make of the same bytes."""
    from replica.config import CPU_DEFAULT_DTYPE

    tokens = kv_cache_tokens_logged()
    assert len(set(tokens)) == 1, tokens
    engine_tokens = tokens[0]
    footprint = planner.read_checkpoint(r1_folder(), dtype=CPU_DEFAULT_DTYPE if ON_CPU else "auto")
    per_token = footprint.kv_bytes_per_token_layer(
        tp=1, kv_dtype_bytes=planner.kv_dtype_bytes(None, footprint.dtype_bytes)) * \
        footprint.num_layers
    # The engine's own figure: bytes over the tokens it holds, within one KV block of tokens.
    assert KV_CACHE_BYTES / engine_tokens == pytest.approx(per_token, rel=0.01)
    if ON_CPU:
        blocks = KV_CACHE_BYTES // int(per_token * CPU_MLA_BLOCK)
        assert engine_tokens == blocks * CPU_MLA_BLOCK
        # 576 latent values (kv_lora_rank 512 + rope 64) x 4 bytes x 3 layers, as MLA caches.
        assert per_token == 576 * 4 * 3
