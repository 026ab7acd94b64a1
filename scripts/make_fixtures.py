#!/usr/bin/env python3
"""Generate the reference fixtures the wordloom Rust tests compare against.

Run by hand from anywhere:

    /opt/wlpy/bin/python scripts/make_fixtures.py [--gguf PATH] [--skip-tiny] [--skip-smollm] [--only-spm]
                                                  [--only NAME[,NAME...]]

--only builds just the named output directories (tiny-llama, tiny-llama-f16, tiny-qwen2,
tiny-qwen2-bf16, tiny-gpt2, tiny-gptneo, tiny-gptj, smollm2, spm-gguf) and leaves every
other fixture untouched; tiny-llama/tiny-llama-f16 and tiny-qwen2/tiny-qwen2-bf16 are built
as pairs. E.g. `--only tiny-gptneo,tiny-gptj`.

Needs: torch, transformers (>= 5), tokenizers, gguf, safetensors, numpy.

Outputs (all under tests/fixtures/, regenerated from scratch, deterministic):

  tiny-llama/       LlamaForCausalLM, GQA, llama3 rope scaling, untied lm_head, f32
  tiny-llama-f16/   the same weights stored as float16 (reference computed in f32
                    from the f16-rounded weights)
  tiny-qwen2/       Qwen2ForCausalLM, q/k/v bias, tied embeddings, model vocab
                    padded above the tokenizer vocab, f32
  tiny-qwen2-bf16/  the same weights stored as bfloat16 (reference computed in f32
                    from the bf16-rounded weights)
  tiny-gpt2/        GPT2LMHeadModel (Conv1D weights, tied wte), f32
  tiny-gptneo/      GPTNeoForCausalLM, layer 0 global / layer 1 local attention with
                    window_size 8 (smaller than prompt + generated tokens), unscaled
                    attention scores, learned positions, tied wte, f32; same tokenizer
                    as tiny-gpt2. Cached generate() is checked against full recompute.
  tiny-gptj/        GPTJForCausalLM, partial interleaved rotary (rotary_dim 8 of head_dim
                    16), parallel attn + MLP off one ln_1, untied lm_head with bias;
                    weights stored as float16 in pytorch_model.bin only (no safetensors),
                    reference computed in f32 from the f16-rounded weights; same tokenizer
                    as tiny-gpt2.
  smollm2/          tokenize.json, chat_template.json, ppl.txt, perplexity.json,
                    logits.json for SmolLM2-135M-Instruct (GGUF, dequantized by
                    transformers to f32). No weights are written.
  spm-gguf/         tokenizer.gguf (metadata only, no tensors) holding a tiny
                    llama-style SentencePiece BPE vocab (byte_fallback, split_digits)
                    trained here, plus tokenize.json with transformers' ids for it.
                    --only-spm builds just this directory (needs sentencepiece).

Greedy convention for every `greedy_ids` here: pure argmax over the full logits
row, EOS is NOT a stop condition (generate() is called with eos_token_id=None),
so exactly max_new_tokens tokens are produced. Where EOS matters a separate
`greedy_ids_stop_at_eos` is recorded too.

Floats are float32 values written in their shortest round-trip decimal form, so
parsing them as f32 gives back the exact value torch produced.
"""

import argparse
import json
import math
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures"
DEFAULT_GGUF = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

SEED = 1234
GPTNEO_STD = 0.25  # tiny-gptneo init std (gpt2 uses 0.5)
GPTNEO_QK_SCALE = 0.5  # extra factor on tiny-gptneo q_proj/k_proj weights (its attention scores are unscaled)
GPTNEO_WINDOW = 8  # tiny-gptneo local attention window (smaller than the longer prompts + generated tokens)
NEW_TOKENS_TINY = 20
NEW_TOKENS_SMOLLM = 30


# --------------------------------------------------------------------------
# Text (public domain)
# --------------------------------------------------------------------------

# Jane Austen, "Pride and Prejudice" (1813), chapter 1. Used for perplexity.
PPL_TEXT = """It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.

However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property of some one or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"

Mr. Bennet replied that he had not.

"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."

Mr. Bennet made no answer.

"Do you not want to know who has taken it?" cried his wife impatiently.

"You want to tell me, and I have no objection to hearing it."

This was invitation enough.

"Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of large fortune from the north of England; that he came down on Monday in a chaise and four to see the place, and was so much delighted with it, that he agreed with Mr. Morris immediately; that he is to take possession before Michaelmas, and some of his servants are to be in the house by the end of next week."

"What is his name?"

"Bingley."

"Is he married or single?"

"Oh! Single, my dear, to be sure! A single man of large fortune; four or five thousand a year. What a fine thing for our girls!"

"How so? How can it affect them?"

"My dear Mr. Bennet," replied his wife, "how can you be so tiresome! You must know that I am thinking of his marrying one of them."

"Is that his design in settling here?"

"Design! Nonsense, how can you talk so! But it is very likely that he may fall in love with one of them, and therefore you must visit him as soon as he comes."

"I see no occasion for that. You and the girls may go, or you may send them by themselves, which perhaps will be still better, for as you are as handsome as any of them, Mr. Bingley may like you the best of the party."

"My dear, you flatter me. I certainly have had my share of beauty, but I do not pretend to be anything extraordinary now. When a woman has five grown-up daughters, she ought to give over thinking of her own beauty."

"In such cases, a woman has not often much beauty to think of."

"But, my dear, you must indeed go and see Mr. Bingley when he comes into the neighbourhood."

"It is more than I engage for, I assure you."

"But consider your daughters. Only think what an establishment it would be for one of them. Sir William and Lady Lucas are determined to go, merely on that account, for in general, you know, they visit no newcomers. Indeed you must go, for it will be impossible for us to visit him if you do not."

"You are over-scrupulous, surely. I dare say Mr. Bingley will be very glad to see you; and I will send a few lines by you to assure him of my hearty consent to his marrying whichever he chooses of the girls; though I must throw in a good word for my little Lizzy."

"I desire you will do no such thing. Lizzy is not a bit better than the others; and I am sure she is not half so handsome as Jane, nor half so good-humoured as Lydia. But you are always giving her the preference."

"They have none of them much to recommend them," replied he; "they are all silly and ignorant like other girls; but Lizzy has something more of quickness than her sisters."

"Mr. Bennet, how can you abuse your own children in such a way? You take delight in vexing me. You have no compassion for my poor nerves."

"You mistake me, my dear. I have a high respect for your nerves. They are my old friends. I have heard you mention them with consideration these last twenty years at least."

"Ah, you do not know what I suffer."

"But I hope you will get over it, and live to see many young men of four thousand a year come into the neighbourhood."

"It will be no use to us, if twenty such should come, since you will not visit them."

"Depend upon it, my dear, that when there are twenty, I will visit them all."

Mr. Bennet was so odd a mixture of quick parts, sarcastic humour, reserve, and caprice, that the experience of three-and-twenty years had been insufficient to make his wife understand his character. Her mind was less difficult to develop. She was a woman of mean understanding, little information, and uncertain temper. When she was discontented, she fancied herself nervous. The business of her life was to get her daughters married; its solace was visiting and news.
"""

