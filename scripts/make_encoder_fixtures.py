#!/usr/bin/env python3
"""Generate the reference fixtures for the BERT-family encoder tests of wordloom.

Run by hand from anywhere:

    /opt/wlpy/bin/python scripts/make_encoder_fixtures.py [--only NAME ...] [--skip-minilm]
                                                          [--minilm DIR] [--threads N]

Needs: torch, transformers (>= 5), tokenizers, sentencepiece, safetensors, numpy,
sentence-transformers (only for minilm/).

Outputs (all under tests/fixtures/, each directory regenerated from scratch,
byte-for-byte deterministic; every tiny-* directory holds an HF-layout checkpoint:
config.json (with both dtype and torch_dtype), the weights, tokenizer.json,
tokenizer_config.json, plus reference.json). All tiny models: hidden 32, 2 layers,
4 heads, intermediate 64, gelu, random weights N(0, 0.5), LayerNorm weight 1+N(0, 0.2)
and bias N(0, 0.2), other biases N(0, 0.1); classification heads scaled x3 and
re-centred on the training corpus so different inputs get different labels.

  tiny-bert-cls/       BertForSequenceClassification, 3 labels (negative, neutral,
                       positive), problem_type single_label_classification,
                       type_vocab_size 2, max_position_embeddings 128, f32
                       model.safetensors. Uncased WordPiece tokenizer (BertTokenizer:
                       BertNormalizer lowercase + strip accents + CJK chars isolated,
                       BertPreTokenizer, 448-token vocab learned here, [UNK] = 1,
                       model_max_length 128)
  tiny-bert-ner/       BertForTokenClassification, 9 labels O B-PER I-PER B-LOC I-LOC
                       B-ORG I-ORG B-MISC I-MISC, the same tokenizer, 128 positions, f32
  tiny-bert-qa/        BertForQuestionAnswering, the same vocab (model_max_length 512),
                       max_position_embeddings 512, f32; the QA reference includes a
                       context of ~825 tokens (three doc_stride=128 / max_seq_len=384
                       windows)
  tiny-bert-nli/       BertForSequenceClassification, id2label {0: entailment,
                       1: neutral, 2: contradiction} (+ label2id), 128 positions, f32,
                       for the zero-shot-classification pipeline
  tiny-distilbert-cls/ DistilBertForSequenceClassification, 2 labels (NEGATIVE,
                       POSITIVE), 128 positions, weights ONLY as pytorch_model.bin
                       (torch.save zip pickle of the f32 state dict, no safetensors),
                       DistilBertTokenizer (same WordPiece vocab, no token_type_ids)
  tiny-bert-base/      bare BertModel (architectures ["BertModel"], pooler weights
                       included), 512 positions, f32, no sentence-transformers files
                       (modules.json etc.), for the mean-pooling fallback; no pipelines
  tiny-roberta-cls/    RobertaForSequenceClassification, 4 labels (toxic, obscene,
                       threat, insult), problem_type multi_label_classification (the
                       pipeline applies sigmoid), byte-level BPE tokenizer
                       (RobertaTokenizer, 512 tokens, add_prefix_space false,
                       RobertaProcessing <s> ... </s> with trim_offsets), pad_token_id 1
                       (position ids start at padding_idx+1 = 2), max_position_embeddings
                       514, type_vocab_size 1; weights stored as float16 (reference
                       computed in f32 from the f16-rounded weights)
  tiny-xlmr-ner/       XLMRobertaForTokenClassification, the 9 NER labels, 514
                       positions, pad_token_id 1; tokenizer = a SentencePiece Unigram
                       model trained here (402 ids in the fairseq layout <s>=0 <pad>=1
                       </s>=2 <unk>=3, spm piece i -> i+1, <mask> last) as transformers
                       5's XLMRobertaTokenizer writes it: Precompiled normalizer from a
                       small custom rule set (full-width ASCII -> ASCII, U+3000 ->
                       space, fi/fl ligatures), WhitespaceSplit + Metaspace(always)
                       pre-tokenizer; weights stored as bfloat16 (reference computed in
                       f32 from the bf16-rounded weights); one extra input exercises
                       the normalizer
  minilm/              embeddings.json: sentence-transformers reference embeddings for
                       the real all-MiniLM-L6-v2 in .cache/models/ (14 texts incl.
                       accents, emoji, Chinese, Japanese, Arabic, whitespace padding and
                       one text truncated at max_seq_length 256): input ids after
                       truncation, normalized embeddings (the model's Normalize
                       module), unnormalized pooled embeddings, pairwise cosine of the
                       first 4 texts. No weights are written.

Every tiny-* reference.json holds, for the same list of INPUTS (one text per entry,
encoded one at a time with tokenizer(text), i.e. with special tokens): input_ids,
offsets, tokens, the full last hidden state of input 0, the attention-masked mean of
the last hidden state per input, the head logits per input, the head outputs of all
inputs as ONE right-padded batch, and the task pipeline outputs (transformers
pipelines on cpu, given the f32-loaded model object). The question-answering
pipeline was removed in transformers 5, so the QA reference comes from
qa_pipeline_v4 below, a line-by-line port of transformers 4.57.6's
QuestionAnsweringPipeline (its outputs were compared by hand with the real 4.57.6
pipeline when this script was written: identical).
See the `schema` key of each reference.json. After writing, every tiny-* directory
is reloaded from disk (transformers model + the raw tokenizer.json through the
tokenizers library) and its ids, offsets, mean_pooled and logits are reproduced.

Floats that are float32 values are written in their shortest float32 round-trip
decimal form (parse as f32 to get back the exact value torch produced); float64
results (QA scores summed over several candidate spans) are written with Python's
repr. Offsets, entity start/end and QA start/end are Python str indices (Unicode
code points), not UTF-8 byte offsets.
"""

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_fixtures import (  # noqa: E402
    FIX,
    PPL_TEXT,
    REPO,
    TRAIN_TEXT,
    _F32,
    _dist_version,
    f32list,
    fresh_dir,
    versions,
    write_json,
)

SEED = 20240611
DEFAULT_MINILM = REPO / ".cache" / "models" / "all-MiniLM-L6-v2"

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
CLS_LABELS = ["negative", "neutral", "positive"]
NLI_LABELS = ["entailment", "neutral", "contradiction"]
ROBERTA_LABELS = ["toxic", "obscene", "threat", "insult"]
DISTIL_LABELS = ["NEGATIVE", "POSITIVE"]
AGGREGATIONS = ["none", "simple", "first", "average", "max"]

# --------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------

