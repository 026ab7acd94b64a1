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
    x.iter_mut().zip(residual).for_each(|(v, r)| *v += r);
    let (mean, inverse) = row_statistics(x, eps);
    for ((v, g), b) in x.iter_mut().zip(gamma).zip(beta) {
        *v = (*v - mean) * inverse * g + b;
    }
}

/// A row's mean and 1 / √(variance + eps).
#[inline(always)]
fn row_statistics(x: &[f32], eps: f32) -> (f32, f32) {
    let h = x.len();
    let whole = h / LANES * LANES;
    let mut lanes = [0f32; LANES];
    for xc in x[..whole].chunks_exact(LANES) {
        for i in 0..LANES {
            lanes[i] += xc[i];
        }
    }
    // The tail added one by one after the lanes, in the order the fused pass used to.
    let mut sum: f32 = lanes.iter().sum();
    for v in &x[whole..] {
        sum += v;
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
    (mean, 1.0 / (squares / h as f32 + eps).sqrt())
}

/// Rows of LayerNorm per parallel task in training (a few tens of KB of each tensor).
const TRAINING_ROWS: usize = 32;

/// Training's LayerNorm: `out` = LayerNorm of the rows of `x` (rows of `gamma.len()`), on
/// rayon's pool, where candle's GEMMs between these kernels run too.
pub fn layer_norm(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    let h = gamma.len();
    assert!(
        h > 0 && x.len().is_multiple_of(h),
        "rows of the LayerNorm size"
    );
    assert_eq!((beta.len(), out.len()), (h, x.len()), "LayerNorm shapes");
    super::parallel_rows(out, h, TRAINING_ROWS, |r0, r1, out| {
        norm_rows(&x[r0 * h..r1 * h], gamma, beta, eps, out)
    });
}

with_avx2! {
    fn norm_rows(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) = norm_rows_portable
}

#[inline(always)]
fn norm_rows_portable(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    let h = gamma.len();
    for (row, y) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let (mean, inverse) = row_statistics(row, eps);
        for (((y, v), g), b) in y.iter_mut().zip(row).zip(gamma).zip(beta) {
            *y = (v - mean) * inverse * g + b;
        }
    }
}

/// A norm backward pass's inputs: rows of `h` in `x`, and `dy`, `dx` of `x`'s shape.
fn check_backward_shapes(norm: &str, x: &[f32], h: usize, dy: &[f32], dx: &[f32]) {
    assert!(
        h > 0 && x.len().is_multiple_of(h),
        "rows of the {norm} size"
    );
    assert_eq!(
        (dy.len(), dx.len()),
        (x.len(), x.len()),
        "{norm} gradient shapes"
    );
}

/// Gradients of [`layer_norm`] given the output's gradient `dy`: `dx` is written, and
/// (dgamma, dbeta) returned. With x̂ = (x − mean)·r and g = dy·gamma, per row
/// dx = r·(g − mean(g) − x̂·mean(g·x̂)); dgamma = Σ dy·x̂, dbeta = Σ dy over rows.
pub fn layer_norm_backward(
    x: &[f32],
    gamma: &[f32],
    eps: f32,
    dy: &[f32],
    dx: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let h = gamma.len();
    check_backward_shapes("LayerNorm", x, h, dy, dx);
    let dxp = super::SendPtr(dx.as_mut_ptr());
    let mut sums = super::chunked_sums(x.len() / h, TRAINING_ROWS, 2 * h, |r0, r1, partial| {
        // SAFETY: rows r0..r1 of dx belong to this chunk; dx outlives the call.
        let dx = unsafe { std::slice::from_raw_parts_mut(dxp.get().add(r0 * h), (r1 - r0) * h) };
        let (x, dy) = (&x[r0 * h..r1 * h], &dy[r0 * h..r1 * h]);
        backward_rows(x, gamma, eps, dy, dx, partial)
    });
    let dbeta = sums.split_off(h);
    (sums, dbeta)
}

with_avx2! {
    /// Rows of [`layer_norm_backward`]; `sums` = [dgamma | dbeta] to add to.
    fn backward_rows(x: &[f32], gamma: &[f32], eps: f32, dy: &[f32], dx: &mut [f32], sums: &mut [f32]) = backward_rows_portable
}

#[inline(always)]
fn backward_rows_portable(
    x: &[f32],
    gamma: &[f32],
    eps: f32,
    dy: &[f32],
    dx: &mut [f32],
    sums: &mut [f32],
) {
    let h = gamma.len();
    let (dgamma, dbeta) = sums.split_at_mut(h);
    let rows = x.chunks_exact(h).zip(dy.chunks_exact(h));
    for ((x, dy), dx) in rows.zip(dx.chunks_exact_mut(h)) {
        let statistics = row_statistics(x, eps);
        backward_row::<true>(x, gamma, statistics, dy, dx, dgamma, dbeta);
    }
}

