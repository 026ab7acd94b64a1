//! Weight-streaming rate of the quantized decode kernels (one activation row), on matrices
//! shaped like SmolLM2-135M's layers and totalling about its 92 MB, so the weights come from
//! memory as in a real decode step:
//! `cargo bench --bench kernels` (threads: RAYON_NUM_THREADS, default all cores). Then the f32
//! products of many rows, on the panel kernel and the AMX tiles (`BENCH_DENSE_ONLY=1`: only
//! those), and f32 decode steps over GPT-Neo-125M-shaped layers (`BENCH_GEMV_ONLY=1`: only those).
//! `BENCH_PREFILL_ONLY=1`: only the precise products of a 512-token prefill through one
//! SmolLM2-shaped Q4_1 layer. `BENCH_BATCH_ONLY=1`: only the precise products of one decode
//! step for 1–8 sequences (the server's batched step).

use std::time::Instant;
use wordloom::kernels::dense::{packed_matmul_forced, PackedMatrix};
use wordloom::kernels::{
    quant_matmul_forced, quant_matmul_precise, reference, QuantKind, QuantTensor,
};

/// One SmolLM2-135M layer: q, k, v, o, gate, up, down (out × in).
const SMOLLM2_LAYER: [(usize, usize); 7] = [
    (576, 576),
    (192, 576),
    (192, 576),
    (576, 576),
    (1536, 576),
    (1536, 576),
    (576, 1536),
];

