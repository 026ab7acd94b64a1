#!/usr/bin/env python3
"""PyTorch / `transformers` peer benchmark for wordloom's f32 safetensors path.

Two subcommands, run from anywhere:

    # once: dequantize the GGUF through transformers and save an HF-layout f32 model dir
    /opt/wlpy/bin/python scripts/bench_transformers.py export \
        [--gguf .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf] \
        [--out .cache/models/SmolLM2-135M-Instruct-f32] [--force] [--no-check]

    # the peer numbers, same shape as `wordloom bench --json`
    /opt/wlpy/bin/python scripts/bench_transformers.py bench \
        --model .cache/models/SmolLM2-135M-Instruct-f32 --threads 2 \
        --prompt-tokens 512 --gen-tokens 128 --repetitions 3 --json

    # optional: check an exported dir (layout, dtypes, tied embeddings, greedy " Paris")
    /opt/wlpy/bin/python scripts/bench_transformers.py verify [--model DIR]

Relative paths are taken relative to the current directory; the defaults are relative to
the repository root. Needs torch, transformers (>= 5), gguf, safetensors.

export
  Loads the GGUF with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` (which
  dequantizes to f32 and undoes llama.cpp's q/k row permutation, so the saved tensors are in
  normal HF order and use HF names) and writes config.json (model_type llama,
  tie_word_embeddings true, no quantization_config), model.safetensors (float32, no
  lm_head.weight since it is tied), generation_config.json, tokenizer.json and
  tokenizer_config.json (with chat_template inlined). config.json is rewritten in the classic
  hub layout (top-level rope_theta / rope_scaling, not v5's rope_parameters) because that is
  what wordloom's config parser reads. Written to a temporary sibling dir and
  renamed into place; skipped when the output dir is already complete (use --force to redo).
  Unless --no-check, the saved dir is reloaded and its logits compared with the in-memory
  GGUF-loaded model (must be identical), and greedy text for "The capital of France is"
  must start with " Paris".

bench
  torch.set_num_threads(T), torch.set_num_interop_threads(1); model loaded in float32,
  eval(), everything under torch.inference_mode(); default attention implementation (sdpa).
  The measurement mirrors src/cli/bench.rs:
    prefill  one forward over a fixed prompt of --prompt-tokens ids,
             id_i = (i*7919 + 13) % (vocab_size - 1) + 1, into a fresh KV cache, with
             logits_to_keep=1 (only the last row of logits, as wordloom's LogitsWanted::Last);
             tokens/s = prompt_tokens / time.
    decode   a manual greedy loop (NOT generate()): --gen-tokens forwards of one token each,
             model(input_ids=[[tok]], cache=cache, use_cache=True, logits_to_keep=1)
             (`cache=` is transformers >= 5.x's name for `past_key_values=`, which is used on
             versions whose forward still takes only the old name)
             then argmax over the full logits row. The first token is the argmax of the
             prefill. With --decode-prompt-tokens 0 (default, identical to the Rust bench) the
             loop starts from an empty cache and every one of the --gen-tokens steps is timed;
             with N > 0 the first N prompt ids are prefilled into the cache first (untimed) and
             then the --gen-tokens steps are timed. tokens/s = gen_tokens / time.
  One untimed warm-up iteration (prefill + decode), then --repetitions timed ones; each
  figure is the median (upper median for an even count, values[n//2], as the Rust bench).
  peak_rss_bytes = resource.getrusage(RUSAGE_SELF).ru_maxrss * 1024 (Linux reports KiB).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GGUF = REPO_ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = REPO_ROOT / ".cache/models/SmolLM2-135M-Instruct-f32"
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
CHECK_PROMPT = "The capital of France is"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# export


def is_complete(out: Path) -> bool:
    return all((out / f).is_file() for f in REQUIRED_FILES)


def check_dir_layout(out: Path) -> None:
    """Structural checks on an exported dir; raises on any problem."""
    from safetensors import safe_open

    missing = [f for f in REQUIRED_FILES if not (out / f).is_file()]
    if missing:
        raise SystemExit(f"{out}: missing {missing}")
    config = json.loads((out / "config.json").read_text())
    problems = []
    if config.get("model_type") != "llama":
        problems.append(f"model_type is {config.get('model_type')!r}, want 'llama'")
    if config.get("tie_word_embeddings") is not True:
        problems.append("tie_word_embeddings is not true")
    if not isinstance(config.get("rope_theta"), (int, float)):
        problems.append("config.json has no top-level rope_theta (wordloom would use 10000)")
    if "quantization_config" in config:
        problems.append("config.json still has a quantization_config")
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    if not isinstance(tok_config.get("chat_template"), (str, list)):
        problems.append("tokenizer_config.json has no chat_template")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        dtypes = {str(f.get_slice(n).get_dtype()) for n in names}
        q_shape = tuple(f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape()) \
            if "model.layers.0.self_attn.q_proj.weight" in names else None
    n_layers = config.get("num_hidden_layers", 0)
    want = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        want |= {
            p + "input_layernorm.weight",
            p + "post_attention_layernorm.weight",
            p + "self_attn.q_proj.weight",
            p + "self_attn.k_proj.weight",
            p + "self_attn.v_proj.weight",
            p + "self_attn.o_proj.weight",
            p + "mlp.gate_proj.weight",
            p + "mlp.up_proj.weight",
            p + "mlp.down_proj.weight",
        }
    if want - names:
        problems.append(f"missing tensors: {sorted(want - names)[:5]}...")
    if names - want:
        problems.append(f"unexpected tensors: {sorted(names - want)[:5]}")
    if dtypes != {"F32"}:
        problems.append(f"tensor dtypes {dtypes}, want only F32")
    hidden = config.get("hidden_size")
    if q_shape != (hidden, hidden):
        problems.append(f"q_proj shape {q_shape}, want {(hidden, hidden)}")
    if problems:
        raise SystemExit(f"{out}: " + "; ".join(problems))
    log(f"layout ok: {len(names)} f32 tensors, HF names, tied embeddings, chat_template present")


def greedy_text(model, tokenizer, prompt: str, new_tokens: int = 8) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1]:])


def check_paris(model, tokenizer) -> str:
    text = greedy_text(model, tokenizer, CHECK_PROMPT)
    log(f"greedy: {CHECK_PROMPT!r} -> {text!r}")
    if not text.startswith(" Paris"):
        raise SystemExit(f"greedy continuation does not start with ' Paris': {text!r}")
    return text


def load_dir(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return model, tokenizer


def classic_config(path: Path) -> None:
    """Rewrite config.json in the classic (transformers 4.x / hub) layout, as
    scripts/make_fixtures.py does: top-level rope_theta / rope_scaling instead of v5's
    rope_parameters (wordloom's LlamaConfig reads only the top-level keys and would otherwise
    fall back to rope_theta 10000), torch_dtype next to dtype. transformers 5 reads both."""
    cfg = json.loads(path.read_text())
    rp = cfg.pop("rope_parameters", None)
    if rp is not None:
        rp = dict(rp)
        cfg["rope_theta"] = rp.pop("rope_theta")
        cfg["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
    cfg["torch_dtype"] = "float32"
    cfg["dtype"] = "float32"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def cmd_export(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(args.gguf).resolve()
    out = Path(args.out).resolve()
    if is_complete(out) and not args.force:
        log(f"{out} already exported; skipping (use --force to redo)")
        return
    if not gguf.is_file():
        raise SystemExit(f"no GGUF at {gguf}")

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    log(f"loaded GGUF in {time.perf_counter() - t0:.1f}s")

    # A plain f32 checkpoint: drop the GGUF "quantization" marker so the dir loads as such.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    model.config.tie_word_embeddings = True
    model.config.architectures = [type(model).__name__]
    model.config.dtype = torch.float32
    assert model.config.model_type == "llama", model.config.model_type
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), \
        "lm_head is not tied to embed_tokens"

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), max_shard_size="100GB")
    model.generation_config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))

    # transformers 5 writes the chat template to chat_template.jinja; also inline it in
    # tokenizer_config.json, where older readers (and the Rust loader first) look.
    tc_path = tmp / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    if not tc.get("chat_template"):
        template = tokenizer.chat_template
        if not template and (tmp / "chat_template.jinja").is_file():
            template = (tmp / "chat_template.jinja").read_text()
        if not template:
            raise SystemExit("the GGUF tokenizer has no chat_template")
        tc["chat_template"] = template
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")

    classic_config(tmp / "config.json")
    check_dir_layout(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"exported to {out} in {time.perf_counter() - t0:.1f}s")

    if args.no_check:
        return
    # Reloaded dir must reproduce the GGUF-loaded model exactly.
    reloaded, rtok = load_dir(out)
    ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids
    assert ids.tolist() == rtok(CHECK_PROMPT, return_tensors="pt").input_ids.tolist(), \
        "tokenizer round-trip changed the ids"
    with torch.inference_mode():
        a = model(ids).logits
        b = reloaded(ids).logits
    diff = (a - b).abs().max().item()
    log(f"logits max |GGUF-loaded - exported| = {diff}")
    if diff != 0.0:
        raise SystemExit("exported model does not reproduce the GGUF-loaded logits exactly")
    check_paris(reloaded, rtok)


def cmd_random_gptneo(args) -> None:
    """A GPT-Neo-125M-shaped checkpoint with random weights (12 layers, d=768, 12 heads,
    global/local alternating with a 256 window, vocab 50257), f32 safetensors, plus the tiny
    GPT-Neo fixture's tokenizer files (the benchmark feeds token ids, not text)."""
    import shutil

    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    out = Path(args.out).resolve()
    if (out / "model.safetensors").exists() and not args.force:
        print(f"{out} exists (use --force to rebuild)")
        return
    torch.manual_seed(0)
    cfg = GPTNeoConfig(
        vocab_size=50257, max_position_embeddings=2048, hidden_size=768, num_layers=12,
        num_heads=12, attention_types=[[["global", "local"], 6]], window_size=256,
        activation_function="gelu_new", resid_dropout=0.0, embed_dropout=0.0,
        attention_dropout=0.0, bos_token_id=50256, eos_token_id=50256,
    )
    model = GPTNeoForCausalLM(cfg).eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO_ROOT / "tests" / "fixtures" / "tiny-gptneo" / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(out)