/// One row of a norm's backward pass given the row's mean (0 for RMSNorm) and 1/scale r: dx
/// written, dgamma (and dbeta when `CENTRED`) added to. With x̂ = (x − mean)·r and
/// g = dy·gamma, dx = r·(g − mean(g) − x̂·mean(g·x̂)) for LayerNorm and r·(g − x̂·mean(g·x̂))
/// for RMSNorm (no centring).
#[inline(always)]
fn backward_row<const CENTRED: bool>(
    x: &[f32],
    gamma: &[f32],
    (mean, inverse): (f32, f32),
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let h = x.len();
    // dx holds x̂ until the row's means are known; the sums in LANES lanes (then the tail).
    let (mut g_lanes, mut gx_lanes) = ([0f32; LANES], [0f32; LANES]);
    let mut step = |k: usize, lane: usize| {
        let normed = (x[k] - mean) * inverse;
        let g = dy[k] * gamma[k];
        g_lanes[lane] += g;
        gx_lanes[lane] += g * normed;
        dgamma[k] += dy[k] * normed;
        if CENTRED {
            dbeta[k] += dy[k];
        }
        dx[k] = normed;
    };
    let whole = h / LANES * LANES;
    for k0 in (0..whole).step_by(LANES) {
        for lane in 0..LANES {
            step(k0 + lane, lane);
        }
    }
    for k in whole..h {
        step(k, 0);
    }
    let mean_g = if CENTRED {
        g_lanes.iter().sum::<f32>() / h as f32
    } else {
        0.0
    };
    let mean_gx = gx_lanes.iter().sum::<f32>() / h as f32;
    for k in 0..h {
        dx[k] = inverse * (dy[k] * gamma[k] - mean_g - dx[k] * mean_gx);
    }
}

/// Training's RMSNorm (Llama's): `out = x·r·gamma` per row of `gamma.len()`, with
/// r = 1 / √(mean(x²) + eps); on rayon's pool as [`layer_norm`].
pub fn rms_norm(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
    let h = gamma.len();
    assert!(
        h > 0 && x.len().is_multiple_of(h),
        "rows of the RMSNorm size"
    );
    assert_eq!(out.len(), x.len(), "RMSNorm shapes");
    super::parallel_rows(out, h, TRAINING_ROWS, |r0, r1, out| {
        rms_rows(&x[r0 * h..r1 * h], gamma, eps, out)
    });
}

with_avx2! {
    fn rms_rows(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) = rms_rows_portable
}

#[inline(always)]
fn rms_rows_portable(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
    let h = gamma.len();
    for (row, y) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let inverse = rms_inverse(row, eps);
        for ((y, v), g) in y.iter_mut().zip(row).zip(gamma) {
            *y = v * inverse * g;
        }
    }
}

/// 1 / √(mean(x²) + eps) of a row, the squares summed in LANES lanes.
#[inline(always)]
fn rms_inverse(x: &[f32], eps: f32) -> f32 {
    let whole = x.len() / LANES * LANES;
    let mut lanes = [0f32; LANES];
    for xc in x[..whole].chunks_exact(LANES) {
        for i in 0..LANES {
            lanes[i] += xc[i] * xc[i];
        }
    }
    let squares = lanes.iter().sum::<f32>() + x[whole..].iter().map(|v| v * v).sum::<f32>();
    1.0 / (squares / x.len() as f32 + eps).sqrt()
}

/// Gradients of [`rms_norm`] given the output's gradient `dy`: `dx` is written and dgamma
/// returned. With x̂ = x·r and g = dy·gamma, per row dx = r·(g − x̂·mean(g·x̂)) (LayerNorm's
/// without the centring terms); dgamma = Σ dy·x̂ over rows.
pub fn rms_norm_backward(
    x: &[f32],
    gamma: &[f32],
    eps: f32,
    dy: &[f32],
    dx: &mut [f32],
) -> Vec<f32> {
    let h = gamma.len();
    check_backward_shapes("RMSNorm", x, h, dy, dx);
    let dxp = super::SendPtr(dx.as_mut_ptr());
    super::chunked_sums(x.len() / h, TRAINING_ROWS, h, |r0, r1, dgamma| {
        // SAFETY: rows r0..r1 of dx belong to this chunk; dx outlives the call.
        let dx = unsafe { std::slice::from_raw_parts_mut(dxp.get().add(r0 * h), (r1 - r0) * h) };
        rms_backward_rows(
            &x[r0 * h..r1 * h],
            gamma,
            eps,
            &dy[r0 * h..r1 * h],
            dx,
            dgamma,
        )
    })
}

with_avx2! {
    /// Rows of [`rms_norm_backward`]; dgamma to add to.
    fn rms_backward_rows(x: &[f32], gamma: &[f32], eps: f32, dy: &[f32], dx: &mut [f32], dgamma: &mut [f32]) = rms_backward_rows_portable
}

