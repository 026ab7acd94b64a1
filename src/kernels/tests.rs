//! Unit tests: block semantics, SIMD vs scalar, and the matmul against an f64 reference.
//!
//! Tolerance: activations are quantized to int8 per 32-block with scale d_x = amax/127, so
//! |x - d_x·q| ≤ d_x/2 and the exact error bound per output is
//!     Σ_blocks (Σ_j |w_j|) · d_x / 2
//! to which we add 1e-5 · Σ_blocks (|m_b|·Σ|x| + Σ|w_j x_j|) for f32 rounding (the unified
//! `u·d + m` form has a cancellation between the two terms, worst for Q8_0's m = -128·d).

use super::reference::{dequantize, matmul_f64, quantize};
use super::*;

struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }
}

const KINDS: [QuantKind; 3] = [QuantKind::Q4_0, QuantKind::Q4_1, QuantKind::Q8_0];

fn tolerance(w: &QuantMatrix, wd: &[f32], x: &[f32], m: usize) -> Vec<f32> {
    let (rows, cols) = (w.rows, w.cols);
    let nb = cols / 32;
    let mut u = [0u8; 32];
    let mut tol = vec![0.0f32; m * rows];
    for i in 0..m {
        for r in 0..rows {
            let mut t = 0.0f64;
            for b in 0..nb {
                let xs = &x[i * cols + b * 32..i * cols + b * 32 + 32];
                let ws = &wd[r * cols + b * 32..r * cols + b * 32 + 32];
                let amax = xs.iter().fold(0.0f32, |a, v| a.max(v.abs())) as f64;
                let dx = amax / 127.0;
                let sw: f64 = ws.iter().map(|v| v.abs() as f64).sum();
                let sx: f64 = xs.iter().map(|v| v.abs() as f64).sum();
                let swx: f64 = ws.iter().zip(xs).map(|(a, b)| (a * b).abs() as f64).sum();
                let (_, mn) = scalar::block_of(w, r, b, &mut u);
                t += sw * dx / 2.0 * 1.0001 + 1e-5 * ((mn.abs() as f64) * sx + swx);
            }
            tol[i * rows + r] = t as f32 + 1e-6;
        }
    }
    tol
}

fn check(kind: QuantKind, m: usize, rows: usize, cols: usize, seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let wf = rng.vec(rows * cols, 0.5);
    let bytes = quantize(kind, &wf, rows, cols);
    let owned = QuantTensor::from_gguf(kind, rows, cols, &bytes);
    let w = owned.matrix();
    let x = rng.vec(m * cols, 2.0);
    let wd = dequantize(&w);
    let mut want = vec![0.0f32; m * rows];
    matmul_f64(&wd, rows, cols, &x, m, &mut want);
    let mut got = vec![f32::NAN; m * rows];
    let tol = tolerance(&w, &wd, &x, m);
    // Both SIMD paths, forced, then the default dispatch (checked further below).
    for forced in [Some(false), Some(true), None] {
        quant_matmul_forced(&w, &x, m, &mut got, forced);
        for idx in 0..m * rows {
            let err = (got[idx] - want[idx]).abs();
            assert!(
            err <= tol[idx],
            "{kind:?} m={m} rows={rows} cols={cols} path={forced:?}: out[{}][{}] = {} want {} (err {err}, tol {})",
            idx / rows,
            idx % rows,
            got[idx],
            want[idx],
            tol[idx]
        );
        }
    }

    // The SIMD path and the scalar fallback see the same quantized activations and must agree
    // up to f32 summation order; so must the AVX2 kernel where the dispatch prefers AVX-512.
    let mut acts = QuantizedActs::new();
    quantize_rows(&x, m, cols, &mut acts, false);
    let mut sc = vec![f32::NAN; m * rows];
    scalar::gemv_scalar(&w, &acts, m, 0, rows, sc.as_mut_ptr());
    let mut paths = vec![("simd", got)];
    #[cfg(target_arch = "x86_64")]
    if features().avx2 {
        let mut avx2 = vec![f32::NAN; m * rows];
        // SAFETY: AVX2, FMA and F16C detected; one thread writes all of `avx2`.
        unsafe { x86::gemv::<false>(&w, &acts, m, 0, rows, avx2.as_mut_ptr()) };
        paths.push(("avx2", avx2));
    }
    for (name, values) in paths {
        for idx in 0..m * rows {
            let err = (values[idx] - sc[idx]).abs();
            assert!(
                err <= tol[idx] * 0.05 + 1e-5 * want[idx].abs() + 1e-5,
                "{kind:?} m={m} rows={rows} cols={cols}: {name} {} vs scalar {} at {idx}",
                values[idx],
                sc[idx]
            );
        }
    }
}

