//! Fine-tuning against PyTorch: gradients of a tiny BERT classifier, AdamW steps with
//! clipping and Trainer-style weight decay, the warmup schedules, and resume equality.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{fixture, read_json};
use wordloom::models::bert::{Encoder, EncoderConfig, EncoderInput, Positions};
use wordloom::train::{self, AdamW, AdamWConfig, Precision, Schedule, Task};
use wordloom::weights::{Parameters, WeightStore};

const DIR: &str = "train-bert-cls";

fn load_tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(&format!("{DIR}/{name}")), &Device::Cpu).unwrap()
}

fn setup() -> (Arc<Parameters>, EncoderConfig, Vec<EncoderInput>, Tensor) {
    let dir = fixture(DIR);
    let config: EncoderConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let params = Arc::new(Parameters::from_base(
        WeightStore::open_hf_dir(&dir).unwrap(),
        None,
    ));
    let reference = read_json(&format!("{DIR}/reference.json"));
    let batch = &reference["batch"];
    let inputs = (0..4)
        .map(|i| {
            let n = batch["lengths"][i].as_u64().unwrap() as usize;
            let ids = common::ids(&batch["input_ids"][i]);
            let types = common::ids(&batch["token_type_ids"][i]);
            EncoderInput {
                ids: ids[..n].to_vec(),
                type_ids: types[..n].to_vec(),
            }
        })
        .collect();
    let labels = Tensor::new(common::ids(&batch["labels"]), &Device::Cpu).unwrap();
    (params, config, inputs, labels)
}

fn loss(
    params: &Arc<Parameters>,
    config: &EncoderConfig,
    inputs: &[EncoderInput],
    labels: &Tensor,
    outputs: Positions,
) -> Tensor {
    let store = WeightStore::Trainable(params.clone());
    let model = Encoder::from_weights(config.clone(), &store, DType::F32, &Device::Cpu).unwrap();
    let hidden = model.forward_positions(inputs, outputs).unwrap();
    let logits = model.sequence_logits(&hidden).unwrap();
    candle_nn::loss::cross_entropy(&logits, labels).unwrap()
}

