"""A stand-in Hugging Face Hub on loopback: serves a few repositories' files as huggingface_hub downloads them."""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import threading
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
COMMIT = "0" * 39 + "1"
# DeepSeek-R1's own model.safetensors.index.json: 163 shards, total_size as published.
R1_TOTAL_SIZE = 688_586_727_753
R1_SHARDS = 163


def r1_repository() -> dict[str, bytes]:
    """deepseek-ai/DeepSeek-R1 as the planner reads it: config.json and the weight index."""
    shards = [f"model-{i:05d}-of-{R1_SHARDS:06d}.safetensors" for i in range(1, R1_SHARDS + 1)]
    index = {"metadata": {"total_size": R1_TOTAL_SIZE},
             "weight_map": {f"layer.{i}.weight": name for i, name in enumerate(shards)}}
    return {"config.json": (FIXTURES / "deepseek-r1" / "config.json").read_bytes(),
            "model.safetensors.index.json": json.dumps(index).encode()}


@contextlib.contextmanager
def stand_in_hub(repositories: dict[str, dict[str, bytes]]):
    """Serves GET/HEAD /{repo}/resolve/{revision}/{file}; yields its URL (for HF_ENDPOINT) and
    the list of paths asked for."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, with_body: bool) -> None:
            asked.append(self.path)
            parts = self.path.lstrip("/").split("/")
            repo, rest = "/".join(parts[:2]), parts[2:]
            body = None
            if len(rest) >= 3 and rest[0] == "resolve":
                body = repositories.get(repo, {}).get("/".join(rest[2:]))
            if body is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", f'"{hashlib.sha1(body).hexdigest()}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self._answer(with_body=False)

        def do_GET(self) -> None:
            self._answer(with_body=True)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()
