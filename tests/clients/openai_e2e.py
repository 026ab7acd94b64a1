#!/usr/bin/env python3
"""End-to-end check of `wordloom serve` through the official `openai` Python client.

Run by tests/serve_openai.rs against a server holding the tiny random Llama
(tests/fixtures/tiny-llama) and the tiny BERT encoder (tests/fixtures/tiny-bert-base).
The chat model's text is gibberish, so the checks are about structure, token counts,
finish reasons and determinism, never about meaning.

Modes:
  (default)            every check below; exit 1 if any fails
  --expect-auth-error  every call must raise openai.AuthenticationError (wrong key)
  --smoke              one chat call must succeed (right key)
"""

import argparse
import base64
import math
import struct
import sys
import traceback

import openai

CHAT = "tiny-llama"
EMBED = "tiny-bert-base"
EMBED_DIM = 32
MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


class CheckFailed(AssertionError):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def expect_error(kind, call, what):
    """Run `call`, which must raise `kind`; return the exception."""
    try:
        result = call()
    except kind as e:
        return e
    except openai.APIError as e:
        raise CheckFailed(
            f"{what}: expected {kind.__name__}, got {type(e).__name__} "
            f"(status {getattr(e, 'status_code', None)}): {e}"
        )
    raise CheckFailed(f"{what}: expected {kind.__name__}, but the call succeeded: {result!r}")


def chat(client, **kw):
    args = dict(model=CHAT, messages=MESSAGES, max_tokens=8, temperature=0)
    args.update(kw)
    return client.chat.completions.create(**args)


def check_usage(usage, what, max_completion):
    check(usage is not None, f"{what}: response has no usage")
    check(usage.prompt_tokens > 0, f"{what}: usage.prompt_tokens = {usage.prompt_tokens}, want > 0")
    check(
        1 <= usage.completion_tokens <= max_completion,
        f"{what}: usage.completion_tokens = {usage.completion_tokens}, want 1..={max_completion}",
    )
    check(
        usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
        f"{what}: usage.total_tokens = {usage.total_tokens}, "
        f"want {usage.prompt_tokens} + {usage.completion_tokens}",
    )


# ---------------------------------------------------------------------------- checks


def test_models(client):
    ids = [m.id for m in client.models.list()]
    check(CHAT in ids, f"models.list(): chat model {CHAT!r} missing from {ids}")
    check(EMBED in ids, f"models.list(): embedding model {EMBED!r} missing from {ids}")


def test_chat_greedy(client):
    r = chat(client)
    check(r.object == "chat.completion", f"chat: object = {r.object!r}")
    check(r.model == CHAT, f"chat: model = {r.model!r}, want {CHAT!r}")
    check(isinstance(r.id, str) and r.id, f"chat: id = {r.id!r}")
    check(len(r.choices) == 1, f"chat: {len(r.choices)} choices, want 1")
    c = r.choices[0]
    check(c.index == 0, f"chat: choice index = {c.index}")
    check(c.finish_reason in ("length", "stop"), f"chat: finish_reason = {c.finish_reason!r}")
    check(c.message.role == "assistant", f"chat: message.role = {c.message.role!r}")
    check(isinstance(c.message.content, str), f"chat: message.content = {c.message.content!r}")
    check_usage(r.usage, "chat", 8)
    if c.finish_reason == "length":
        check(
            r.usage.completion_tokens == 8,
            f"chat: finish_reason length after {r.usage.completion_tokens} tokens, max_tokens 8",
        )
    again = chat(client)
    check(
        again.choices[0].message.content == c.message.content,
        f"chat: greedy requests differ: {c.message.content!r} vs {again.choices[0].message.content!r}",
    )
    check(again.usage.completion_tokens == r.usage.completion_tokens, "chat: greedy token counts differ")
    check(again.id != r.id, f"chat: two responses share the id {r.id!r}")