# The inputs every tiny-* reference.json covers (all well under 100 tokens).
INPUTS = [
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9: the \u00e9l\u00e8ve visited Z\u00fcrich.",
    "I love pizza \U0001F355\U0001F525 and sunshine \u2600\ufe0f, thumbs up \U0001F44D\U0001F3FD!",
    "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059",
    "John Smith lives in New York and works for Acme Corp.",
    "Mr. Bennet didn't reply; Elizabeth laughed   at 3.14159 o'clock -- unbelievable!",
]
# Extra input only for tiny-xlmr-ner: exercises the Precompiled normalizer
# (full-width letters, ideographic space, ligature).
XLMR_EXTRA_INPUTS = ["\uff34\uff4f\uff4b\uff59\uff4f\u3000\ufb01nance office in Paris"]

# Extra training text (public domain / written here): names, places, questions,
# a little CJK so some of INPUTS[3] is in the vocabularies.
EXTRA_TRAIN = """John Smith and Mary Johnson live in New York. They work for Acme Corporation in London and Paris.
Elizabeth Bennet visited Netherfield Park with Jane. Mr. Darcy lives in Derbyshire, England.
What is the capital of France? Paris is the capital of France. Who wrote the book? Where does he live?
When did the war begin? How many years ago was the nation created? Which company does John work for?
The river runs past the bank of the town. The lazy dog sleeps near the river. The quick brown fox jumps.
Sports, politics, technology and cooking are popular topics. The team won the football match.
The government passed a new law. The computer software was updated. She cooked pasta with tomato sauce.
\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059\u3002\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3002
\u4e2d\u6587\u6d4b\u8bd5\uff0c\u4f60\u597d\u3002\u5317\u4eac\u662f\u4e2d\u56fd\u7684\u9996\u90fd\u3002
I love pizza \U0001F355 and good food. Thumbs up!
"""


def corpus_lines():
    text = TRAIN_TEXT + "\n" + PPL_TEXT + "\n" + EXTRA_TRAIN
    return [line for line in text.split("\n") if line.strip()]


# QA: (question, context) pairs. QA_LONG_CONTEXT is > 384 tokens for every tokenizer here.
QA_SHORT_CONTEXT = (
    "John Smith lives in New York and works for Acme Corporation. He moved there in 2019 "
    "after ten years in London, where he studied history at the university."
)
QA_CONTEXT_2 = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity."
)
QA_LONG_CONTEXT = "\n\n".join(PPL_TEXT.split("\n\n")[:22])
QA_CASES = [
    {"question": "Where does John Smith live?", "context": QA_SHORT_CONTEXT, "kwargs": {}},
    {"question": "Which company does he work for?", "context": QA_SHORT_CONTEXT, "kwargs": {}},
    {"question": "What was it the age of?", "context": QA_CONTEXT_2, "kwargs": {}},
    {"question": "Caf\u00e9 na\u00efve?", "context": "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 in Z\u00fcrich, \u6771\u4eac.", "kwargs": {}},
    {"question": "When did he move to New York?", "context": QA_SHORT_CONTEXT, "kwargs": {"top_k": 3}},
    {"question": "Who has taken Netherfield Park?", "context": QA_LONG_CONTEXT, "kwargs": {}},
]

ZS_TEXTS = [
    "The team won the football match last night.",
    "The government passed a new law about taxes.",
    "She cooked pasta with tomato sauce and basil.",
]
ZS_LABELS = ["sports", "politics", "technology", "cooking"]
ZS_CALLS = [
    {"multi_label": False, "hypothesis_template": None},
    {"multi_label": True, "hypothesis_template": None},
    {"multi_label": False, "hypothesis_template": "This text is about {}."},
]
ZS_DEFAULT_TEMPLATE = "This example is {}."