fn assert_close(name: &str, ours: &[f32], theirs: &[f32], abs: f32, rel: f32) {
    assert_eq!(ours.len(), theirs.len(), "{name}: length");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!(
            (a - b).abs() <= abs + rel * b.abs(),
            "{name}[{i}]: ours {a}, PyTorch {b}"
        );
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn gradients_of_a_classifier_batch_match_pytorch() {
    // Training computes the last layer for first tokens only; the full pass must agree too.
    for outputs in [Positions::FirstOnly, Positions::All] {
        gradients_match_pytorch(outputs);
    }
}

fn gradients_match_pytorch(outputs: Positions) {
    let (params, config, inputs, labels) = setup();
    let loss = loss(&params, &config, &inputs, &labels, outputs);
    let reference = read_json(&format!("{DIR}/reference.json"));
    let expected = reference["loss"].as_f64().unwrap() as f32;
    let got = loss.to_scalar::<f32>().unwrap();
    assert!((got - expected).abs() < 1e-5, "loss {got} vs {expected}");
    let grads = loss.backward().unwrap();
    let theirs = load_tensors("grads.safetensors");
    let vars = params.vars();
    assert_eq!(
        vars.len(),
        theirs.len(),
        "every PyTorch parameter is trained"
    );
    for (name, var) in &vars {
        let ours = grads
            .get(var.as_tensor())
            .map(values)
            .unwrap_or_else(|| vec![0.0; var.elem_count()]);
        assert_close(name, &ours, &values(&theirs[name]), 1e-5, 1e-4);
    }
}

/// The loss of the reference batch with training dropout drawn from `seed` (None: eval mode).
fn loss_with_dropout(config: &EncoderConfig, seed: Option<u64>) -> f32 {
    let (params, _, inputs, labels) = setup();
    let store = WeightStore::Trainable(params);
    let mut model =
        Encoder::from_weights(config.clone(), &store, DType::F32, &Device::Cpu).unwrap();
    if let Some(seed) = seed {
        model = model.with_training_dropout(seed);
    }
    let hidden = model
        .forward_positions(&inputs, Positions::FirstOnly)
        .unwrap();
    let logits = model.sequence_logits(&hidden).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
    loss.to_scalar::<f32>().unwrap()
}

#[test]
fn training_dropout_follows_the_config_and_its_seed() {
    let (_, config, _, _) = setup();
    // The fixture's config keeps BERT's 0.1 dropout (the PyTorch reference overrode it to 0).
    assert_eq!(config.hidden_dropout_prob, Some(0.1));
    let eval = loss_with_dropout(&config, None);
    let (a, b) = (
        loss_with_dropout(&config, Some(1)),
        loss_with_dropout(&config, Some(2)),
    );
    assert_eq!(
        a,
        loss_with_dropout(&config, Some(1)),
        "same seed, same masks"
    );
    assert_ne!(a, b, "another seed draws other masks");
    assert_ne!(a, eval, "dropout changes the training pass");
    // With every probability 0 (the reference's overrides), training mode is eval mode, and
    // both equal PyTorch's loss.
    let off = EncoderConfig {
        hidden_dropout_prob: Some(0.0),
        attention_probs_dropout_prob: Some(0.0),
        classifier_dropout: Some(0.0),
        ..config
    };
    let expected = read_json(&format!("{DIR}/reference.json"))["loss"]
        .as_f64()
        .unwrap() as f32;
    assert_eq!(loss_with_dropout(&off, Some(1)), eval);
    assert!((eval - expected).abs() < 1e-5, "{eval} vs {expected}");
    // Inverted dropout: a fraction p of zeros, the rest scaled by 1 / (1 - p), mean 1.
    let mask = wordloom::weights::linear::dropout_mask(&[200_000], 0.1, 7).unwrap();
    let values = values(&mask);
    let zeros = values.iter().filter(|&&v| v == 0.0).count() as f64 / values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
    assert!((zeros - 0.1).abs() < 0.005, "{zeros}");
    assert!((mean - 1.0).abs() < 0.01, "{mean}");
    assert!(values
        .iter()
        .all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
}

#[test]
fn adamw_with_clipping_and_weight_decay_matches_torch() {
    let (params, config, inputs, labels) = setup();
    loss(&params, &config, &inputs, &labels, Positions::All); // builds the model, registering its parameters
    let vars = params.vars();
    let mut optimizer = AdamW::new(AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    });
    // Step 1 from PyTorch's own gradients: isolates the optimizer and the clipping.
    let theirs = load_tensors("grads.safetensors");
    let mut grads: Vec<Vec<f32>> = vars.iter().map(|(n, _)| values(&theirs[n])).collect();
    let norm = train::apply_gradients(&vars, &mut grads, &mut optimizer, 1e-3, Some(1.0)).unwrap();
    assert!((norm - 72.98593).abs() < 1e-3, "grad norm {norm}");
    let after = load_tensors("after_step.safetensors");
    for (name, var) in &vars {
        assert_close(
            name,
            &values(var.as_tensor()),
            &values(&after[name]),
            1e-6,
            1e-6,
        );
    }
    // Step 2 end to end: our forward and backward at the new weights, the moments carried over.
    let loss = loss(&params, &config, &inputs, &labels, Positions::FirstOnly);
    assert!((loss.to_scalar::<f32>().unwrap() - 0.4975286).abs() < 1e-4);
    let mut grads = train::collect_gradients(&vars, &loss.backward().unwrap()).unwrap();
    train::apply_gradients(&vars, &mut grads, &mut optimizer, 1e-3, Some(1.0)).unwrap();
    let after = load_tensors("after_two_steps.safetensors");
    // Softmax ignores a constant added to every score, so the key bias's true gradient is 0 and
    // both engines' values are rounding noise (~1e-7) that Adam scales up to full-size steps.
    for (name, var) in vars
        .iter()
        .filter(|(n, _)| !n.ends_with("attention.self.key.bias"))
    {
        assert_close(
            name,
            &values(var.as_tensor()),
            &values(&after[name]),
            2e-5,
            1e-4,
        );
    }
}

#[test]
fn learning_rate_schedules_match_transformers() {
    let reference = read_json(&format!("{DIR}/reference.json"));
    let values = &reference["lr_schedules"]["values"];
    for (name, schedule) in [
        ("linear", Schedule::Linear),
        ("cosine", Schedule::Cosine),
        ("constant", Schedule::Constant),
    ] {
        for (step, expected) in values[name].as_array().unwrap().iter().enumerate() {
            let ours = 1e-3 * schedule.factor(step as u64, 3, 12);
            let expected = expected.as_f64().unwrap();
            assert!(
                (ours - expected).abs() < 1e-12,
                "{name} step {step}: {ours} vs {expected}"
            );
        }
    }
}

/// A task that fails on its `fail_at`-th loss call, like a process killed mid-run.
struct Interrupted<'a> {
    inner: &'a dyn wordloom::train::Task,
    calls: std::cell::Cell<usize>,
    fail_at: usize,
}