def test_chat_stream(client):
    whole = chat(client)
    stream = chat(client, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    check(chunks, "chat stream: no chunks")
    for ch in chunks:
        check(ch.object == "chat.completion.chunk", f"chat stream: chunk object = {ch.object!r}")
        check(ch.model == CHAT, f"chat stream: chunk model = {ch.model!r}")
    check(len({ch.id for ch in chunks}) == 1, "chat stream: chunks carry different ids")
    first = chunks[0]
    check(first.choices, "chat stream: first chunk has no choices")
    check(
        first.choices[0].delta.role == "assistant",
        f"chat stream: first delta role = {first.choices[0].delta.role!r}, want 'assistant'",
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    check(
        text == whole.choices[0].message.content,
        f"chat stream: deltas concatenate to {text!r}, non-stream content is "
        f"{whole.choices[0].message.content!r}",
    )
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    check(
        finishes == [whole.choices[0].finish_reason],
        f"chat stream: finish reasons {finishes}, want [{whole.choices[0].finish_reason!r}]",
    )
    last = chunks[-1]
    check(last.choices == [], f"chat stream: usage chunk has choices {last.choices}")
    check_usage(last.usage, "chat stream", 8)
    check(
        last.usage.completion_tokens == whole.usage.completion_tokens,
        f"chat stream: usage.completion_tokens = {last.usage.completion_tokens}, "
        f"non-stream had {whole.usage.completion_tokens}",
    )
    check(
        last.usage.prompt_tokens == whole.usage.prompt_tokens,
        f"chat stream: usage.prompt_tokens = {last.usage.prompt_tokens}, non-stream had {whole.usage.prompt_tokens}",
    )
    check(all(ch.usage is None for ch in chunks[:-1]), "chat stream: usage on a chunk before the last")
    # Without include_usage no chunk carries usage.
    plain = list(chat(client, stream=True))
    check(all(ch.usage is None for ch in plain), "chat stream without include_usage: a chunk has usage")
    text = "".join(ch.choices[0].delta.content or "" for ch in plain if ch.choices)
    check(text == whole.choices[0].message.content, "chat stream without include_usage: text differs")


def test_chat_n_seeded(client):
    kw = dict(n=2, temperature=1.0, seed=1234, max_tokens=12)
    a = chat(client, **kw)
    check(len(a.choices) == 2, f"n=2: {len(a.choices)} choices")
    check(
        sorted(c.index for c in a.choices) == [0, 1],
        f"n=2: choice indices {[c.index for c in a.choices]}, want [0, 1]",
    )
    check_usage(a.usage, "n=2", 24)
    b = chat(client, **kw)
    ta = {c.index: c.message.content for c in a.choices}
    tb = {c.index: c.message.content for c in b.choices}
    check(ta == tb, f"n=2 seeded: the same request gave {ta} and then {tb}")
    check(a.usage == b.usage, f"n=2 seeded: usage {a.usage} then {b.usage}")
    # The same seeded request streamed gives the same choices.
    parts = {0: "", 1: ""}
    for ch in chat(client, stream=True, **kw):
        for c in ch.choices:
            parts[c.index] += c.delta.content or ""
    check(parts == ta, f"n=2 seeded stream: {parts}, non-stream gave {ta}")


def test_chat_logprobs(client):
    r = chat(client, logprobs=True, top_logprobs=2)
    lp = r.choices[0].logprobs
    check(lp is not None and lp.content is not None, f"logprobs: choice.logprobs = {lp!r}")
    check(
        len(lp.content) == r.usage.completion_tokens,
        f"logprobs: {len(lp.content)} entries for {r.usage.completion_tokens} completion tokens",
    )
    for i, entry in enumerate(lp.content):
        check(entry.logprob <= 0, f"logprobs: token {i} ({entry.token!r}) has logprob {entry.logprob} > 0")
        check(
            len(entry.top_logprobs) == 2,
            f"logprobs: token {i} has {len(entry.top_logprobs)} top_logprobs, want 2",
        )
        for t in entry.top_logprobs:
            check(t.logprob <= 0, f"logprobs: token {i} alternative {t.token!r} has logprob {t.logprob}")
        check(
            entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob,
            f"logprobs: token {i} alternatives not in descending order",
        )
        # Greedy: the chosen token is the most likely one.
        check(
            math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-5),
            f"logprobs: greedy token {i} logprob {entry.logprob} != best alternative "
            f"{entry.top_logprobs[0].logprob}",
        )
    plain = chat(client)
    check(plain.choices[0].logprobs is None, "logprobs: present although not requested")
    check(
        plain.choices[0].message.content == r.choices[0].message.content,
        "logprobs: asking for logprobs changed the greedy text",
    )


def test_completions(client):
    kw = dict(model=CHAT, prompt="Once upon a time", max_tokens=5, temperature=0)
    r = client.completions.create(**kw)
    check(r.object == "text_completion", f"completions: object = {r.object!r}")
    check(r.model == CHAT, f"completions: model = {r.model!r}")
    check(len(r.choices) == 1, f"completions: {len(r.choices)} choices")
    c = r.choices[0]
    check(isinstance(c.text, str), f"completions: text = {c.text!r}")
    check(c.finish_reason in ("length", "stop"), f"completions: finish_reason = {c.finish_reason!r}")
    check_usage(r.usage, "completions", 5)
    again = client.completions.create(**kw)
    check(again.choices[0].text == c.text, f"completions: greedy gave {c.text!r} then {again.choices[0].text!r}")

    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    check(chunks, "completions stream: no chunks")
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    check(text == c.text, f"completions stream: chunks concatenate to {text!r}, non-stream text is {c.text!r}")
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    check(finishes == [c.finish_reason], f"completions stream: finish reasons {finishes}, want [{c.finish_reason!r}]")
    check_usage(chunks[-1].usage, "completions stream", 5)
    check(
        chunks[-1].usage.completion_tokens == r.usage.completion_tokens,
        f"completions stream: usage.completion_tokens = {chunks[-1].usage.completion_tokens}, "
        f"non-stream had {r.usage.completion_tokens}",
    )

    # Legacy logprobs: an integer number of alternatives.
    lr = client.completions.create(logprobs=2, **kw)
    lp = lr.choices[0].logprobs
    check(lp is not None, "completions logprobs: missing")
    n = r.usage.completion_tokens
    check(
        len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n,
        f"completions logprobs: lengths tokens {len(lp.tokens)}, token_logprobs {len(lp.token_logprobs)}, "
        f"top_logprobs {len(lp.top_logprobs)}, text_offset {len(lp.text_offset)}; want {n}",
    )
    check(all(x <= 0 for x in lp.token_logprobs), f"completions logprobs: positive logprob in {lp.token_logprobs}")
    check(lr.choices[0].text == c.text, "completions logprobs: asking for logprobs changed the greedy text")

    # A list of prompts: one choice per prompt.
    multi = client.completions.create(
        model=CHAT, prompt=["Once upon a time", "The weather today"], max_tokens=3, temperature=0
    )
    check(
        sorted(ch.index for ch in multi.choices) == [0, 1],
        f"completions with 2 prompts: choice indices {[ch.index for ch in multi.choices]}",
    )
    first = next(ch for ch in multi.choices if ch.index == 0)
    check(
        c.text.startswith(first.text),
        f"completions with 2 prompts: choice 0 {first.text!r} is not a prefix of the single-prompt text {c.text!r}",
    )


def pick_stop(text):
    """A short piece from the middle of `text` to use as a stop string."""
    for start in range(1, len(text) - 1):
        piece = text[start : start + 2]
        if len(piece) == 2 and "\ufffd" not in piece and piece.strip():
            return piece
    return None


def test_stop(client):
    base = client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=16, temperature=0)
    text = base.choices[0].text
    stop = pick_stop(text)
    check(stop is not None, f"stop: no usable stop string in the greedy text {text!r}")
    r = client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=16, temperature=0, stop=[stop])
    got = r.choices[0].text
    check(stop not in got, f"stop: completion text {got!r} contains the stop string {stop!r}")
    check(r.choices[0].finish_reason == "stop", f"stop: finish_reason = {r.choices[0].finish_reason!r}, want 'stop'")
    want = text[: text.index(stop)]
    check(got == want, f"stop: text {got!r}, want the greedy text up to the stop string: {want!r}")
    # Streamed, the stop string must not leak through a delta either.
    streamed = "".join(
        ch.choices[0].text
        for ch in client.completions.create(
            model=CHAT, prompt="Once upon a time", max_tokens=16, temperature=0, stop=[stop], stream=True
        )
        if ch.choices
    )
    check(streamed == got, f"stop stream: {streamed!r}, non-stream {got!r}")

    # Chat: same idea, stop given as a single string.
    full = chat(client, max_tokens=16).choices[0].message.content
    stop = pick_stop(full)
    check(stop is not None, f"chat stop: no usable stop string in {full!r}")
    r = chat(client, max_tokens=16, stop=stop)
    got = r.choices[0].message.content
    check(stop not in got, f"chat stop: content {got!r} contains the stop string {stop!r}")
    check(r.choices[0].finish_reason == "stop", f"chat stop: finish_reason = {r.choices[0].finish_reason!r}")
    check(got == full[: full.index(stop)], f"chat stop: {got!r}, want {full[: full.index(stop)]!r}")
    streamed = "".join(
        ch.choices[0].delta.content or "" for ch in chat(client, max_tokens=16, stop=stop, stream=True) if ch.choices
    )
    check(stop not in streamed, f"chat stop stream: deltas {streamed!r} contain the stop string {stop!r}")
    check(streamed == got, f"chat stop stream: {streamed!r}, non-stream {got!r}")