# Texts for minilm/embeddings.json. The last one is longer than 256 tokens.
MINILM_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the stage.",
    "A person performs music with a string instrument.",
    "The stock market fell sharply on Monday.",
    "Cr\u00e8me br\u00fbl\u00e9e \u00e0 la fran\u00e7aise, na\u00efve caf\u00e9",
    "I love pizza \U0001F355\U0001F525!",
    "\u6211\u559c\u6b22\u5728\u5317\u4eac\u5403\u996d\u3002",
    "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059",
    "\u0627\u0644\u0644\u063a\u0629 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u062c\u0645\u064a\u0644\u0629 \u062c\u062f\u0627",
    "MiXeD CaSe TeXt WITH SHOUTING and whispering",
    "Wait... what?!? (Really) -- yes: [no]; {maybe} <ok> \"quoted\" 'single' #hash @at $100 50% a&b*c",
    "In 2024, 3.14159 * 42 = 131.94678 and 1,000,000 > 999999.",
    "   leading and trailing spaces   ",
    PPL_TEXT.split("\n\n")[0] + " " + " ".join(PPL_TEXT.split("\n\n")[1:12]).replace("\n", " "),
]

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def py(x):
    """numpy / torch scalars -> plain Python; float32-exact floats become _F32 (shortest f32 form)."""
    if isinstance(x, dict):
        return {k: py(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [py(v) for v in x]
    if isinstance(x, np.ndarray):
        return py(x.tolist()) if x.dtype != np.float32 else f32list(x)
    if torch.is_tensor(x):
        return py(x.tolist()) if not x.is_floating_point() else f32list(x)
    if isinstance(x, (np.floating, float)):
        if isinstance(x, np.float32):
            return _F32(x)
        v = float(x)
        return _F32(v) if float(np.float32(v)) == v else v
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def all_versions():
    v = versions()
    for name in ("sentencepiece", "safetensors", "sentence-transformers"):
        try:
            v[name] = _dist_version(name)
        except Exception:
            pass
    return v


def fix_config(path, dtype_name, extra=None):
    """Write torch_dtype next to v5's dtype (older loaders read torch_dtype)."""
    cfg = json.loads(path.read_text())
    cfg["torch_dtype"] = dtype_name
    cfg["dtype"] = dtype_name
    if extra:
        cfg.update(extra)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def tidy_tokenizer_config(out):
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    path = out / "chat_template.jinja"
    if path.exists():
        path.unlink()
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


# --------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------


def train_wordpiece(vocab_size, min_frequency=2):
    """Uncased BERT WordPiece vocab learned from corpus_lines(); returns {token: id}.

    Same procedure as tokenizers' WordPieceTrainer (BPE merges over words split into a first
    char + "##"-prefixed continuation chars, most frequent pair first), but with a deterministic
    tie-break (equal counts: lexicographically smallest pair), because the library trainer breaks
    ties by hash-map order and gives a different vocab on every run. Words come from the real
    BertNormalizer (lowercase, strip accents, CJK chars isolated) + BertPreTokenizer. Ids:
    [PAD] [UNK] [CLS] [SEP] [MASK] = 0..4, then the alphabet (sorted), then merges in order."""
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts = Counter()
    for line in corpus_lines():
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(line)))
    words = sorted(counts)
    splits = {w: [w[0]] + ["##" + c for c in w[1:]] for w in words}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += sorted({sym for w in words for sym in splits[w]})
    seen = set(vocab)
    while len(vocab) < vocab_size:
        pairs = Counter()
        for w in words:
            sp = splits[w]
            for a, b in zip(sp, sp[1:]):
                pairs[(a, b)] += counts[w]
        if not pairs:
            break
        (a, b), n = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if n < min_frequency:
            break
        merged = a + b[2:]
        for w in words:
            sp = splits[w]
            if len(sp) < 2:
                continue
            out, i = [], 0
            while i < len(sp):
                if i + 1 < len(sp) and sp[i] == a and sp[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(sp[i])
                    i += 1
            splits[w] = out
        if merged not in seen:
            seen.add(merged)
            vocab.append(merged)
    return {t: i for i, t in enumerate(vocab)}


def wordpiece_tokenizer(vocab, max_len, cls_name="BertTokenizer"):
    import transformers

    cls = getattr(transformers, cls_name)
    return cls(vocab=dict(vocab), do_lower_case=True, model_max_length=max_len)


def train_bytelevel_bpe(vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(corpus_lines(), trainer=trainer)
    tj = json.loads(raw.to_str())
    vocab = tj["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in tj["model"]["merges"]]
    assert [vocab[t] for t in ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]] == [0, 1, 2, 3, 4]
    return vocab, merges


def roberta_tokenizer(vocab, merges):
    from transformers import RobertaTokenizer

    return RobertaTokenizer(
        vocab=dict(vocab), merges=list(merges), add_prefix_space=False, trim_offsets=True, model_max_length=512
    )


# Precompiled normalizer rules for the tiny SentencePiece model: NFKC-style full-width
# ASCII -> ASCII, ideographic space -> space, fi / fl ligatures.
SPM_RULES = (
    [f"{c:X}\t{c - 0xFEE0:X}" for c in range(0xFF01, 0xFF5F)] + ["3000\t20", "FB01\t66 69", "FB02\t66 6C"]
)


def train_unigram_spm(vocab_size, workdir):
    """Tiny SentencePiece Unigram model (XLM-R style: <unk>=0 <s>=1 </s>=2, dummy prefix,
    remove extra whitespace, custom normalization rules). Returns the serialized ModelProto."""
    import sentencepiece as spm

    rules = workdir / "spm_rules.tsv"
    rules.write_text("\n".join(SPM_RULES) + "\n")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=1.0,
        normalization_rule_tsv=str(rules),
        add_dummy_prefix=True,
        remove_extra_whitespaces=True,
        split_digits=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        seed_sentencepiece_size=20000,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    rules.unlink()
    return buf.getvalue()


def xlmr_tokenizer(proto):
    """XLMRobertaTokenizer (transformers 5, tokenizers backend) from a SentencePiece proto, with the
    fairseq id layout: <s>=0 <pad>=1 </s>=2 <unk>=3, spm piece i (i >= 3) -> id i+1, <mask> last."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import XLMRobertaTokenizer

    m = pb.ModelProto()
    m.ParseFromString(proto)
    assert [p.piece for p in m.pieces[:3]] == ["<unk>", "<s>", "</s>"]
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p.piece, p.score) for p in m.pieces[3:]]
    vocab += [("<mask>", 0.0)]
    charsmap = m.normalizer_spec.precompiled_charsmap
    assert len(charsmap) > 0
    tok = XLMRobertaTokenizer(vocab=vocab, _spm_precompiled_charsmap=charsmap, model_max_length=512)
    return tok


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------


def init_weights(model, seed, std=0.5, emb_std=0.5):
    """Deterministic wide init so outputs are far from uniform and pipelines are not tied.

    2-D weights ~ N(0, std) (word/position/token-type embeddings N(0, emb_std));
    LayerNorm weight ~ 1 + N(0, 0.2), LayerNorm bias ~ N(0, 0.2); other biases ~ N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    ln_params = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):
            for pname, _ in mod.named_parameters(recurse=False):
                ln_params.add(f"{mname}.{pname}" if mname else pname)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ln_params:
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                else:
                    p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.2)
            elif p.ndim >= 2:
                s = emb_std if "embeddings" in name else std
                p.copy_(torch.randn(p.shape, generator=g) * s)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def bert_config(vocab_size, max_pos, labels=None, **kw):
    from transformers import BertConfig

    extra = {}
    if labels is not None:
        extra["id2label"] = {i: lab for i, lab in enumerate(labels)}
        extra["label2id"] = {lab: i for i, lab in enumerate(labels)}
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=max_pos,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        **extra,
        **kw,
    )


def roberta_like_config(cls_name, vocab_size, labels, **kw):
    import transformers

    cls = getattr(transformers, cls_name)
    return cls(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        id2label={i: lab for i, lab in enumerate(labels)},
        label2id={lab: i for i, lab in enumerate(labels)},
        **kw,
    )


def distilbert_config(vocab_size, max_pos, labels):
    from transformers import DistilBertConfig

    return DistilBertConfig(
        vocab_size=vocab_size,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=64,
        activation="gelu",
        max_position_embeddings=max_pos,
        sinusoidal_pos_embds=False,
        pad_token_id=0,
        id2label={i: lab for i, lab in enumerate(labels)},
        label2id={lab: i for i, lab in enumerate(labels)},
    )


# --------------------------------------------------------------------------
# reference computation
# --------------------------------------------------------------------------


def head_kind(model):
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "sequence"
    if name.endswith("ForTokenClassification"):
        return "token"
    if name.endswith("ForQuestionAnswering"):
        return "qa"
    return "none"


@torch.no_grad()
def run_model(model, enc):
    """enc: dict of 2-D LongTensors. Returns (last_hidden_state [B,T,H], outputs)."""
    names = ["input_ids", "attention_mask", "token_type_ids"]
    kw = {k: enc[k] for k in names if k in enc}
    out = model(**kw, output_hidden_states=True)
    if head_kind(model) == "none":
        h = out.last_hidden_state
        assert torch.equal(h, out.hidden_states[-1])
    else:
        h = out.hidden_states[-1]
    return h.float(), out