# Training corpus for the tiny byte-level BPE tokenizers: public-domain prose
# (Dickens 1859, Lincoln 1863, Melville 1851) plus a little code and accents.
TRAIN_TEXT = """It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the other way.

Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. We are met on a great battle-field of that war. We have come to dedicate a portion of that field, as a final resting place for those who here gave their lives that that nation might live. It is altogether fitting and proper that we should do this.

Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of the world. It is a way I have of driving off the spleen and regulating the circulation.

The quick brown fox jumps over the lazy dog. Hello world! Don't worry, I'm sure we'll be fine; they've said so.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, 2))

class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

Caf\u00e9, na\u00efve, Z\u00fcrich, r\u00e9sum\u00e9, fa\u00e7ade, \u00e9l\u00e8ve, \u00fcber, se\u00f1or.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159
"""

# ChatML; the qwen2 variant injects a default system prompt like Qwen2 does.
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_QWEN = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Pre-tokenizer split regexes (as in the HF llama3 / qwen2 tokenizer.json).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TINY_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Hello   world\n\n\tTabs\tand    spaces  ",
    "Caf\u00e9 na\u00efve Z\u00fcrich r\u00e9sum\u00e9 \u65e5\u672c \U0001F600",
    "It",
]
TINY_BATCH = ["Call me", "Four score and seven years ago our fathers brought forth"]
CHAT_CASES = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def versions():
    import tokenizers
    import transformers

    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }
    try:
        import gguf

        v["gguf"] = getattr(gguf, "__version__", None) or _dist_version("gguf")
    except ImportError:
        pass
    return v


def _dist_version(name):
    from importlib.metadata import version

    return version(name)


def f32list(t):
    """Shortest decimal strings that round-trip as float32."""
    a = np.asarray(t.detach().to(torch.float32).cpu().numpy() if torch.is_tensor(t) else t, dtype=np.float32)
    return [_F32(x) for x in a.reshape(-1)]


class _F32(float):
    """A float that json-serialises with the shortest float32 repr."""

    def __new__(cls, x):
        obj = float.__new__(cls, float(np.float32(x)))
        obj._s = np.format_float_positional(np.float32(x), unique=True, trim="-") if np.isfinite(x) else None
        if obj._s is not None and ("e" in obj._s or len(obj._s) > 14):
            obj._s = np.format_float_scientific(np.float32(x), unique=True, trim="-")
        return obj


def _json(obj, ind=0):
    sp = " " * ind
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f'{sp} {json.dumps(k, ensure_ascii=False)}: {_json(v, ind + 1)}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + sp + "}"
    if isinstance(obj, (list, tuple)):
        if all(isinstance(x, (int, float, str, bool)) or x is None for x in obj) and not any(
            isinstance(x, str) and len(x) > 40 for x in obj
        ):
            return "[" + ", ".join(_json(x, ind) for x in obj) + "]"
        return "[\n" + ",\n".join(sp + " " + _json(x, ind + 1) for x in obj) + "\n" + sp + "]"
    if isinstance(obj, _F32):
        if obj._s is None:
            return json.dumps(float(obj))
        return obj._s
    if isinstance(obj, float):
        if math.isfinite(obj):
            return repr(obj)
        raise ValueError("non-finite float in fixture")
    return json.dumps(obj, ensure_ascii=False)


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_json(obj) + "\n", encoding="utf-8")


def fresh_dir(path):
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


# --------------------------------------------------------------------------
# tiny tokenizers
# --------------------------------------------------------------------------


def train_tokenizer(kind, vocab_size):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    if kind == "gpt2":
        specials = ["<|endoftext|>"]
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif kind == "llama":
        specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
    elif kind == "qwen2":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
    else:
        raise ValueError(kind)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (TRAIN_TEXT + "\n" + PPL_TEXT).split("\n\n")
    tok.train_from_iterator(corpus, trainer=trainer)
    if kind == "llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def wrap_tokenizer(kind, raw):
    from transformers import PreTrainedTokenizerFast

    if kind == "gpt2":
        kw = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token=None)
    elif kind == "llama":
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token=None, pad_token="</s>", chat_template=CHATML)
    else:
        kw = dict(
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token=None,
            chat_template=CHATML_QWEN,
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        )
    return PreTrainedTokenizerFast(tokenizer_object=raw, model_max_length=128, **kw)


def save_tokenizer(tok, out):
    tok.save_pretrained(out)
    # keep the chat template inside tokenizer_config.json (older layout every loader knows)
    jinja = out / "chat_template.jinja"
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if jinja.exists():
        cfg["chat_template"] = jinja.read_text()
        jinja.unlink()
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if "extra_special_tokens" in cfg:
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


# --------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------


