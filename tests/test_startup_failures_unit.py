"""Unit tests: the root cause found in a replica's log, and the remedy for a memory failure."""
from __future__ import annotations

from common import startup_failures as sf
from replica.config import EngineConfig

KV_TOO_SMALL = (
    "(EngineCore pid=16970) ERROR 12-04 12:37:38 [core.py:1510] ValueError: To serve at least "
    "one request with the model's max seq len (2048), (0.0 GiB KV cache is needed, which is "
    "larger than the available KV cache memory (0.0 GiB). Based on the available memory, the "
    "estimated maximum model length is 896. Try increasing `gpu_memory_utilization`")
TORCH_OOM = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB. GPU 0 has a total "
    "capacity of 139.81 GiB of which 2.77 GiB is free. Including non-PyTorch memory, this "
    "process has 137.03 GiB memory in use.")
LOG = [
    "INFO 12-04 12:37:30 [core.py:90] Initializing a V1 LLM engine",
    "Traceback (most recent call last):",
    '  File "vllm/v1/core/kv_cache_utils.py", line 1030, in _check_enough_kv_cache_memory',
    "    raise ValueError(",
    KV_TOO_SMALL,
    "\x1b[36m(ServeReplica pid=1)\x1b[0m RuntimeError: Engine core initialization failed. See "
    "root cause above. Failed core proc(s): {}",
]


def test_the_root_cause_is_the_engines_error_not_the_wrappers():
    cause = sf.root_cause(LOG)
    assert cause is not None and cause.startswith("ValueError: To serve at least one request")
    assert sf.root_cause(["all fine", "INFO started"]) is None


def test_a_kv_cache_too_small_gets_the_context_that_fits():
    gpu = sf.remedies_for(sf.root_cause(LOG) or "", EngineConfig(gpu_memory_utilization=0.9))
    assert gpu[0].startswith("--max-model-len 896 (or less)")
    assert "--gpu-memory-utilization above 0.9" in gpu[1] and "--kv-cache-dtype fp8" in gpu[1]
    cpu = sf.remedies_for(KV_TOO_SMALL, EngineConfig(device="cpu", kv_cache_memory_bytes=2**20))
    assert "--kv-cache-memory-bytes larger than 1048576 keeps --max-model-len 2048" in cpu[1]


def test_a_gpu_out_of_memory_after_graph_capture_gets_a_utilization_that_leaves_room():
    """The R1 failure with DeepGEMM at 0.92: 4 GiB asked, 2.77 GiB free of 139.81 GiB."""
    assert sf.root_cause([TORCH_OOM]) == TORCH_OOM
    remedies = sf.remedies_for(TORCH_OOM, EngineConfig(gpu_memory_utilization=0.92))
    # (4.00 - 2.77 + 1 margin) / 139.81 = 0.016 below 0.92
    assert remedies[0].startswith("--gpu-memory-utilization 0.90 leaves the 4 GiB")
    assert "--tensor-parallel-size auto" in remedies[1]


def test_failures_are_grouped_by_cause_with_the_remedy_once():
    failures = [sf.StartFailure("LLMDeployment", f"{i:032x}", "ab" * 28, KV_TOO_SMALL,
                                ["--max-model-len 896"]) for i in range(3)]
    text = sf.format_failures(failures)
    assert text.count("ValueError") == 1 and text.count("remedy:") == 1
    assert "LLMDeployment, 3 replica(s) on node abababababab" in text
    assert sf.format_failures([]) == ""