def masked_mean(h, mask):
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(dim=-2) / m.sum(dim=-2).clamp(min=1e-9)


def encode_one(tok, text):
    enc = tok(text, return_offsets_mapping=True)
    return {
        "input_ids": list(enc["input_ids"]),
        "offsets": [list(o) for o in enc["offset_mapping"]],
        "token_type_ids": list(enc["token_type_ids"]) if "token_type_ids" in enc else None,
        "tokens": tok.convert_ids_to_tokens(enc["input_ids"]),
    }


def check_raw_tokenizer(out, tok, texts):
    """The written tokenizer.json, loaded by the tokenizers library alone, must give the same
    ids and offsets as the transformers tokenizer (that is what a Rust loader reads)."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    for t in texts:
        e = raw.encode(t)
        ref = tok(t, return_offsets_mapping=True)
        assert e.ids == list(ref["input_ids"]), (out.name, t, e.ids, ref["input_ids"])
        assert [list(o) for o in e.offsets] == [list(o) for o in ref["offset_mapping"]], (out.name, t)


@torch.no_grad()
def encoder_reference(model, tok, inputs):
    kind = head_kind(model)
    per_input = []
    singles = []
    for i, text in enumerate(inputs):
        e = encode_one(tok, text)
        t = {"input_ids": torch.tensor([e["input_ids"]]), "attention_mask": torch.ones(1, len(e["input_ids"]), dtype=torch.long)}
        if e["token_type_ids"] is not None:
            t["token_type_ids"] = torch.tensor([e["token_type_ids"]])
        h, out = run_model(model, t)
        rec = {"text": text, **{k: v for k, v in e.items() if v is not None}}
        if e["token_type_ids"] is None:
            rec.pop("token_type_ids", None)
        rec["mean_pooled"] = f32list(masked_mean(h, t["attention_mask"])[0])
        if kind in ("sequence", "token"):
            lg = out.logits[0].float()
            rec["logits"] = f32list(lg) if kind == "sequence" else [f32list(r) for r in lg]
            singles.append(lg)
        elif kind == "qa":
            rec["start_logits"] = f32list(out.start_logits[0])
            rec["end_logits"] = f32list(out.end_logits[0])
            singles.append((out.start_logits[0].float(), out.end_logits[0].float()))
        else:
            singles.append(None)
        if i == 0:
            first = {"shape": list(h[0].shape), "data": f32list(h[0])}
        per_input.append(rec)

    # one right-padded batch
    enc = tok(list(inputs), padding=True, return_tensors="pt")
    assert tok.padding_side == "right"
    h, out = run_model(model, enc)
    mask = enc["attention_mask"]
    batch = {"padding": "right", "pad_token_id": tok.pad_token_id, "padded_length": int(mask.shape[1])}
    max_diff = 0.0
    bm = masked_mean(h, mask)
    batch["mean_pooled"] = [f32list(bm[i]) for i in range(len(inputs))]
    for i, rec in enumerate(per_input):
        n = len(rec["input_ids"])
        assert enc["input_ids"][i, :n].tolist() == rec["input_ids"]
        max_diff = max(max_diff, float((bm[i] - torch.tensor(rec["mean_pooled"], dtype=torch.float32)).abs().max()))
    if kind == "sequence":
        bl = out.logits.float()
        batch["logits"] = [f32list(bl[i]) for i in range(len(inputs))]
        for i, s in enumerate(singles):
            max_diff = max(max_diff, float((bl[i] - s).abs().max()))
    elif kind == "token":
        bl = out.logits.float()
        rows = []
        for i, s in enumerate(singles):
            n = s.shape[0]
            rows.append([f32list(r) for r in bl[i, :n]])
            max_diff = max(max_diff, float((bl[i, :n] - s).abs().max()))
        batch["logits"] = rows
    elif kind == "qa":
        batch["start_logits"], batch["end_logits"] = [], []
        for i, (s0, e0) in enumerate(singles):
            n = s0.shape[0]
            batch["start_logits"].append(f32list(out.start_logits[i, :n]))
            batch["end_logits"].append(f32list(out.end_logits[i, :n]))
            max_diff = max(max_diff, float((out.start_logits[i, :n] - s0).abs().max()))
            max_diff = max(max_diff, float((out.end_logits[i, :n] - e0).abs().max()))
    batch["max_abs_diff_vs_single"] = max_diff
    assert max_diff < 1e-4, max_diff
    margin = None
    if kind in ("sequence", "token"):
        rows = torch.cat([s.reshape(-1, s.shape[-1]) for s in singles])
        top2 = torch.topk(rows, 2, dim=-1).values
        margin = float((top2[:, 0] - top2[:, 1]).min())
        assert margin > 2e-4, margin
    return per_input, first, batch, margin


# ---- pipelines --------------------------------------------------------------


def make_pipe(task, model, tok, **kw):
    from transformers import pipeline

    return pipeline(task, model=model, tokenizer=tok, device="cpu", **kw)


def cls_pipeline_reference(model, tok, inputs):
    pipe = make_pipe("text-classification", model, tok)
    fn = "sigmoid" if (model.config.problem_type == "multi_label_classification" or model.config.num_labels == 1) else "softmax"
    return {
        "task": "text-classification",
        "function_to_apply": fn,
        "top_k_none": [py(pipe(t, top_k=None)) for t in inputs],
        "default": [py(pipe(t)) for t in inputs],
    }


def ner_pipeline_reference(model, tok, inputs):
    res = {"task": "token-classification", "ignore_labels": ["O"]}
    for s in AGGREGATIONS:
        pipe = make_pipe("token-classification", model, tok, aggregation_strategy=s)
        res[s] = [py(pipe(t)) for t in inputs]
    return res


def zero_shot_reference(model, tok):
    pipe = make_pipe("zero-shot-classification", model, tok)
    calls = []
    for spec in ZS_CALLS:
        for text in ZS_TEXTS:
            kw = {"candidate_labels": ZS_LABELS, "multi_label": spec["multi_label"]}
            template = spec["hypothesis_template"]
            if template is not None:
                kw["hypothesis_template"] = template
            out = pipe(text, **kw)
            assert out["sequence"] == text
            calls.append(
                {
                    "sequence": text,
                    "candidate_labels": ZS_LABELS,
                    "multi_label": spec["multi_label"],
                    "hypothesis_template": template or ZS_DEFAULT_TEMPLATE,
                    "hypothesis_template_passed": template is not None,
                    "labels": out["labels"],
                    "scores": py(out["scores"]),
                }
            )
    # the raw NLI logits behind those calls (one (premise, hypothesis) pair per forward)
    pairs = []
    with torch.no_grad():
        for template in (ZS_DEFAULT_TEMPLATE, ZS_CALLS[2]["hypothesis_template"]):
            for text in ZS_TEXTS:
                for lab in ZS_LABELS:
                    hyp = template.format(lab)
                    enc = tok(text, hyp, truncation="only_first", return_tensors="pt")
                    _, out = run_model(model, enc)
                    pairs.append(
                        {
                            "premise": text,
                            "hypothesis": hyp,
                            "input_ids": enc["input_ids"][0].tolist(),
                            "token_type_ids": enc["token_type_ids"][0].tolist(),
                            "logits": f32list(out.logits[0]),
                        }
                    )
    ent = [k for k, v in model.config.label2id.items() if k.lower().startswith("entail")]
    return {
        "task": "zero-shot-classification",
        "entailment_id": model.config.label2id[ent[0]],
        "contradiction_id_used": -1 if model.config.label2id[ent[0]] == 0 else 0,
        "calls": calls,
        "pairs": pairs,
    }


# ---- question answering (port of transformers 4.57 QuestionAnsweringPipeline) ----


def _decode_spans(start, end, topk, max_answer_len, undesired_tokens):
    if start.ndim == 1:
        start = start[None]
    if end.ndim == 1:
        end = end[None]
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    scores_flat = candidates.flatten()
    if topk == 1:
        idx_sort = [np.argmax(scores_flat)]
    elif len(scores_flat) < topk:
        idx_sort = np.argsort(-scores_flat)
    else:
        idx = np.argpartition(-scores_flat, topk)[0:topk]
        idx_sort = idx[np.argsort(-scores_flat[idx])]
    starts, ends = np.unravel_index(idx_sort, candidates.shape)[1:]
    desired_spans = np.isin(starts, undesired_tokens.nonzero()) & np.isin(ends, undesired_tokens.nonzero())
    starts = starts[desired_spans]
    ends = ends[desired_spans]
    scores = candidates[0, starts, ends]
    return starts, ends, scores


def _select_starts_ends(start, end, p_mask, attention_mask, min_null_score=1000000, top_k=1,
                        handle_impossible_answer=False, max_answer_len=15):
    undesired_tokens = np.abs(np.array(p_mask) - 1)
    if attention_mask is not None:
        undesired_tokens = undesired_tokens & attention_mask
    undesired_tokens_mask = undesired_tokens == 0.0
    start = np.where(undesired_tokens_mask, -10000.0, start)
    end = np.where(undesired_tokens_mask, -10000.0, end)
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    if handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())
    start[0, 0] = end[0, 0] = 0.0
    starts, ends, scores = _decode_spans(start, end, top_k, max_answer_len, undesired_tokens)
    return starts, ends, scores, min_null_score


def _get_indices(enc, s, e, sequence_index, align_to_words):
    if align_to_words:
        try:
            start_word = enc.token_to_word(s)
            end_word = enc.token_to_word(e)
            start_index = enc.word_to_chars(start_word, sequence_index=sequence_index)[0]
            end_index = enc.word_to_chars(end_word, sequence_index=sequence_index)[1]
        except Exception:
            start_index = enc.offsets[s][0]
            end_index = enc.offsets[e][1]
    else:
        start_index = enc.offsets[s][0]
        end_index = enc.offsets[e][1]
    return start_index, end_index


@torch.no_grad()
def qa_pipeline_v4(model, tok, question, context, top_k=1, doc_stride=None, max_answer_len=15,
                   max_seq_len=None, handle_impossible_answer=False, align_to_words=True, padding="do_not_pad",
                   trace=None):
    """transformers 4.57.6 QuestionAnsweringPipeline (fast-tokenizer path, pt), preprocess + _forward +
    postprocess, same operations in the same order and dtypes. `trace` (a list) receives per-window data."""
    if max_seq_len is None:
        max_seq_len = min(tok.model_max_length, 384)
    if doc_stride is None:
        doc_stride = min(max_seq_len // 2, 128)
    if doc_stride > max_seq_len:
        raise ValueError("doc_stride > max_seq_len")
    question_first = tok.padding_side == "right"
    encoded = tok(
        text=question if question_first else context,
        text_pair=context if question_first else question,
        padding=padding,
        truncation="only_second" if question_first else "only_first",
        max_length=max_seq_len,
        stride=doc_stride,
        return_token_type_ids=True,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    num_spans = len(encoded["input_ids"])
    p_mask = [[t != 1 if question_first else 0 for t in encoded.sequence_ids(i)] for i in range(num_spans)]
    min_null_score = 1000000
    answers = []
    for i in range(num_spans):
        ids = encoded["input_ids"][i]
        if tok.cls_token_id is not None:
            for ci in np.nonzero(np.array(ids) == tok.cls_token_id)[0]:
                p_mask[i][ci] = 0
        fw = {}
        for k in tok.model_input_names:
            v = torch.tensor(encoded[k][i])
            if v.dtype == torch.int32:
                v = v.long()
            fw[k] = v.unsqueeze(0)
        pm = torch.tensor(p_mask[i]).unsqueeze(0)
        out = model(**fw)
        start_, end_ = out["start_logits"], out["end_logits"]
        if start_.dtype == torch.bfloat16:
            start_, end_ = start_.float(), end_.float()
        attention_mask = fw["attention_mask"].numpy() if "attention_mask" in fw else None
        pre_topk = top_k * 2 + 10 if align_to_words else top_k
        starts, ends, scores, min_null_score = _select_starts_ends(
            start_, end_, pm, attention_mask, min_null_score, pre_topk, handle_impossible_answer, max_answer_len
        )
        enc = encoded[i]
        offset = (fw["input_ids"] == tok.pad_token_id).numpy().sum() if tok.padding_side == "left" else 0
        sequence_index = 1 if question_first else 0
        cands = []
        for s, e, score in zip(starts, ends, scores):
            s = s - offset
            e = e - offset
            start_index, end_index = _get_indices(enc, s, e, sequence_index, align_to_words)
            target = context[start_index:end_index]
            cands.append({"start_token": int(s), "end_token": int(e), "score": py(score), "start": start_index,
                          "end": end_index, "answer": target})
            found = None
            for a in answers:
                if a["answer"].lower() == target.lower():
                    found = a
                    break
            if found:
                found["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": start_index, "end": end_index,
                                "answer": context[start_index:end_index]})
        if trace is not None:
            seq = encoded.sequence_ids(i)
            ctx_pos = [j for j, sid in enumerate(seq) if sid == (1 if question_first else 0)]
            trace.append({"num_tokens": len(ids), "context_token_positions": [ctx_pos[0], ctx_pos[-1] + 1],
                          "context_char_span": [encoded["offset_mapping"][i][ctx_pos[0]][0],
                                                encoded["offset_mapping"][i][ctx_pos[-1]][1]],
                          "input_ids": list(ids), "start_logits": f32list(out["start_logits"][0]),
                          "end_logits": f32list(out["end_logits"][0]), "candidates": cands})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda x: x["score"], reverse=True)
    if trace is not None:
        trace.append({"merged": [dict(a) for a in answers]})
    answers = answers[:top_k]
    if len(answers) == 1:
        return answers[0]
    return answers


def qa_reference(model, tok):
    cases = []
    for c in QA_CASES:
        trace = []
        out = qa_pipeline_v4(model, tok, c["question"], c["context"], trace=trace, **c["kwargs"])
        merged = trace.pop()["merged"]
        k = c["kwargs"].get("top_k", 1)
        scores = [a["score"] for a in merged[: k + 1]]
        gap = min(a - b for a, b in zip(scores, scores[1:])) if len(scores) > 1 else None
        assert gap is None or gap > 1e-4 * scores[0], (c["question"], scores)
        for w in trace:  # keep the file small (the model's logits are covered by `inputs`)
            del w["candidates"], w["start_logits"], w["end_logits"]
            if len(trace) > 1:
                del w["input_ids"]
        ctx_tokens = len(tok(c["context"], add_special_tokens=False)["input_ids"])
        rec = {
            "question": c["question"],
            "context": c["context"],
            "kwargs": c["kwargs"],
            "context_tokens": ctx_tokens,
            "num_windows": len(trace),
            "result": py(out),
            "min_score_gap_top_k": py(gap),
            "merged_answers": py(merged[:3]),
            "windows": trace,
        }
        cases.append(rec)
    assert any(c["num_windows"] > 1 for c in cases)
    return {
        "task": "question-answering",
        "implementation": "port of transformers 4.57.6 QuestionAnsweringPipeline (removed in transformers 5): "
        "qa_pipeline_v4 in scripts/make_encoder_fixtures.py",
        "defaults": {"top_k": 1, "doc_stride": 128, "max_seq_len": 384, "max_answer_len": 15,
                     "handle_impossible_answer": False, "align_to_words": True, "padding": "do_not_pad"},
        "cases": cases,
    }


# --------------------------------------------------------------------------
# building the tiny fixtures
# --------------------------------------------------------------------------


def save_checkpoint(model, tok, out, dtype, weights="safetensors"):
    fresh_dir(out)
    m = model.to(dtype)
    m.config.dtype = dtype
    m.save_pretrained(out)
    model.to(torch.float32)
    tok.save_pretrained(out)
    tidy_tokenizer_config(out)
    dname = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    fix_config(out / "config.json", dname)
    if weights == "bin":
        from safetensors.torch import load_file

        sd = load_file(str(out / "model.safetensors"))
        torch.save(sd, out / "pytorch_model.bin")
        (out / "model.safetensors").unlink()
    for p in out.iterdir():
        os.chmod(p, 0o644)
    return dname


def load_written_state(out):
    if (out / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(out / "model.safetensors")), "model.safetensors"
    return torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True), "pytorch_model.bin"


SCHEMA = {
    "inputs[i]": "text, input_ids (tokenizer(text)['input_ids'], special tokens included), offsets "
    "(offset_mapping, [start, end) char offsets into text; [0, 0] for special tokens), tokens "
    "(convert_ids_to_tokens), token_type_ids (only for tokenizers that return them), mean_pooled "
    "(attention-masked mean over ALL positions incl. special tokens of the last hidden state, not "
    "normalized, input run alone), logits (sequence heads: [num_labels]; token heads: [T][num_labels]) or "
    "start_logits/end_logits ([T], QA)",
    "last_hidden_state_first": "{shape: [T, hidden], data: row-major flattened} for inputs[0] run alone",
    "batch": "all inputs as ONE batch, right-padded with pad_token_id to padded_length, attention_mask 0 on "
    "pads: mean_pooled (masked mean, pads excluded), logits (same layout as inputs[i].logits, token heads cut "
    "to the non-pad positions) or start_logits/end_logits (QA, cut likewise); max_abs_diff_vs_single = largest "
    "|batch - single| over all of those",
    "pipelines": "transformers pipeline outputs; numpy scalars converted to plain JSON numbers; offsets, "
    "start and end are Python str (Unicode code point) indices, not byte offsets",
}


def build_tiny(name, model, tok, dtype=torch.float32, weights="safetensors", texts=INPUTS, pipelines=(),
               extra_config=None):
    from transformers import AutoModel, AutoModelForQuestionAnswering, AutoModelForSequenceClassification, \
        AutoModelForTokenClassification, AutoTokenizer

    out = FIX / name
    dname = save_checkpoint(model, tok, out, dtype, weights)
    if extra_config:
        fix_config(out / "config.json", dname, extra_config)
    sd, wfile = load_written_state(out)
    assert all(v.dtype == dtype for v in sd.values()), {k: v.dtype for k, v in sd.items()}

    auto = {"sequence": AutoModelForSequenceClassification, "token": AutoModelForTokenClassification,
            "qa": AutoModelForQuestionAnswering, "none": AutoModel}[head_kind(model)]
    m32 = auto.from_pretrained(out, dtype=torch.float32).eval()
    assert type(m32) is type(model), (type(m32), type(model))
    msd = m32.state_dict()
    for k, v in sd.items():
        assert k in msd, k
        assert torch.equal(msd[k], v.float()), k
    tok2 = AutoTokenizer.from_pretrained(out)
    for t in texts:
        assert tok2(t, return_offsets_mapping=True)["offset_mapping"] == tok(t, return_offsets_mapping=True)["offset_mapping"]
        assert tok2(t)["input_ids"] == tok(t)["input_ids"], (name, t)
    check_raw_tokenizer(out, tok2, texts)

    per_input, first, batch, margin = encoder_reference(m32, tok2, texts)
    if dtype == torch.float32:
        note = f"weights stored as float32 in {wfile}; reference computed in float32"
    else:
        note = (f"weights stored as {dname} in {wfile}; reference computed in float32 after upcasting those "
                f"stored ({dname}-rounded) values, i.e. from_pretrained(dir, dtype=torch.float32)")
    cfg = m32.config
    ref = {
        "model": name,
        "architecture": type(m32).__name__,
        "versions": all_versions(),
        "seed": SEED,
        "note": note,
        "compute_dtype": "float32",
        "weights_file": wfile,
        "weights_dtype": dname,
        "tokenizer_class": type(tok2).__name__,
        "vocab_size": cfg.vocab_size,
        "pad_token_id": tok2.pad_token_id,
        "id2label": {str(k): v for k, v in cfg.id2label.items()} if head_kind(m32) != "none" else None,
        "problem_type": cfg.problem_type,
        "schema": SCHEMA,
        "inputs": per_input,
        "last_hidden_state_first": first,
        "batch": batch,
        "min_top2_logit_margin": margin,
    }
    if head_kind(m32) in ("none", "qa"):
        ref.pop("id2label")
        ref.pop("problem_type")
        ref.pop("min_top2_logit_margin")
    pipes = {}
    for p in pipelines:
        if p == "cls":
            pipes["text_classification"] = cls_pipeline_reference(m32, tok2, texts)
        elif p == "ner":
            pipes["token_classification"] = ner_pipeline_reference(m32, tok2, texts)
        elif p == "qa":
            pipes["question_answering"] = qa_reference(m32, tok2)
        elif p == "nli":
            pipes["zero_shot_classification"] = zero_shot_reference(m32, tok2)
    if pipes:
        ref["pipelines"] = pipes
    write_json(out / "reference.json", ref)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"[{name}] vocab={cfg.vocab_size} files={sorted(p.name for p in out.iterdir())} {size / 1024:.1f} KiB")
    return ref


@torch.no_grad()
def center_head(model, tok, linear, o_fraction=None, scale=3.0):
    """Scale the final head layer's weight by `scale`, then shift its bias so the head's mean logits
    over the training corpus are zero: random encoders give every input a similar [CLS] state, so
    without this every input gets the same top label. With o_fraction (token heads, label 0 = "O"),
    label 0's bias is then raised so that fraction of the corpus tokens is predicted "O"."""
    linear.weight *= scale
    rows = []
    for line in corpus_lines()[:80]:
        e = tok(line, return_tensors="pt", truncation=True, max_length=64)
        lg = model(**e).logits[0]
        rows.append(lg[1:-1] if lg.ndim == 2 else lg[None])
    rows = torch.cat(rows)
    mean = rows.mean(0)
    linear.bias -= mean
    if o_fraction is not None:
        c = rows - mean
        gap = c[:, 1:].max(dim=-1).values - c[:, 0]
        linear.bias[0] += torch.quantile(gap, o_fraction)