def init_weights(model, seed, std, emb_std):
    """Deterministic init, wider than default so logits are not near-uniform.

    2-D weights ~ N(0, std); token embeddings / lm_head ~ N(0, emb_std) (peakier logits);
    position embeddings N(0, std/2); norm gains ~ 1 + N(0, 0.1); biases ~ N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                if name.endswith("wpe.weight"):
                    s = std / 2
                elif any(k in name for k in ("embed_tokens", "lm_head", "wte")):
                    s = emb_std
                else:
                    s = std
                p.copy_(torch.randn(p.shape, generator=g) * s)
            elif "norm" in name or ".ln_" in name:
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                else:
                    p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
            else:  # linear biases
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def make_model(kind, vocab_size, tok):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tid = tok.convert_tokens_to_ids
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            hidden_act="silu",
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            # head_dim 16 -> wavelengths 6.3 .. 19869; with original_max 64 the
            # bands are: i=0 kept (wavelen < 16), i=1,2 smoothed, i>=3 divided by factor.
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            bos_token_id=tid("<s>"),
            eos_token_id=tid("</s>"),
            pad_token_id=tid("</s>"),
        )
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_act="silu",
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            use_sliding_window=False,
            tie_word_embeddings=True,
            bos_token_id=tid("<|endoftext|>"),
            eos_token_id=tid("<|im_end|>"),
            pad_token_id=tid("<|endoftext|>"),
        )
        model = Qwen2ForCausalLM(cfg)
    elif kind == "gpt2":
        eot = tid("<|endoftext|>")
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_positions=128,
            n_embd=64,
            n_layer=2,
            n_head=4,
            activation_function="gelu_new",
            layer_norm_epsilon=1e-5,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=eot,
            eos_token_id=eot,
            tie_word_embeddings=True,
        )
        model = GPT2LMHeadModel(cfg)
    elif kind == "gptneo":
        from transformers import GPTNeoConfig, GPTNeoForCausalLM

        eot = tid("<|endoftext|>")
        cfg = GPTNeoConfig(
            vocab_size=vocab_size,
            max_position_embeddings=128,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],  # layer 0 global, layer 1 local
            window_size=GPTNEO_WINDOW,
            intermediate_size=None,  # 4 * hidden_size
            activation_function="gelu_new",
            layer_norm_epsilon=1e-5,
            resid_dropout=0.0,
            embed_dropout=0.0,
            attention_dropout=0.0,
            classifier_dropout=0.0,
            bos_token_id=eot,
            eos_token_id=eot,
            tie_word_embeddings=True,
        )
        # "eager" is GPTNeoSelfAttention (the only non-flash implementation)
        model = GPTNeoForCausalLM(cfg)
        assert model.config.attention_layers == ["global", "local"], model.config.attention_layers
    elif kind == "gptj":
        from transformers import GPTJConfig, GPTJForCausalLM

        eot = tid("<|endoftext|>")
        cfg = GPTJConfig(
            vocab_size=vocab_size,
            n_positions=128,
            n_embd=64,
            n_layer=2,
            n_head=4,
            rotary_dim=8,  # partial rotary: head_dim = 16
            n_inner=None,  # 4 * n_embd
            activation_function="gelu_new",
            layer_norm_epsilon=1e-5,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=eot,
            eos_token_id=eot,
            tie_word_embeddings=False,
        )
        model = GPTJForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.eval()
    return model


def positions_from_mask(mask):
    pos = mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


@torch.no_grad()
def last_logprobs(model, ids):
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def greedy(model, ids, n, pad_id):
    """generate() greedy with EOS disabled, cross-checked against a manual argmax loop.

    Returns (new_ids, min_margin) where min_margin is the smallest top1-top2 logit gap
    over the steps (how fragile the reference is)."""
    from transformers import GenerationConfig

    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=pad_id,
        bos_token_id=None,
    )
    x = torch.tensor([ids])
    # generate() merges unset (None) fields from model.generation_config, which would bring EOS
    # back; install the clean config on the model instead.
    saved, model.generation_config = model.generation_config, gc
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        output_scores=True,
        return_dict_in_generate=True,
    )
    model.generation_config = saved
    new = out.sequences[0, len(ids):].tolist()
    assert len(new) == n, (len(new), n)
    margins = []
    for s in out.scores:
        top2 = torch.topk(s[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
    # manual full-recompute argmax loop must agree
    cur = list(ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([cur])).logits[0, -1]
        cur.append(int(torch.argmax(logits)))
    assert cur[len(ids):] == new, ("generate() vs manual greedy mismatch", cur[len(ids):], new)
    return new, min(margins)


@torch.no_grad()
def prompt_token_logprobs(model, ids):
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [lp[t, ids[t + 1]] for t in range(len(ids) - 1)]


@torch.no_grad()
def batch_reference(model, tok, prompts, n, pad_id, singles):
    """Left-padded batched forward + greedy generate; must agree with the unbatched runs."""
    from transformers import GenerationConfig

    enc = [tok(p)["input_ids"] for p in prompts]
    L = max(len(e) for e in enc)
    ids = torch.tensor([[pad_id] * (L - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc])
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, -1].float()
    lps = torch.log_softmax(logits, dim=-1)
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=pad_id, bos_token_id=None)
    saved, model.generation_config = model.generation_config, gc
    out = model.generate(input_ids=ids, attention_mask=mask)
    model.generation_config = saved
    gen = out[:, L:].tolist()
    max_diff = 0.0
    for i, s in enumerate(singles):
        max_diff = max(max_diff, float((lps[i] - s["_lp"]).abs().max()))
        assert gen[i] == s["greedy_ids"], ("batched greedy differs from unbatched", i, gen[i], s["greedy_ids"])
    assert max_diff < 1e-4, max_diff
    return {
        "prompts": prompts,
        "prompt_ids": enc,
        "padding": "left-padded with pad_token_id, attention_mask, position_ids = cumsum(mask)-1",
        "pad_token_id": pad_id,
        "last_logprobs": [f32list(lps[i]) for i in range(len(prompts))],
        "greedy_ids": gen,
        "greedy_text": [tok.decode(g) for g in gen],
        "eos_in_greedy": [tok.eos_token_id in g for g in gen],
        "max_abs_diff_vs_unbatched": max_diff,
    }


def model_reference(model, tok, name, dtype_note, pad_id):
    cases = []
    for i, p in enumerate(TINY_PROMPTS):
        ids = tok(p)["input_ids"]
        lp = last_logprobs(model, ids)[-1]
        new, margin = greedy(model, ids, NEW_TOKENS_TINY, pad_id)
        c = {
            "prompt": p,
            "prompt_ids": ids,
            "last_logprobs": f32list(lp),
            "greedy_ids": new,
            "greedy_text": tok.decode(new),
            "greedy_min_top2_logit_margin": margin,
            "eos_in_greedy": tok.eos_token_id in new,
        }
        if i == 0:
            ptl = prompt_token_logprobs(model, ids)
            c["prompt_token_logprobs"] = f32list(torch.stack(ptl))
            nll = -float(torch.stack(ptl).double().mean())
            c["prompt_perplexity"] = math.exp(nll)
        cases.append(c)
    singles = []
    for p in TINY_BATCH:
        ids = tok(p)["input_ids"]
        new, _ = greedy(model, ids, NEW_TOKENS_TINY, pad_id)
        singles.append({"_lp": last_logprobs(model, ids)[-1], "greedy_ids": new})
    batch = batch_reference(model, tok, TINY_BATCH, NEW_TOKENS_TINY, pad_id, singles)
    ref = {
        "model": name,
        "versions": versions(),
        "seed": SEED,
        "compute_dtype": "float32",
        "weights": dtype_note,
        "vocab_size_model": model.config.vocab_size,
        "vocab_size_tokenizer": len(tok),
        "greedy_convention": (
            f"generate(do_sample=False, max_new_tokens={NEW_TOKENS_TINY}, eos_token_id=None): pure argmax over all "
            "logits, EOS never stops generation; exactly max_new_tokens tokens. Verified equal to a manual "
            "full-recompute argmax loop."
        ),
        "prompt_ids_convention": "tokenizer(prompt)['input_ids'] with default add_special_tokens=True",
        "decode_convention": "tokenizer.decode(ids) (skip_special_tokens=False)",
        "prompt_token_logprobs_convention": "entry t = log_softmax(logits[t])[ids[t+1]], t = 0..len-2",
        "cases": cases,
        "batch": batch,
    }
    if tok.chat_template:
        chats = []
        for msgs in CHAT_CASES:
            rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            chat_ids = tok(rendered, add_special_tokens=False)["input_ids"]
            chats.append({"messages": msgs, "rendered": rendered, "ids_no_special_added": chat_ids})
        ref["chat"] = chats
    return ref


def note_dtype(dt):
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dt]


def fix_config(path, kind, dtype_name):
    """Rewrite config.json in the classic (transformers 4.x / hub) layout: top-level rope_theta and
    rope_scaling instead of v5's rope_parameters; torch_dtype next to dtype."""
    cfg = json.loads(path.read_text())
    rp = cfg.pop("rope_parameters", None)
    if rp is not None:
        rp = dict(rp)
        cfg["rope_theta"] = rp.pop("rope_theta")
        if rp.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = rp
        else:
            cfg["rope_scaling"] = None
    cfg["torch_dtype"] = dtype_name
    cfg["dtype"] = dtype_name
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


TOKENIZER_KIND = {"gptneo": "gpt2", "gptj": "gpt2"}  # model kind -> tiny tokenizer kind


