//! Residual add + LayerNorm over host rows, in one pass over memory per row.
//!
//! The post-LayerNorm blocks of BERT-family encoders end twice in `LN(x + residual)`; as separate
//! framework ops that is an addition into a fresh buffer and a norm into another.

/// Lanes of the partial sums: independent accumulators, so the compiler vectorises the
/// reductions without reordering any one lane's additions.
const LANES: usize = 16;

/// `x ← LayerNorm(x + residual)` row by row (rows of `gamma.len()`), with weight `gamma`, bias
/// `beta`; mean and variance in two passes (no cancellation from `E[x²] − E[x]²`).
pub fn add_layer_norm(x: &mut [f32], residual: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let h = gamma.len();
    assert!(h > 0, "empty LayerNorm");
    assert_eq!(beta.len(), h, "LayerNorm bias length");
    assert_eq!(x.len() % h, 0, "rows of the LayerNorm size");
    assert_eq!(residual.len(), x.len(), "residual shape");
    let base = super::SendPtr(x.as_mut_ptr());
    // ~10 flops and 12 bytes per element.
    super::parallel_chunks(x.len() / h, h * 12, |r0, r1| {
        // SAFETY: rows r0..r1 of x belong to this task; x outlives the call.
        let rows = unsafe { std::slice::from_raw_parts_mut(base.get().add(r0 * h), (r1 - r0) * h) };
        let residual = &residual[r0 * h..r1 * h];
        #[cfg(target_arch = "x86_64")]
        if super::features().avx512 {
            // SAFETY: AVX-512F detected.
            unsafe { rows_avx512(rows, residual, gamma, beta, eps) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if super::features().avx2 {
            // SAFETY: AVX2 detected.
            unsafe { rows_avx2(rows, residual, gamma, beta, eps) };
            return;
        }
        rows_portable(rows, residual, gamma, beta, eps);
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(x: &mut [f32], residual: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    rows_portable(x, residual, gamma, beta, eps)
}

/// The same code compiled for AVX2 (the lane sums vectorise as two 8-wide registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rows_avx2(x: &mut [f32], residual: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    rows_portable(x, residual, gamma, beta, eps)
}

#[inline(always)]
fn rows_portable(x: &mut [f32], residual: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let h = gamma.len();
    for (row, res) in x.chunks_exact_mut(h).zip(residual.chunks_exact(h)) {
        add_norm_row(row, res, gamma, beta, eps);
    }
}

#[inline(always)]
fn add_norm_row(x: &mut [f32], residual: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let h = x.len();
    let whole = h / LANES * LANES;
    let mut lanes = [0f32; LANES];
    for (xc, rc) in x[..whole]
        .chunks_exact_mut(LANES)
        .zip(residual[..whole].chunks_exact(LANES))
    {
        for i in 0..LANES {
            xc[i] += rc[i];
            lanes[i] += xc[i];
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for (v, r) in x[whole..].iter_mut().zip(&residual[whole..]) {
        *v += r;
        sum += *v;
    }
    let mean = sum / h as f32;

    let mut lanes = [0f32; LANES];
    for xc in x[..whole].chunks_exact(LANES) {
        for i in 0..LANES {
            let d = xc[i] - mean;
            lanes[i] += d * d;
        }
    }
    let mut squares: f32 = lanes.iter().sum();
    for v in &x[whole..] {
        squares += (v - mean) * (v - mean);
    }
    let inverse = 1.0 / (squares / h as f32 + eps).sqrt();

    for ((v, g), b) in x.iter_mut().zip(gamma).zip(beta) {
        *v = (*v - mean) * inverse * g + b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_float64_layer_norm_of_the_sum() {
        let mut seed = 3u32;
        let mut rand = move || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        // 384 (whole lanes), 40 (lanes + a tail), 7 (tail only); an offset far from zero
        // exposes the one-pass variance's cancellation.
        for (h, rows, offset) in [(384, 70, 0.0), (40, 5, 0.0), (7, 3, 0.0), (64, 4, 1000.0)] {
            let x: Vec<f32> = (0..h * rows).map(|_| rand() * 4.0 + offset).collect();
            let r: Vec<f32> = (0..h * rows).map(|_| rand()).collect();
            let g: Vec<f32> = (0..h).map(|_| 1.0 + rand()).collect();
            let b: Vec<f32> = (0..h).map(|_| rand()).collect();
            let mut got = x.clone();
            add_layer_norm(&mut got, &r, &g, &b, 1e-12);
            for row in 0..rows {
                let v: Vec<f64> = (0..h)
                    .map(|i| x[row * h + i] as f64 + r[row * h + i] as f64)
                    .collect();
                let mean = v.iter().sum::<f64>() / h as f64;
                let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / h as f64;
                for i in 0..h {
                    let want = (v[i] - mean) / (var + 1e-12).sqrt() * g[i] as f64 + b[i] as f64;
                    let tolerance = if offset == 0.0 { 2e-6 } else { 2e-3 };
                    let got = got[row * h + i] as f64;
                    assert!(
                        (got - want).abs() < tolerance,
                        "h {h} row {row} [{i}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