def build_all(only, workdir):
    from transformers import (
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertForTokenClassification,
        BertModel,
        DistilBertForSequenceClassification,
        RobertaForSequenceClassification,
        XLMRobertaForTokenClassification,
    )

    wp_vocab = train_wordpiece(448)
    V = len(wp_vocab)
    tok128 = wordpiece_tokenizer(wp_vocab, 128)
    tok512 = wordpiece_tokenizer(wp_vocab, 512)

    if "tiny-bert-cls" in only:
        torch.manual_seed(SEED)
        m = BertForSequenceClassification(
            bert_config(V, 128, CLS_LABELS, problem_type="single_label_classification")).eval()
        init_weights(m, SEED + 1)
        center_head(m, tok128, m.classifier)
        build_tiny("tiny-bert-cls", m, tok128, pipelines=("cls",))

    if "tiny-bert-ner" in only:
        torch.manual_seed(SEED)
        m = BertForTokenClassification(bert_config(V, 128, NER_LABELS)).eval()
        init_weights(m, SEED + 2)
        center_head(m, tok128, m.classifier, o_fraction=0.6)
        build_tiny("tiny-bert-ner", m, tok128, pipelines=("ner",))

    if "tiny-bert-qa" in only:
        torch.manual_seed(SEED)
        m = BertForQuestionAnswering(bert_config(V, 512)).eval()
        init_weights(m, SEED + 3)
        with torch.no_grad():
            m.qa_outputs.weight *= 3.0  # peakier start/end distributions
        build_tiny("tiny-bert-qa", m, tok512, pipelines=("qa",))

    if "tiny-bert-nli" in only:
        torch.manual_seed(SEED)
        m = BertForSequenceClassification(bert_config(V, 128, NLI_LABELS)).eval()
        init_weights(m, SEED + 4)
        center_head(m, tok128, m.classifier)
        build_tiny("tiny-bert-nli", m, tok128, pipelines=("nli",))

    if "tiny-distilbert-cls" in only:
        torch.manual_seed(SEED)
        dtok = wordpiece_tokenizer(wp_vocab, 128, "DistilBertTokenizer")
        m = DistilBertForSequenceClassification(distilbert_config(V, 128, DISTIL_LABELS)).eval()
        init_weights(m, SEED + 5)
        center_head(m, dtok, m.classifier)
        build_tiny("tiny-distilbert-cls", m, dtok, weights="bin", pipelines=("cls",))

    if "tiny-bert-base" in only:
        torch.manual_seed(SEED)
        m = BertModel(bert_config(V, 512)).eval()
        init_weights(m, SEED + 6)
        build_tiny("tiny-bert-base", m, tok512, extra_config={"architectures": ["BertModel"]})

    if "tiny-roberta-cls" in only:
        vocab, merges = train_bytelevel_bpe(512)
        rtok = roberta_tokenizer(vocab, merges)
        torch.manual_seed(SEED)
        m = RobertaForSequenceClassification(
            roberta_like_config("RobertaConfig", len(vocab), ROBERTA_LABELS, problem_type="multi_label_classification")
        ).eval()
        init_weights(m, SEED + 7)
        center_head(m, rtok, m.classifier.out_proj)
        build_tiny("tiny-roberta-cls", m, rtok, dtype=torch.float16, pipelines=("cls",))

    if "tiny-xlmr-ner" in only:
        proto = train_unigram_spm(400, workdir)
        xtok = xlmr_tokenizer(proto)
        torch.manual_seed(SEED)
        m = XLMRobertaForTokenClassification(roberta_like_config("XLMRobertaConfig", len(xtok), NER_LABELS)).eval()
        init_weights(m, SEED + 8)
        center_head(m, xtok, m.classifier, o_fraction=0.5)
        build_tiny("tiny-xlmr-ner", m, xtok, dtype=torch.bfloat16, texts=INPUTS + XLMR_EXTRA_INPUTS,
                   pipelines=("ner",))


