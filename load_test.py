"""Load test for the completion service: concurrency/rate-controlled requests, latency and per-node report."""
from __future__ import annotations

import importlib
import math
import sys
from typing import Sequence

from common.cli import (EXIT_FAILURE, EXIT_OK, EXIT_USAGE, add_flag, exits_with_codes,
                        make_parser, non_negative_int, positive_int)
from ops import prefix_cache
from loadgen.client import (CHAT_ENDPOINT, DEFAULT_PROMPT, ENDPOINTS, ROOT_ENDPOINT,
                            SESSION_HEADER, LoadConfig, format_report, load_prompts,
                            run_load_sync, summarize, system_prompt_text, write_json)

EPILOG = """examples:
  python load_test.py                                  # 20 in flight, 100 requests
  python load_test.py -c 30 -n 150 -p "请简要解释相对论"
  python load_test.py --stream -c 64 -n 1000 --json result.json --report result.html
  python load_test.py --request-rate 5 --duration 60 -n 0 --prompt-file prompts.jsonl
  python load_test.py --conversations 16 --turns 6 --system-prompt-words 800 --stream

exit codes: 0 all requests succeeded, 1 any request failed (or the service was unreachable),
2 bad flags."""


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects nan
        raise ValueError("must be positive")
    return value


# argparse names the converter in its error message ("invalid _positive_float value").
_positive_float.__name__ = "positive number"


def build_parser():
    parser = make_parser("Send concurrent completion requests to the service and report "
                         "throughput, latency (TTFT/TPOT/ITL when streaming) and how the "
                         "answers spread over the cluster's nodes.", EPILOG)
    load = parser.add_argument_group("load")
    add_flag(load, "-c", "--concurrency", env="LOAD_CONCURRENCY", default=20, type=positive_int,
             help="requests in flight at once (the cap, also with --request-rate)")
    add_flag(load, "-n", "--num-requests", env="LOAD_NUM_REQUESTS", default=100,
             type=non_negative_int, help="requests to send; 0 = no limit (needs --duration)")
    add_flag(load, "--request-rate", env="LOAD_REQUEST_RATE", default=math.inf,
             type=_positive_float,
             help="mean requests/s with Poisson arrivals; inf = closed loop (each finished "
                  "request immediately starts the next)")
    add_flag(load, "--duration", env="LOAD_DURATION", default=None, type=_positive_float,
             help="stop issuing new requests after this many seconds (in-flight ones finish)")
    add_flag(load, "--seed", env="LOAD_SEED", default=0, type=int,
             help="random seed for the Poisson arrival times")
    chat = parser.add_argument_group(
        "conversations (multi-turn chat: the traffic a reasoning model serves)")
    add_flag(chat, "--conversations", env="LOAD_CONVERSATIONS", default=0, type=non_negative_int,
             help="run this many chat conversations on /v1/chat/completions instead of "
                  "independent requests: each turn carries the whole history and the "
                  f"conversation's {SESSION_HEADER} header, the next turn is sent after the "
                  "answer, and all conversations interleave (-n is then ignored); the report "
                  "says whether each conversation stayed on one node and how the turns' "
                  "first tokens grow")
    add_flag(chat, "--turns", env="LOAD_TURNS", default=4, type=positive_int,
             help="turns per conversation (questions from -p/--prompt-file in turn)")
    add_flag(chat, "--no-session-header", env="LOAD_NO_SESSION_HEADER", type=bool, default=False,
             help=f"send the turns without the {SESSION_HEADER} header (what --routing prefix "
                  "must cope with: clients that name no session)")
    add_flag(chat, "--system-prompt-words", env="LOAD_SYSTEM_PROMPT_WORDS", default=0,
             type=non_negative_int,
             help="a system prompt of about this many words shared by every chat request: a "
                  "long common prefix, as a deployed assistant's instructions are")
    request = parser.add_argument_group("requests")
    add_flag(request, "-p", "--prompt", default=DEFAULT_PROMPT, help="prompt sent with every request")
    add_flag(request, "--prompt-file", env="LOAD_PROMPT_FILE", default=None,
             help="file of prompts, one per line or JSONL {\"prompt\": ...}, used in turn "
                  "(overrides --prompt)")
    add_flag(request, "--max-tokens", env="LOAD_MAX_TOKENS", default=128, type=positive_int,
             help="max_tokens per request")
    add_flag(request, "--temperature", env="LOAD_TEMPERATURE", default=None, type=float,
             help="sampling temperature (server default when unset)")
    add_flag(request, "--ignore-eos", env="LOAD_IGNORE_EOS", default=False, type=bool,
             help="ask the server to generate exactly --max-tokens tokens")
    add_flag(request, "--stream", env="LOAD_STREAM", default=False, type=bool,
             help="stream answers (SSE) and measure TTFT, TPOT and ITL")
    service = parser.add_argument_group("service")
    add_flag(service, "--url", env="SERVICE_URL", default="http://localhost:8000",
             help="service base URL")
    add_flag(service, "--endpoint", env="LOAD_ENDPOINT", default="/", choices=ENDPOINTS,
             help="'/' (the service's own API), '/v1/completions' or '/v1/chat/completions' "
                  "(OpenAI format; the prompt as one user message)")
    add_flag(service, "--model", env="SERVED_MODEL_NAME", default="DeepSeek-R1",
             help="model name sent on the OpenAI endpoints")
    add_flag(service, "--api-key", env="API_KEY", default=None,
             help="sent as 'Authorization: Bearer <key>'")
    add_flag(service, "--timeout", env="LOAD_TIMEOUT", default=600.0, type=_positive_float,
             help="per-request timeout in seconds, including the whole streamed answer")
    add_flag(service, "--expected-nodes", env="EXPECTED_NODES", default=None, type=positive_int,
             help="nodes that should be serving: ones that answered nothing count as 0 in the "
                  "balance figure")
    output = parser.add_argument_group("output")
    add_flag(output, "--json", dest="json_file", default=None, metavar="FILE",
             help="write parameters, summary, per-node stats and error kinds to FILE")
    add_flag(output, "--report", dest="report_file", env="LOAD_REPORT", default=None,
             metavar="FILE.html",
             help="also write a self-contained HTML report (charts of latency, throughput and "
                  "requests in flight over time, answers per node, errors; opens offline)")
    add_flag(output, "--metrics-url", env="LOAD_METRICS_URL", default=None,
             metavar="URL[,URL...]",
             help="Prometheus endpoints to read vLLM's prefix-cache counters from, before and "
                  "after the run: each Ray node's metrics endpoint (ray start "
                  "--metrics-export-port) or vllm serve's /metrics; the report then gives each "
                  "replica's prefix-cache hit rate for this run")
    output.add_argument("--json-requests", action="store_true",
                        help="also write every request's record into the --json file")
    output.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def write_html_report(path: str, result, summary, text_summary: str) -> None:
    # plotly is only needed here: a plain load test runs without it.
    from loadgen.report import build_report_data
    from loadgen.report_html import write_report

    write_report(path, build_report_data(result, summary), text_summary)


