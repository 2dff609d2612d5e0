"""Shared code of the Ray Serve + vLLM deployment scripts: config, engine, HTTP API, Ray helpers."""