def build_tiny(kind, dirname, tok_vocab, model_vocab, seed, std, emb_std, variant=None, outs=None):
    """outs: optional list of (dirname, dtype, weights) with weights "safetensors" (model.safetensors) or
    "bin" (pytorch_model.bin only: torch.save of the state dict); default: dirname as float32 safetensors
    plus the optional (dirname, dtype) variant as safetensors."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok_kind = TOKENIZER_KIND.get(kind, kind)
    raw = train_tokenizer(tok_kind, tok_vocab)
    tok = wrap_tokenizer(tok_kind, raw)
    if model_vocab is None:
        model_vocab = len(tok)
    assert model_vocab >= len(tok)
    model = make_model(kind, model_vocab, tok)
    init_weights(model, seed, std, emb_std)
    if kind == "gptneo":
        # GPT-Neo does not scale the scores by 1/sqrt(head_dim): shrink q and k so the softmax is about as sharp
        # as in a scaled model (and the f32 reference not needlessly sensitive to rounding)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(GPTNEO_QK_SCALE)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = pad_id

    if outs is None:
        outs = [(dirname, torch.float32, "safetensors")]
        if variant is not None:
            outs.append((variant[0], variant[1], "safetensors"))
    for d, dt, fmt in outs:
        assert fmt in ("safetensors", "bin"), fmt
        out = FIX / d
        fresh_dir(out)
        m = model.to(dt)
        m.config.dtype = dt
        m.save_pretrained(out, safe_serialization=True)
        os.chmod(out / "model.safetensors", 0o644)
        save_tokenizer(tok, out)
        fix_config(out / "config.json", kind, note_dtype(dt))
        # reload exactly what was written and compute the reference from it in f32
        sd = load_file(str(out / "model.safetensors"))
        if fmt == "bin":
            torch.save(sd, out / "pytorch_model.bin")
            (out / "model.safetensors").unlink()
            os.chmod(out / "pytorch_model.bin", 0o644)
            sd = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
        assert all(v.dtype == dt for v in sd.values()), {k: v.dtype for k, v in sd.items()}
        m32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert m32.config.vocab_size == model_vocab
        if kind == "llama":
            rp = m32.config.rope_parameters
            assert rp["rope_type"] == "llama3" and rp["factor"] == 8.0, rp
        tok2 = AutoTokenizer.from_pretrained(out)
        for p in TINY_PROMPTS + TINY_BATCH:
            assert tok2(p)["input_ids"] == tok(p)["input_ids"], p
        assert tok2.chat_template == tok.chat_template
        with torch.no_grad():
            ref_sd = {k: v.float() for k, v in sd.items()}
            msd = m32.state_dict()
            for k, v in msd.items():
                if k in ref_sd:
                    assert torch.equal(v, ref_sd[k]), k
            if m32.config.tie_word_embeddings:
                assert torch.equal(m32.get_output_embeddings().weight, m32.get_input_embeddings().weight)
            else:
                # an untied model must have every parameter in the file
                missing = [k for k, _ in m32.named_parameters() if k not in ref_sd]
                assert not missing, missing
        if fmt == "safetensors":
            note = f"safetensors stored as {note_dtype(dt)}; reference computed in float32 after upcasting those stored values"
        else:
            note = (f"pytorch_model.bin only (torch.save of the state dict, no safetensors) stored as {note_dtype(dt)}; "
                    "reference computed in float32 after upcasting those stored values")
        ref = model_reference(m32, tok, d, note, pad_id)
        ref["tensor_names"] = sorted(sd.keys())
        if kind in ARCH_CHECKS:
            ARCH_CHECKS[kind](m32, tok, ref, {k: v.float() for k, v in sd.items()}, pad_id)
        write_json(out / "reference.json", ref)
        model = model.to(torch.float32)
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"[tiny] {d}: vocab tok={len(tok)} model={model_vocab}, {size / 1e3:.0f} kB")


# --------------------------------------------------------------------------
# GPT-Neo / GPT-J: independent re-implementations that pin down the
# architecture facts recorded in reference.json "architecture_notes"
# --------------------------------------------------------------------------


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _attend(q, k, v, allowed, scale):
    """q, k, v: [T, H, D]; allowed: [T, T] bool (query i, key j)."""
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hij,jhd->ihd", torch.softmax(s, dim=-1), v)


@torch.no_grad()
def gptneo_manual(sd, cfg, ids, window=None, scale=1.0):
    """GPT-Neo forward for one unpadded sequence: learned absolute positions, pre-LN blocks, q/k/v without
    bias, attention scores NOT scaled, local layers see keys j with i - window < j <= i."""
    window = cfg.window_size if window is None else window
    H, E = cfg.num_heads, cfg.hidden_size
    D = E // H
    T = len(ids)
    pfx = "transformer."
    x = sd[pfx + "wte.weight"][ids] + sd[pfx + "wpe.weight"][torch.arange(T)]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    for layer, kind in enumerate(cfg.attention_layers):
        p = f"{pfx}h.{layer}."
        h = _ln(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = (h @ sd[f"{p}attn.attention.{n}_proj.weight"].T for n in "qkv")
        allowed = j <= i
        if kind == "local":
            allowed = allowed & (i - j < window)
        o = _attend(q.view(T, H, D), k.view(T, H, D), v.view(T, H, D), allowed, scale).reshape(T, E)
        x = x + o @ sd[p + "attn.attention.out_proj.weight"].T + sd[p + "attn.attention.out_proj.bias"]
        h = _ln(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = _gelu_new(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    x = _ln(x, sd[pfx + "ln_f.weight"], sd[pfx + "ln_f.bias"])
    return x @ sd[pfx + "wte.weight"].T  # tied lm_head


def gptj_sin_cos(positions, rotary_dim):
    """GPT-J's table: inv_freq[i] = 1 / 10000^(2i / rotary_dim), i = 0 .. rotary_dim/2 - 1 (float32),
    angle[p, i] = float32(p) * inv_freq[i]."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    ang = positions.float()[:, None] * inv_freq[None, :]
    return torch.sin(ang), torch.cos(ang)


def gptj_rotate(x, sin, cos, rotary_dim, interleaved=True):
    """x: [T, H, D]. Interleaved (GPT-J): pairs (2i, 2i+1) of the first rotary_dim dims of each head:
    y[2i] = x[2i] cos_i - x[2i+1] sin_i ; y[2i+1] = x[2i+1] cos_i + x[2i] sin_i. Dims >= rotary_dim pass.
    interleaved=False gives the NeoX/llama rotate_half convention instead (used only to show it differs)."""
    r, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    s, c = sin[:, None, :], cos[:, None, :]
    if interleaved:
        a, b = r[..., 0::2], r[..., 1::2]
        y = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        half = rotary_dim // 2
        a, b = r[..., :half], r[..., half:]
        y = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    return torch.cat((y, rest), dim=-1)