@exits_with_codes
def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()  # env-var defaults are parsed here and may be invalid
        args = parser.parse_args(list(argv) if argv is not None else None)
        if args.num_requests == 0 and args.duration is None:
            parser.error("-n 0 (no limit) needs --duration")
        prompts = [args.prompt]
        if args.prompt_file:
            try:
                prompts = load_prompts(args.prompt_file)
            except (OSError, ValueError) as exc:
                parser.error(f"--prompt-file: {exc}")
        endpoint = args.endpoint
        if args.conversations:
            if endpoint not in (ROOT_ENDPOINT, CHAT_ENDPOINT):
                parser.error(f"--conversations are chats on {CHAT_ENDPOINT}, not {endpoint}")
            if args.request_rate != math.inf:
                parser.error("--conversations run as a closed loop (each turn after its "
                             "answer): no --request-rate")
            endpoint = CHAT_ENDPOINT
        if args.report_file:
            try:  # before the run, not after it
                importlib.import_module("loadgen.report_html")
            except ImportError as exc:
                parser.error(f"--report needs plotly (pip install plotly): {exc}")
    except SystemExit as exc:  # argparse exits 2 on bad flags and 0 for --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    config = LoadConfig(
        url=args.url, endpoint=endpoint, prompts=prompts, max_tokens=args.max_tokens,
        concurrency=args.concurrency, num_requests=args.num_requests,
        request_rate=args.request_rate, duration=args.duration, timeout=args.timeout,
        stream=args.stream, model=args.model, api_key=args.api_key, ignore_eos=args.ignore_eos,
        temperature=args.temperature, seed=args.seed, progress=not args.no_progress,
        expected_nodes=args.expected_nodes, conversations=args.conversations,
        turns=args.turns, system_prompt=system_prompt_text(args.system_prompt_words),
        session_header=not args.no_session_header)

    metrics_urls = [u.strip() for u in (args.metrics_url or "").split(",") if u.strip()]
    before: prefix_cache.Counters = {}
    if metrics_urls:
        before, errors = prefix_cache.read(metrics_urls)
        if errors:
            print("error: --metrics-url: " + "; ".join(errors), file=sys.stderr)
            return EXIT_USAGE
    try:
        result = run_load_sync(config, describe_server=bool(args.report_file))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE
    summary = summarize(result)
    text = format_report(summary, config)
    extra = {}
    if metrics_urls:
        hits, errors = prefix_cache.read_after(metrics_urls, before)
        text += "\n" + "\n".join(prefix_cache.format_rows(hits, errors))
        extra["prefix_cache"] = [h.to_dict() for h in hits]

    if args.json_file:
        try:
            write_json(args.json_file, result, summary, include_requests=args.json_requests,
                       extra=extra)
        except OSError as exc:
            print(f"error: cannot write {args.json_file}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    if args.report_file:
        try:
            write_html_report(args.report_file, result, summary, text)
        except OSError as exc:
            print(f"error: cannot write {args.report_file}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    if summary.unreachable:
        message = summary.sample_errors.get("connection_error", "")
        print(f"error: service unreachable at {config.target_url()}: {message}", file=sys.stderr)
        return EXIT_FAILURE
    print(text)
    return EXIT_OK if summary.failures == 0 and summary.successes > 0 else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
