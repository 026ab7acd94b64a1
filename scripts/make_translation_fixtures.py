#!/usr/bin/env python3
"""Generate the reference fixtures for encoder-decoder translation parity (Marian / opus-mt,
T5 / Flan-T5, M2M100, NLLB-200) of wordloom against Python `transformers`.

Run by hand from anywhere:

    /opt/wlpy/bin/python scripts/make_translation_fixtures.py [--only marian,t5,m2m100,nllb] [--threads 1]

--only builds just the named fixtures (marian, t5, m2m100, nllb; the directory names tiny-marian,
tiny-t5, tiny-m2m100, tiny-nllb are accepted too) and leaves every other fixture untouched.
Rebuild only the NLLB fixture:

    /opt/wlpy/bin/python scripts/make_translation_fixtures.py --only nllb --threads 1

Needs: torch, transformers (>= 5), sentencepiece (+ protobuf for its model proto), tokenizers,
safetensors, numpy. Runs on CPU in float32 with one thread (torch.set_num_threads(1)),
torch.use_deterministic_algorithms(True), attn_implementation="eager", fixed seeds and no
network access (HF_HUB_OFFLINE=1). Every output is byte-for-byte deterministic (re-running
gives identical files; the sha256 of every file was compared over two runs).

Tokenizers. The SentencePiece models are trained here (sentencepiece Python package,
num_threads=1, no shuffling) on a few hundred short English / German / French sentences the
script generates from templates (corpus() below; plenty of é, è, ê, ë, ü, ö, ä, ß, ç, ï ...).
The published checkpoints' SentencePiece models use the "nmt_nfkc" normalization, whose
precompiled charsmap alone is ~237 KB, so these use a small user-defined rule set instead
(NORM_RULES: NFC composition of base letter + combining grave / acute / circumflex / tilde /
diaeresis / cedilla, full-width ! , . : ? -> ASCII, no-break / ideographic spaces -> " ",
ligatures ff fi fl ffi ffl -> letters, "…" -> "..."; spec name "user_defined", precompiled_charsmap
non-empty). All keep SentencePiece's defaults add_dummy_prefix=true,
remove_extra_whitespaces=true, character_coverage=1.0 (characters never seen in training,
e.g. "€", are unknown).

Outputs (all under tests/fixtures/, each directory regenerated from scratch, each < 300 KB
except tiny-nllb < 400 KB):

  tiny-marian/   MarianMTModel laid out like a Helsinki-NLP/opus-mt-* repo (no tokenizer.json,
                 no special_tokens_map.json):
    config.json              MarianConfig as transformers 5 writes it, plus what the opus-mt
                             converter puts there: d_model 32, 2+2 layers, 4 heads, ffn 64,
                             max_position_embeddings 64, activation "swish", scale_embedding,
                             static (sinusoidal, not saved) positions, shared encoder/decoder
                             embeddings tied to lm_head, pad = decoder_start = the last id,
                             eos 0, bos 0, forced_eos 0, and the legacy generation keys
                             (num_beams, max_length, bad_words_ids) the converter wrote into
                             config.json (transformers 5 ignores them there); dtype/torch_dtype.
    generation_config.json   like opus-mt's (gen_values in build_marian): num_beams 4, max_length 64,
                             bad_words_ids [[pad]], decoder_start pad, eos 0, forced_eos 0,
                             bos 0, pad, renormalize_logits true.
    model.safetensors        float32, as save_pretrained writes it (tied tensors once; no
                             embed_positions; final_logits_bias included).
    source.spm / target.spm  SentencePiece unigram models: English (vocab 180) / German (vocab
                             200), both <unk>=0 <s>=1 </s>=2, user-defined normalizer.
    vocab.json               the joint vocabulary (token -> id) the way the opus-mt converter
                             builds it from Marian's vocab.yml: "</s>"=0, "<unk>"=1, then every
                             other piece of BOTH spm models (no <s>), most frequent first in the
                             spm-segmented training text (ties by piece string), pieces never
                             produced appended in source-spm then target-spm order, and "<pad>"
                             added last. Written like MarianTokenizer.save_vocabulary (indent 2,
                             non-ASCII escaped as \\uXXXX). vocab.json ids are NOT spm ids.
    tokenizer_config.json    {"target_lang": "de", "source_lang": "en"} (what the converter writes)
    reference.json
  tiny-t5/       T5ForConditionalGeneration laid out like google/flan-t5-*:
    config.json              d_model 32, d_kv 8, 4 heads, 2+2 layers, d_ff 64, 32 buckets, max
                             distance 128, feed_forward_proj "gated-gelu" (gelu_new),
                             tie_word_embeddings false (untied lm_head, decoder output NOT scaled
                             by d_model**-0.5), vocab_size 136 = 128 spm pieces + 8 unused ids
                             (like 32128 vs 32100; ids 128..135 have no token).
    generation_config.json   like flan-t5's: decoder_start 0, eos 1, pad 0 (nothing else).
    model.safetensors        float32: shared.weight, the separate lm_head.weight, the layers.
    spiece.model             SentencePiece unigram, 128 pieces, <pad>=0 </s>=1 <unk>=2 (no <s>),
                             trained on EN+DE plus the task prefixes (vocab kept small so the
                             directory stays < 300 KB: the untied lm_head doubles the vocab cost).
    tokenizer.json           written by T5Tokenizer (T5TokenizerFast) loaded from spiece.model
                             with extra_ids=0 (no sentinel tokens; ids == spm ids).
    tokenizer_config.json    as transformers 5 writes it, minus the load-time flags is_local /
                             local_files_only (special_tokens_map.json removed if written)
    reference.json
  tiny-m2m100/   M2M100ForConditionalGeneration laid out like facebook/m2m100_418M:
    config.json              d_model 32, 2+2 layers, 4 heads, ffn 64, max_position_embeddings 64,
                             scale_embedding, relu, tied shared/lm_head, pad 1, bos 0, eos 2,
                             decoder_start 2, vocab_size = len(vocab.json) + 100 language
                             tokens + 8 "madeup words".
    generation_config.json   like m2m100_418M's: num_beams 5, early_stopping true, max_length 64,
                             bos 0, eos 2, pad 1, decoder_start 2.
    model.safetensors        float32.
    sentencepiece.bpe.model  SentencePiece BPE, 200 pieces, trained on EN+DE+FR.
    vocab.json               fairseq dictionary layout: <s>=0 <pad>=1 </s>=2 <unk>=3, then the spm
                             pieces most frequent first (ties by string; never-produced pieces
                             appended in spm order); language tokens __xx__ are NOT in it: the
                             tokenizer appends the 100 m2m100 codes at len(vocab.json) + i.
    tokenizer_config.json    hub (transformers 4) layout, by hand: additional_special_tokens = the
                             100 __xx__ tokens, language_codes m2m100, num_madeup_words 8,
                             src_lang/tgt_lang null, model_max_length 1024, tokenizer_class.
    reference.json
  tiny-nllb/     M2M100ForConditionalGeneration laid out like facebook/nllb-200-distilled-600M (NO vocab.json:
                 the ids come from tokenizer.json):
    config.json              as tiny-m2m100's (d_model 32, 2+2 layers, 4 heads, ffn 64, scale_embedding, relu,
                             pre-norm, tied shared/lm_head, pad 1, bos 0, eos 2, decoder_start 2), layerdrop 0 as
                             nllb-200, max_position_embeddings 256 (>= max_length 200, as nllb-200's 1024; the
                             sinusoidal table is not stored), vocab_size = len(tokenizer) = 404 (nllb-200 itself
                             has 256206 = 256204 + 2 unused rows), plus the keys nllb-200's config.json carries:
                             max_length 200, num_hidden_layers, tokenizer_class NllbTokenizer.
    generation_config.json   like nllb-200-distilled-600M's: bos 0, decoder_start 2, eos 2, pad 1, max_length 200
                             (no num_beams: greedy by default).
    model.safetensors        float32.
    sentencepiece.bpe.model  SentencePiece BPE, 200 pieces, trained on EN+DE+FR (as tiny-m2m100's).
    tokenizer.json           as transformers 5's NllbTokenizer (tokenizers backend, NllbConverter vocab) writes it:
                             BPE vocab <s>=0 <pad>=1 </s>=2 <unk>=3, spm piece i (i >= 3) at i + 1; added tokens:
                             those 4, the 202 nllb language codes (FAIRSEQ_LANGUAGE_CODES order, special) at
                             201..402 (eng_Latn 247, fra_Latn 257, deu_Latn 242), <mask>=403 last (built without
                             mask, then added, since transformers 5 would put it before the codes); normalizer
                             Precompiled + Replace(" {2,}" -> " "), Metaspace(prepend always, split), post_processor
                             TemplateProcessing [eng_Latn] $A </s> (non-legacy; src_lang replaces it).
    tokenizer_config.json    hub (transformers 4) layout, by hand: additional_special_tokens = the 202 codes,
                             legacy_behaviour false, src_lang/tgt_lang null, mask_token as an __type AddedToken dict
                             (lstrip), model_max_length 1024, sp_model_kwargs {}, tokenizer_class NllbTokenizer.
    special_tokens_map.json  the hub's: bos/cls/eos/mask/pad/sep/unk + additional_special_tokens.
    reference.json           cases eng_Latn -> fra_Latn (forced_bos fra_Latn), case_tgt_deu (SOURCES[0] ->
                             deu_Latn), case_src_fra (a French corpus sentence, src_lang fra_Latn -> eng_Latn);
                             every source is asserted to be [src_lang id] + pieces + [</s>]. Cases carry
                             sentencepiece_pieces_equal: the tokenizer.json pipeline differs from the spm library
                             on sentence 2 (trailing space kept as a final "▁" piece; "€" shown as <unk>). The random
                             model often emits language codes mid-sequence (special: decoded text "").

reference.json (see its "schema" key): for 4 source sentences (one with accents incl. a
decomposed "é", one with extra spaces / punctuation / an unknown character; T5 sentences carry
"translate English to German: " or "summarize: "), computed from the model and tokenizer
RELOADED from the written directory (AutoTokenizer / AutoModelForSeq2SeqLM, float32, eager):
source ids and pieces, the encoder output of sentence 0, the step-0 decoder log-softmax of
sentence 0, greedy / beam / default-config generate() outputs (ids, texts, sequences_scores),
the generation settings that came from generation_config.json, and every warning transformers
emitted. The weights are random (untrained): outputs are gibberish and repetitive. EOS is made
reachable where needed with a documented tweak (Marian: final_logits_bias[eos] += 3; M2M100 and
NLLB: the tied embedding / output row of EOS scaled x2.5; T5: none needed with its seed) so that some beam
hypotheses end with EOS early while others run to the length limit (asserted). Checks asserted
before writing: the reloaded weights equal the saved ones; every greedy / beam result is unchanged
when re-run with 1e-4 noise on the processed scores (no near-ties that f32 rounding could flip);
every beam sequences_scores value equals a teacher-forced re-scoring (sum of processed log-probs /
generated_length ** length_penalty, to 2e-5); each directory is < 300 KB (tiny-nllb < 400 KB).

Floats that are float32 values are written in their shortest float32 round-trip decimal form.
"""

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import unicodedata
import warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_fixtures import FIX, _F32, _dist_version, f32list, fresh_dir, versions, write_json  # noqa: E402