def cmd_verify(args) -> None:
    model_dir = Path(args.model).resolve()
    check_dir_layout(model_dir)
    model, tokenizer = load_dir(model_dir)
    check_paris(model, tokenizer)


# --------------------------------------------------------------------------------------------
# bench


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def cmd_bench(args) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    if args.prompt_tokens < 1 or args.gen_tokens < 1:
        raise SystemExit("--prompt-tokens and --gen-tokens must be at least 1")
    if args.repetitions < 1:
        raise SystemExit("--repetitions must be at least 1")
    if not 0 <= args.decode_prompt_tokens <= args.prompt_tokens:
        raise SystemExit("--decode-prompt-tokens must be in 0..=--prompt-tokens")

    threads = args.threads if args.threads else torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError as e:  # only settable before any inter-op work has started
        log(f"warning: set_num_interop_threads(1) failed: {e}")

    model_path = Path(args.model).resolve()
    t0 = time.perf_counter()
    if model_path.is_file() and model_path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(
            str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    model.eval()
    load_seconds = time.perf_counter() - t0
    if model.dtype != torch.float32:
        raise SystemExit(f"model loaded as {model.dtype}, want float32")

    config = model.config
    vocab = config.vocab_size
    ctx = getattr(config, "max_position_embeddings", None)
    if ctx is not None and args.prompt_tokens + args.gen_tokens > ctx:
        raise SystemExit(f"--prompt-tokens + --gen-tokens exceed the context window of {ctx}")

    prompt = [(i * 7919 + 13) % (vocab - 1) + 1 for i in range(args.prompt_tokens)]
    prompt_ids = torch.tensor([prompt], dtype=torch.long)
    decode_prefix = prompt_ids[:, : args.decode_prompt_tokens]

    def new_cache():
        return DynamicCache(config=config)

    # transformers 5.x renamed forward's `past_key_values` to `cache` (the old name warns and
    # goes away in 5.40); pass whichever this version takes. DynamicCache is updated in place.
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"

    def fwd(ids, cache):
        return model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kw: cache})

    def one_iteration():
        cache = new_cache()
        t = time.perf_counter()
        out = fwd(prompt_ids, cache)
        nxt = int(out.logits[0, -1].argmax())
        prefill_s = time.perf_counter() - t

        cache = new_cache()
        if args.decode_prompt_tokens:
            fwd(decode_prefix, cache)
        tok = torch.tensor([[nxt]], dtype=torch.long)
        t = time.perf_counter()
        for _ in range(args.gen_tokens):
            out = fwd(tok, cache)
            tok = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        decode_s = time.perf_counter() - t
        return args.prompt_tokens / prefill_s, args.gen_tokens / decode_s

    prefill, decode = [], []
    with torch.inference_mode():
        one_iteration()  # warm-up, not counted
        for _ in range(args.repetitions):
            p, d = one_iteration()
            prefill.append(p)
            decode.append(d)

    report = {
        "engine": "transformers",
        "model": str(model_path),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "decode_prompt_tokens": args.decode_prompt_tokens,
        "repetitions": args.repetitions,
        "prefill_tokens_per_second": median(prefill),
        "decode_tokens_per_second": median(decode),
        "prefill_runs": prefill,
        "decode_runs": decode,
        "decode_method": f"manual loop: model({cache_kw}=DynamicCache, use_cache=True, "
                         "logits_to_keep=1) + argmax",
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "load_seconds": load_seconds,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"model    {report['model']}")
        print(f"threads  {report['threads']} (interop {report['interop_threads']})")
        print(f"prefill  {report['prefill_tokens_per_second']:.1f} tokens/s "
              f"({args.prompt_tokens} tokens)")
        print(f"decode   {report['decode_tokens_per_second']:.1f} tokens/s "
              f"({args.gen_tokens} tokens)")
        print(f"load     {load_seconds:.3f} s")
        print(f"peak RSS {report['peak_rss_bytes'] / (1024 * 1024):.1f} MiB")
        print(f"torch {report['torch_version']}, transformers {report['transformers_version']}")


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("export", help="GGUF -> HF-layout f32 model dir")
    e.add_argument("--gguf", default=str(DEFAULT_GGUF))
    e.add_argument("--out", default=str(DEFAULT_OUT))
    e.add_argument("--force", action="store_true", help="re-export even if complete")
    e.add_argument("--no-check", action="store_true",
                   help="skip the reload / logits / greedy ' Paris' checks")

    r = sub.add_parser("random-gptneo", help="random GPT-Neo-125M-shaped f32 model dir")
    r.add_argument("--out", default=str(REPO_ROOT / ".cache" / "models" / "gpt-neo-125m-random"))
    r.add_argument("--force", action="store_true")

    v = sub.add_parser("verify", help="check an exported dir")
    v.add_argument("--model", default=str(DEFAULT_OUT))

    b = sub.add_parser("bench", help="prefill / decode tokens/s")
    b.add_argument("--model", default=str(DEFAULT_OUT),
                   help="HF model dir (or a .gguf file, dequantized to f32)")
    b.add_argument("--threads", type=int, default=0, help="0: torch's default")
    b.add_argument("--prompt-tokens", type=int, default=512)
    b.add_argument("--gen-tokens", type=int, default=128)
    b.add_argument("--decode-prompt-tokens", type=int, default=0,
                   help="prompt ids prefilled (untimed) before the decode loop; "
                        "0 = start from an empty cache, as the Rust bench")
    b.add_argument("--repetitions", type=int, default=3)
    b.add_argument("--json", action="store_true")

    args = ap.parse_args()
    {
        "export": cmd_export,
        "random-gptneo": cmd_random_gptneo,
        "verify": cmd_verify,
        "bench": cmd_bench,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