@torch.no_grad()
def gptj_manual(sd, cfg, ids, interleaved=True):
    """GPT-J forward for one unpadded sequence: no position embeddings, partial interleaved rotary on q and k,
    scores scaled by 1/sqrt(head_dim), parallel residual x + attn(ln_1(x)) + mlp(ln_1(x)), no ln_2,
    q/k/v/out_proj without bias, fc_in/fc_out and lm_head with bias."""
    H, E, R = cfg.n_head, cfg.n_embd, cfg.rotary_dim
    D = E // H
    T = len(ids)
    pfx = "transformer."
    sin, cos = gptj_sin_cos(torch.arange(T), R)
    x = sd[pfx + "wte.weight"][ids]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    for layer in range(cfg.n_layer):
        p = f"{pfx}h.{layer}."
        h = _ln(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = (h @ sd[f"{p}attn.{n}_proj.weight"].T for n in "qkv")
        q = gptj_rotate(q.view(T, H, D), sin, cos, R, interleaved)
        k = gptj_rotate(k.view(T, H, D), sin, cos, R, interleaved)
        o = _attend(q, k, v.view(T, H, D), j <= i, D ** -0.5).reshape(T, E)
        attn = o @ sd[p + "attn.out_proj.weight"].T
        mlp = _gelu_new(h @ sd[p + "mlp.fc_in.weight"].T + sd[p + "mlp.fc_in.bias"])
        mlp = mlp @ sd[p + "mlp.fc_out.weight"].T + sd[p + "mlp.fc_out.bias"]
        x = x + attn + mlp
    x = _ln(x, sd[pfx + "ln_f.weight"], sd[pfx + "ln_f.bias"])
    return x @ sd["lm_head.weight"].T + sd["lm_head.bias"]


@torch.no_grad()
def cached_vs_uncached(model, ids, n, pad_id):
    """generate() (DynamicCache, one token per step after prefill) vs a loop that recomputes the whole
    sequence with use_cache=False each step. Returns (cached_ids, uncached_ids, max |logit diff| over the
    steps while both sequences still agree)."""
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=None,
                          pad_token_id=pad_id, bos_token_id=None)
    x = torch.tensor([ids])
    saved, model.generation_config = model.generation_config, gc
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), output_logits=True,
                         return_dict_in_generate=True, use_cache=True)
    model.generation_config = saved
    cached = out.sequences[0, len(ids):].tolist()
    cur, diff = list(ids), 0.0
    for step in range(n):
        logits = model(input_ids=torch.tensor([cur]), use_cache=False).logits[0, -1].float()
        if cur[len(ids):] == cached[:step]:
            diff = max(diff, float((logits - out.logits[step][0].float()).abs().max()))
        cur.append(int(torch.argmax(logits)))
    return cached, cur[len(ids):], diff


def _check_manual(model, sd, ref, manual, name, **kw):
    worst = 0.0
    for c in ref["cases"] + [{"prompt_ids": ids} for ids in ref["batch"]["prompt_ids"]]:
        with torch.no_grad():
            hf = model(input_ids=torch.tensor([c["prompt_ids"]])).logits[0].float()
        worst = max(worst, float((manual(sd, model.config, c["prompt_ids"], **kw) - hf).abs().max()))
    assert worst < 1e-4, (name, "manual re-implementation disagrees with transformers", worst)
    return worst


