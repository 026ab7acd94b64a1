#!/usr/bin/env python3
"""Load benchmark for an OpenAI-compatible server (wordloom serve, llama-server): C concurrent
streaming chat clients, each sending R requests; reports aggregate generated tokens/s and
time-to-first-token percentiles as one JSON line. Standard library only.

    python3 scripts/bench_serve.py --url http://127.0.0.1:8080 --clients 8 --requests 4 --max-tokens 128
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse

QUESTIONS = [
    "Explain how a rainbow forms.",
    "Write a short poem about the sea.",
    "What are three tips for a job interview?",
    "Describe the water cycle.",
    "How do I make a cup of tea?",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What is photosynthesis?",
]


def one_request(url, model, question, max_tokens, seed):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    body = {
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": seed,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:200]!r}")
    first = None
    tokens = 0
    usage = None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            if choice.get("delta", {}).get("content"):
                if first is None:
                    first = time.perf_counter() - start
                tokens += 1
    conn.close()
    completion = usage["completion_tokens"] if usage else tokens
    return first if first is not None else time.perf_counter() - start, completion


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--label", default="")
    ap.add_argument(
        "--distinct",
        action="store_true",
        help="start every question with its own request number, so that no two prompts share "
        "more than the chat template's system turn (a server's prompt cache reuses only that)",
    )
    args = ap.parse_args()
    ttfts, counts, errors = [], [], []
    lock = threading.Lock()

    def client(c):
        for r in range(args.requests):
            q = QUESTIONS[(c + r) % len(QUESTIONS)]
            if args.distinct:
                q = f"Question {c * args.requests + r + 1}: {q}"
            try:
                ttft, n = one_request(args.url, args.model, q, args.max_tokens, c * 100 + r)
                with lock:
                    ttfts.append(ttft)
                    counts.append(n)
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                with lock:
                    errors.append(str(e))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts.sort()
    q = lambda p: ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else None
    print(json.dumps({
        "label": args.label,
        "clients": args.clients,
        "requests": len(counts),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "generated_tokens": sum(counts),
        "seconds": round(wall, 3),
        "tokens_per_second": round(sum(counts) / wall, 2),
        "ttft_p50": q(0.5),
        "ttft_p95": q(0.95),
        "ttft_mean": statistics.mean(ttfts) if ttfts else None,
    }))


if __name__ == "__main__":
    main()