impl wordloom::train::Task for Interrupted<'_> {
    fn examples(&self) -> usize {
        self.inner.examples()
    }
    fn parameters(&self) -> &Arc<Parameters> {
        self.inner.parameters()
    }
    fn loss(&self, indices: &[usize], seed: u64) -> wordloom::Result<(Tensor, usize)> {
        self.calls.set(self.calls.get() + 1);
        if self.calls.get() == self.fail_at {
            return Err(wordloom::Error::InvalidArgument("killed".into()));
        }
        self.inner.loss(indices, seed)
    }
    fn evaluate(&self) -> wordloom::Result<Option<train::Evaluation>> {
        self.inner.evaluate()
    }
}

fn examples() -> Vec<wordloom::train::data::Example> {
    let texts = [
        ("the match was won by the home team", "sport"),
        ("a late goal decided the final", "sport"),
        ("the striker scored twice", "sport"),
        ("the recipe needs butter and flour", "food"),
        ("bake the bread for forty minutes", "food"),
        ("add salt to the soup", "food"),
        ("the coach praised the defence", "sport"),
        ("fresh pasta with tomato sauce", "food"),
        ("the runner broke the record", "sport"),
        ("a cake with chocolate icing", "food"),
    ];
    texts
        .iter()
        .enumerate()
        .map(|(i, (t, l))| wordloom::train::data::Example {
            text: t.to_string(),
            label: l.to_string(),
            origin: format!("line {}", i + 1),
        })
        .collect()
}

#[test]
fn an_interrupted_run_resumed_from_its_checkpoint_ends_with_the_same_weights() {
    // f16 also restores its loss scale from the checkpoint.
    for precision in [Precision::F32, Precision::F16] {
        resume_ends_with_the_same_weights(precision);
    }
}