def check_gptneo(model, tok, ref, sd, pad_id):
    from transformers import DynamicCache

    cfg = model.config
    w = cfg.window_size
    assert cfg.attention_layers == ["global", "local"] and w == GPTNEO_WINDOW
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    assert max(len(c["prompt_ids"]) for c in ref["cases"]) > w, "need a prompt longer than the window"
    manual_diff = _check_manual(model, sd, ref, gptneo_manual, "gptneo")
    # the window must matter: an all-global (window >= T) model gives different logits for long prompts
    long_ids = max((c["prompt_ids"] for c in ref["cases"]), key=len)
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([long_ids])).logits[0].float()
    no_window = float((gptneo_manual(sd, cfg, long_ids, window=10 ** 6) - hf).abs().max())
    assert no_window > 1e-2, ("local window has no effect", no_window)
    # and so must the missing 1/sqrt(head_dim): scaling the scores gives a different model
    scaled = float((gptneo_manual(sd, cfg, long_ids, scale=(cfg.hidden_size // cfg.num_heads) ** -0.5) - hf)
                   .abs().max())
    assert scaled > 1e-2, ("score scaling has no effect", scaled)
    cache_layers = sorted({type(l).__name__ for l in DynamicCache(config=cfg).layers})
    steps = []
    for c in ref["cases"]:
        cached, uncached, diff = cached_vs_uncached(model, c["prompt_ids"], NEW_TOKENS_TINY, pad_id)
        assert len(c["prompt_ids"]) + NEW_TOKENS_TINY > w
        # model_reference's greedy() already asserted generate() == manual full recompute (with a fresh cache per
        # step); this repeats it with use_cache=False and compares the logits too.
        assert cached == uncached == c["greedy_ids"], ("cached vs uncached greedy differ", c["prompt"], cached,
                                                        uncached)
        # f32 rounding only (the unscaled scores make softmax a little sensitive: ~1e-5, rarely 1e-4);
        # a wrong window would show up as O(1) differences
        assert diff < 1e-3, ("cached vs uncached logits differ", c["prompt"], diff)
        steps.append(diff)
    ref["architecture_notes"] = (
        "transformers GPTNeoForCausalLM (modeling_gpt_neo.py, GPTNeoSelfAttention._attn, eager). "
        "Embeddings: h = wte[id] + wpe[position] (learned absolute positions, max_position_embeddings 128). "
        "Blocks are pre-LN GPT-2 style: x = x + out_proj(attn(ln_1(x))); x = x + c_proj(gelu_new(c_fc(ln_2(x)))); "
        "final ln_f; lm_head tied to wte, no bias. Linears: q_proj/k_proj/v_proj have NO bias, out_proj, "
        "mlp.c_fc, mlp.c_proj have bias; all are nn.Linear (weight [out, in], y = x W^T + b), not GPT-2 Conv1D. "
        "Attention scores are NOT scaled: attn_weights = matmul(query, key^T) with q, k upcast to float32 and no "
        "1/sqrt(head_dim) factor (the flash path passes softmax_scale=1.0). Masked scores are set to "
        "finfo(float32).min before softmax. Layer types come from attention_types [[['global','local'], 1]] -> "
        "layer 0 'global' (plain causal), layer 1 'local'. Local mask: bias = tril(ones(P,P)) XOR "
        "tril(tril(ones(P,P)), -window_size), i.e. query at absolute position i may attend key j iff "
        f"i - window_size < j <= i (at most window_size = {w} keys, the current token included). It is "
        "sliced as bias[key_len - query_len : key_len, :key_len], so positions are absolute sequence indices, "
        "also during cached decoding (the DynamicCache keeps ALL past keys, cache layers: "
        f"{', '.join(cache_layers)}; the window is applied by the mask, not by dropping keys). LayerNorm eps 1e-5. "
        f"Checked here: an independent re-implementation with exactly these rules matches the transformers "
        f"logits (max |diff| {manual_diff:.2e}); removing the window changes the logits of the longest prompt by "
        f"{no_window:.3f} and scaling the scores by 1/sqrt(head_dim) changes them by {scaled:.3f}; cached generate() equals a use_cache=False full-recompute greedy for every case "
        f"(prompt + {NEW_TOKENS_TINY} tokens > window), max |logit diff| {max(steps):.2e}."
    )
    ref["cache_check"] = {
        "window_size": w,
        "cached_equals_uncached": True,
        "max_abs_logit_diff_per_case": steps,
        "note": "generate() with DynamicCache vs full recompute with use_cache=False at every step; greedy_ids "
        "are identical, so greedy_ids are both the cached and the mathematically exact continuation.",
    }
    print(f"[gptneo] manual diff {manual_diff:.2e}, no-window diff {no_window:.3f}, cache diff {max(steps):.2e}")


def check_gptj(model, tok, ref, sd, pad_id):
    cfg = model.config
    R, D = cfg.rotary_dim, cfg.n_embd // cfg.n_head
    assert R == 8 and D == 16
    manual_diff = _check_manual(model, sd, ref, gptj_manual, "gptj")
    long_ids = max((c["prompt_ids"] for c in ref["cases"]), key=len)
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([long_ids])).logits[0].float()
    neox = float((gptj_manual(sd, cfg, long_ids, interleaved=False) - hf).abs().max())
    assert neox > 1e-2, ("rotate_half convention indistinguishable", neox)
    lm_bias = sd["lm_head.bias"]
    assert float(lm_bias.abs().min()) > 0 and float(lm_bias.std()) > 0.05
    for k, v in sd.items():
        if ".ln_" in k:
            target = 0.0 if k.endswith("bias") else 1.0
            assert float((v - target).abs().max()) > 0.05, k
    steps = []
    for c in ref["cases"]:
        cached, uncached, diff = cached_vs_uncached(model, c["prompt_ids"], NEW_TOKENS_TINY, pad_id)
        assert cached == uncached == c["greedy_ids"], ("cached vs uncached greedy differ", c["prompt"])
        assert diff < 1e-3, diff
        steps.append(diff)
    ref["architecture_notes"] = (
        "transformers GPTJForCausalLM (modeling_gptj.py). No position embeddings: h = wte[id]. Each block has ONE "
        "LayerNorm (ln_1, no ln_2) and a parallel residual: h = ln_1(x); x = x + out_proj(attn(h)) + "
        "fc_out(gelu_new(fc_in(h))). Final ln_f, then untied lm_head WITH bias: logits = ln_f(x) W^T + b. "
        "Biases: q_proj, k_proj, v_proj, out_proj have NO bias; mlp.fc_in, mlp.fc_out and lm_head have bias. "
        "All nn.Linear (weight [out, in]). LayerNorm eps 1e-5. head_dim = n_embd / n_head = 16; rotary only on "
        f"the first rotary_dim = {R} dims of each head of q and k (v untouched), dims {R}..15 pass through. "
        "Rotary table (create_sinusoidal_positions(n_positions, rotary_dim)), float32: inv_freq[i] = 1.0 / "
        "(10000 ** (arange(0, rotary_dim, 2) / rotary_dim)), i = 0..rotary_dim/2-1; angle[p][i] = float(p) * "
        "inv_freq[i]; table[p] = cat(sin(angle[p]), cos(angle[p])); sin, cos = split in halves. Interleaved "
        "pairs (rotate_every_two, NOT the NeoX/llama rotate_half): sin and cos are repeat_interleave'd x2, "
        "rotate_every_two(x)[2i] = -x[2i+1], [2i+1] = x[2i], so y[2i] = x[2i] cos_i - x[2i+1] sin_i and "
        "y[2i+1] = x[2i+1] cos_i + x[2i] sin_i for i < rotary_dim/2. Position p = index in the sequence "
        "(cache length + offset while decoding; cumsum(mask)-1 for the left-padded batch). Scores = "
        "q k^T * head_dim**-0.5 (scaling applied to the product), causal mask, softmax. The eager path computes "
        "q k^T and softmax in float32 (query/key upcast, probabilities cast back to the value dtype); the sdpa "
        f"path (transformers' default, used for this reference: {model.config._attn_implementation}) computes in "
        "the input dtype; this reference is computed entirely in float32 so both agree. The sin/cos table is a "
        "non-persistent float32 buffer (not in the weights file) cast to the activation dtype in forward "
        "(embed_positions[position_ids].to(x.dtype)). "
        f"Checked here: an independent re-implementation with exactly these rules matches the transformers "
        f"logits (max |diff| {manual_diff:.2e}); the rotate_half convention instead changes the logits of the "
        f"longest prompt by {neox:.3f}; cached generate() equals use_cache=False full recompute "
        f"(max |logit diff| {max(steps):.2e})."
    )
    print(f"[gptj] manual diff {manual_diff:.2e}, rotate_half diff {neox:.3f}, cache diff {max(steps):.2e}")


ARCH_CHECKS = {"gptneo": check_gptneo, "gptj": check_gptj}


# --------------------------------------------------------------------------
# SmolLM2 (GGUF)
# --------------------------------------------------------------------------

SMOLLM_TOKENIZE = [
    "Hello world",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "\tif x:\n\t\treturn y\n",
    "a    b     c",
    "line1\n\nline2\n\n\n\nline3",
    "   \n  \n\t\n",
    "caf\u00e9 na\u00efve Z\u00fcrich",
    "\u00c5ngstr\u00f6m r\u00e9sum\u00e9 fa\u00e7ade",
    "cafe\u0301 (decomposed accent)",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u4e2d\u6587\u6d4b\u8bd5\uff0c\u4f60\u597d\u3002",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
    "emoji \U0001F600\U0001F44D\U0001F3FD",
    "family \U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466 flag \U0001F3F3\ufe0f\u200d\U0001F308",
    "1234567",
    "3.14159",
    "The year 2024 had 366 days.",
    "x   1 and y  22",
    "\n\n2",
    "don't I'm we'll they've she'd it's",
    "DON'T I'M",
    "<|im_start|>user\nHi<|im_end|>\n",
    "<|endoftext|>",
    "text<|im_end|>more",
    "<|im_start|",
    "",
    " ",
    "\n",
    "https://example.com/path?q=1&r=2#frag",
    "x=1;y=2;print(x+y)  # comment",
    "!!!???...---",
    "a\r\nb",
]

SMOLLM_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Say hello."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Write a haiku about Rust."},
    ],
]


def smollm_digits_variant(tok):
    """The pre-tokenizer llama.cpp uses for pre='smollm' (and the original HF tokenizer.json):
    Digits(individual) then GPT-2 ByteLevel regex. transformers' GGUF loader instead uses plain
    ByteLevel (no Digits). Returns a tokenizers.Tokenizer with the smollm pre-tokenizer."""
    from tokenizers import Tokenizer, pre_tokenizers

    t = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return t