#[inline(always)]
fn rms_backward_rows_portable(
    x: &[f32],
    gamma: &[f32],
    eps: f32,
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
) {
    let h = gamma.len();
    let rows = x.chunks_exact(h).zip(dy.chunks_exact(h));
    for ((x, dy), dx) in rows.zip(dx.chunks_exact_mut(h)) {
        let statistics = (0.0, rms_inverse(x, eps));
        backward_row::<false>(x, gamma, statistics, dy, dx, dgamma, &mut []);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// d loss / d values[i] by central differences (step 1e-2), perturbing a copy.
    fn numeric_gradient(values: &[f32], i: usize, loss: impl Fn(&[f32]) -> f64) -> f64 {
        let at = |d: f32| {
            let mut v = values.to_vec();
            v[i] += d;
            loss(&v)
        };
        (at(1e-2) - at(-1e-2)) / 2e-2
    }

    #[test]
    fn layer_norm_gradients_match_finite_differences() {
        let (h, rows, eps) = (40, 5, 1e-5f32);
        let value = |i: usize| ((i * 7919) % 97) as f32 / 97.0 - 0.5;
        let x: Vec<f32> = (0..h * rows).map(|i| 3.0 * value(i) + 0.5).collect();
        let gamma: Vec<f32> = (0..h).map(|i| 1.0 + value(i + 11)).collect();
        let beta: Vec<f32> = (0..h).map(|i| value(i + 23)).collect();
        let dy: Vec<f32> = (0..h * rows).map(|i| value(i + 31)).collect();
        // loss = Σ dy · LayerNorm(x), in f64 for the differences.
        let loss = |x: &[f32], gamma: &[f32], beta: &[f32]| -> f64 {
            let mut out = vec![0f32; x.len()];
            layer_norm(x, gamma, beta, eps, &mut out);
            out.iter()
                .zip(&dy)
                .map(|(o, d)| *o as f64 * *d as f64)
                .sum()
        };
        let mut dx = vec![0f32; x.len()];
        let (dgamma, dbeta) = layer_norm_backward(&x, &gamma, eps, &dy, &mut dx);
        for i in [0, 3, 39, 41, 150, 199] {
            let want = numeric_gradient(&x, i, |x| loss(x, &gamma, &beta));
            assert!(
                (dx[i] as f64 - want).abs() < 2e-3,
                "dx[{i}] {} vs {want}",
                dx[i]
            );
        }
        for i in [0, 17, 39] {
            let want = numeric_gradient(&gamma, i, |g| loss(&x, g, &beta));
            assert!((dgamma[i] as f64 - want).abs() < 2e-3, "dgamma[{i}]");
            let want = numeric_gradient(&beta, i, |b| loss(&x, &gamma, b));
            assert!((dbeta[i] as f64 - want).abs() < 2e-3, "dbeta[{i}]");
        }
    }

    #[test]
    fn rms_norm_matches_its_definition_and_finite_differences() {
        // 40 columns: whole lanes and a tail.
        let (h, rows, eps) = (40, 5, 1e-5f32);
        let value = |i: usize| ((i * 7919) % 97) as f32 / 97.0 - 0.5;
        let x: Vec<f32> = (0..h * rows).map(|i| 3.0 * value(i) + 0.5).collect();
        let gamma: Vec<f32> = (0..h).map(|i| 1.0 + value(i + 11)).collect();
        let dy: Vec<f32> = (0..h * rows).map(|i| value(i + 31)).collect();
        let reference = |x: &[f32], gamma: &[f32]| -> Vec<f64> {
            x.chunks_exact(h)
                .flat_map(|row| {
                    let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / h as f64;
                    let r = 1.0 / (ms + eps as f64).sqrt();
                    row.iter()
                        .zip(gamma)
                        .map(move |(&v, &g)| v as f64 * r * g as f64)
                })
                .collect()
        };
        let mut out = vec![0f32; x.len()];
        rms_norm(&x, &gamma, eps, &mut out);
        for (got, want) in out.iter().zip(reference(&x, &gamma)) {
            assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        }
        let loss = |x: &[f32], gamma: &[f32]| -> f64 {
            reference(x, gamma)
                .iter()
                .zip(&dy)
                .map(|(y, d)| y * *d as f64)
                .sum()
        };
        let mut dx = vec![f32::NAN; x.len()];
        let dgamma = rms_norm_backward(&x, &gamma, eps, &dy, &mut dx);
        for i in (0..x.len()).step_by(7) {
            let want = numeric_gradient(&x, i, |x| loss(x, &gamma));
            assert!(
                (dx[i] as f64 - want).abs() < 2e-3,
                "dx[{i}] {} vs {want}",
                dx[i]
            );
        }
        for i in [0, 17, 39] {
            let want = numeric_gradient(&gamma, i, |g| loss(&x, g));
            assert!((dgamma[i] as f64 - want).abs() < 2e-3, "dgamma[{i}]");
        }
    }

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