# --------------------------------------------------------------------------
# all-MiniLM-L6-v2 (sentence-transformers)
# --------------------------------------------------------------------------


def build_minilm(model_dir):
    from sentence_transformers import SentenceTransformer

    model_dir = Path(model_dir).resolve()
    if not (model_dir / "modules.json").exists():
        sys.exit(f"sentence-transformers model not found: {model_dir} (pass --minilm DIR or --skip-minilm)")
    out = FIX / "minilm"
    fresh_dir(out)
    st = SentenceTransformer(str(model_dir), device="cpu")
    st.eval()
    modules = [type(m).__name__ for m in st]
    assert modules[-1] == "Normalize", modules
    # the same model without the Normalize module: pooled sentence embeddings before L2 normalization
    st_unnorm = SentenceTransformer(modules=[st[0], st[1]], device="cpu")
    st_unnorm.eval()

    emb = st.encode(MINILM_TEXTS, batch_size=32, convert_to_tensor=True)
    emb_one = torch.stack([st.encode([t], convert_to_tensor=True)[0] for t in MINILM_TEXTS])
    raw = st_unnorm.encode(MINILM_TEXTS, batch_size=32, convert_to_tensor=True)
    # input ids exactly as sentence-transformers tokenizes (truncation to max_seq_length)
    ids = []
    for t in MINILM_TEXTS:
        feats = st.preprocess([t])
        n = int(feats["attention_mask"][0].sum())
        ids.append(feats["input_ids"][0, :n].tolist())
    assert max(len(x) for x in ids) == st.max_seq_length, [len(x) for x in ids]
    long_full = len(st.tokenizer(MINILM_TEXTS[-1])["input_ids"])
    assert long_full > st.max_seq_length
    # cross-check: manual masked mean pooling on the transformer's token embeddings + L2 normalize
    with torch.no_grad():
        for i, t in enumerate(MINILM_TEXTS):
            f = st.preprocess([t])
            tok_emb = st[0]({k: v for k, v in f.items()})["token_embeddings"]
            pooled = masked_mean(tok_emb, f["attention_mask"])[0]
            assert float((pooled - raw[i]).abs().max()) < 1e-5
            assert float((torch.nn.functional.normalize(pooled, dim=-1) - emb[i]).abs().max()) < 1e-5
    batch_vs_single = float((emb - emb_one).abs().max())
    first4 = emb[:4]
    cos = (first4 @ first4.T).clamp(-1, 1)
    pooling_cfg = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    ref = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "model_dir": str(model_dir.relative_to(REPO)) if model_dir.is_relative_to(REPO) else str(model_dir),
        "versions": all_versions(),
        "note": "float32 on cpu. embeddings = SentenceTransformer(dir).encode(texts) with the model's own modules "
        "(Transformer -> Pooling(mean) -> Normalize), batch_size 32, texts batched together (padded). "
        "embeddings_unnormalized = the same Transformer + Pooling modules without Normalize. Each text's "
        "input_ids are what sentence-transformers feeds the model: tokenizer(text, truncation=True, "
        "max_length=max_seq_length) incl. [CLS]/[SEP]; the last text is truncated.",
        "modules": modules,
        "pooling": pooling_cfg,
        "max_seq_length": st.max_seq_length,
        "do_lower_case": getattr(st[0], "do_lower_case", None),
        "dimension": int(emb.shape[1]),
        "texts": MINILM_TEXTS,
        "input_ids": ids,
        "untruncated_token_count_last": long_full,
        "embeddings": [f32list(e) for e in emb],
        "embeddings_unnormalized": [f32list(e) for e in raw],
        "batch_vs_single_max_abs_diff": batch_vs_single,
        "pairwise_cosine_first4": [f32list(r) for r in cos],
    }
    write_json(out / "embeddings.json", ref)
    print(f"[minilm] {len(MINILM_TEXTS)} texts, dim={emb.shape[1]}, longest input {long_full} tokens "
          f"(truncated to {st.max_seq_length}), batch-vs-single diff {batch_vs_single:.2e}")