SEED = 5150
NEW_TOKENS = 20
BEAM_KW = dict(num_beams=4, length_penalty=0.6, no_repeat_ngram_size=3, num_return_sequences=2,
               early_stopping=True, max_new_tokens=NEW_TOKENS, do_sample=False)
GREEDY_KW = dict(num_beams=1, do_sample=False, max_new_tokens=NEW_TOKENS)
NOISE = 1e-4
HIDDEN_FULL_LIMIT = 2000

# --------------------------------------------------------------------------
# corpus (generated here, no downloads)
# --------------------------------------------------------------------------

SUBJECTS = {
    "en": ["The cat", "The dog", "My brother", "My sister", "The teacher", "A young woman", "The old man",
           "Our neighbour", "The children", "The café owner", "Zoë", "The baker from Zürich", "My naïve friend",
           "The doctor", "The farmer", "Her grandmother", "The little boy", "The students", "A tourist", "The mayor"],
    "de": ["Die Katze", "Der Hund", "Mein Bruder", "Meine Schwester", "Der Lehrer", "Eine junge Frau", "Der alte Mann",
           "Unser Nachbar", "Die Kinder", "Der Cafébesitzer", "Zoë", "Der Bäcker aus Zürich", "Mein naiver Freund",
           "Die Ärztin", "Der Bauer", "Ihre Großmutter", "Der kleine Junge", "Die Studenten", "Ein Tourist",
           "Der Bürgermeister"],
    "fr": ["Le chat", "Le chien", "Mon frère", "Ma sœur", "Le professeur", "Une jeune femme", "Le vieil homme",
           "Notre voisin", "Les enfants", "Le patron du café", "Zoë", "Le boulanger de Zurich", "Mon ami naïf",
           "La médecin", "Le fermier", "Sa grand-mère", "Le petit garçon", "Les étudiants", "Un touriste", "Le maire"],
}
VERBS = {
    "en": ["ate", "saw", "bought", "liked", "found", "carried", "wanted", "painted", "sold", "forgot", "cooked",
           "opened", "washed", "brought", "described", "visited"],
    "de": ["aß", "sah", "kaufte", "mochte", "fand", "trug", "wollte", "malte", "verkaufte", "vergaß", "kochte",
           "öffnete", "wusch", "brachte", "beschrieb", "besuchte"],
    "fr": ["a mangé", "a vu", "a acheté", "a aimé", "a trouvé", "a porté", "a voulu", "a peint", "a vendu", "a oublié",
           "a cuisiné", "a ouvert", "a lavé", "a apporté", "a décrit", "a visité"],
}
OBJECTS = {
    "en": ["the bread", "the cheese", "a large piece of cake", "the red apples", "sweet fruit", "the breakfast",
           "a crème brûlée", "the old map", "a blue bicycle", "the façade", "the green door", "a heavy suitcase",
           "the kitchen window", "fresh vegetables", "the small garden", "a warm soup", "the yellow flowers",
           "an expensive watch", "the wooden chair", "the museum"],
    "de": ["das Brot", "den Käse", "ein großes Stück Kuchen", "die roten Äpfel", "süßes Obst", "das Frühstück",
           "eine Crème brûlée", "die alte Karte", "ein blaues Fahrrad", "die Fassade", "die grüne Tür",
           "einen schweren Koffer", "das Küchenfenster", "frisches Gemüse", "den kleinen Garten", "eine warme Suppe",
           "die gelben Blumen", "eine teure Uhr", "den hölzernen Stuhl", "das Museum"],
    "fr": ["le pain", "le fromage", "un grand morceau de gâteau", "les pommes rouges", "des fruits sucrés",
           "le petit déjeuner", "une crème brûlée", "la vieille carte", "un vélo bleu", "la façade", "la porte verte",
           "une valise lourde", "la fenêtre de la cuisine", "des légumes frais", "le petit jardin", "une soupe chaude",
           "les fleurs jaunes", "une montre chère", "la chaise en bois", "le musée"],
}
ENDINGS = {
    "en": ["today.", "yesterday evening.", "near the river.", "on the street!", "in the morning?",
           "with great pleasure.", "before lunch.", "after the storm.", "in the village square.", "every Sunday.",
           "without a word.", "at the station?"],
    "de": ["heute.", "gestern Abend.", "am Fluss.", "auf der Straße!", "am Morgen?", "mit großer Freude.",
           "vor dem Mittagessen.", "nach dem Sturm.", "auf dem Dorfplatz.", "jeden Sonntag.", "ohne ein Wort.",
           "am Bahnhof?"],
    "fr": ["aujourd'hui.", "hier soir.", "près de la rivière.", "dans la rue !", "le matin ?", "avec grand plaisir.",
           "avant le déjeuner.", "après l'orage.", "sur la place du village.", "chaque dimanche.", "sans un mot.",
           "à la gare ?"],
}
EXTRA = {
    "en": ["Good morning!", "Thank you very much.", "How are you?", "I am fine, thanks.", "Where is the station?",
           "It costs 12 euros.", "We need 3 apples and 250 grams of cheese.", "See you at 7 o'clock.",
           "Hello, my friend!", "Is it far from here?", "The naïve fiancée met the café owner.",
           "Über and Zoë are names."],
    "de": ["Guten Morgen!", "Vielen Dank.", "Wie geht es dir?", "Mir geht es gut, danke.", "Wo ist der Bahnhof?",
           "Es kostet 12 Euro.", "Wir brauchen 3 Äpfel und 250 Gramm Käse.", "Bis um 7 Uhr.",
           "Hallo, mein Freund!", "Ist es weit von hier?", "Die Straße ist schön und groß.",
           "Grüße aus München und Köln."],
    "fr": ["Bonjour !", "Merci beaucoup.", "Comment ça va ?", "Ça va bien, merci.", "Où est la gare ?",
           "Ça coûte 12 euros.", "Il nous faut 3 pommes et 250 grammes de fromage.", "À 7 heures.",
           "Bonjour, mon ami !", "Est-ce loin d'ici ?", "La fenêtre de l'église est très belle.",
           "Noël à Genève, été à Nîmes."],
}
N_TEMPLATE = 400
T5_PREFIXES = ["translate English to German: ", "summarize: "]


def corpus(lang):
    """N_TEMPLATE template sentences + EXTRA, deterministic."""
    s, v, o, e = SUBJECTS[lang], VERBS[lang], OBJECTS[lang], ENDINGS[lang]
    out = []
    for n in range(N_TEMPLATE):
        out.append(f"{s[n % len(s)]} {v[(n // 20 + 3 * n) % len(v)]} {o[(7 * n + n // 11) % len(o)]} "
                   f"{e[(5 * n + n // 13) % len(e)]}")
    return out + EXTRA[lang]


# Source sentences of every reference (English).
SOURCES = [
    "The cat saw the red apples today.",
    # accents; "café" is written decomposed (e + U+0301) -> the normalizer composes it
    "Zoë ate a crème brûlée at the cafe\u0301 in Zürich.",
    # leading / repeated / trailing spaces, a full-width "！", a no-break space, "…" (-> "..."), doubled
    # punctuation and "€" (in no vocabulary: <unk>)
    "  Hello,   my friend！!  It costs 12\u00a0€ … really?? ",
    "My brother bought a blue bicycle near the river yesterday evening.",
]
T5_SOURCES = [
    "translate English to German: " + SOURCES[0],
    "translate English to German: " + SOURCES[1],
    "translate English to German: " + SOURCES[2],
    "summarize: " + SOURCES[3],
]


# --------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------


def norm_rules():
    """User-defined normalization rules (source codepoints -> target codepoints), NFKC-like subset."""
    rules = {}
    for base in "aeiouyAEIOUYcCnN":
        for mark in (0x300, 0x301, 0x302, 0x303, 0x308, 0x327):
            src = base + chr(mark)
            dst = unicodedata.normalize("NFC", src)
            if len(dst) == 1:
                rules[src] = dst
    for cp in (0xFF01, 0xFF0C, 0xFF0E, 0xFF1A, 0xFF1F):  # full-width ! , . : ?
        rules[chr(cp)] = chr(cp - 0xFEE0)
    for cp in (0x00A0, 0x2007, 0x202F, 0x3000):
        rules[chr(cp)] = " "
    rules.update({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl", "\u2026": "..."})
    return rules


NORM_RULES = norm_rules()


def train_spm(lines, model_type, vocab_size, workdir, **ids):
    import sentencepiece as spm

    tsv = Path(workdir) / "norm_rules.tsv"
    tsv.write_text("".join(" ".join(f"{ord(c):X}" for c in s) + "\t" + " ".join(f"{ord(c):X}" for c in d) + "\n"
                           for s, d in sorted(NORM_RULES.items())))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=1.0,
        normalization_rule_tsv=str(tsv),
        add_dummy_prefix=True,
        remove_extra_whitespaces=True,
        split_digits=False,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        seed_sentencepiece_size=20000,
        minloglevel=2,
        **ids,
    )
    tsv.unlink()
    # the trainer records the rule file's (temporary) path in normalizer_spec: clear it for reproducible bytes
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(buf.getvalue())
    assert m.normalizer_spec.name == "user_defined" and m.normalizer_spec.precompiled_charsmap
    m.normalizer_spec.normalization_rule_tsv = ""
    return m.SerializeToString(deterministic=True)


def spm_info(proto_bytes):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(proto_bytes)
    ns = m.normalizer_spec
    ts = m.trainer_spec
    types = Counter(pb.ModelProto.SentencePiece.Type.Name(p.type) for p in m.pieces)
    return {
        "model_type": pb.TrainerSpec.ModelType.Name(ts.model_type),
        "vocab_size": len(m.pieces),
        "piece_types": dict(sorted(types.items())),
        "first_pieces": [p.piece for p in m.pieces[:4]],
        "unk_id": ts.unk_id, "bos_id": ts.bos_id, "eos_id": ts.eos_id, "pad_id": ts.pad_id,
        "normalizer_spec": {
            "name": ns.name,
            "add_dummy_prefix": ns.add_dummy_prefix,
            "remove_extra_whitespaces": ns.remove_extra_whitespaces,
            "escape_whitespaces": ns.escape_whitespaces,
            "precompiled_charsmap_bytes": len(ns.precompiled_charsmap),
        },
        "denormalizer_spec_charsmap_bytes": len(m.denormalizer_spec.precompiled_charsmap),
        "byte_fallback": ts.byte_fallback,
        "file_bytes": len(proto_bytes),
    }


def piece_counts(sp, lines):
    c = Counter()
    for line in lines:
        c.update(sp.encode(line, out_type=str))
    return c


def frequency_vocab(head, counts, spms):
    """head tokens first, then pieces by descending count (ties by string), then never-produced
    non-control pieces of each spm in spm order."""
    vocab = {t: i for i, t in enumerate(head)}
    for piece, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    for sp in spms:
        for i in range(sp.get_piece_size()):
            if sp.is_control(i) or sp.is_unknown(i):
                continue
            p = sp.id_to_piece(i)
            if p not in vocab:
                vocab[p] = len(vocab)
    return vocab


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def all_versions():
    v = versions()
    v.pop("gguf", None)
    for name in ("sentencepiece", "safetensors", "protobuf"):
        try:
            v[name] = _dist_version(name)
        except Exception:
            pass
    return v


class Capture:
    """Collects transformers log records (warning and above) and Python warnings."""

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)
        self.events = []

    def _clean(self, msg):
        return " ".join(str(msg).replace(self.out_dir, "<fixture dir>").split())

    @contextlib.contextmanager
    def __call__(self, where):
        from transformers.utils import logging as hf_logging

        records = []

        class H(logging.Handler):
            def emit(self, record):
                records.append(("log." + record.levelname.lower(), record.getMessage()))

        h = H(level=logging.WARNING)
        root = hf_logging.get_logger("transformers")
        root.addHandler(h)
        try:
            with warnings.catch_warnings(record=True) as ws:
                warnings.simplefilter("always")
                yield
        finally:
            root.removeHandler(h)
        events = [(kind, self._clean(msg)) for kind, msg in records]
        events += [("warnings." + w.category.__name__, self._clean(w.message)) for w in ws]
        for kind, msg in events:
            for e in self.events:
                if e["kind"] == kind and e["message"] == msg:
                    e["count"] += 1
                    if where not in e["where"]:
                        e["where"].append(where)
                    break
            else:
                self.events.append({"kind": kind, "message": msg, "count": 1, "where": [where]})