def decode_b64(s):
    raw = base64.b64decode(s)
    check(len(raw) % 4 == 0, f"embeddings base64: {len(raw)} bytes is not a whole number of float32s")
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_embeddings(client):
    texts = ["hello world", "goodbye"]
    r = client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    check(r.model == EMBED, f"embeddings: model = {r.model!r}")
    check(len(r.data) == 2, f"embeddings: {len(r.data)} vectors for 2 inputs")
    check([d.index for d in r.data] == [0, 1], f"embeddings: indices {[d.index for d in r.data]}")
    floats = [d.embedding for d in r.data]
    for i, v in enumerate(floats):
        check(len(v) == EMBED_DIM, f"embeddings: vector {i} has {len(v)} dims, want {EMBED_DIM}")
        norm = math.sqrt(sum(x * x for x in v))
        check(abs(norm - 1) < 1e-4, f"embeddings: vector {i} has norm {norm}, want 1")
    check(floats[0] != floats[1], "embeddings: different inputs gave the same vector")
    check(r.usage.prompt_tokens > 0, f"embeddings: usage.prompt_tokens = {r.usage.prompt_tokens}")

    # encoding_format="base64": this client hands back the raw string; decode it ourselves.
    b = client.embeddings.create(model=EMBED, input=texts, encoding_format="base64")
    for i, d in enumerate(b.data):
        e = d.embedding
        v = decode_b64(e) if isinstance(e, str) else list(e)
        check(len(v) == EMBED_DIM, f"embeddings base64: vector {i} has {len(v)} dims")
        diff = max(abs(x - y) for x, y in zip(v, floats[i]))
        check(diff < 1e-6, f"embeddings base64: vector {i} differs from the float one by {diff}")

    # No encoding_format: the client asks for base64 itself and decodes it.
    d = client.embeddings.create(model=EMBED, input=texts)
    for i, item in enumerate(d.data):
        diff = max(abs(x - y) for x, y in zip(item.embedding, floats[i]))
        check(len(item.embedding) == EMBED_DIM and diff < 1e-6, f"embeddings default format: vector {i} differs by {diff}")

    # A single string.
    one = client.embeddings.create(model=EMBED, input="hello world", encoding_format="float")
    check(len(one.data) == 1, f"embeddings single input: {len(one.data)} vectors")
    diff = max(abs(x - y) for x, y in zip(one.data[0].embedding, floats[0]))
    check(diff < 1e-5, f"embeddings: single-input vector differs from the batched one by {diff}")