def build_smollm(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.exists():
        sys.exit(f"GGUF not found: {gguf_path} (pass --gguf PATH or --skip-smollm)")
    out = FIX / "smollm2"
    fresh_dir(out)
    gdir, gname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    vers = versions()
    src = {"gguf_file": gname, "gguf_bytes": gguf_path.stat().st_size}
    bt = tok.backend_tokenizer

    # ---- tokenize.json
    alt = smollm_digits_variant(tok)
    entries = []
    n_diff = 0
    for s in SMOLLM_TOKENIZE:
        ids = tok(s)["input_ids"]
        e = {"text": s, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids), "decoded": tok.decode(ids)}
        alt_ids = alt.encode(s, add_special_tokens=True).ids
        if alt_ids != ids:
            e["ids_smollm_digits_pretokenizer"] = alt_ids
            n_diff += 1
        entries.append(e)
    write_json(
        out / "tokenize.json",
        {
            "source": src,
            "versions": vers,
            "convention": "ids = AutoTokenizer.from_pretrained(dir, gguf_file=...)(text)['input_ids'] "
            "(default add_special_tokens; this tokenizer adds no BOS/EOS). decoded = tokenizer.decode(ids).",
            "tokenizer": {
                "pre_tokenizer": json.loads(bt.to_str())["pre_tokenizer"],
                "post_processor": json.loads(bt.to_str())["post_processor"],
                "decoder": json.loads(bt.to_str())["decoder"],
                "normalizer": json.loads(bt.to_str())["normalizer"],
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "pad_token": tok.pad_token,
                "unk_token": tok.unk_token,
                "special_tokens": {str(k): v.content for k, v in tok.added_tokens_decoder.items()},
                "vocab_size": len(tok),
            },
            "note_digits": "transformers builds plain GPT-2 ByteLevel pre-tokenization for pre='smollm'; llama.cpp "
            "(and the original HF tokenizer.json) split digits individually first (Digits(individual_digits=True) "
            "then ByteLevel regex). Where that changes the ids, the entry has ids_smollm_digits_pretokenizer. "
            f"{n_diff} of {len(entries)} entries differ.",
            "cases": entries,
        },
    )
    print(f"[smollm2] tokenize.json: {len(entries)} cases, {n_diff} differ under digits pre-tokenizer")

    # ---- chat_template.json
    chats = []
    for msgs in SMOLLM_CHATS:
        rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        chats.append(
            {
                "messages": msgs,
                "add_generation_prompt": True,
                "rendered": rendered,
                "ids": tok(rendered)["input_ids"],
            }
        )
    rendered_no_gen = tok.apply_chat_template(SMOLLM_CHATS[2], tokenize=False, add_generation_prompt=False)
    chats.append({"messages": SMOLLM_CHATS[2], "add_generation_prompt": False, "rendered": rendered_no_gen,
                  "ids": tok(rendered_no_gen)["input_ids"]})
    write_json(
        out / "chat_template.json",
        {
            "source": src,
            "versions": vers,
            "template": tok.chat_template,
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "convention": "rendered = apply_chat_template(messages, tokenize=False, add_generation_prompt=...); "
            "ids = tokenizer(rendered)['input_ids'] (special tokens in the text are matched whole).",
            "cases": chats,
        },
    )

    # ---- model
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    model.eval()
    cfg = model.config
    model_info = {
        "architecture": type(model).__name__,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta"),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "weights": "GGUF dequantized to float32 by transformers; compute float32",
    }

    # ---- perplexity
    text = PPL_TEXT
    (out / "ppl.txt").write_text(text, encoding="utf-8")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ppl_res = []
    with torch.no_grad():
        for n in (128, 512):
            nll_sum, scored, windows = 0.0, 0, 0
            for start in range(0, len(ids), n):
                w = ids[start : start + n]
                if len(w) < 2:
                    continue
                logits = model(input_ids=torch.tensor([w])).logits[0].float()
                lp = torch.log_softmax(logits[:-1], dim=-1)
                tgt = torch.tensor(w[1:])
                nll_sum += float(-lp.gather(1, tgt[:, None]).double().sum())
                scored += len(w) - 1
                windows += 1
            ppl = math.exp(nll_sum / scored)
            ppl_res.append({"ctx": n, "perplexity": ppl, "tokens": len(ids), "scored": scored, "windows": windows,
                            "nll_sum": nll_sum})
            print(f"[smollm2] ppl ctx={n}: {ppl:.4f} ({scored} scored)")
    write_json(
        out / "perplexity.json",
        {
            "source": src,
            "versions": vers,
            "model": model_info,
            "text_file": "ppl.txt",
            "text_sha256": __import__("hashlib").sha256(text.encode("utf-8")).hexdigest(),
            "definition": "ids = tokenizer(text, add_special_tokens=False); non-overlapping windows of ctx tokens "
            "(last may be shorter; windows with < 2 tokens skipped); each window run independently from an empty "
            "cache; token 0 of a window is context only; NLL = -log p(w[i] | w[:i]) for i >= 1; "
            "perplexity = exp(sum NLL / scored).",
            "results": ppl_res,
        },
    )

    # ---- logits.json
    prompts = [
        ("raw", "The capital of France is"),
        ("chat", tok.apply_chat_template(SMOLLM_CHATS[0], tokenize=False, add_generation_prompt=True)),
    ]
    eos_id = tok.eos_token_id
    cases = []
    with torch.no_grad():
        for kind, p in prompts:
            pids = tok(p)["input_ids"]
            logits = model(input_ids=torch.tensor([pids])).logits[0, -1].float()
            lp = torch.log_softmax(logits, dim=-1)
            top = torch.topk(lp, 20)
            gc = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS_SMOLLM, eos_token_id=None,
                                  pad_token_id=tok.pad_token_id, bos_token_id=None)
            x = torch.tensor([pids])
            saved, model.generation_config = model.generation_config, gc
            o = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                               output_scores=True, return_dict_in_generate=True)
            model.generation_config = saved
            cur = list(pids)  # cross-check: manual argmax loop with full recompute
            for _ in range(NEW_TOKENS_SMOLLM):
                cur.append(int(torch.argmax(model(input_ids=torch.tensor([cur])).logits[0, -1])))
            new = o.sequences[0, len(pids):].tolist()
            assert len(new) == NEW_TOKENS_SMOLLM
            assert cur[len(pids):] == new, ("generate() vs manual greedy mismatch", cur[len(pids):], new)
            margins = [float(torch.topk(s[0].float(), 2).values.diff().neg()) for s in o.scores]
            stop = new[: new.index(eos_id) + 1] if eos_id in new else new
            cases.append(
                {
                    "kind": kind,
                    "prompt": p,
                    "prompt_ids": pids,
                    "top20": [[int(i), _F32(float(v))] for v, i in zip(top.values.tolist(), top.indices.tolist())],
                    "top20_tokens": tok.convert_ids_to_tokens(top.indices.tolist()),
                    "greedy_ids": new,
                    "greedy_text": tok.decode(new),
                    "greedy_ids_stop_at_eos": stop,
                    "greedy_text_stop_at_eos": tok.decode(stop, skip_special_tokens=True),
                    "greedy_top2_logit_margins": [round(m, 4) for m in margins],
                }
            )
            print(f"[smollm2] {kind}: {tok.decode(new)!r}")
    write_json(
        out / "logits.json",
        {
            "source": src,
            "versions": vers,
            "model": model_info,
            "eos_token_id": eos_id,
            "convention": f"prompt_ids = tokenizer(prompt)['input_ids'] (no BOS added). top20 = [token_id, logprob] "
            f"of log_softmax(last-position logits), descending. greedy_ids: generate(do_sample=False, "
            f"max_new_tokens={NEW_TOKENS_SMOLLM}, eos_token_id=None) = pure argmax, EOS does not stop; "
            "greedy_ids_stop_at_eos = prefix up to and including the first eos_token_id.",
            "cases": cases,
        },
    )


# --------------------------------------------------------------------------
# llama-style SentencePiece tokenizer rebuilt from GGUF metadata
# --------------------------------------------------------------------------