def reset_warning_once():
    """transformers' logger.warning_once is an lru_cache: clear it so every fixture sees its warnings
    independently of which fixtures ran before in this process."""
    try:
        logging.Logger.warning_once.cache_clear()
    except AttributeError:
        pass


def init_weights(model, seed, std, emb_std, rel_std=0.5):
    """Deterministic wide init (outputs far from uniform): 2-D weights ~ N(0, std), token embeddings /
    lm_head ~ N(0, emb_std), T5 relative_attention_bias ~ N(0, rel_std); LayerNorm / RMSNorm weights
    ~ 1 + N(0, 0.1), their biases and every linear bias ~ N(0, 0.1). Marian's frozen sinusoidal
    embed_positions are left alone. Tied parameters are visited once (named_parameters order)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:
                continue
            if p.ndim >= 2:
                if any(k in name for k in ("shared", "embed_tokens", "lm_head")):
                    s = emb_std
                elif "relative_attention_bias" in name:
                    s = rel_std
                else:
                    s = std
                p.copy_(torch.randn(p.shape, generator=g) * s)
            elif "norm" in name:
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                else:
                    p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return g


def save_model(model, out):
    model.save_pretrained(str(out), safe_serialization=True)
    os.chmod(out / "model.safetensors", 0o644)


def write_gen_config(out, values):
    """Writes generation_config.json through GenerationConfig (non-default values + transformers_version)."""
    from transformers import GenerationConfig

    path = out / "generation_config.json"
    if path.exists():
        path.unlink()
    GenerationConfig(**values).save_pretrained(str(out))
    written = json.loads(path.read_text())
    for k, v in values.items():
        assert written.get(k) == v, (k, written.get(k), v)
    return written


def patch_config(out, set_keys=None, drop_keys=()):
    """Rewrites config.json (sorted keys, indent 2) with dtype + torch_dtype and the given changes."""
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    cfg["dtype"] = "float32"
    cfg["torch_dtype"] = "float32"
    for k in drop_keys:
        cfg.pop(k, None)
    if set_keys:
        cfg.update(set_keys)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def load_model(out, capture):
    from transformers import AutoModelForSeq2SeqLM

    with capture("AutoModelForSeq2SeqLM.from_pretrained"):
        model, info = AutoModelForSeq2SeqLM.from_pretrained(
            str(out), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
    model.eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model, {k: sorted(v) if isinstance(v, (set, list)) else v for k, v in info.items() if v}


def safetensors_keys(path):
    """{"num_tensors", "layer_0_keys" (encoder/decoder layer or block 0, with shapes; the other layers repeat them),
    "other_keys" (with shapes)}, metadata."""
    import re

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in sorted(f.keys())}
        meta = f.metadata()
    layer = re.compile(r"\.(layers|block)\.(\d+)\.")
    first = {k: v for k, v in shapes.items() if (mm := layer.search(k)) and mm.group(2) == "0"}
    other = {k: v for k, v in shapes.items() if not layer.search(k)}
    return {"num_tensors": len(shapes), "layer_0_keys": first, "other_keys": other}, meta


class NoiseProcessor:
    """Adds fixed uniform noise in [-NOISE, NOISE] to the processed scores (robustness check)."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids, scores):
        noise = (torch.rand(scores.shape, generator=self.g) * 2 - 1) * NOISE
        return scores + noise


def gen(model, enc, capture, where, noise_seed=None, **kw):
    from transformers import LogitsProcessorList

    if noise_seed is not None:
        kw = dict(kw, logits_processor=LogitsProcessorList([NoiseProcessor(noise_seed)]))
    with torch.no_grad(), capture(where):
        return model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def processed_logprobs(gc, logits_t, prefix, max_length, no_repeat, forced_bos):
    """The scores generate() ranks at one step, from the raw logits of that step: log_softmax, then
    no_repeat_ngram / bad_words (single-token, i.e. Marian's pad) -> -inf, forced BOS at cur_len 1, forced
    EOS at cur_len max_length-1 (one-hot 0), then log_softmax again if renormalize_logits.
    Returns (scores, forced)."""
    cur_len = len(prefix)
    lp = torch.log_softmax(logits_t.float(), dim=-1)
    forced = False
    if no_repeat and cur_len >= no_repeat:
        tail = tuple(prefix[cur_len - no_repeat + 1:])
        for i in range(cur_len - no_repeat + 1):
            if tuple(prefix[i:i + no_repeat - 1]) == tail:
                lp[prefix[i + no_repeat - 1]] = -float("inf")
    for bad in gc.bad_words_ids or []:
        if len(bad) == 1:
            lp[bad[0]] = -float("inf")
    if forced_bos is not None and cur_len == 1:
        lp = torch.full_like(lp, -float("inf"))
        lp[forced_bos] = 0.0
        forced = True
    if gc.forced_eos_token_id is not None and cur_len == max_length - 1:
        lp = torch.full_like(lp, -float("inf"))
        lp[gc.forced_eos_token_id] = 0.0
        forced = True
    if gc.renormalize_logits:
        lp = torch.log_softmax(lp, dim=-1)
    return lp, forced


def teacher_forced_logits(model, enc, toks):
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    decoder_input_ids=torch.tensor([toks[:-1]]))
    return out.logits[0]


def greedy_margin(model, enc, seq, max_length, forced_bos):
    """min over the free (not forced) greedy steps of top-1 minus top-2 of the processed scores."""
    logits = teacher_forced_logits(model, enc, seq)
    gaps = []
    for t in range(len(seq) - 1):
        lp, forced = processed_logprobs(model.generation_config, logits[t], seq[:t + 1], max_length, None, forced_bos)
        if not forced:
            top2 = torch.topk(lp, 2).values
            gaps.append(float(top2[0] - top2[1]))
    return min(gaps) if gaps else None


def recompute_beam_score(model, enc, seq, gen_len, prompt_len, max_length, length_penalty, no_repeat, forced_bos):
    """Teacher-forced re-scoring of one returned beam: sum over its generated tokens of processed_logprobs(),
    divided by gen_len ** length_penalty."""
    toks = seq[:prompt_len + gen_len]
    logits = teacher_forced_logits(model, enc, toks)
    total = 0.0
    for t in range(prompt_len - 1, len(toks) - 1):
        lp, _ = processed_logprobs(model.generation_config, logits[t], toks[:t + 1], max_length, no_repeat, forced_bos)
        total += float(lp[toks[t + 1]])
    return total / (gen_len ** length_penalty)


def gen_settings(model, call_kwargs):
    """which effective settings came from generation_config.json (model.generation_config) vs the call."""
    gc = model.generation_config.to_diff_dict()
    gc.pop("transformers_version", None)
    from_file = {k: v for k, v in sorted(gc.items()) if k not in call_kwargs}
    return {"call_kwargs": {k: v for k, v in call_kwargs.items()}, "from_generation_config": from_file}


def ends_with_eos(ids, eos, fill):
    """True when the hypothesis (ids without trailing fill) ends with eos."""
    s = list(ids)
    while s and s[-1] == fill and fill != eos:
        s.pop()
    return bool(s) and s[-1] == eos


def record_call(calls, name, settings):
    """generate() settings are the same for every sentence: keep them once per call kind."""
    if name in calls:
        assert calls[name] == settings, (name, calls[name], settings)
    calls[name] = settings