const SHAPES: &[(usize, usize, usize)] = &[
    // (m, rows, cols)
    (1, 1, 32),
    (1, 37, 96),
    (1, 64, 576),
    (2, 33, 64),
    (3, 50, 160),
    (4, 31, 288),
    (5, 33, 64),
    (7, 100, 288),
    (17, 45, 608),
    (64, 70, 576),
    (64, 32, 1536),
    (130, 19, 224),
    (33, 129, 32),
];

#[test]
fn matmul_q4_1() {
    for (s, &(m, r, c)) in SHAPES.iter().enumerate() {
        check(QuantKind::Q4_1, m, r, c, s as u64 + 1);
    }
}

#[test]
fn matmul_q8_0() {
    for (s, &(m, r, c)) in SHAPES.iter().enumerate() {
        check(QuantKind::Q8_0, m, r, c, s as u64 + 100);
    }
}

#[test]
fn matmul_q4_0() {
    for (s, &(m, r, c)) in SHAPES.iter().enumerate() {
        check(QuantKind::Q4_0, m, r, c, s as u64 + 200);
    }
}

#[test]
fn matmul_single_thread_pool() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        for kind in KINDS {
            check(kind, 1, 300, 576, 7);
            check(kind, 96, 300, 576, 8);
        }
    });
}

#[test]
fn matmul_larger_parallel() {
    // Enough work that the row range is split across tasks on both paths.
    for kind in KINDS {
        check(kind, 1, 1000, 576, 11);
        check(kind, 70, 333, 576, 12);
    }
}

#[test]
fn nested_calls_from_rayon_tasks() {
    // Callers may run matmuls inside their own rayon tasks (e.g. one per sequence).
    use rayon::prelude::*;
    let (rows, cols) = (700, 576);
    let wf = Rng(3).vec(rows * cols, 0.5);
    let bytes = quantize(QuantKind::Q4_1, &wf, rows, cols);
    let owned = QuantTensor::from_gguf(QuantKind::Q4_1, rows, cols, &bytes);
    let w = owned.matrix();
    let wd = dequantize(&w);
    (0..16usize).into_par_iter().for_each(|t| {
        let m = [1, 2, 40, 70][t % 4];
        let x = Rng(100 + t as u64).vec(m * cols, 1.0);
        let mut got = vec![0.0; m * rows];
        quant_matmul(&w, &x, m, &mut got);
        let mut want = vec![0.0; m * rows];
        matmul_f64(&wd, rows, cols, &x, m, &mut want);
        let tol = tolerance(&w, &wd, &x, m);
        for i in 0..m * rows {
            assert!((got[i] - want[i]).abs() <= tol[i]);
        }
    });
}