fn main() {
    if std::env::var_os("BENCH_GEMV_ONLY").is_some() {
        dense_gemv(&mut uniform(3));
        return;
    }
    if std::env::var_os("BENCH_DENSE_ONLY").is_some() {
        dense_f32(&mut uniform(5));
        return;
    }
    if std::env::var_os("BENCH_PREFILL_ONLY").is_some() {
        prefill(&mut uniform(7));
        return;
    }
    if std::env::var_os("BENCH_BATCH_ONLY").is_some() {
        batched_decode(&mut uniform(11));
        return;
    }
    // BENCH_MB: total weight bytes per pass (default: SmolLM2's 92 MB; small = in cache).
    let total_mb: usize = std::env::var("BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(92);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let shapes = SMOLLM2_LAYER;
    for kind in [QuantKind::Q4_1, QuantKind::Q4_0, QuantKind::Q8_0] {
        let mut layers = Vec::new();
        let mut bytes = 0usize;
        while bytes < total_mb << 20 {
            for &(rows, cols) in &shapes {
                let w: Vec<f32> = (0..rows * cols).map(|_| rand() * 0.1).collect();
                let q = reference::quantize(kind, &w, rows, cols);
                bytes += q.len();
                layers.push(QuantTensor::from_gguf(kind, rows, cols, &q));
            }
        }
        let x: Vec<f32> = (0..32 * 1536).map(|_| rand()).collect();
        let mut out = vec![0f32; 32 * 1536];
        let mut best = f64::MAX;
        for _ in 0..(2000 / total_mb).clamp(10, 400) {
            let t0 = Instant::now();
            for layer in &layers {
                let (rows, cols) = (layer.rows(), layer.cols());
                quant_matmul_precise(&layer.matrix(), &x[..cols], 1, &mut out[..rows]);
            }
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "{kind:?} decode (m=1, precise): {:.1} GB/s of weights ({:.2} ms per {:.0} MB pass, {} threads)",
            bytes as f64 / best / 1e9,
            best * 1e3,
            bytes as f64 / 1e6,
            rayon::current_num_threads()
        );
        if kind != QuantKind::Q4_1 {
            continue;
        }
        // Several activation rows (batched decode in the server, the precise path's pairs):
        // the group-streaming kernel against the panel GEMM.
        for m in [2, 4, 8, 16, 32] {
            let mut line = format!("  m={m:2} (plain int8):");
            for (name, gemm) in [("streaming", false), ("panel GEMM", true)] {
                let mut best = f64::MAX;
                for _ in 0..(2000 / total_mb).clamp(5, 200) {
                    let t0 = Instant::now();
                    for layer in &layers {
                        let (rows, cols) = (layer.rows(), layer.cols());
                        let out = &mut out[..m * rows];
                        quant_matmul_forced(&layer.matrix(), &x[..m * cols], m, out, Some(gemm));
                    }
                    best = best.min(t0.elapsed().as_secs_f64());
                }
                line += &format!("  {name} {:.1} GB/s", bytes as f64 / best / 1e9);
            }
            println!("{line}");
        }
    }
    dense_f32(&mut rand);
    dense_gemv(&mut rand);
}

/// The precise (two int8 rows per token) Q4_1 products of a 512-token prefill through one
/// SmolLM2-shaped layer, in useful GFLOP/s (2 per weight and token).
fn prefill(rand: &mut impl FnMut() -> f32) {
    let shapes = SMOLLM2_LAYER;
    let kind = QuantKind::Q4_1;
    let layer: Vec<QuantTensor> = shapes
        .iter()
        .map(|&(rows, cols)| {
            let w: Vec<f32> = (0..rows * cols).map(|_| rand() * 0.1).collect();
            QuantTensor::from_gguf(kind, rows, cols, &reference::quantize(kind, &w, rows, cols))
        })
        .collect();
    let m = 512;
    let x: Vec<f32> = (0..m * 1536).map(|_| rand()).collect();
    let mut out = vec![0f32; m * 1536];
    let flops: usize = shapes.iter().map(|&(n, k)| 2 * m * n * k).sum();
    let (best, median) = best_and_median(30, || {
        for (w, &(rows, cols)) in layer.iter().zip(&shapes) {
            quant_matmul_precise(&w.matrix(), &x[..m * cols], m, &mut out[..m * rows]);
        }
    });
    println!(
        "{kind:?} prefill (m={m}, precise): {:.1} GFLOP/s best, {:.1} median ({:.2} ms per layer, {} threads)",
        flops as f64 / best / 1e9,
        flops as f64 / median / 1e9,
        median * 1e3,
        rayon::current_num_threads()
    );
}

/// The precise Q4_1 products of one decode step for 1, 2, 4 and 8 sequences through all of
/// SmolLM2's layers (30 × the shapes above, from memory) and its Q8_0 vocabulary projection:
/// the server's batched step without attention and element-wise work.
fn batched_decode(rand: &mut impl FnMut() -> f32) {
    let mut quantized = |kind, rows, cols| {
        let w: Vec<f32> = (0..rows * cols).map(|_| rand() * 0.1).collect();
        QuantTensor::from_gguf(kind, rows, cols, &reference::quantize(kind, &w, rows, cols))
    };
    // Thirty layers of distinct weights (~80 MB), so that they stream from memory.
    let layers: Vec<QuantTensor> = (0..30)
        .flat_map(|_| SMOLLM2_LAYER)
        .map(|(rows, cols)| quantized(QuantKind::Q4_1, rows, cols))
        .collect();
    let vocabulary = quantized(QuantKind::Q8_0, 49152, 576);
    let x: Vec<f32> = (0..8 * 1536).map(|_| rand()).collect();
    let mut out = vec![0f32; 8 * 49152];
    for m in [1, 2, 4, 8] {
        let (layers_best, layers_median) = best_and_median(20, || {
            for w in &layers {
                let (rows, cols) = (w.rows(), w.cols());
                quant_matmul_precise(&w.matrix(), &x[..m * cols], m, &mut out[..m * rows]);
            }
        });
        let (head_best, head_median) = best_and_median(20, || {
            quant_matmul_precise(
                &vocabulary.matrix(),
                &x[..m * 576],
                m,
                &mut out[..m * 49152],
            );
        });
        println!(
            "m={m}: Q4_1 layers {:.2} ms best, {:.2} median; Q8_0 vocabulary {:.2} / {:.2} ms ({:.2} ms per token in all, {} threads)",
            layers_best * 1e3,
            layers_median * 1e3,
            head_best * 1e3,
            head_median * 1e3,
            (layers_median + head_median) * 1e3 / m as f64,
            rayon::current_num_threads()
        );
    }
}

/// The fastest and the median of `repetitions` timed runs of `f`, in seconds.
fn best_and_median(repetitions: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut times: Vec<f64> = (0..repetitions)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[0], times[times.len() / 2])
}