def sentence_reference(model, tok, text, capture, idx, eos, dec_start, calls, extra_gen=None, forced_bos=None,
                       first_step=False, label="", sp=None):
    extra_gen = dict(extra_gen or {})
    enc = tok(text, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    entry = {
        "text": text,
        "source_ids": ids,
        "source_pieces": tok.tokenize(text),
        "source_tokens": tok.convert_ids_to_tokens(ids),
    }
    if sp is not None:  # tokenizers-backend tokenizer: compare with the SentencePiece library itself
        sp_pieces = sp.encode(text, out_type=str)
        entry["sentencepiece_pieces_equal"] = sp_pieces == entry["source_pieces"]
        if not entry["sentencepiece_pieces_equal"]:
            entry["sentencepiece_pieces"] = sp_pieces
    dec_prefix = [dec_start] + ([forced_bos] if forced_bos is not None else [])
    if first_step:
        with torch.no_grad():
            enc_out = model.get_encoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            h = enc_out.last_hidden_state[0]
            n = h.numel()
            if n < HIDDEN_FULL_LIMIT:
                entry["encoder_last_hidden_state"] = {"shape": list(h.shape), "values": f32list(h)}
            else:
                entry["encoder_last_hidden_state"] = {"shape": list(h.shape), "first_64": f32list(h.reshape(-1)[:64]),
                                                      "sum": _F32(float(h.double().sum()))}
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        decoder_input_ids=torch.tensor([dec_prefix]))
            lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            entry["first_step_logprobs"] = {
                "decoder_input_ids": dec_prefix,
                "argmax": int(lp.argmax()),
                "values": f32list(lp),
            }
            if forced_bos is not None:
                lp0 = torch.log_softmax(out.logits[0, 0].float(), dim=-1)
                entry["first_step_logprobs_before_forced_bos"] = {
                    "decoder_input_ids": [dec_start], "argmax": int(lp0.argmax()), "values": f32list(lp0)}

    tag = f"sentence {idx}{label}"
    # greedy
    gkw = dict(GREEDY_KW, **extra_gen)
    g = gen(model, enc, capture, f"{tag}: greedy", **gkw)[0].tolist()
    g_noise = gen(model, enc, capture, f"{tag}: greedy+noise", noise_seed=SEED + 7 + idx, **gkw)[0].tolist()
    assert g_noise == g, ("greedy unstable under noise", g, g_noise)
    record_call(calls, "greedy", gen_settings(model, gkw))
    entry["greedy"] = {
        "ids": g,
        "text": decode(tok, g),
        "new_tokens": len(g) - 1,
        "ends_with_eos": g[-1] == eos,
        "min_top1_top2_gap": _F32(greedy_margin(model, enc, g, 1 + NEW_TOKENS, forced_bos)),
    }
    # beam with scores
    bkw = dict(BEAM_KW, **extra_gen)
    b = gen(model, enc, capture, f"{tag}: beam", output_scores=True, return_dict_in_generate=True, **bkw)
    b_plain = gen(model, enc, capture, f"{tag}: beam (plain)", **bkw)
    b_noise = gen(model, enc, capture, f"{tag}: beam+noise", noise_seed=SEED + 17 + idx, **bkw)
    seqs = b.sequences.tolist()
    assert b_plain.tolist() == seqs, "output_scores changed the beam result"
    assert b_noise.tolist() == seqs, ("beam unstable under noise", seqs, b_noise.tolist())
    fill = model.generation_config.pad_token_id
    gen_lens = [int(x) for x in ((b.beam_indices + 1).bool()).sum(dim=1).tolist()]
    for s_ids, n_gen, score in zip(seqs, gen_lens, b.sequences_scores.tolist()):
        re_score = recompute_beam_score(model, enc, s_ids, n_gen, 1, 1 + NEW_TOKENS, BEAM_KW["length_penalty"],
                                        BEAM_KW["no_repeat_ngram_size"], forced_bos)
        assert abs(re_score - score) < 2e-5, ("beam score recomputation", re_score, score, s_ids)
    record_call(calls, "beam", gen_settings(model, dict(bkw, output_scores=True, return_dict_in_generate=True)))
    entry["beam"] = {
        "ids": seqs,
        "texts": [decode(tok, s) for s in seqs],
        "sequences_scores": f32list(b.sequences_scores),
        "ends_with_eos": [ends_with_eos(s, eos, fill) for s in seqs],
        "generated_lengths": gen_lens,
        "num_steps": len(b.scores),
    }
    # checkpoint defaults
    dkw = dict(extra_gen)
    d = gen(model, enc, capture, f"{tag}: beam_default", **dkw)[0].tolist()
    record_call(calls, "beam_default", gen_settings(model, dkw))
    entry["beam_default"] = {
        "ids": d,
        "text": decode(tok, d),
        "ends_with_eos": ends_with_eos(d, eos, fill),
    }
    return entry


# Beam-score bookkeeping of transformers 5 (documented in every reference.json).
BEAM_SCORE_NOTE = (
    "transformers 5 beam search (generation/utils.py _beam_search): per step log_probs = "
    "log_softmax(logits) then the logits processors (bad_words / no_repeat_ngram / forced bos/eos set -inf "
    "or 0; renormalize_logits=true re-applies log_softmax LAST); candidates = running sum + log_probs, top "
    "2*num_beams kept; a candidate ending in EOS (or reaching max_length) is finalised with score "
    "sum_logprobs / (generated_len ** length_penalty), generated_len = cur_len + 1 - decoder_prompt_len "
    "(tokens after the decoder prompt, the final EOS and a forced BOS included); only candidates ranked in "
    "the top num_beams may finalise. sequences_scores = that finalised score. Shorter returned sequences "
    "are right-filled with (pad_token_id or eos_token_id) -- a pad id of 0 is falsy, so T5 fills with EOS=1."
)


def common_schema(extra=None):
    s = {
        "model / architecture": "fixture dir / HF class used to load it",
        "versions": "python and package versions that produced these files",
        "compute": "float32, CPU, torch.set_num_threads(1), deterministic algorithms, attn_implementation eager",
        "special_tokens": "pad / eos / unk / bos / decoder_start ids and strings (config, generation_config, "
                          "tokenizer)",
        "spm": "SentencePiece model(s): trainer + normalizer spec (precompiled_charsmap size in bytes), piece types",
        "vocab_layout": "how the model ids relate to the SentencePiece piece ids",
        "weights": "init recipe (seed, stds) and the EOS tweak applied before saving; safetensors tensor count, "
                   "the keys + shapes of layer 0 (other layers repeat them with their index) and every non-layer key",
        "generate_calls": "per generate() kind: call_kwargs passed by the script, and from_generation_config = every "
                          "generation_config.json value that was not overridden by the call (so it applied)",
        "generation_config_json": "the exact content of generation_config.json as written",
        "config_json_notes": "what differs from a bare save_pretrained() config.json and why",
        "loading_info": "non-empty output_loading_info of AutoModelForSeq2SeqLM.from_pretrained(dir) (none expected)",
        "warnings": "every distinct transformers log warning / Python warning: kind, message (fixture paths "
                    "replaced by <fixture dir>), count, and the calls that emitted it (transformers' warning_once "
                    "cache is cleared per fixture)",
        "beam_search_note": "how transformers 5 scores / finalises / pads beam hypotheses",
        "cases[i].text": "the source sentence",
        "cases[i].source_ids": "tokenizer(text).input_ids (special tokens included)",
        "cases[i].source_pieces": "tokenizer.tokenize(text) (no special tokens)",
        "cases[i].source_tokens": "convert_ids_to_tokens(source_ids) (shows which pieces became <unk>)",
        "cases[i].sentencepiece_pieces_equal": "(T5 only) whether the SentencePiece library's encode(text, "
                                               "out_type=str) gives the same pieces as the tokenizer.json pipeline "
                                               "(if not, "
                                               "sentencepiece_pieces holds them)",
        "cases[0].encoder_last_hidden_state": "model.get_encoder()(input_ids).last_hidden_state[0]: shape [T, d_model] "
                                             "and row-major float32 values (all if < 2000 floats, else first_64 + sum)",
        "cases[0].first_step_logprobs": "log_softmax(logits[0, -1]) over the full model vocab for decoder_input_ids "
                                        "(the decoder start token, plus the forced language token for M2M100); raw "
                                        "model output, no logits processors; argmax = its argmax",
        "cases[i].greedy": "generate(num_beams=1, do_sample=False, max_new_tokens=20) + the checkpoint's "
                           "generation_config for everything not passed (settings.from_generation_config): ids = full "
                           "returned sequence incl. the decoder start token; text = decode(ids, "
                           "skip_special_tokens=True); min_top1_top2_gap = smallest top-1 minus top-2 of the processed "
                           "scores over the greedy steps (forced BOS / EOS steps excluded)",
        "cases[i].beam": "generate(num_beams=4, length_penalty=0.6, no_repeat_ngram_size=3, num_return_sequences=2, "
                         "early_stopping=True, max_new_tokens=20, do_sample=False, output_scores=True, "
                         "return_dict_in_generate=True): ids (2 sequences, right-filled as HF returns them), texts, "
                         "sequences_scores (float32), ends_with_eos per sequence, generated_lengths (tokens after "
                         "the decoder start, from beam_indices), num_steps (decoding steps run)",
        "cases[i].beam_default": "generate() with only the checkpoint's generation_config (+ forced_bos_token_id for "
                                 "M2M100): ids and text",
        "robustness": "every greedy / beam result was re-run with uniform noise in [-1e-4, 1e-4] added to the "
                      "processed scores and did not change",
        "beam_score_check": "every beam sequences_scores value equals (|diff| < 2e-5, asserted) a teacher-forced "
                            "re-scoring: sum over the generated tokens of the processed log-prob (log_softmax; "
                            "no_repeat_ngram(3) and bad_words -> -inf; forced BOS at step 1 / forced EOS at "
                            "max_length-1 -> one-hot 0; log_softmax again when renormalize_logits) divided by "
                            "generated_length ** 0.6",
    }
    if extra:
        s.update(extra)
    return s


def check_eos_paths(cases, eos, max_new, key="beam"):
    early, maxlen = 0, 0
    for c in cases:
        for s, l, e in zip(c[key]["ids"], c[key]["generated_lengths"], c[key]["ends_with_eos"]):
            if e and l < max_new:
                early += 1
            if l == max_new:
                maxlen += 1
    return early, maxlen


def finish(out, ref, limit=300_000):
    write_json(out / "reference.json", ref)
    total = 0
    for p in sorted(out.iterdir()):
        total += p.stat().st_size
    assert total < limit, f"{out.name}: {total} bytes"
    print(f"[{out.name}] {total} bytes: " + ", ".join(f"{p.name}={p.stat().st_size}" for p in sorted(out.iterdir())))


# --------------------------------------------------------------------------
# Marian (opus-mt layout)
# --------------------------------------------------------------------------

MARIAN_SRC_VOCAB = 180
MARIAN_TGT_VOCAB = 200
MARIAN_EOS_BIAS = 3.0  # added to final_logits_bias[eos]
MARIAN_STD, MARIAN_EMB_STD = 0.25, 0.5
MARIAN_BIAS_STD = 0.5