def test_errors(client):
    e = expect_error(openai.NotFoundError, lambda: chat(client, model="no-such-model"), "unknown chat model")
    check("no-such-model" in str(e), f"unknown chat model: message does not name the model: {e}")
    expect_error(
        openai.NotFoundError,
        lambda: client.embeddings.create(model="no-such-model", input="x"),
        "unknown embedding model",
    )
    expect_error(
        openai.NotFoundError,
        lambda: client.completions.create(model="no-such-model", prompt="x", max_tokens=2),
        "unknown completion model",
    )
    e = expect_error(openai.BadRequestError, lambda: chat(client, temperature=-1), "temperature=-1")
    check("temperature" in str(e), f"temperature=-1: message does not mention temperature: {e}")
    check(e.status_code == 400, f"temperature=-1: status {e.status_code}")
    body = e.body if isinstance(e.body, dict) else {}
    check(body.get("param") == "temperature", f"temperature=-1: error param = {body.get('param')!r}, body {e.body!r}")
    check(body.get("type") == "invalid_request_error", f"temperature=-1: error type = {body.get('type')!r}")
    expect_error(openai.BadRequestError, lambda: chat(client, messages=[]), "empty messages")
    expect_error(openai.BadRequestError, lambda: chat(client, max_tokens=0), "max_tokens=0")
    expect_error(openai.BadRequestError, lambda: chat(client, top_p=0), "top_p=0")
    expect_error(
        openai.BadRequestError,
        lambda: chat(client, messages=[{"role": "wizard", "content": "hi"}]),
        "unknown role",
    )
    expect_error(
        openai.BadRequestError,
        lambda: client.embeddings.create(model=EMBED, input=[]),
        "empty embedding input",
    )
    # The server is still fine afterwards.
    check(chat(client, max_tokens=2).choices, "after errors: chat call failed")