/// Uniform values in [-0.5, 0.5) from a linear congruential generator.
fn uniform(mut seed: u32) -> impl FnMut() -> f32 {
    move || {
        seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
        (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    }
}

/// Random (n × k) weight matrices of these shapes, packed for the f32 kernels.
fn packed_layers(shapes: &[(usize, usize)], rand: &mut impl FnMut() -> f32) -> Vec<PackedMatrix> {
    shapes
        .iter()
        .map(|&(n, k)| {
            let w: Vec<f32> = (0..n * k).map(|_| rand() * 0.1).collect();
            PackedMatrix::pack(&w, n, k)
        })
        .collect()
}

/// f32 decode steps (one activation row) over GPT-Neo-125M-shaped layers, 496 MB in all, so the
/// weights stream from memory as in a real decode step (`BENCH_GEMV_ONLY=1`: only this).
fn dense_gemv(rand: &mut impl FnMut() -> f32) {
    let d = 768;
    let mut shapes = Vec::new();
    for _ in 0..12 {
        shapes.extend([(d, d), (d, d), (d, d), (d, d), (4 * d, d), (d, 4 * d)]);
    }
    shapes.push((50257, d));
    let layers = packed_layers(&shapes, rand);
    let bytes: usize = shapes.iter().map(|&(n, k)| n * k * 4).sum();
    let x: Vec<f32> = (0..4 * d).map(|_| rand()).collect();
    let mut out = vec![0f32; 50257];
    let (best, median) = best_and_median(20, || {
        for (layer, &(n, k)) in layers.iter().zip(&shapes) {
            packed_matmul_forced(layer, &x[..k], 1, None, &mut out[..n], Some(false));
        }
    });
    println!(
        "f32 decode (m=1): {:.1} GB/s best, {:.1} median ({:.2} ms per {:.0} MB pass, {} threads)",
        bytes as f64 / best / 1e9,
        bytes as f64 / median / 1e9,
        median * 1e3,
        bytes as f64 / 1e6,
        rayon::current_num_threads()
    );
}

/// f32 products of many rows (encoders at batch, prefill) on MiniLM-shaped layers: the f32
/// panel kernel against the AMX bf16×3 tiles (where the CPU has them), in GFLOP/s.
fn dense_f32(rand: &mut impl FnMut() -> f32) {
    let shapes = [(1152, 384), (384, 384), (1536, 384), (384, 1536)];
    let layers = packed_layers(&shapes, rand);
    let x: Vec<f32> = (0..1024 * 1536).map(|_| rand()).collect();
    let mut out = vec![0f32; 1024 * 1536];
    wordloom::kernels::set_matmul_precision(wordloom::kernels::MatmulPrecision::High);
    let tiles = match wordloom::kernels::dense_path() {
        "amx-bf16x3" => "AMX bf16x3",
        _ => "(no AMX here: f32 again)",
    };
    for m in [16, 32, 64, 128, 704] {
        let flops: usize = shapes.iter().map(|&(n, k)| 2 * m * n * k).sum();
        let mut line = format!("f32 dense m={m:4}:");
        for (name, amx) in [("panel kernel", false), (tiles, true)] {
            let mut best = f64::MAX;
            for _ in 0..(20_000 / m).clamp(5, 200) {
                let t0 = Instant::now();
                for (layer, &(n, k)) in layers.iter().zip(&shapes) {
                    packed_matmul_forced(layer, &x[..m * k], m, None, &mut out[..m * n], Some(amx));
                }
                best = best.min(t0.elapsed().as_secs_f64());
            }
            line += &format!("  {name} {:.0} GFLOP/s", flops as f64 / best / 1e9);
        }
        println!("{line}");
    }
}