fn resume_ends_with_the_same_weights(precision: Precision) {
    use wordloom::train::classify::ClassifierTask;
    let base = fixture("tiny-bert-base");
    let data = examples();
    let options = train::TrainOptions {
        precision,
        epochs: 2.0,
        lr: 1e-3,
        batch_size: 2,
        grad_accum: 2,
        warmup_steps: 1,
        schedule: Schedule::Cosine,
        weight_decay: 0.01,
        save_every: Some(2),
        ..train::TrainOptions::default()
    };
    let task = |seed| {
        ClassifierTask::new(
            base.to_str().unwrap(),
            &data,
            &data[..4],
            None,
            seed,
            precision,
        )
        .unwrap()
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = task(7);
    let reports = train::train(&straight, &options, straight_dir.path(), false, |_| {}).unwrap();
    assert_eq!(
        reports.len(),
        6,
        "10 examples, 2 per micro-batch, 2 micro-batches per step, 2 epochs"
    );

    let resumed_dir = tempfile::tempdir().unwrap();
    let first = task(7);
    let interrupted = Interrupted {
        inner: &first,
        calls: Default::default(),
        fail_at: 10,
    };
    let err = train::train(&interrupted, &options, resumed_dir.path(), false, |_| {}).unwrap_err();
    assert!(err.to_string().contains("killed"));
    // A fresh process: new parameters from the base model, then the checkpoint (step 4).
    let second = task(7);
    let changed = train::TrainOptions {
        lr: 2e-3,
        ..options.clone()
    };
    let refused = train::train(&second, &changed, resumed_dir.path(), true, |_| {}).unwrap_err();
    assert!(refused.to_string().contains("other settings"), "{refused}");
    let rest = train::train(&second, &options, resumed_dir.path(), true, |_| {}).unwrap();
    assert_eq!(
        rest.iter().map(|r| r.step).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    for ((name, a), (_, b)) in straight
        .parameters()
        .vars()
        .iter()
        .zip(second.parameters().vars())
    {
        assert_eq!(
            values(a.as_tensor()),
            values(b.as_tensor()),
            "{name} differs after resuming"
        );
    }
    let losses = |r: &[train::StepReport]| r.iter().map(|s| s.loss).collect::<Vec<_>>();
    assert_eq!(losses(&reports), losses(&rest));
    let metrics = std::fs::read_to_string(resumed_dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().count(),
        6,
        "each step logged once:\n{metrics}"
    );
}

#[test]
fn mixed_precision_trains_in_bf16_and_f16_close_to_f32() {
    use wordloom::train::classify::ClassifierTask;
    let base = fixture("tiny-bert-base");
    let data = examples();
    let run = |precision| {
        let options = train::TrainOptions {
            epochs: 2.0,
            lr: 1e-3,
            batch_size: 2,
            precision,
            ..train::TrainOptions::default()
        };
        let task = ClassifierTask::new(
            base.to_str().unwrap(),
            &data,
            &data[..4],
            None,
            7,
            precision,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        train::train(&task, &options, dir.path(), false, |_| {}).unwrap()
    };
    let full = run(Precision::F32);
    for (precision, tolerance) in [(Precision::Bf16, 3e-2), (Precision::F16, 3e-3)] {
        let mixed = run(precision);
        assert_eq!(mixed.len(), full.len());
        let mut differs = false;
        for (m, f) in mixed.iter().zip(&full) {
            assert!(
                (m.loss - f.loss).abs() <= tolerance * f.loss.abs(),
                "{precision:?} step {}: loss {} vs f32 {}",
                m.step,
                m.loss,
                f.loss
            );
            differs |= m.loss != f.loss;
            assert!(!m.skipped, "{precision:?} step {} overflowed", m.step);
            let scale = (precision == Precision::F16).then_some(65536.0);
            assert_eq!(m.loss_scale, scale, "{precision:?}");
        }
        // The products really ran in the lower precision.
        assert!(differs, "{precision:?} losses are bitwise f32's");
        let (m, f) = (mixed.last().unwrap(), full.last().unwrap());
        let (me, fe) = (m.eval.as_ref().unwrap(), f.eval.as_ref().unwrap());
        assert!(
            (me.loss - fe.loss).abs() <= tolerance * fe.loss,
            "{precision:?}"
        );
    }
}

fn finetune(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_wordloom"))
        .arg("finetune")
        .args(["--task", "classify", "--threads", "2"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bad_training_data_is_refused_before_training_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let base = fixture("tiny-bert-base");
    let base = base.to_str().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let good = "{\"text\": \"a goal\", \"label\": \"sport\"}\n{\"text\": \"some soup\", \"label\": \"food\"}\n";
    let cases = [
        (write("empty.jsonl", "\n"), None, "no examples"),
        (
            write("bad.jsonl", &format!("{good}{{\"text\": \"x\"}}\n")),
            None,
            "bad.jsonl:3: no `label`",
        ),
        (
            write("train.jsonl", good),
            Some(write(
                "eval.jsonl",
                "{\"text\": \"t\", \"label\": \"music\"}\n",
            )),
            "label `music` never occurs",
        ),
        (
            write("one.csv", "text,label\nhello,a\nbye,a\n"),
            None,
            "at least two labels",
        ),
        (
            write("nocol.csv", "body,label\nhello,a\n"),
            None,
            "no `text` column",
        ),
    ];
    for (data, eval, needle) in cases {
        let mut args = vec!["-m", base, "--data", &data, "--out", out];
        if let Some(e) = &eval {
            args.extend(["--eval", e]);
        }
        let result = finetune(&args);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{data} should fail");
        assert!(
            stderr.contains(needle),
            "{data}: expected {needle:?} in {stderr}"
        );
    }
    // With --skip-errors the bad line is counted and training goes on.
    let data = write("mixed.jsonl", &format!("{good}not json\n{good}"));
    let result = finetune(&[
        "-m",
        base,
        "--data",
        &data,
        "--out",
        out,
        "--max-steps",
        "1",
        "--skip-errors",
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(String::from_utf8_lossy(&result.stderr).contains("skipped 1 malformed"));
}

/// all-MiniLM-L6-v2 fine-tuned on SpamAssassin (subject + body, 96 tokens, 100 steps of 16 at
/// lr 2e-4, with the config's 0.1 dropout: 97.6% measured; 1e-4 reached 96.7% with dropout):
/// ≥ 97% on the held-out fifth, and the saved directory works with `wordloom classify`.
#[test]
fn minilm_fine_tuned_on_spamassassin_reaches_97_percent() {
    let fetched = std::process::Command::new("python3")
        .args(["scripts/fetch_data.py", "spam"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        fetched.status.success(),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    let data = std::path::PathBuf::from(String::from_utf8(fetched.stdout).unwrap().trim());
    let minilm = common::minilm_path();
    let out = tempfile::tempdir().unwrap();
    let result = finetune(&[
        "-m",
        minilm.to_str().unwrap(),
        "--data",
        data.join("train.jsonl").to_str().unwrap(),
        "--eval",
        data.join("test.jsonl").to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
        "--max-len",
        "96",
        "--batch-size",
        "16",
        "--lr",
        "2e-4",
        "--max-steps",
        "100",
        "--warmup",
        "10",
    ]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    let metrics = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    let accuracy = last["eval"]["accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.97, "held-out accuracy {accuracy}\n{stderr}");
    assert!(out.path().join("training.svg").is_file());
    let classified = std::process::Command::new(env!("CARGO_BIN_EXE_wordloom"))
        .args(["classify", "-m", out.path().to_str().unwrap(), "--json"])
        .arg("Cheap meds!!! Click here to claim your FREE prize now\n\nLimited offer, act now, unsubscribe below")
        .output()
        .unwrap();
    assert!(
        classified.status.success(),
        "{}",
        String::from_utf8_lossy(&classified.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&classified.stdout).unwrap();
    assert_eq!(answer["label"], "spam", "{answer}");
}

#[test]
fn an_interrupted_lora_run_with_dropout_resumes_to_the_same_adapter() {
    use wordloom::train::sft::{SftExample, SftRecord, SftTask};
    use wordloom::weights::{LoraConfig, TargetModules};
    let base = fixture("tiny-llama");
    let data: Vec<SftExample> = (0..6)
        .map(|i| SftExample {
            record: SftRecord::Completion {
                prompt: format!("question {i}: how many? "),
                completion: format!("answer {} apples", i * 3),
            },
            origin: format!("line {}", i + 1),
        })
        .collect();
    let options = train::TrainOptions {
        max_steps: Some(4),
        lr: 5e-3,
        batch_size: 2,
        grad_accum: 1,
        save_every: Some(2),
        ..train::TrainOptions::default()
    };
    let task = || {
        let targets = TargetModules::Names(vec!["q_proj".into(), "down_proj".into()]);
        let config = LoraConfig::new(4, 8.0, 0.1, targets).unwrap();
        SftTask::new(
            base.to_str().unwrap(),
            config,
            &data,
            &data[..2],
            64,
            3,
            Default::default(),
        )
        .unwrap()
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = task();
    let reports = train::train(&straight, &options, straight_dir.path(), false, |_| {}).unwrap();
    assert!(reports[3].loss < reports[0].loss, "{reports:?}");

    let resumed_dir = tempfile::tempdir().unwrap();
    let first = task();
    let interrupted = Interrupted {
        inner: &first,
        calls: Default::default(),
        fail_at: 4,
    };
    train::train(&interrupted, &options, resumed_dir.path(), false, |_| {}).unwrap_err();
    let second = task();
    train::train(&second, &options, resumed_dir.path(), true, |_| {}).unwrap();
    let vars = straight.parameters().vars();
    assert_eq!(
        vars.len(),
        8,
        "q_proj and down_proj of 2 layers, A and B each"
    );
    for ((name, a), (_, b)) in vars.iter().zip(second.parameters().vars()) {
        assert_eq!(
            values(a.as_tensor()),
            values(b.as_tensor()),
            "{name} differs after resuming"
        );
    }
}