CHECKS = [
    test_models,
    test_chat_greedy,
    test_chat_stream,
    test_chat_n_seeded,
    test_chat_logprobs,
    test_completions,
    test_stop,
    test_embeddings,
    test_errors,
]


def run_all(client):
    failed = []
    for fn in CHECKS:
        try:
            fn(client)
            print(f"ok    {fn.__name__}")
        except Exception as e:  # noqa: BLE001 - report every failure, then exit 1
            failed.append(fn.__name__)
            print(f"FAIL  {fn.__name__}: {type(e).__name__}: {e}")
            if not isinstance(e, CheckFailed):
                traceback.print_exc(file=sys.stdout)
    print(f"openai {openai.__version__}: {len(CHECKS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def run_expect_auth_error(new_client):
    calls = {
        "models.list": lambda c: c.models.list(),
        "chat.completions.create": lambda c: chat(c, max_tokens=2),
        "completions.create": lambda c: c.completions.create(model=CHAT, prompt="x", max_tokens=2),
        "embeddings.create": lambda c: c.embeddings.create(model=EMBED, input="x"),
    }
    failed = 0
    for name, call in calls.items():
        # A fresh client (so a fresh connection) per call: the server answers 401 before reading
        # a POST body and then drops the keep-alive connection without `Connection: close`, so a
        # reused connection can fail with APIConnectionError (see the ignored test
        # `unauthorized_post_keeps_the_connection_usable` in tests/serve_openai.rs).
        client = new_client()
        try:
            e = expect_error(openai.AuthenticationError, lambda: call(client), name)
            check(e.status_code == 401, f"{name}: status {e.status_code}, want 401")
            print(f"ok    {name} raised AuthenticationError: {e}")
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {e}")
        finally:
            client.close()
    return 1 if failed else 0


def run_smoke(client):
    r = chat(client, max_tokens=4)
    check(len(r.choices) == 1, f"smoke: {len(r.choices)} choices")
    check_usage(r.usage, "smoke", 4)
    ids = [m.id for m in client.models.list()]
    check(CHAT in ids, f"smoke: {CHAT!r} not in {ids}")
    print(f"ok    smoke: {r.usage.completion_tokens} tokens")
    return 0


def main():
    global CHAT, EMBED, EMBED_DIM
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--chat-model", default=CHAT)
    p.add_argument("--embedding-model", default=EMBED)
    p.add_argument("--embedding-dim", type=int, default=EMBED_DIM)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--expect-auth-error", action="store_true", help="every call must fail with 401")
    mode.add_argument("--smoke", action="store_true", help="one chat call must succeed")
    args = p.parse_args()
    CHAT, EMBED, EMBED_DIM = args.chat_model, args.embedding_model, args.embedding_dim
    # No retries: an error must surface as the first response's exception.
    def new_client():
        return openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)

    client = new_client()
    if args.expect_auth_error:
        return run_expect_auth_error(new_client)
    if args.smoke:
        return run_smoke(client)
    return run_all(client)


if __name__ == "__main__":
    sys.exit(main())