# --------------------------------------------------------------------------
# verification: reload every written fixture and reproduce its reference
# --------------------------------------------------------------------------


@torch.no_grad()
def verify_fixture(name, tol=1e-5):
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModel, AutoModelForQuestionAnswering, \
        AutoModelForSequenceClassification, AutoModelForTokenClassification

    out = FIX / name
    ref = json.loads((out / "reference.json").read_text())
    arch = AutoConfig.from_pretrained(out).architectures[0]
    auto = AutoModel
    if arch.endswith("ForSequenceClassification"):
        auto = AutoModelForSequenceClassification
    elif arch.endswith("ForTokenClassification"):
        auto = AutoModelForTokenClassification
    elif arch.endswith("ForQuestionAnswering"):
        auto = AutoModelForQuestionAnswering
    model = auto.from_pretrained(out, dtype=torch.float32).eval()
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    worst = 0.0
    for rec in ref["inputs"]:
        e = raw.encode(rec["text"])
        assert e.ids == rec["input_ids"], (name, rec["text"])
        assert [list(o) for o in e.offsets] == rec["offsets"], (name, rec["text"])
        kw = {"input_ids": torch.tensor([e.ids]), "attention_mask": torch.tensor([e.attention_mask])}
        if "token_type_ids" in rec:
            kw["token_type_ids"] = torch.tensor([e.type_ids])
        o = model(**kw, output_hidden_states=True)
        h = o.hidden_states[-1][0]
        worst = max(worst, float((h.mean(0) - torch.tensor(rec["mean_pooled"])).abs().max()))
        for key, val in (("logits", getattr(o, "logits", None)), ("start_logits", getattr(o, "start_logits", None)),
                         ("end_logits", getattr(o, "end_logits", None))):
            if key in rec:
                worst = max(worst, float((val[0] - torch.tensor(rec[key])).abs().max()))
    assert worst <= tol, (name, worst)
    print(f"[verify] {name}: reloaded from disk, max |diff| = {worst:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="build only these directories (e.g. tiny-bert-qa minilm)")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--minilm", default=str(DEFAULT_MINILM), help="all-MiniLM-L6-v2 dir (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    only = set(args.only) if args.only else None
    tiny = [n for n in ("tiny-bert-cls", "tiny-bert-ner", "tiny-bert-qa", "tiny-bert-nli", "tiny-distilbert-cls",
                        "tiny-bert-base", "tiny-roberta-cls", "tiny-xlmr-ner") if not only or n in only]
    if tiny:
        with tempfile.TemporaryDirectory() as workdir:
            build_all(tiny, Path(workdir))
        for n in tiny:
            verify_fixture(n)
    if not args.skip_minilm and (not only or "minilm" in only):
        build_minilm(args.minilm)


if __name__ == "__main__":
    main()