# Training text for the tiny SentencePiece BPE: English prose written for this
# fixture plus accents and a little CJK (so some CJK pieces exist; the test
# strings use other CJK characters that must fall back to <0xXX> bytes).
SPM_TRAIN_TEXT = """The little train left the station just after seven in the morning. It carried farmers, teachers,
two sleepy students and a dog that belonged to nobody in particular. The conductor walked slowly
along the carriages, punching tickets and talking about the weather, which was grey and cold again.

By nine the train had reached the river. The water was high after the rain, and the old bridge
shook a little as the carriages rolled across it. Nobody seemed worried; they had crossed it a
thousand times before, and the bridge had always held.

In the afternoon the sun came out at last. The students woke up, the farmers opened their baskets
of bread and cheese, and the dog was given more than its share. Somebody started to sing, and
soon the whole carriage was singing the same old song about home.

Numbers matter too: 12 apples, 345 pears, 2024 tickets, 7 stations and 3.14159 kilometres of track.
Caf\u00e9, na\u00efve, r\u00e9sum\u00e9, fa\u00e7ade, \u00e9l\u00e8ve, \u00fcber, se\u00f1or, Z\u00fcrich, \u00c5ngstr\u00f6m.
\u6771\u4eac\u3068\u5927\u962a\u306f\u65e5\u672c\u306e\u90fd\u5e02\u3067\u3059\u3002\u6771\u4eac\u306f\u5927\u304d\u3044\u3002
"""

SPM_TOKENIZE = [
    "Hello world",
    "The little train left the station.",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "a    b     c",
    "line1\nline2\n\nline3",
    "\n",
    " ",
    "\tTabs\tand spaces",
    "caf\u00e9 na\u00efve Z\u00fcrich",
    "cafe\u0301 (decomposed accent)",
    "\u6771\u4eac\u306f\u5927\u304d\u3044",
    "\u4e2d\u6587\u6d4b\u8bd5\uff0c\u4f60\u597d\u3002",
    "emoji \U0001F600\U0001F44D",
    "12345 and 3.14159",
    "The year 2024 had 366 days.",
    "<s> literal bos in text",
    "text</s>more",
    "don't stop",
    "",
]


def spm_train():
    """Train a tiny llama-style SentencePiece BPE model; returns the serialized ModelProto."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    lines = [l for l in SPM_TRAIN_TEXT.split("\n") if l.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=384,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        # the llama tokenizer.model settings
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        split_by_unicode_script=True,
        split_by_number=True,
        max_sentencepiece_length=16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buf.getvalue()


def spm_gguf_vocab(proto):
    """tokens / scores / token types exactly as llama.cpp's convert_hf_to_gguf
    (_create_vocab_sentencepiece) writes them for a SentencePiece model."""
    import sentencepiece as spm
    from gguf import TokenType

    sp = spm.SentencePieceProcessor(model_proto=proto)
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            t = TokenType.UNKNOWN
        elif sp.is_control(i):
            t = TokenType.CONTROL
        elif sp.is_unused(i):
            t = TokenType.UNUSED
        elif sp.is_byte(i):
            t = TokenType.BYTE
        else:
            t = TokenType.NORMAL
        types.append(int(t))
    return sp, tokens, scores, types


def build_spm_gguf():
    import gguf
    from transformers import AutoTokenizer

    out = FIX / "spm-gguf"
    fresh_dir(out)
    proto = spm_train()
    sp, tokens, scores, types = spm_gguf_vocab(proto)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]

    path = out / "tokenizer.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    # deliberately no tokenizer.ggml.add_bos_token / add_eos_token
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    tok = AutoTokenizer.from_pretrained(str(out), gguf_file="tokenizer.gguf")
    bt_json = json.loads(tok.backend_tokenizer.to_str())
    cases = []
    for s in SPM_TOKENIZE:
        ids = tok(s)["input_ids"]
        cases.append(
            {
                "text": s,
                "ids": ids,
                "tokens": tok.convert_ids_to_tokens(ids),
                "decoded": tok.decode(ids, skip_special_tokens=True),
                "sentencepiece_ids": [1] + sp.encode(s),
            }
        )
    write_json(
        out / "tokenize.json",
        {
            "source": {"gguf_file": "tokenizer.gguf", "gguf_bytes": path.stat().st_size},
            "versions": versions() | {"sentencepiece": _dist_version("sentencepiece")},
            "convention": "ids = AutoTokenizer.from_pretrained(dir, gguf_file='tokenizer.gguf')(text)['input_ids'] "
            "(default add_special_tokens: BOS <s>=1 is prepended, no EOS). decoded = tokenizer.decode(ids, "
            "skip_special_tokens=True). sentencepiece_ids = [1] + the original SentencePiece model's encode(text), "
            "for comparison only (the GGUF holds only metadata; no tensors).",
            "tokenizer": {
                "normalizer": bt_json["normalizer"],
                "pre_tokenizer": bt_json["pre_tokenizer"],
                "post_processor": bt_json["post_processor"],
                "decoder": bt_json["decoder"],
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "unk_token": tok.unk_token,
                "vocab_size": len(tok),
            },
            "cases": cases,
        },
    )
    n_diff = sum(c["ids"] != c["sentencepiece_ids"] for c in cases)
    print(f"[spm-gguf] vocab={len(tokens)} gguf={path.stat().st_size} bytes, {len(cases)} cases, "
          f"{n_diff} differ from sentencepiece")
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=str(DEFAULT_GGUF), help="SmolLM2-135M-Instruct GGUF (default: %(default)s)")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-smollm", action="store_true")
    ap.add_argument("--only-spm", action="store_true", help="only build spm-gguf/ (tiny SentencePiece GGUF tokenizer)")
    ap.add_argument("--only", metavar="NAME[,NAME...]",
                    help="build only these fixture directories, e.g. tiny-gptneo,tiny-gptj (others untouched)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    tiny = {
        "tiny-llama": lambda: build_tiny("llama", "tiny-llama", 384, None, SEED, 0.25, 0.6,
                                         variant=("tiny-llama-f16", torch.float16)),
        "tiny-qwen2": lambda: build_tiny("qwen2", "tiny-qwen2", 448, 512, SEED + 1, 0.25, 0.6,
                                         variant=("tiny-qwen2-bf16", torch.bfloat16)),
        # tied wte: a big input embedding makes the model echo its last token, so keep it smaller
        "tiny-gpt2": lambda: build_tiny("gpt2", "tiny-gpt2", 320, None, SEED + 2, 0.5, 0.4),
        # same tokenizer as tiny-gpt2 (same kind, vocab and corpus -> identical tokenizer.json)
        "tiny-gptneo": lambda: build_tiny("gptneo", "tiny-gptneo", 320, None, SEED + 3, GPTNEO_STD, 0.4),
        "tiny-gptj": lambda: build_tiny("gptj", "tiny-gptj", 320, None, SEED + 4, 0.2, 0.5,
                                        outs=[("tiny-gptj", torch.float16, "bin")]),
    }
    others = {"smollm2": lambda: build_smollm(args.gguf), "spm-gguf": build_spm_gguf}
    aliases = {"tiny-llama-f16": "tiny-llama", "tiny-qwen2-bf16": "tiny-qwen2"}

    if args.only:
        names = []
        for n in (x.strip().rstrip("/") for x in args.only.split(",") if x.strip()):
            n = aliases.get(n, n)
            if n not in tiny and n not in others:
                ap.error(f"--only: unknown fixture {n!r}; known: {', '.join(list(tiny) + list(aliases) + list(others))}")
            if n not in names:
                names.append(n)
        for n in names:
            (tiny.get(n) or others[n])()
        return
    if args.only_spm:
        build_spm_gguf()
        return
    if not args.skip_tiny:
        for build in tiny.values():
            build()
    if not args.skip_smollm:
        build_smollm(args.gguf)
    build_spm_gguf()

    total = sum(p.stat().st_size for p in FIX.rglob("*") if p.is_file())
    print(f"fixtures total: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