#[test]
fn zero_activations_and_weights() {
    for kind in KINDS {
        let (rows, cols) = (40, 96);
        let bytes = quantize(kind, &vec![0.0; rows * cols], rows, cols);
        let owned = QuantTensor::from_gguf(kind, rows, cols, &bytes);
        let w = owned.matrix();
        for m in [1, 9] {
            let mut rng = Rng(5);
            let x = rng.vec(m * cols, 1.0);
            let mut out = vec![f32::NAN; m * rows];
            quant_matmul(&w, &x, m, &mut out);
            assert!(out.iter().all(|&v| v == 0.0), "{kind:?}");
        }
        let wf = Rng(9).vec(rows * cols, 1.0);
        let bytes = quantize(kind, &wf, rows, cols);
        let owned = QuantTensor::from_gguf(kind, rows, cols, &bytes);
        let w = owned.matrix();
        for m in [1, 9] {
            let x = vec![0.0f32; m * cols];
            let mut out = vec![f32::NAN; m * rows];
            quant_matmul(&w, &x, m, &mut out);
            assert!(out.iter().all(|&v| v == 0.0), "{kind:?}");
        }
    }
}

fn f16b(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

#[test]
fn block_semantics_match_ggml() {
    // Q4_0: value = (nibble - 8) * d; low nibbles are elements 0..16, high nibbles 16..32.
    let mut blk = Vec::new();
    blk.extend_from_slice(&f16b(0.5));
    for j in 0..16u8 {
        blk.push(j | ((15 - j) << 4));
    }
    let owned = QuantTensor::from_gguf(QuantKind::Q4_0, 1, 32, &blk);
    let w = owned.matrix();
    let mut out = [0.0f32; 32];
    dequantize_row(&w, 0, &mut out);
    for j in 0..16 {
        assert_eq!(out[j], (j as f32 - 8.0) * 0.5);
        assert_eq!(out[j + 16], ((15 - j) as f32 - 8.0) * 0.5);
    }
    // Q4_1: value = nibble * d + m.
    let mut blk = Vec::new();
    blk.extend_from_slice(&f16b(0.25));
    blk.extend_from_slice(&f16b(-1.0));
    for j in 0..16u8 {
        blk.push((j ^ 5) | (j << 4));
    }
    let owned = QuantTensor::from_gguf(QuantKind::Q4_1, 1, 32, &blk);
    let w = owned.matrix();
    dequantize_row(&w, 0, &mut out);
    for j in 0..16 {
        assert_eq!(out[j], (j ^ 5) as f32 * 0.25 - 1.0);
        assert_eq!(out[j + 16], j as f32 * 0.25 - 1.0);
    }
    // Q8_0: value = q * d.
    let mut blk = Vec::new();
    blk.extend_from_slice(&f16b(2.0));
    for j in 0..32i32 {
        blk.push(((j * 9 - 128) as i8) as u8);
    }
    let owned = QuantTensor::from_gguf(QuantKind::Q8_0, 1, 32, &blk);
    let w = owned.matrix();
    dequantize_row(&w, 0, &mut out);
    for j in 0..32 {
        assert_eq!(out[j], ((j as i32 * 9 - 128) as i8) as f32 * 2.0);
    }
}

#[test]
fn extreme_values() {
    // Q8_0 with full-range bytes (-128 included) and Q4 with all-15 nibbles: no saturation.
    for kind in KINDS {
        let (rows, cols) = (17, 128);
        let bb = kind.block_bytes();
        let mut bytes = vec![0u8; rows * kind.row_bytes(cols)];
        let mut rng = Rng(77);
        for blk in bytes.chunks_exact_mut(bb) {
            blk[..2].copy_from_slice(&f16b(0.01 + rng.f().abs()));
            let qs = if kind == QuantKind::Q4_1 {
                blk[2..4].copy_from_slice(&f16b(rng.f()));
                4
            } else {
                2
            };
            for (j, q) in blk[qs..].iter_mut().enumerate() {
                *q = if j % 3 == 0 {
                    0x80
                } else if j % 3 == 1 {
                    0xff
                } else {
                    0x7f
                };
            }
        }
        let owned = QuantTensor::from_gguf(kind, rows, cols, &bytes);
        let w = owned.matrix();
        let wd = dequantize(&w);
        for m in [1, 8] {
            let mut x: Vec<f32> = (0..m * cols)
                .map(|j| if j % 2 == 0 { 3.0 } else { -3.0 })
                .collect();
            x[0] = 100.0;
            let mut want = vec![0.0; m * rows];
            matmul_f64(&wd, rows, cols, &x, m, &mut want);
            let mut got = vec![0.0; m * rows];
            quant_matmul(&w, &x, m, &mut got);
            let tol = tolerance(&w, &wd, &x, m);
            for idx in 0..m * rows {
                assert!(
                    (got[idx] - want[idx]).abs() <= tol[idx],
                    "{kind:?} m={m} {idx}: {} vs {}",
                    got[idx],
                    want[idx]
                );
            }
        }
    }
}

#[test]
fn quant_kind_sizes() {
    assert_eq!(QuantKind::Q4_1.row_bytes(576), 18 * 20);
    assert_eq!(QuantKind::Q8_0.row_bytes(576), 18 * 34);
    assert_eq!(QuantKind::Q4_0.row_bytes(64), 36);
}

/// Real blocks from the SmolLM2 GGUF, if present (skipped otherwise).
#[test]
fn precise_activations_match_f32_math() {
    // The residual pass must bring int8-activation error down by orders of magnitude.
    for kind in [QuantKind::Q4_0, QuantKind::Q4_1, QuantKind::Q8_0] {
        for &(m, rows, cols) in &[(1, 96, 576), (3, 40, 160), (70, 33, 224)] {
            let mut rng = Rng(97 + m as u64 + rows as u64);
            let wf = rng.vec(rows * cols, 1.0);
            let data = quantize(kind, &wf, rows, cols);
            let owned = QuantTensor::from_gguf(kind, rows, cols, &data);
            let w = owned.matrix();
            let wd = dequantize(&w);
            let x = rng.vec(m * cols, 1.0);
            let mut want = vec![0.0; m * rows];
            matmul_f64(&wd, rows, cols, &x, m, &mut want);
            let mut got = vec![0.0; m * rows];
            quant_matmul_precise(&w, &x, m, &mut got);
            let tol = tolerance(&w, &wd, &x, m);
            for idx in 0..m * rows {
                // `tolerance` is the int8-activation bound; the precise path must beat it 50-fold.
                let err = (got[idx] - want[idx]).abs();
                assert!(
                    err <= tol[idx] / 50.0 + 1e-4,
                    "{kind:?} m={m} rows={rows} cols={cols} [{idx}]: {err} vs int8 bound {}",
                    tol[idx]
                );
            }
        }
    }
}

#[test]
fn vector_activation_quantization_matches_the_scalar_blocks() {
    let mut rng = Rng(11);
    let mut x = rng.vec(32 * 9, 3.0);
    x[32..64].fill(0.0); // an all-zero block: scale 0
    x[64] = 1e30; // one huge value: everything else rounds to 0
    for (i, v) in x[96..128].iter_mut().enumerate() {
        *v = (i as f32 - 16.0) * 0.5; // exact halves: ties round to even
    }
    let nb = x.len() / 32;
    let (mut want_q, mut want_d, mut want_s) = (vec![0i8; x.len()], vec![0f32; nb], vec![0f32; nb]);
    for b in 0..nb {
        let block = &x[b * 32..][..32];
        (want_d[b], want_s[b]) = quantize_block_scalar(block, &mut want_q[b * 32..][..32]);
    }
    #[cfg(target_arch = "x86_64")]
    for (name, available) in [("avx2", features().avx2), ("avx512", features().avx512)] {
        if !available {
            continue;
        }
        let (mut q, mut d, mut s) = (vec![0i8; x.len()], vec![0f32; nb], vec![0f32; nb]);
        // SAFETY: the feature was detected.
        unsafe {
            match name {
                "avx2" => x86::quantize_row_avx2(&x, &mut q, &mut d, &mut s),
                _ => x86::quantize_row_avx512(&x, &mut q, &mut d, &mut s),
            }
        }
        assert_eq!(q, want_q, "{name} values");
        assert_eq!(d, want_d, "{name} scales");
        assert_eq!(s, want_s, "{name} sums");
    }
}

#[test]
fn vector_residual_quantization_matches_the_scalar_blocks() {
    let mut rng = Rng(13);
    let mut x = rng.vec(32 * 6, 3.0);
    x[32..64].fill(0.0); // an all-zero block: scale 0
    x[64] = 1e30; // one huge value: every other value (and residual) rounds to 0
    let nb = x.len() / 32;
    let (mut q, mut d, mut s) = (vec![0i8; x.len()], vec![0f32; nb], vec![0f32; nb]);
    for b in 0..nb {
        (d[b], s[b]) = quantize_block_scalar(&x[b * 32..][..32], &mut q[b * 32..][..32]);
    }
    // A residual of exactly half a step (x = 0.5·d): 128 steps of d/256, clamped to 127.
    x[96] = 127.0;
    x[97] = 0.5;
    (d[3], s[3]) = quantize_block_scalar(&x[96..128], &mut q[96..128]);
    let (mut want_q, mut want_d, mut want_s) = (vec![0i8; x.len()], vec![0f32; nb], vec![0f32; nb]);
    quantize_residual_row_scalar(&x, (&q, &d), (&mut want_q, &mut want_d, &mut want_s));
    assert_eq!(d[3], 1.0);
    assert_eq!(
        (q[97], want_q[97]),
        (0, 127),
        "half a step rounds to even, then clamps"
    );
    for b in 0..nb {
        assert_eq!(want_d[b], d[b] / 256.0, "residual scale of block {b}");
        for j in b * 32..b * 32 + 32 {
            let rest = x[j] - d[b] * q[j] as f32;
            assert!((rest - want_d[b] * want_q[j] as f32).abs() <= want_d[b] * 1.5);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if features().avx2 {
        let (mut rq, mut rd, mut rs) = (vec![0i8; x.len()], vec![0f32; nb], vec![0f32; nb]);
        // SAFETY: the feature was detected.
        unsafe { x86::quantize_residual_row_avx2(&x, (&q, &d), (&mut rq, &mut rd, &mut rs)) };
        assert_eq!(rq, want_q, "values");
        assert_eq!(rd, want_d, "scales");
        assert_eq!(rs, want_s, "sums");
    }
}

#[test]
fn precise_products_of_several_matrices_equal_one_at_a_time() {
    // Row counts off the 16-row groups, so the matrices' joint range has gaps; enough work for
    // the pool to split it into single groups.
    let (m, cols) = (64, 256);
    let mut rng = Rng(29);
    let owned: Vec<QuantTensor> = [
        (40, QuantKind::Q4_1),
        (33, QuantKind::Q4_0),
        (16, QuantKind::Q8_0),
    ]
    .iter()
    .map(|&(rows, kind)| {
        let data = quantize(kind, &rng.vec(rows * cols, 1.0), rows, cols);
        QuantTensor::from_gguf(kind, rows, cols, &data)
    })
    .collect();
    let ws: Vec<QuantMatrix> = owned.iter().map(|w| w.matrix()).collect();
    let x = rng.vec(m * cols, 1.0);
    let mut together: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; m * w.rows]).collect();
    let mut slices: Vec<&mut [f32]> = together.iter_mut().map(Vec::as_mut_slice).collect();
    quant_matmul_precise_many(&ws, &x, m, &mut slices);
    for (w, got) in ws.iter().zip(&together) {
        let mut alone = vec![0.0; m * w.rows];
        quant_matmul_precise(w, &x, m, &mut alone);
        assert_eq!(got, &alone, "{:?} with {} rows", w.kind, w.rows);
    }
}

#[test]
fn precise_products_of_empty_matrices_write_nothing() {
    let (m, cols) = (3, 64);
    let data = quantize(QuantKind::Q4_1, &[], 0, cols);
    let empty = QuantTensor::from_gguf(QuantKind::Q4_1, 0, cols, &data);
    let x = Rng(5).vec(m * cols, 1.0);
    quant_matmul_precise_many(&[empty.matrix()], &x, m, &mut [&mut []]);
}