def build_marian():
    import sentencepiece as spm
    from transformers import AutoTokenizer, MarianConfig, MarianMTModel

    out = FIX / "tiny-marian"
    fresh_dir(out)
    reset_warning_once()
    capture = Capture(out)
    seed = SEED
    en, de = corpus("en"), corpus("de")
    with tempfile.TemporaryDirectory() as td:
        src_proto = train_spm(en, "unigram", MARIAN_SRC_VOCAB, td)
        tgt_proto = train_spm(de, "unigram", MARIAN_TGT_VOCAB, td)
    (out / "source.spm").write_bytes(src_proto)
    (out / "target.spm").write_bytes(tgt_proto)
    sp_src = spm.SentencePieceProcessor(model_proto=src_proto)
    sp_tgt = spm.SentencePieceProcessor(model_proto=tgt_proto)
    for sp in (sp_src, sp_tgt):
        assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]

    counts = piece_counts(sp_src, en) + piece_counts(sp_tgt, de)
    vocab = frequency_vocab(["</s>", "<unk>"], counts, [sp_src, sp_tgt])
    for t in ("<s>",):
        assert t not in vocab
    vocab["<pad>"] = max(vocab.values()) + 1  # convert_marian_to_pytorch.add_to_vocab_
    pad = vocab["<pad>"]
    V = len(vocab)
    with open(out / "vocab.json", "w", encoding="utf-8") as f:  # MarianTokenizer.save_vocabulary / save_json
        json.dump(vocab, f, indent=2)
    (out / "tokenizer_config.json").write_text(json.dumps({"target_lang": "de", "source_lang": "en"}))

    cfg = MarianConfig(
        vocab_size=V, decoder_vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, activation_function="swish", scale_embedding=True,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True, pad_token_id=pad,
        decoder_start_token_id=pad, eos_token_id=0, bos_token_id=0, forced_eos_token_id=0, dropout=0.1,
        attention_dropout=0.0, activation_dropout=0.0, architectures=["MarianMTModel"],
    )
    torch.manual_seed(seed)
    model = MarianMTModel(cfg).eval()
    g = init_weights(model, seed + 1, std=MARIAN_STD, emb_std=MARIAN_EMB_STD)
    with torch.no_grad():
        model.model.shared.weight[pad].zero_()  # the converter appends a zero row for <pad>
        bias = torch.randn((1, V), generator=g) * MARIAN_BIAS_STD
        bias[0, pad] = 0.0
        bias[0, 0] += MARIAN_EOS_BIAS
        model.final_logits_bias.copy_(bias)
    assert model.lm_head.weight.data_ptr() == model.model.shared.weight.data_ptr()
    save_model(model, out)
    gen_values = {"bad_words_ids": [[pad]], "bos_token_id": 0, "decoder_start_token_id": pad, "eos_token_id": 0,
                  "forced_eos_token_id": 0, "max_length": 64, "num_beams": 4, "pad_token_id": pad,
                  "renormalize_logits": True}
    gen_written = write_gen_config(out, gen_values)
    # the opus-mt converter passed these generation keys to MarianConfig, so they sit in config.json too
    legacy = {"bad_words_ids": [[pad]], "max_length": 64, "num_beams": 4}
    patch_config(out, set_keys=legacy)
    for name in ("tokenizer.json", "special_tokens_map.json"):
        assert not (out / name).exists()

    # ---- reload from disk
    with capture("AutoTokenizer.from_pretrained"):
        tok = AutoTokenizer.from_pretrained(str(out))
    assert type(tok).__name__ == "MarianTokenizer", type(tok)
    m, info = load_model(out, capture)
    assert type(m).__name__ == "MarianMTModel"
    assert not info, info
    sd0, sd1 = model.state_dict(), m.state_dict()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    assert m.generation_config.renormalize_logits is True and m.generation_config.num_beams == 4
    assert tok.pad_token_id == pad and tok.eos_token_id == 0 and tok.unk_token_id == 1

    cases, calls = [], {}
    for i, text in enumerate(SOURCES):
        cases.append(sentence_reference(m, tok, text, capture, i, eos=0, dec_start=pad, calls=calls,
                                        first_step=(i == 0)))
    early, maxlen = check_eos_paths(cases, 0, NEW_TOKENS)
    assert early >= 1, "no beam hypothesis ends with EOS early"

    keys, meta = safetensors_keys(out / "model.safetensors")
    src_in_vocab = sum(sp_src.id_to_piece(i) in vocab for i in range(sp_src.get_piece_size()))
    tgt_in_vocab = sum(sp_tgt.id_to_piece(i) in vocab for i in range(sp_tgt.get_piece_size()))
    ref = {
        "model": "tiny-marian",
        "architecture": type(m).__name__,
        "tokenizer_class": type(tok).__name__,
        "versions": all_versions(),
        "compute": {"dtype": "float32", "torch_num_threads": torch.get_num_threads(), "attn_implementation": "eager"},
        "special_tokens": {
            "pad": {"id": pad, "token": "<pad>"}, "eos": {"id": 0, "token": "</s>"}, "unk": {"id": 1, "token": "<unk>"},
            "bos": {"id": 0, "note": "config bos_token_id 0 (= </s>); never used, Marian has no BOS"},
            "decoder_start": {"id": pad, "token": "<pad>"},
            "tokenizer_adds": "</s> appended to every source; nothing prepended",
        },
        "spm": {"source.spm": spm_info(src_proto), "target.spm": spm_info(tgt_proto)},
        "vocab_layout": {
            "vocab_json_size": V,
            "description": "vocab.json is a joint token -> id map (opus-mt style); ids are NOT spm piece ids. "
                           "</s>=0, <unk>=1, then pieces of both spm models by descending frequency in the "
                           "segmented training corpora (ties by piece string), then never-produced pieces "
                           "(source spm order, then target spm order), <pad> last. MarianTokenizer encodes with "
                           "source.spm (encode(text, out_type=str)) and maps each piece through vocab.json; a "
                           "piece missing from vocab.json (e.g. an unknown character) becomes <unk>=1. <s> is "
                           "not in vocab.json.",
            "source_spm_pieces_in_vocab_json": src_in_vocab,
            "target_spm_pieces_in_vocab_json": tgt_in_vocab,
            "decode": "transformers 5 MarianTokenizer._decode defaults use_source_tokenizer to (not separate_vocabs) "
                      "= True: generated ids -> vocab.json tokens -> SOURCE spm decode_pieces (not target.spm); "
                      "special tokens skipped with skip_special_tokens",
        },
        "weights": {
            "init": f"torch.manual_seed({seed}) then init_weights(seed={seed + 1}): 2-D weights N(0, 0.25^2), shared "
                    "embedding N(0, 0.5^2), LayerNorm weight 1+N(0, 0.1^2) / bias N(0, 0.1^2), linear biases "
                    "N(0, 0.1^2); shared[pad] row = 0 (as the opus-mt converter appends it)",
            "final_logits_bias": f"N(0, {MARIAN_BIAS_STD}^2) from the same generator, [pad] = 0, then "
                                 f"[eos=0] += {MARIAN_EOS_BIAS} (EOS tweak so some beams end early)",
            "positions": "static sinusoidal MarianSinusoidalPositionalEmbedding, NOT stored in model.safetensors: "
                         "angle(pos, j) = pos / 10000^(2*(j//2)/d_model) (numpy float64, then float32); features "
                         "[0, d/2) = sin(angle[:, 0::2]), [d/2, d) = cos(angle[:, 1::2]) (not interleaved); positions "
                         "0, 1, 2, ... for encoder and decoder",
            "tied": "lm_head.weight = model.shared.weight = encoder/decoder embed_tokens (one tensor on disk)",
            "embed_scale": "sqrt(d_model) on token embeddings (scale_embedding true)",
            "safetensors_keys": keys,
            "safetensors_metadata": meta,
        },
        "generation_config_json": gen_written,
        "config_json_notes": {
            "legacy_generation_keys_added": legacy,
            "why": "the opus-mt converter passed num_beams / bad_words_ids / max_length to MarianConfig, so published "
                   "opus-mt config.json files carry them; transformers 5 pops them on load (generation_config.json "
                   "wins). dtype and torch_dtype = float32 added; keys sorted.",
        },
        "loading_info": info,
        "beam_search_note": BEAM_SCORE_NOTE,
        "eos_paths": {"beam_hypotheses_ending_with_eos_before_20": early, "beam_hypotheses_at_20_new_tokens": maxlen,
                      "note": "forced_eos_token_id=0 (from generation_config) forces EOS as the last token at "
                              "max_length-1, so length-capped hypotheses also end with </s>"},
        "generate_calls": calls,
        "warnings": capture.events,
        "schema": common_schema(),
        "cases": cases,
    }
    finish(out, ref)


# --------------------------------------------------------------------------
# T5 (flan-t5 layout)
# --------------------------------------------------------------------------

T5_SPM_VOCAB = 128
T5_MODEL_VOCAB = 136
T5_EOS_SCALE = 1.0  # no EOS tweak needed: the seed already gives early-EOS and length-capped beams


def t5_corpus():
    lines = []
    for lang in ("en", "de"):
        lines += corpus(lang)
    for k, line in enumerate(corpus("en")):  # every English line once more with a task prefix (3 of 4 translate)
        lines.append(T5_PREFIXES[0 if k % 4 else 1] + line)
    return lines


