//! The encoder commands end to end: JSONL output in input order, inputs from arguments, files
//! (lines, JSONL, CSV) and stdin, and bad input reported per line.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::fixture;
use serde_json::Value;
use wordloom::tasks::embed::cosine;

/// A JSON array of numbers as f32.
fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn wordloom(args: &[&str], stdin: Option<&[u8]>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wordloom"))
        .args(args)
        .env("WORDLOOM_CACHE", fixture("../../.cache"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run wordloom");
    if let Some(bytes) = stdin {
        child.stdin.take().unwrap().write_all(bytes).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

fn jsonl(args: &[&str], stdin: Option<&[u8]>) -> Vec<Value> {
    let (ok, stdout, stderr) = wordloom(args, stdin);
    assert!(ok, "{args:?}: {stderr}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn model(name: &str) -> String {
    fixture(name).to_string_lossy().into_owned()
}

fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn classify_prints_jsonl_in_input_order_from_every_source() {
    let m = model("tiny-bert-cls");
    let from_args = jsonl(
        &[
            "classify",
            "-m",
            &m,
            "--json",
            "short",
            "a much longer text than that one",
            "mid length",
        ],
        None,
    );
    let texts: Vec<&str> = from_args
        .iter()
        .map(|v| v["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["short", "a much longer text than that one", "mid length"]
    );
    for v in &from_args {
        let scores = v["scores"].as_object().unwrap();
        assert_eq!(scores.len(), 3);
        let best = scores
            .values()
            .map(|s| s.as_f64().unwrap())
            .fold(0.0, f64::max);
        assert_eq!(v["score"].as_f64().unwrap(), best);
        assert_eq!(scores[v["label"].as_str().unwrap()].as_f64().unwrap(), best);
    }

    let dir = tempfile::tempdir().unwrap();
    let csv = write(
        &dir,
        "in.csv",
        b"id,text\n1,short\n2,\"a much longer text than that one\"\n3,mid length\n",
    );
    let jsonl_file = write(&dir, "in.jsonl", b"{\"text\": \"short\"}\n{\"text\": \"a much longer text than that one\"}\n{\"text\": \"mid length\"}\n");
    for file in [&csv, &jsonl_file] {
        let got = jsonl(&["classify", "-m", &m, "--json", "--file", file], None);
        assert_eq!(got, from_args, "{file}");
    }
    let piped = jsonl(
        &["classify", "-m", &m, "--json"],
        Some(b"short\na much longer text than that one\nmid length\n"),
    );
    assert_eq!(piped, from_args);

    let top1 = jsonl(
        &["classify", "-m", &m, "--json", "--top-k", "1", "short"],
        None,
    );
    assert_eq!(top1[0]["scores"].as_object().unwrap().len(), 1);
}

#[test]
fn bad_lines_stop_the_run_or_are_skipped_and_counted() {
    let m = model("tiny-bert-cls");
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "in.txt",
        b"good one\n\n   \nbad \xff utf8\ngood two\n",
    );
    let (ok, _, stderr) = wordloom(&["classify", "-m", &m, "--json", "--file", &file], None);
    assert!(!ok);
    assert!(
        stderr.contains("in.txt:2") && stderr.contains("empty"),
        "{stderr}"
    );

    let (ok, stdout, stderr) = wordloom(
        &[
            "classify",
            "-m",
            &m,
            "--json",
            "--skip-errors",
            "--file",
            &file,
        ],
        None,
    );
    assert!(ok, "{stderr}");
    let texts: Vec<String> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(texts, ["good one", "good two"]);
    assert!(
        stderr.contains("in.txt:3")
            && stderr.contains("in.txt:4")
            && stderr.contains("invalid UTF-8"),
        "{stderr}"
    );
    assert!(stderr.contains("3 input(s) skipped"), "{stderr}");
}

#[test]
fn bad_files_and_models_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let csv = write(&dir, "in.csv", b"id,body\n1,hello\n");
    let (ok, _, stderr) = wordloom(
        &["classify", "-m", &model("tiny-bert-cls"), "--file", &csv],
        None,
    );
    assert!(
        !ok && stderr.contains("no `text` column (the header has: id, body)"),
        "{stderr}"
    );

    let (ok, _, stderr) = wordloom(&["classify", "-m", &model("tiny-bert-ner"), "hello"], None);
    assert!(
        !ok && stderr.contains("sequence-classification head")
            && stderr.contains("token-classification head"),
        "{stderr}"
    );

    let (ok, _, stderr) = wordloom(&["classify", "hello"], None);
    assert!(!ok && stderr.contains("needs a model"), "{stderr}");

    let (ok, _, stderr) = wordloom(&["embed", "-m", &model("tiny-llama"), "hello"], None);
    assert!(
        !ok && stderr.contains("unsupported architecture `llama`"),
        "{stderr}"
    );

    let (ok, _, stderr) = wordloom(
        &[
            "ner",
            "-m",
            &model("tiny-bert-ner"),
            "--aggregation",
            "mean",
            "x",
        ],
        None,
    );
    assert!(
        !ok && stderr.contains("unknown aggregation strategy `mean`"),
        "{stderr}"
    );
}

#[test]
fn overlong_input_is_truncated_or_refused() {
    let m = model("tiny-bert-cls");
    let long = "word ".repeat(2000);
    let got = jsonl(&["classify", "-m", &m, "--json", &long], None);
    assert_eq!(got.len(), 1);
    let (ok, _, stderr) = wordloom(&["classify", "-m", &m, "--no-truncate", &long], None);
    assert!(
        !ok && stderr.contains("tokens but the model accepts at most 128"),
        "{stderr}"
    );
}

#[test]
fn ner_qa_zero_shot_and_search_print_their_documented_fields() {
    let ner = jsonl(
        &[
            "ner",
            "-m",
            &model("tiny-bert-ner"),
            "--json",
            "John Smith lives in New York.",
        ],
        None,
    );
    let entity = &ner[0]["entities"][0];
    for key in ["entity_group", "score", "word", "start", "end"] {
        assert!(entity.get(key).is_some(), "{key} in {entity}");
    }

    let qa = jsonl(
        &[
            "qa",
            "-m",
            &model("tiny-bert-qa"),
            "--json",
            "--question",
            "Where does he live?",
            "--context",
            "He lives in Paris.",
        ],
        None,
    );
    let answer = &qa[0];
    let (start, end) = (
        answer["start"].as_u64().unwrap() as usize,
        answer["end"].as_u64().unwrap() as usize,
    );
    assert_eq!(
        &"He lives in Paris."[start..end],
        answer["answer"].as_str().unwrap()
    );

    let zs = jsonl(
        &[
            "zero-shot",
            "-m",
            &model("tiny-bert-nli"),
            "--json",
            "--labels",
            "sports,politics",
            "The match was great.",
        ],
        None,
    );
    let scores = zs[0]["scores"].as_object().unwrap();
    let total: f64 = scores.values().map(|s| s.as_f64().unwrap()).sum();
    assert!(
        (total - 1.0).abs() < 1e-5,
        "single-label zero-shot sums to 1: {total}"
    );
    let (ok, _, stderr) = wordloom(
        &[
            "zero-shot",
            "-m",
            &model("tiny-bert-cls"),
            "--labels",
            "a,b",
            "x",
        ],
        None,
    );
    assert!(!ok && stderr.contains("entailment"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let corpus = write(
        &dir,
        "corpus.txt",
        b"the cat sat on the mat\nstock markets fell sharply\na kitten sleeps on a rug\n",
    );
    let hits = jsonl(
        &[
            "search",
            "-m",
            &model("tiny-bert-base"),
            "--json",
            "--corpus",
            &corpus,
            "--query",
            "the cat sat on the mat",
            "--top-k",
            "2",
        ],
        None,
    );
    let results = hits[0]["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["index"], 0, "an exact match ranks first");
    assert!((results[0]["score"].as_f64().unwrap() - 1.0).abs() < 1e-4);
}

#[test]
fn minilm_embeds_and_searches_by_meaning() {
    let path = common::minilm_path();
    let m = path.to_string_lossy().into_owned();
    let got = jsonl(
        &[
            "embed",
            "-m",
            &m,
            "--json",
            "A dog runs in the park.",
            "Ein Hund rennt im Park.",
        ],
        None,
    );
    assert_eq!(got[0]["embedding"].as_array().unwrap().len(), 384);
    let raw = jsonl(
        &[
            "embed",
            "-m",
            &m,
            "--json",
            "--no-normalize",
            "A dog runs in the park.",
        ],
        None,
    );
    let norm: f64 = raw[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap().powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        (norm - 1.0).abs() > 1e-3,
        "--no-normalize keeps the pooled length ({norm})"
    );

    let dir = tempfile::tempdir().unwrap();
    let corpus = write(
        &dir,
        "faq.jsonl",
        "{\"text\": \"How do I reset my password?\"}\n{\"text\": \"Where is my parcel? It has not arrived.\"}\n{\"text\": \"Can I pay by credit card?\"}\n".as_bytes(),
    );
    let hits = jsonl(
        &[
            "search",
            "-m",
            &m,
            "--json",
            "--corpus",
            &corpus,
            "--query",
            "my delivery is late",
            "--top-k",
            "3",
        ],
        None,
    );
    assert_eq!(hits[0]["results"][0]["index"], 1, "{}", hits[0]);
}

/// `--matmul-precision high` (bf16×3 on AMX where the CPU has it) still meets the embedding
/// parity bar, cosine ≥ 0.9999 with sentence-transformers, batched over the reference texts; and
/// its vectors stay within 1e-3 of the default f32 path's.
#[test]
fn minilm_high_precision_keeps_sentence_transformers_parity() {
    let path = common::minilm_path();
    let m = path.to_string_lossy().into_owned();
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("minilm/embeddings.json")).unwrap())
            .unwrap();
    let texts: Vec<String> = reference["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| serde_json::json!({ "text": t }).to_string())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "texts.jsonl", (texts.join("\n") + "\n").as_bytes());
    let embed = |precision: &str| {
        let args = [
            "--matmul-precision",
            precision,
            "embed",
            "-m",
            &m,
            "--json",
            "--file",
            &file,
        ];
        let rows = jsonl(&args, None);
        assert_eq!(rows.len(), texts.len());
        rows.iter()
            .map(|r| floats(&r["embedding"]))
            .collect::<Vec<_>>()
    };
    let (high, highest) = (embed("high"), embed("highest"));
    for (i, (h, exact)) in high.iter().zip(&highest).enumerate() {
        let want = floats(&reference["embeddings"][i]);
        let similarity = cosine(h, &want);
        assert!(similarity >= 0.9999, "text {i}: cosine {similarity}");
        let diff = h
            .iter()
            .zip(exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-3, "text {i}: high vs highest differ by {diff}");
    }
    // An unknown precision is refused by name.
    let (ok, _, stderr) = wordloom(&["--matmul-precision", "low", "embed", "x"], None);
    assert!(!ok && stderr.contains("low"), "{stderr}");
}