def build_t5():
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration, T5Tokenizer

    out = FIX / "tiny-t5"
    fresh_dir(out)
    reset_warning_once()
    capture = Capture(out)
    seed = SEED + 100
    lines = t5_corpus()
    with tempfile.TemporaryDirectory() as td:
        proto = train_spm(lines, "unigram", T5_SPM_VOCAB, td, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
        tdp = Path(td) / "spm"
        tdp.mkdir()
        (tdp / "spiece.model").write_bytes(proto)
        with capture("T5Tokenizer.from_pretrained(dir with only spiece.model, extra_ids=0)"):
            tok0 = T5Tokenizer.from_pretrained(str(tdp), extra_ids=0, model_max_length=512)
        with capture("T5Tokenizer.save_pretrained"):
            tok0.save_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    if not (out / "spiece.model").exists():
        (out / "spiece.model").write_bytes(proto)
    assert (out / "spiece.model").read_bytes() == proto
    for name in ("special_tokens_map.json", "added_tokens.json"):
        if (out / name).exists():
            (out / name).unlink()
    assert (out / "tokenizer.json").exists()
    assert len(tok0) == T5_SPM_VOCAB, len(tok0)
    # drop the load-time flags transformers 5 persists from from_pretrained(local dir)
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    dropped = {k: tc.pop(k) for k in ("is_local", "local_files_only") if k in tc}
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")

    cfg = T5Config(
        vocab_size=T5_MODEL_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.1, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, architectures=["T5ForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg).eval()
    # transformers 5's T5Config always sets tie_word_embeddings=True (keeping scale_decoder_outputs=False
    # for an explicit False), so a freshly built model shares lm_head with `shared`: untie it (flan-t5 has both).
    if model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr():
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    assert cfg.scale_decoder_outputs is False
    init_weights(model, seed + 1, std=0.2, emb_std=0.5, rel_std=0.5)
    with torch.no_grad():
        model.lm_head.weight[1] *= T5_EOS_SCALE
    # save by hand: save_pretrained would treat lm_head as tied to shared and drop it
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
          if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
    assert not torch.equal(sd["lm_head.weight"], sd["shared.weight"])
    save_file({k: sd[k] for k in sorted(sd)}, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)
    model.config.save_pretrained(str(out))
    gen_values = {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    gen_written = write_gen_config(out, gen_values)
    patch_config(out, set_keys={"tie_word_embeddings": False}, drop_keys=("scale_decoder_outputs",))

    # ---- reload from disk
    with capture("AutoTokenizer.from_pretrained"):
        tok = AutoTokenizer.from_pretrained(str(out))
    m, info = load_model(out, capture)
    assert type(m).__name__ == "T5ForConditionalGeneration"
    assert m.config.scale_decoder_outputs is False
    assert m.lm_head.weight.data_ptr() != m.shared.weight.data_ptr()
    assert torch.equal(m.lm_head.weight, sd["lm_head.weight"]) and torch.equal(m.shared.weight, sd["shared.weight"])
    msd = m.state_dict()
    for k, v in sd.items():
        assert torch.equal(msd[k], v), k
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token_id == 2
    # tokenizer.json ids == spm ids
    tj = json.loads((out / "tokenizer.json").read_text())
    assert [p[0] for p in tj["model"]["vocab"]] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]

    cases, calls = [], {}
    for i, text in enumerate(T5_SOURCES):
        cases.append(sentence_reference(m, tok, text, capture, i, eos=1, dec_start=0, calls=calls,
                                        first_step=(i == 0), sp=sp))
    early, maxlen = check_eos_paths(cases, 1, NEW_TOKENS)
    assert early >= 1 and maxlen >= 1, (early, maxlen)

    keys, meta = safetensors_keys(out / "model.safetensors")
    ref = {
        "model": "tiny-t5",
        "architecture": type(m).__name__,
        "tokenizer_class": type(tok).__name__,
        "versions": all_versions(),
        "compute": {"dtype": "float32", "torch_num_threads": torch.get_num_threads(), "attn_implementation": "eager"},
        "special_tokens": {
            "pad": {"id": 0, "token": "<pad>"}, "eos": {"id": 1, "token": "</s>"}, "unk": {"id": 2, "token": "<unk>"},
            "bos": None, "decoder_start": {"id": 0, "token": "<pad>"},
            "tokenizer_adds": "</s> appended to every source (TemplateProcessing $A </s>); nothing prepended",
            "extra_ids": 0,
        },
        "spm": {"spiece.model": spm_info(proto)},
        "tokenizer_json": {
            "normalizer": tj["normalizer"] and {k: (v if k != "precompiled_charsmap" else f"<{len(v)} base64 chars>")
                                                 for k, v in tj["normalizer"].items()},
            "pre_tokenizer": tj["pre_tokenizer"],
            "post_processor_type": tj["post_processor"]["type"] if tj["post_processor"] else None,
            "decoder": tj["decoder"],
            "model_type": tj["model"]["type"], "unk_id": tj["model"].get("unk_id"),
            "byte_fallback": tj["model"].get("byte_fallback"),
            "added_tokens": [{"id": a["id"], "content": a["content"], "special": a["special"]}
                             for a in tj["added_tokens"]],
        },
        "tokenizer_config_dropped_keys": dropped,
        "vocab_layout": {
            "tokenizer_size": len(tok), "model_vocab_size": T5_MODEL_VOCAB,
            "description": "tokenizer.json Unigram vocab == spiece.model pieces in order (token id == spm piece id, "
                           f"asserted); model vocab padded to {T5_MODEL_VOCAB}: ids {T5_SPM_VOCAB}.."
                           f"{T5_MODEL_VOCAB - 1} have no token (their logits are "
                           "real model outputs; decode() drops them)",
        },
        "weights": {
            "init": f"torch.manual_seed({seed}) then init_weights(seed={seed + 1}): 2-D weights N(0, 0.2^2), "
                    "shared and lm_head N(0, 0.5^2), relative_attention_bias N(0, 0.5^2), RMSNorm weights "
                    "1+N(0, 0.1^2)",
            "eos_tweak": (f"lm_head.weight[eos=1] *= {T5_EOS_SCALE} (before saving)" if T5_EOS_SCALE != 1.0 else
                          "none: with this seed some beams already end with EOS early and others hit 20 tokens"),
            "lm_head": "separate tensor (tie_word_embeddings false); decoder output NOT multiplied by d_model**-0.5",
            "saved_with": "safetensors.torch.save_file of the state dict minus encoder/decoder.embed_tokens "
                          "(aliases of shared); transformers 5 save_pretrained would drop lm_head.weight as 'tied'",
            "safetensors_keys": keys,
            "safetensors_metadata": meta,
        },
        "generation_config_json": gen_written,
        "config_json_notes": {
            "changes": "written by T5Config.save_pretrained, then tie_word_embeddings set to false (transformers 5 "
                       "writes true: its T5Config forces tie_word_embeddings=True and records the original value as "
                       "scale_decoder_outputs), scale_decoder_outputs dropped, dtype/torch_dtype added, keys sorted. "
                       "On load transformers 5 reads tie_word_embeddings=false as scale_decoder_outputs=false and, "
                       "because shared.weight and lm_head.weight differ on disk, keeps them untied (see warnings).",
        },
        "loading_info": info,
        "beam_search_note": BEAM_SCORE_NOTE,
        "eos_paths": {"beam_hypotheses_ending_with_eos_before_20": early, "beam_hypotheses_at_20_new_tokens": maxlen},
        "generate_calls": calls,
        "warnings": capture.events,
        "schema": common_schema({"cases[i].beam_default": "generate() with only generation_config.json (flan-t5 style: "
                                 "no num_beams / max_length, so greedy with the global default max_length 20 = "
                                 "decoder start + 19... see settings): ids and text"}),
        "cases": cases,
    }
    finish(out, ref)


# --------------------------------------------------------------------------
# M2M100
# --------------------------------------------------------------------------

M2M_SPM_VOCAB = 200
M2M_EOS_SCALE = 2.5
M2M_STD, M2M_EMB_STD = 0.25, 0.5


def build_m2m100():
    import sentencepiece as spm
    from transformers import AutoTokenizer, M2M100Config, M2M100ForConditionalGeneration
    from transformers.models.m2m_100.tokenization_m2m_100 import FAIRSEQ_LANGUAGE_CODES

    out = FIX / "tiny-m2m100"
    fresh_dir(out)
    reset_warning_once()
    capture = Capture(out)
    seed = SEED + 200
    langs = {lang: corpus(lang) for lang in ("en", "de", "fr")}
    lines = langs["en"] + langs["de"] + langs["fr"]
    with tempfile.TemporaryDirectory() as td:
        proto = train_spm(lines, "bpe", M2M_SPM_VOCAB, td)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    vocab = frequency_vocab(["<s>", "<pad>", "</s>", "<unk>"], piece_counts(sp, lines), [sp])
    (out / "sentencepiece.bpe.model").write_bytes(proto)
    with open(out / "vocab.json", "w", encoding="utf-8") as f:  # M2M100Tokenizer.save_vocabulary / save_json
        json.dump(vocab, f, indent=2)
    # hub (transformers 4) layout, written by hand: transformers 5's M2M100Tokenizer.save_pretrained writes
    # "extra_special_tokens": [] and the language tokens then load as NON-special tokens (len(tok) 201, decode
    # keeps "__fr__"); with additional_special_tokens listed they are special, as for facebook/m2m100_418M.
    lang_tokens = [f"__{c}__" for c in FAIRSEQ_LANGUAGE_CODES["m2m100"]]
    tcfg = {
        "additional_special_tokens": lang_tokens, "bos_token": "<s>", "eos_token": "</s>", "language_codes": "m2m100",
        "model_max_length": 1024, "num_madeup_words": 8, "pad_token": "<pad>", "sep_token": "</s>",
        "sp_model_kwargs": {}, "src_lang": None, "tgt_lang": None, "tokenizer_class": "M2M100Tokenizer",
        "unk_token": "<unk>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    V = len(vocab) + 100 + 8

    cfg = M2M100Config(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        scale_embedding=True, activation_function="relu", dropout=0.1, attention_dropout=0.1,
        activation_dropout=0.0, encoder_layerdrop=0.05, decoder_layerdrop=0.05, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, tie_word_embeddings=True,
        architectures=["M2M100ForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(cfg).eval()
    init_weights(model, seed + 1, std=M2M_STD, emb_std=M2M_EMB_STD)
    with torch.no_grad():
        model.model.shared.weight[1].zero_()  # fairseq's <pad> embedding row stays 0
        model.model.shared.weight[2] *= M2M_EOS_SCALE
    assert model.lm_head.weight.data_ptr() == model.model.shared.weight.data_ptr()
    save_model(model, out)
    gen_values = {"bos_token_id": 0, "decoder_start_token_id": 2, "early_stopping": True, "eos_token_id": 2,
                  "max_length": 64, "num_beams": 5, "pad_token_id": 1}
    gen_written = write_gen_config(out, gen_values)
    patch_config(out)

    # ---- reload from disk
    with capture("AutoTokenizer.from_pretrained"):
        tok = AutoTokenizer.from_pretrained(str(out))
    assert type(tok).__name__ == "M2M100Tokenizer", type(tok)
    tok.src_lang = "en"
    m, info = load_model(out, capture)
    assert not info, info
    sd0, sd1 = model.state_dict(), m.state_dict()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    fr, de, en_id = tok.get_lang_id("fr"), tok.get_lang_id("de"), tok.get_lang_id("en")
    assert tok.pad_token_id == 1 and tok.eos_token_id == 2 and tok.unk_token_id == 3 and tok.bos_token_id == 0
    assert len(tok) == len(vocab) + 100, len(tok)

    cases, calls, calls_de = [], {}, {}
    for i, text in enumerate(SOURCES):
        cases.append(sentence_reference(m, tok, text, capture, i, eos=2, dec_start=2, calls=calls, forced_bos=fr,
                                        extra_gen={"forced_bos_token_id": fr}, first_step=(i == 0)))
    de_case = sentence_reference(m, tok, SOURCES[0], capture, 0, eos=2, dec_start=2, calls=calls_de, forced_bos=de,
                                 extra_gen={"forced_bos_token_id": de}, first_step=True, label=" (tgt de)")
    early, maxlen = check_eos_paths(cases + [de_case], 2, NEW_TOKENS)
    assert early >= 1 and maxlen >= 1, (early, maxlen)

    keys, meta = safetensors_keys(out / "model.safetensors")
    ref = {
        "model": "tiny-m2m100",
        "architecture": type(m).__name__,
        "tokenizer_class": type(tok).__name__,
        "versions": all_versions(),
        "compute": {"dtype": "float32", "torch_num_threads": torch.get_num_threads(), "attn_implementation": "eager"},
        "src_lang": "en",
        "tgt_lang": "fr",
        "forced_bos_token_id": fr,
        "lang_ids": {"en": en_id, "fr": fr, "de": de},
        "special_tokens": {
            "bos": {"id": 0, "token": "<s>"}, "pad": {"id": 1, "token": "<pad>"}, "eos": {"id": 2, "token": "</s>"},
            "unk": {"id": 3, "token": "<unk>"}, "decoder_start": {"id": 2, "token": "</s>"},
            "tokenizer_adds": "source = [__en__] + pieces + [</s>] (src_lang token prepended, eos appended)",
        },
        "spm": {"sentencepiece.bpe.model": spm_info(proto)},
        "vocab_layout": {
            "vocab_json_size": len(vocab), "tokenizer_size": len(tok), "model_vocab_size": V,
            "description": "vocab.json (fairseq dictionary order): <s>=0 <pad>=1 </s>=2 <unk>=3, then spm pieces by "
                           "descending frequency in the segmented EN+DE+FR training text (ties by string), never-"
                           "produced pieces in spm order; ids are NOT spm ids (spm: <unk>=0 <s>=1 </s>=2). "
                           "Language tokens __xx__ for the 100 m2m100 codes (FAIRSEQ_LANGUAGE_CODES order) get ids "
                           "len(vocab.json) + i; 8 'madeup word' ids follow in the model vocab only (no token).",
            "piece_not_in_vocab": "M2M100Tokenizer maps an spm piece missing from vocab.json to <unk>=3",
        },
        "tokenizer_config_json": "written by hand in the transformers 4 / hub layout: additional_special_tokens = "
                                 "the 100 __xx__ tokens (FAIRSEQ_LANGUAGE_CODES['m2m100'] order), language_codes "
                                 "m2m100, num_madeup_words 8, src_lang / tgt_lang null, model_max_length 1024, "
                                 "tokenizer_class M2M100Tokenizer. transformers 5's own save_pretrained() of a fresh "
                                 "M2M100Tokenizer writes extra_special_tokens [] instead, and the language tokens then "
                                 "reload as NON-special (len(tokenizer) 201 instead of 301, decode(..., "
                                 "skip_special_tokens=True) keeps '__fr__').",
        "weights": {
            "init": f"torch.manual_seed({seed}) then init_weights(seed={seed + 1}): 2-D weights N(0, 0.25^2), shared "
                    "N(0, 0.5^2), LayerNorm weight 1+N(0, 0.1^2) / bias N(0, 0.1^2), linear biases N(0, 0.1^2); "
                    "shared[pad=1] = 0",
            "eos_tweak": f"shared.weight[eos=2] *= {M2M_EOS_SCALE} (tied: also the lm_head row and the decoder start "
                         "embedding)",
            "positions": "M2M100SinusoidalPositionalEmbedding (fairseq / tensor2tensor), computed, not stored: "
                         "half = d/2, freq_i = exp(-i * ln(10000) / (half - 1)), row p = [sin(p*freq) | cos(p*freq)] "
                         "(float32), row pad=1 zeroed; position of the t-th non-pad token = pad + 1 + t = 2, 3, ...",
            "tied": "lm_head.weight = model.shared.weight (one tensor on disk)",
            "embed_scale": "sqrt(d_model) (scale_embedding true)",
            "safetensors_keys": keys,
            "safetensors_metadata": meta,
        },
        "generation_config_json": gen_written,
        "config_json_notes": {"changes": "dtype/torch_dtype added, keys sorted"},
        "loading_info": info,
        "beam_search_note": BEAM_SCORE_NOTE,
        "eos_paths": {"beam_hypotheses_ending_with_eos_before_20": early, "beam_hypotheses_at_20_new_tokens": maxlen},
        "generate_calls": calls,
        "generate_calls_tgt_de": calls_de,
        "warnings": capture.events,
        "schema": common_schema({
            "cases[0].first_step_logprobs_before_forced_bos": "log_softmax of the logits for decoder_input_ids [</s>] "
                                                              "alone (the step whose output ForcedBOS overrides)",
            "cases[i] generate calls": "all pass forced_bos_token_id = lang id of fr (as the translation pipeline "
                                       "does); the forced token counts as a generated token",
            "case_tgt_de": "sentence 0 again with forced_bos_token_id = lang id of de",
        }),
        "cases": cases,
        "case_tgt_de": de_case,
    }
    finish(out, ref)


# --------------------------------------------------------------------------
# NLLB (nllb-200 layout: M2M100 model, tokenizer.json ids, no vocab.json)
# --------------------------------------------------------------------------

NLLB_SPM_VOCAB = 200
NLLB_EOS_SCALE = 2.5
NLLB_STD, NLLB_EMB_STD = 0.25, 0.5
NLLB_SRC, NLLB_TGT, NLLB_TGT2 = "eng_Latn", "fra_Latn", "deu_Latn"
NLLB_FR_SOURCE = "La fenêtre de l'église est très belle."  # corpus("fr") line, for the fra_Latn -> eng_Latn case
# generation_config max_length 200 (as nllb-200) must stay inside the sinusoidal table (not stored: costs no bytes),
# as 200 < 1024 does for nllb-200; with 64, transformers silently grows the table past the configured size
NLLB_MAX_POS = 256
NLLB_SIZE_LIMIT = 400_000  # 404-token vocab + 202-entry tokenizer files: a bit above the 300 KB of the others


def redact_charsmap(obj):
    """tokenizer.json normalizer with every precompiled_charsmap replaced by '<N base64 chars>'."""
    if isinstance(obj, dict):
        return {k: (f"<{len(v)} base64 chars>" if k == "precompiled_charsmap" else redact_charsmap(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_charsmap(v) for v in obj]
    return obj


def build_nllb():
    import sentencepiece as spm
    from transformers import AddedToken, AutoTokenizer, M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

    out = FIX / "tiny-nllb"
    fresh_dir(out)
    reset_warning_once()
    capture = Capture(out)
    # SEED + 314: of the offsets 300..323 tried (EOS scale 2.5), the first whose greedy outputs never just repeat the
    # forced language token and whose beams / default generations end both with EOS and at the length limit
    seed = SEED + 314
    codes = list(FAIRSEQ_LANGUAGE_CODES)
    assert len(codes) == 202 and NLLB_FR_SOURCE in corpus("fr")
    langs = {lang: corpus(lang) for lang in ("en", "de", "fr")}
    lines = langs["en"] + langs["de"] + langs["fr"]
    with tempfile.TemporaryDirectory() as td:
        proto = train_spm(lines, "bpe", NLLB_SPM_VOCAB, td)
        src = Path(td) / "spm"
        src.mkdir()
        (src / "sentencepiece.bpe.model").write_bytes(proto)
        # tokenizer.json as transformers 5's NllbTokenizer (tokenizers backend, NllbConverter vocab) serializes it.
        # The language codes must be passed explicitly: from_pretrained() of a directory holding only the spm model
        # adds none of them (eng_Latn -> <unk>). <mask> is left out at construction (transformers 5 would put it at
        # id 201, BEFORE the language codes) and added afterwards so that it comes last, as in nllb-200 (256203).
        with capture("NllbTokenizer.from_pretrained(dir with only sentencepiece.bpe.model)"):
            tok0 = NllbTokenizer.from_pretrained(str(src), additional_special_tokens=codes, mask_token=None)
            tok0.add_special_tokens({"mask_token": AddedToken("<mask>", lstrip=True, rstrip=False, normalized=True,
                                                              single_word=False, special=True)})
        saved = Path(td) / "saved"
        with capture("NllbTokenizer.save_pretrained"):
            tok0.save_pretrained(str(saved))
        (out / "tokenizer.json").write_bytes((saved / "tokenizer.json").read_bytes())
    (out / "sentencepiece.bpe.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]

    # ---- tokenizer.json id layout (fairseq: spm id + 1, then language codes, then <mask>)
    tj = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    tj_vocab = tj["model"]["vocab"]
    assert tj["model"]["type"] == "BPE"
    head = ["<s>", "<pad>", "</s>", "<unk>"]
    assert [tj_vocab[t] for t in head] == [0, 1, 2, 3]
    for i in range(3, sp.get_piece_size()):
        assert tj_vocab[sp.id_to_piece(i)] == i + 1, (i, sp.id_to_piece(i))
    n_base = sp.get_piece_size() + 1
    assert len(tj_vocab) == n_base
    added = {a["content"]: a for a in tj["added_tokens"]}
    assert [a["content"] for a in tj["added_tokens"]] == head + codes + ["<mask>"]
    for k, c in enumerate(codes):
        assert added[c]["id"] == n_base + k and added[c]["special"] and not added[c]["normalized"], c
    mask_id = n_base + len(codes)
    assert added["<mask>"]["id"] == mask_id
    pp = tj["post_processor"]
    assert pp["type"] == "TemplateProcessing"
    assert [next(iter(x.values()))["id"] for x in pp["single"]] == [NLLB_SRC, "A", "</s>"], pp["single"]
    assert pp["special_tokens"][NLLB_SRC]["ids"] == [added[NLLB_SRC]["id"]]
    V = mask_id + 1

    # ---- tokenizer_config.json / special_tokens_map.json in the hub (transformers 4) layout, by hand: transformers
    # 5's save_pretrained writes "backend", "extra_special_tokens" (instead of additional_special_tokens),
    # "src_lang": "eng_Latn", the load-time flags is_local / local_files_only and a 1e30 model_max_length.
    mask_json = {"__type": "AddedToken", "content": "<mask>", "lstrip": True, "normalized": True, "rstrip": False,
                 "single_word": False}
    tcfg = {
        "additional_special_tokens": codes, "bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>",
        "legacy_behaviour": False, "mask_token": mask_json, "model_max_length": 1024, "pad_token": "<pad>",
        "sep_token": "</s>", "sp_model_kwargs": {}, "src_lang": None, "tgt_lang": None,
        "tokenizer_class": "NllbTokenizer", "unk_token": "<unk>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    stmap = {
        "additional_special_tokens": codes, "bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>",
        "mask_token": {k: v for k, v in mask_json.items() if k != "__type"}, "pad_token": "<pad>", "sep_token": "</s>",
        "unk_token": "<unk>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(stmap, indent=2) + "\n")

    cfg = M2M100Config(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=NLLB_MAX_POS,
        scale_embedding=True, activation_function="relu", dropout=0.1, attention_dropout=0.1,
        activation_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, tie_word_embeddings=True,
        architectures=["M2M100ForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(cfg).eval()
    init_weights(model, seed + 1, std=NLLB_STD, emb_std=NLLB_EMB_STD)
    with torch.no_grad():
        model.model.shared.weight[1].zero_()  # fairseq's <pad> embedding row stays 0
        model.model.shared.weight[2] *= NLLB_EOS_SCALE
    assert model.lm_head.weight.data_ptr() == model.model.shared.weight.data_ptr()
    save_model(model, out)
    gen_values = {"bos_token_id": 0, "decoder_start_token_id": 2, "eos_token_id": 2, "max_length": 200,
                  "pad_token_id": 1}
    gen_written = write_gen_config(out, gen_values)
    # what nllb-200-distilled-600M's config.json carries besides the M2M100Config values
    legacy = {"max_length": 200, "num_hidden_layers": 2, "tokenizer_class": "NllbTokenizer"}
    patch_config(out, set_keys=legacy)
    for name in ("vocab.json", "added_tokens.json"):
        assert not (out / name).exists(), name

    # ---- reload from disk
    with capture("AutoTokenizer.from_pretrained"):
        tok = AutoTokenizer.from_pretrained(str(out))
    assert type(tok).__name__ == "NllbTokenizer", type(tok)
    assert tok.src_lang == NLLB_SRC and tok.legacy_behaviour is False
    lang_ids = {c: tok.convert_tokens_to_ids(c) for c in (NLLB_SRC, NLLB_TGT, NLLB_TGT2)}
    for c, i in lang_ids.items():
        assert i == added[c]["id"], (c, i, added[c]["id"])
    assert tok.convert_tokens_to_ids("fra_Latn") == added["fra_Latn"]["id"]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == \
        (0, 1, 2, 3, mask_id)
    assert len(tok) == V, (len(tok), V)
    assert set(codes) <= set(tok.all_special_tokens), "language codes did not load as special tokens"
    assert tok.decode([lang_ids[NLLB_TGT], 2], skip_special_tokens=True) == ""
    m, info = load_model(out, capture)
    assert type(m).__name__ == "M2M100ForConditionalGeneration"
    assert not info, info
    assert m.config.vocab_size == len(tok)
    sd0, sd1 = model.state_dict(), m.state_dict()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    en_id, fr, de = lang_ids[NLLB_SRC], lang_ids[NLLB_TGT], lang_ids[NLLB_TGT2]

    def check_source(case, src_id):
        ids = case["source_ids"]
        assert ids == [src_id] + tok.convert_tokens_to_ids(case["source_pieces"]) + [2], (ids, case["source_pieces"])

    cases, calls, calls_de, calls_fr = [], {}, {}, {}
    for i, text in enumerate(SOURCES):
        cases.append(sentence_reference(m, tok, text, capture, i, eos=2, dec_start=2, calls=calls, forced_bos=fr,
                                        extra_gen={"forced_bos_token_id": fr}, first_step=(i == 0), sp=sp))
    de_case = sentence_reference(m, tok, SOURCES[0], capture, 0, eos=2, dec_start=2, calls=calls_de, forced_bos=de,
                                 extra_gen={"forced_bos_token_id": de}, first_step=True, label=" (tgt deu_Latn)",
                                 sp=sp)
    for c in cases + [de_case]:
        check_source(c, en_id)
    # fra_Latn -> eng_Latn: setting src_lang replaces the post-processor with [fra_Latn] $A </s>
    tok.src_lang = NLLB_TGT
    fr_case = sentence_reference(m, tok, NLLB_FR_SOURCE, capture, len(SOURCES), eos=2, dec_start=2, calls=calls_fr,
                                 forced_bos=en_id, extra_gen={"forced_bos_token_id": en_id}, first_step=True,
                                 label=" (src fra_Latn, tgt eng_Latn)", sp=sp)
    check_source(fr_case, fr)
    tok.src_lang = NLLB_SRC
    early, maxlen = check_eos_paths(cases + [de_case, fr_case], 2, NEW_TOKENS)
    assert early >= 1 and maxlen >= 1, (early, maxlen)

    keys, meta = safetensors_keys(out / "model.safetensors")
    ref = {
        "model": "tiny-nllb",
        "architecture": type(m).__name__,
        "tokenizer_class": type(tok).__name__,
        "versions": all_versions(),
        "compute": {"dtype": "float32", "torch_num_threads": torch.get_num_threads(), "attn_implementation": "eager"},
        "src_lang": NLLB_SRC,
        "tgt_lang": NLLB_TGT,
        "forced_bos_token_id": fr,
        "lang_ids": lang_ids,
        "special_tokens": {
            "bos": {"id": 0, "token": "<s>"}, "pad": {"id": 1, "token": "<pad>"}, "eos": {"id": 2, "token": "</s>"},
            "unk": {"id": 3, "token": "<unk>"}, "mask": {"id": mask_id, "token": "<mask>"},
            "decoder_start": {"id": 2, "token": "</s>"},
            "tokenizer_adds": "source = [src_lang code] + pieces + [</s>] (legacy_behaviour false, asserted for every "
                              "case); tokenizer.json's post_processor is TemplateProcessing single [eng_Latn, $A, "
                              "</s>] (pair [eng_Latn, $A, $B, </s>]); setting tokenizer.src_lang = X replaces it with "
                              "the same template for X (case_src_fra). legacy_behaviour true would give pieces + "
                              "[</s>, src_lang] instead.",
            "layout": f"<s>=0 <pad>=1 </s>=2 <unk>=3, spm piece i (i >= 3) at i + 1 (fairseq offset; spm's own "
                      f"<unk>/<s>/</s> = 0/1/2 are not repeated), {len(codes)} language codes "
                      f"(FAIRSEQ_LANGUAGE_CODES order) at {n_base}..{n_base + len(codes) - 1} (added_tokens, special, "
                      f"normalized false), <mask>={mask_id} last (lstrip, normalized true); len(tokenizer) = "
                      f"model vocab_size = {V}",
        },
        "spm": {"sentencepiece.bpe.model": spm_info(proto)},
        "tokenizer_json": {
            "normalizer": redact_charsmap(tj["normalizer"]),
            "pre_tokenizer": tj["pre_tokenizer"],
            "post_processor": tj["post_processor"],
            "decoder": tj["decoder"],
            "model_type": tj["model"]["type"], "model_vocab_size": len(tj_vocab),
            "num_merges": len(tj["model"]["merges"]), "unk_token": tj["model"].get("unk_token"),
            "fuse_unk": tj["model"].get("fuse_unk"), "byte_fallback": tj["model"].get("byte_fallback"),
            "num_added_tokens": len(tj["added_tokens"]),
            "added_tokens_abridged": [{"id": a["id"], "content": a["content"], "special": a["special"],
                                       "normalized": a["normalized"], "lstrip": a["lstrip"]}
                                      for a in tj["added_tokens"][:5] + tj["added_tokens"][-2:]],
        },
        "vocab_layout": {
            "tokenizer_size": len(tok), "model_vocab_size": V, "tokenizer_json_model_vocab": len(tj_vocab),
            "description": "no vocab.json: ids come from tokenizer.json (BPE model vocab = <s> <pad> </s> <unk> + spm "
                           "pieces 3.. at spm id + 1; added_tokens = those 4 + the 202 language codes + <mask>). "
                           "model vocab_size = len(tokenizer) (no madeup words). nllb-200-distilled-600M itself has "
                           "vocab_size 256206 = len(tokenizer) 256204 + 2 unused rows.",
        },
        "tokenizer_config_json": "written by hand in the transformers 4 / hub layout: additional_special_tokens = the "
                                 "202 codes (FAIRSEQ_LANGUAGE_CODES order), legacy_behaviour false, src_lang / "
                                 "tgt_lang null (the tokenizer then defaults to eng_Latn), mask_token as an "
                                 "{'__type': 'AddedToken', lstrip: true, normalized: true} dict, model_max_length "
                                 "1024, sp_model_kwargs {}, tokenizer_class NllbTokenizer; special_tokens_map.json "
                                 "repeats the special tokens. transformers 5's save_pretrained() writes "
                                 "extra_special_tokens, backend, src_lang eng_Latn, is_local / local_files_only and "
                                 "model_max_length 1e30 instead. Reloaded with AutoTokenizer: language codes special "
                                 "(asserted), ids equal to tokenizer.json's (asserted).",
        "weights": {
            "init": f"torch.manual_seed({seed}) then init_weights(seed={seed + 1}): 2-D weights N(0, 0.25^2), shared "
                    "N(0, 0.5^2), LayerNorm weight 1+N(0, 0.1^2) / bias N(0, 0.1^2), linear biases N(0, 0.1^2); "
                    "shared[pad=1] = 0",
            "eos_tweak": f"shared.weight[eos=2] *= {NLLB_EOS_SCALE} (tied: also the lm_head row and the decoder start "
                         "embedding)",
            "positions": "M2M100SinusoidalPositionalEmbedding (fairseq / tensor2tensor), computed, not stored: "
                         "half = d/2, freq_i = exp(-i * ln(10000) / (half - 1)), row p = [sin(p*freq) | cos(p*freq)] "
                         "(float32), row pad=1 zeroed; position of the t-th non-pad token = pad + 1 + t = 2, 3, ...",
            "tied": "lm_head.weight = model.shared.weight (one tensor on disk)",
            "embed_scale": "sqrt(d_model) (scale_embedding true)",
            "safetensors_keys": keys,
            "safetensors_metadata": meta,
        },
        "generation_config_json": gen_written,
        "config_json_notes": {
            "legacy_keys_added": legacy,
            "changes": "nllb-200-distilled-600M's config.json also carries max_length 200, num_hidden_layers and "
                       "tokenizer_class NllbTokenizer (added here; transformers 5 ignores max_length there: "
                       "generation_config.json wins); layerdrop 0 as nllb-200; dtype/torch_dtype added; keys sorted",
        },
        "loading_info": info,
        "beam_search_note": BEAM_SCORE_NOTE,
        "eos_paths": {"beam_hypotheses_ending_with_eos_before_20": early, "beam_hypotheses_at_20_new_tokens": maxlen},
        "generate_calls": calls,
        "generate_calls_tgt_deu": calls_de,
        "generate_calls_src_fra": calls_fr,
        "warnings": capture.events,
        "schema": common_schema({
            "cases[i].sentencepiece_pieces_equal": "whether the SentencePiece library's encode(text, out_type=str) "
                                                   "gives the same pieces as the tokenizer.json pipeline (if not, "
                                                   "sentencepiece_pieces holds them)",
            "cases[0].first_step_logprobs_before_forced_bos": "log_softmax of the logits for decoder_input_ids [</s>] "
                                                              "alone (the step whose output ForcedBOS overrides)",
            "cases[0].first_step_logprobs": "log_softmax(logits[0, -1]) over the full model vocab for "
                                            "decoder_input_ids [</s>, forced target language code]; raw model "
                                            "output, no logits processors; argmax = its argmax (also in "
                                            "case_tgt_deu / case_src_fra)",
            "cases[i] generate calls": "eng_Latn -> fra_Latn: tokenizer src_lang eng_Latn, all generate() calls "
                                       "pass forced_bos_token_id = id of fra_Latn (as the translation pipeline does); "
                                       "the forced token counts as a generated token",
            "case_tgt_deu": "SOURCES[0] again with forced_bos_token_id = id of deu_Latn",
            "case_src_fra": "a French corpus sentence with tokenizer.src_lang = fra_Latn (source ids start with the "
                            "fra_Latn id) and forced_bos_token_id = id of eng_Latn",
            "cases[i].beam_default": "generate() with only generation_config.json (nllb-200 style: no num_beams, "
                                     "max_length 200, so greedy up to 200 tokens incl. the decoder start) + "
                                     "forced_bos_token_id: ids and text",
        }),
        "cases": cases,
        "case_tgt_deu": de_case,
        "case_src_fra": fr_case,
    }
    finish(out, ref, limit=NLLB_SIZE_LIMIT)


# --------------------------------------------------------------------------


BUILDERS = {"marian": build_marian, "t5": build_t5, "m2m100": build_m2m100, "nllb": build_nllb}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", metavar="NAME[,NAME...]", help="build only these fixtures: marian, t5, m2m100, nllb")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    hf_logging.disable_default_handler()  # warnings are captured into reference.json (Capture), not printed
    hf_logging.disable_progress_bar()

    names = list(BUILDERS)
    if args.only:
        names = []
        for n in (x.strip().rstrip("/") for x in args.only.split(",") if x.strip()):
            n = n[5:] if n.startswith("tiny-") else n
            if n not in BUILDERS:
                ap.error(f"--only: unknown fixture {n!r}; known: {', '.join(BUILDERS)}")
            if n not in names:
                names.append(n)
    for n in names:
        BUILDERS[n]()


if __name__ == "__main__":
    main()
