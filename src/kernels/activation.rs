//! Element-wise activations that candle computes one scalar libm call at a time.

/// Exact-GELU (`x·Φ(x)`, transformers' `gelu`) in place. erf uses Abramowitz & Stegun 7.1.26
/// (absolute error ≤ 1.5e-7), the same order as f32 rounding, so results match PyTorch to ~1e-7.
pub fn gelu_erf_inplace(values: &mut [f32]) {
    in_parallel(values, gelu_erf_serial)
}

/// [`gelu_erf_inplace`] on the calling thread.
pub(crate) fn gelu_erf_serial(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::features().avx512 {
        // SAFETY: AVX-512F detected.
        unsafe { x86::gelu_erf(values) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::features().avx2 {
        // SAFETY: AVX2 and FMA detected.
        unsafe { x86::avx2::gelu_erf(values) };
        return;
    }
    for v in values.iter_mut() {
        *v = gelu_erf_scalar(*v);
    }
}

/// Exact GELU's backward pass on the calling thread: `x ← dy · GELU'(x)`, where
/// GELU'(x) = Φ(x) + x·φ(x) (φ the standard normal density).
pub(crate) fn gelu_erf_backward_serial(x: &mut [f32], dy: &[f32]) {
    assert_eq!(
        x.len(),
        dy.len(),
        "GELU input and gradient differ in length"
    );
    #[cfg(target_arch = "x86_64")]
    if super::features().avx512 {
        // SAFETY: AVX-512F detected; the lengths are equal.
        unsafe { x86::gelu_erf_backward(x, dy) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::features().avx2 {
        // SAFETY: AVX2 and FMA detected; the lengths are equal.
        unsafe { x86::avx2::gelu_erf_backward(x, dy) };
        return;
    }
    for (v, g) in x.iter_mut().zip(dy) {
        *v = g * gelu_erf_derivative_scalar(*v);
    }
}

/// `f` over contiguous pieces of `values` on the kernel pool (a batch's feed-forward
/// activations are megabytes; small inputs stay on the calling thread).
fn in_parallel(values: &mut [f32], f: impl Fn(&mut [f32]) + Sync) {
    let base = super::SendPtr(values.as_mut_ptr());
    // ~20 flops per element: weigh each like 16 bytes streamed.
    super::parallel_chunks(values.len(), 16, |start, end| {
        // SAFETY: the chunks are disjoint pieces of `values`, which outlives the call.
        f(unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) })
    });
}

/// SiLU (`x / (1 + e^(-x))`, also called swish) in place.
pub fn silu_inplace(values: &mut [f32]) {
    in_parallel(values, |values| silu_mul_serial(values, None))
}

/// SwiGLU's gating in place: `gate ← silu(gate) · up`, one pass instead of candle's libm
/// exponential per element, its product and two fresh tensors.
pub fn silu_mul_inplace(gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "SwiGLU's gate and up projections differ in length"
    );
    let base = super::SendPtr(gate.as_mut_ptr());
    super::parallel_chunks(gate.len(), 16, |start, end| {
        // SAFETY: the chunks are disjoint pieces of `gate`, which outlives the call.
        let gate = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        silu_mul_serial(gate, Some(&up[start..end]))
    });
}

/// `gate ← silu(gate) (· up)` on the calling thread.
pub(crate) fn silu_mul_serial(gate: &mut [f32], up: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    if super::features().avx512 {
        // SAFETY: AVX-512F detected; `up`, where given, is as long as `gate`.
        unsafe { x86::silu_mul(gate, up) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::features().avx2 {
        // SAFETY: AVX2 and FMA detected; `up`, where given, is as long as `gate`.
        unsafe { x86::avx2::silu_mul(gate, up) };
        return;
    }
    for (i, g) in gate.iter_mut().enumerate() {
        *g = *g / (1.0 + (-*g).exp()) * up.map_or(1.0, |u| u[i]);
    }
}

/// Tanh-approximated GELU (transformers' `gelu_new` / `gelu_pytorch_tanh`) in place, through
/// the identity 0.5·(1 + tanh(u)) = 1 / (1 + e^(-2u)), u = √(2/π)·(x + 0.044715·x³).
pub fn gelu_tanh_inplace(values: &mut [f32]) {
    in_parallel(values, |values| {
        #[cfg(target_arch = "x86_64")]
        if super::features().avx512 {
            // SAFETY: AVX-512F detected.
            unsafe { x86::gelu_tanh(values) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if super::features().avx2 {
            // SAFETY: AVX2 and FMA detected.
            unsafe { x86::avx2::gelu_tanh(values) };
            return;
        }
        for v in values.iter_mut() {
            *v = gelu_tanh_scalar(*v);
        }
    })
}

/// Softmax in place: `values` become e^(v − max) / Σ.
pub fn softmax_inplace(values: &mut [f32]) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inverse = 1.0 / exp_shifted_inplace(values, max);
    values.iter_mut().for_each(|p| *p *= inverse);
}

/// Log-softmax in place: `v ← v − max − ln Σ e^(v − max)`.
pub fn log_softmax_inplace(values: &mut [f32]) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut numerators = values.to_vec();
    let log_sum = exp_shifted_inplace(&mut numerators, max).ln();
    values.iter_mut().for_each(|v| *v = *v - max - log_sum);
}

/// `v ← e^(v − max)` in place (softmax numerators); returns their sum. The vector path's
/// exponential is within ~2e-7 relative of libm's.
pub fn exp_shifted_inplace(values: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::features().avx512 {
        // SAFETY: AVX-512F detected.
        unsafe { x86::exp_shifted(values, max) };
        let mut lanes = [0f32; 16];
        let mut chunks = values.chunks_exact(16);
        for c in &mut chunks {
            for l in 0..16 {
                lanes[l] += c[l];
            }
        }
        return lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    }
    #[cfg(target_arch = "x86_64")]
    if super::features().avx2 {
        // SAFETY: AVX2 and FMA detected.
        return unsafe { x86::avx2::exp_shifted(values, max) };
    }
    let mut sum = 0f32;
    for v in values.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    sum
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const CUBIC: f32 = 0.044_715;

fn gelu_tanh_scalar(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + CUBIC * x * x * x);
    0.5 * x * (1.0 + u.tanh())
}

const P: f32 = 0.327_591_1;
const A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_7,
    -1.453_152_1,
    1.061_405_4,
];

/// 1 / √(2π): the standard normal density at 0.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// erf(x / √2) and e^(−x²/2), which the approximation computes on the way.
fn erf_parts_scalar(x: f32) -> (f32, f32) {
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let gauss = (-z * z).exp();
    let erf_abs = 1.0 - poly * gauss;
    (if x < 0.0 { -erf_abs } else { erf_abs }, gauss)
}

fn gelu_erf_scalar(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_parts_scalar(x).0)
}

fn gelu_erf_derivative_scalar(x: f32) -> f32 {
    let (erf, gauss) = erf_parts_scalar(x);
    0.5 * (1.0 + erf) + x * gauss * INV_SQRT_2PI
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use super::{A, CUBIC, INV_SQRT_2PI, P, SQRT_2_OVER_PI};

    /// e^y, y clamped to [-87, 88]: 2^n · e^r with |r| ≤ ln2/2, degree-6 Taylor.
    #[inline(always)]
    pub(crate) unsafe fn exp_clamped(y: __m512) -> __m512 {
        unsafe {
            let y = _mm512_min_ps(
                _mm512_max_ps(y, _mm512_set1_ps(-87.0)),
                _mm512_set1_ps(88.0),
            );
            let n = _mm512_roundscale_ps(
                _mm512_mul_ps(y, _mm512_set1_ps(std::f32::consts::LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(std::f32::consts::LN_2), y);
            let mut p = _mm512_set1_ps(1.0 / 720.0);
            for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            _mm512_scalef_ps(p, n)
        }
    }

    /// Apply `f` to 16 lanes at a time, the tail through a mask.
    #[inline(always)]
    unsafe fn map16(values: &mut [f32], f: impl Fn(__m512) -> __m512) {
        let mut chunks = values.chunks_exact_mut(16);
        for chunk in &mut chunks {
            unsafe {
                let x = _mm512_loadu_ps(chunk.as_ptr());
                _mm512_storeu_ps(chunk.as_mut_ptr(), f(x));
            }
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mask = ((1u32 << rest.len()) - 1) as u16;
            unsafe {
                let x = _mm512_maskz_loadu_ps(mask, rest.as_ptr());
                _mm512_mask_storeu_ps(rest.as_mut_ptr(), mask, f(x));
            }
        }
    }

    /// `values ← f(values, other)` 16 lanes at a time, the tail through a mask; `other` is
    /// as long as `values`.
    #[inline(always)]
    unsafe fn zip_map16(values: &mut [f32], other: &[f32], f: impl Fn(__m512, __m512) -> __m512) {
        let n = values.len();
        let (v, o) = (values.as_mut_ptr(), other.as_ptr());
        let mut i = 0;
        while i < n {
            let mask = if n - i >= 16 {
                u16::MAX
            } else {
                ((1u32 << (n - i)) - 1) as u16
            };
            unsafe {
                let x = _mm512_maskz_loadu_ps(mask, v.add(i));
                let y = f(x, _mm512_maskz_loadu_ps(mask, o.add(i)));
                _mm512_mask_storeu_ps(v.add(i), mask, y);
            }
            i += 16;
        }
    }

    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn exp_shifted(values: &mut [f32], max: f32) {
        unsafe {
            let shift = _mm512_set1_ps(max);
            map16(values, |x| exp_clamped(_mm512_sub_ps(x, shift)));
        }
    }

    /// `gate ← gate / (1 + e^(-gate)) (· up)`; `up`, where given, as long as `gate`.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn silu_mul(gate: &mut [f32], up: Option<&[f32]>) {
        let one = _mm512_set1_ps(1.0);
        let silu = |x: __m512| unsafe {
            let e = exp_clamped(_mm512_sub_ps(_mm512_setzero_ps(), x));
            _mm512_div_ps(x, _mm512_add_ps(one, e))
        };
        match up {
            None => unsafe { map16(gate, silu) },
            Some(up) => unsafe { zip_map16(gate, up, |x, u| _mm512_mul_ps(silu(x), u)) },
        }
    }

    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn gelu_erf(values: &mut [f32]) {
        unsafe { map16(values, |x| gelu_erf16(x)) }
    }

    /// `x ← dy · (Φ(x) + x·φ(x))`; `dy` as long as `x`.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn gelu_erf_backward(x: &mut [f32], dy: &[f32]) {
        unsafe {
            zip_map16(x, dy, |x, dy| {
                let (erf, gauss) = erf_parts16(x);
                let half = _mm512_set1_ps(0.5);
                let cdf = _mm512_fmadd_ps(half, erf, half);
                let density = _mm512_mul_ps(gauss, _mm512_set1_ps(INV_SQRT_2PI));
                _mm512_mul_ps(dy, _mm512_fmadd_ps(x, density, cdf))
            })
        }
    }

    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn gelu_tanh(values: &mut [f32]) {
        unsafe { map16(values, |x| gelu_tanh16(x)) }
    }

    /// x / (1 + e^(-2u)); for very negative x the exponential saturates and the result is -0.
    #[inline(always)]
    unsafe fn gelu_tanh16(x: __m512) -> __m512 {
        unsafe {
            let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
            let u = _mm512_mul_ps(
                _mm512_set1_ps(SQRT_2_OVER_PI),
                _mm512_fmadd_ps(_mm512_set1_ps(CUBIC), x3, x),
            );
            let e = exp_clamped(_mm512_mul_ps(_mm512_set1_ps(-2.0), u));
            _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e))
        }
    }

    /// erf(x / √2) and e^(−x²/2), as `erf_parts_scalar`.
    #[inline(always)]
    unsafe fn erf_parts16(x: __m512) -> (__m512, __m512) {
        unsafe {
            let one = _mm512_set1_ps(1.0);
            let z = _mm512_abs_ps(_mm512_mul_ps(
                x,
                _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
            ));
            let t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(P), z, one));
            let mut poly = _mm512_set1_ps(A[4]);
            for c in [A[3], A[2], A[1], A[0]] {
                poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(c));
            }
            poly = _mm512_mul_ps(poly, t);
            let gauss = exp_clamped(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z)));
            let erf_abs = _mm512_fnmadd_ps(poly, gauss, one);
            // Give erf the sign of x.
            let sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN));
            let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs), sign));
            (erf, gauss)
        }
    }

    #[inline(always)]
    unsafe fn gelu_erf16(x: __m512) -> __m512 {
        unsafe {
            let erf = erf_parts16(x).0;
            _mm512_mul_ps(
                _mm512_mul_ps(_mm512_set1_ps(0.5), x),
                _mm512_add_ps(_mm512_set1_ps(1.0), erf),
            )
        }
    }

    /// The same functions eight lanes at a time on AVX2 + FMA, for CPUs without AVX-512.
    pub(crate) mod avx2 {
        use std::arch::x86_64::*;

        use super::super::{A, CUBIC, INV_SQRT_2PI, P, SQRT_2_OVER_PI};

        /// e^y, y clamped to [-87, 88], as the AVX-512 `exp_clamped`; 2^n is built in the
        /// exponent bits (AVX2 has no `scalef`).
        #[inline(always)]
        pub(crate) unsafe fn exp_clamped(y: __m256) -> __m256 {
            unsafe {
                let y = _mm256_min_ps(
                    _mm256_max_ps(y, _mm256_set1_ps(-87.0)),
                    _mm256_set1_ps(88.0),
                );
                let n = _mm256_round_ps(
                    _mm256_mul_ps(y, _mm256_set1_ps(std::f32::consts::LOG2_E)),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                );
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(std::f32::consts::LN_2), y);
                let mut p = _mm256_set1_ps(1.0 / 720.0);
                for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
                    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
                }
                let biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
                _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased)))
            }
        }

        /// Lanes `[0, n)` of an 8-lane mask (all for n ≥ 8).
        #[inline(always)]
        pub(crate) unsafe fn mask8(n: usize) -> __m256i {
            unsafe {
                let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), lanes)
            }
        }

        /// Apply `f` to 8 lanes at a time, the tail through a mask.
        #[inline(always)]
        unsafe fn map8(values: &mut [f32], f: impl Fn(__m256) -> __m256) {
            let mut chunks = values.chunks_exact_mut(8);
            for chunk in &mut chunks {
                unsafe {
                    let x = _mm256_loadu_ps(chunk.as_ptr());
                    _mm256_storeu_ps(chunk.as_mut_ptr(), f(x));
                }
            }
            let rest = chunks.into_remainder();
            if !rest.is_empty() {
                unsafe {
                    let mask = mask8(rest.len());
                    let x = _mm256_maskload_ps(rest.as_ptr(), mask);
                    _mm256_maskstore_ps(rest.as_mut_ptr(), mask, f(x));
                }
            }
        }

        /// `values ← f(values, other)` 8 lanes at a time, the tail through a mask; `other` is
        /// as long as `values`.
        #[inline(always)]
        unsafe fn zip_map8(
            values: &mut [f32],
            other: &[f32],
            f: impl Fn(__m256, __m256) -> __m256,
        ) {
            let n = values.len();
            let (v, o) = (values.as_mut_ptr(), other.as_ptr());
            let mut i = 0;
            while i < n {
                unsafe {
                    let mask = mask8(n - i);
                    let x = _mm256_maskload_ps(v.add(i), mask);
                    let y = f(x, _mm256_maskload_ps(o.add(i), mask));
                    _mm256_maskstore_ps(v.add(i), mask, y);
                }
                i += 8;
            }
        }

        /// `v ← e^(v − max)`; returns the sum.
        #[target_feature(enable = "avx2,fma")]
        pub(crate) unsafe fn exp_shifted(values: &mut [f32], max: f32) -> f32 {
            unsafe {
                let shift = _mm256_set1_ps(max);
                map8(values, |x| exp_clamped(_mm256_sub_ps(x, shift)));
            }
            let mut lanes = [0f32; 8];
            let mut chunks = values.chunks_exact(8);
            for c in &mut chunks {
                for l in 0..8 {
                    lanes[l] += c[l];
                }
            }
            lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
        }

        /// `gate ← gate / (1 + e^(-gate)) (· up)`; `up`, where given, as long as `gate`.
        #[target_feature(enable = "avx2,fma")]
        pub(crate) unsafe fn silu_mul(gate: &mut [f32], up: Option<&[f32]>) {
            let one = _mm256_set1_ps(1.0);
            let silu = |x: __m256| unsafe {
                let e = exp_clamped(_mm256_sub_ps(_mm256_setzero_ps(), x));
                _mm256_div_ps(x, _mm256_add_ps(one, e))
            };
            match up {
                None => unsafe { map8(gate, silu) },
                Some(up) => unsafe { zip_map8(gate, up, |x, u| _mm256_mul_ps(silu(x), u)) },
            }
        }

        #[target_feature(enable = "avx2,fma")]
        pub(crate) unsafe fn gelu_tanh(values: &mut [f32]) {
            unsafe {
                map8(values, |x| {
                    let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
                    let u = _mm256_mul_ps(
                        _mm256_set1_ps(SQRT_2_OVER_PI),
                        _mm256_fmadd_ps(_mm256_set1_ps(CUBIC), x3, x),
                    );
                    let e = exp_clamped(_mm256_mul_ps(_mm256_set1_ps(-2.0), u));
                    _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e))
                })
            }
        }

        /// erf(x / √2) and e^(−x²/2), as `erf_parts_scalar`.
        #[inline(always)]
        unsafe fn erf_parts8(x: __m256) -> (__m256, __m256) {
            unsafe {
                let one = _mm256_set1_ps(1.0);
                let sign_bit = _mm256_set1_ps(-0.0);
                let scaled = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
                let z = _mm256_andnot_ps(sign_bit, scaled);
                let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(P), z, one));
                let mut poly = _mm256_set1_ps(A[4]);
                for c in [A[3], A[2], A[1], A[0]] {
                    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(c));
                }
                poly = _mm256_mul_ps(poly, t);
                let gauss = exp_clamped(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(z, z)));
                let erf_abs = _mm256_fnmadd_ps(poly, gauss, one);
                (_mm256_or_ps(erf_abs, _mm256_and_ps(x, sign_bit)), gauss)
            }
        }

        #[target_feature(enable = "avx2,fma")]
        pub(crate) unsafe fn gelu_erf(values: &mut [f32]) {
            unsafe {
                map8(values, |x| {
                    let erf = erf_parts8(x).0;
                    _mm256_mul_ps(
                        _mm256_mul_ps(_mm256_set1_ps(0.5), x),
                        _mm256_add_ps(_mm256_set1_ps(1.0), erf),
                    )
                })
            }
        }

        /// `x ← dy · (Φ(x) + x·φ(x))`; `dy` as long as `x`.
        #[target_feature(enable = "avx2,fma")]
        pub(crate) unsafe fn gelu_erf_backward(x: &mut [f32], dy: &[f32]) {
            unsafe {
                zip_map8(x, dy, |x, dy| {
                    let (erf, gauss) = erf_parts8(x);
                    let half = _mm256_set1_ps(0.5);
                    let cdf = _mm256_fmadd_ps(half, erf, half);
                    let density = _mm256_mul_ps(gauss, _mm256_set1_ps(INV_SQRT_2PI));
                    _mm256_mul_ps(dy, _mm256_fmadd_ps(x, density, cdf))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Taylor series in f64 (converges fast for |x| ≤ 6 with enough terms).
    fn erf64(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn gelu_matches_the_exact_definition() {
        let xs: Vec<f32> = (-1000..=1000)
            .map(|i| i as f32 * 0.01)
            .chain([-40.0, 40.0, 0.0])
            .collect();
        let mut got = xs.clone();
        gelu_erf_inplace(&mut got);
        let mut avx2 = xs.clone();
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::features().avx2 {
            // SAFETY: AVX2 and FMA detected.
            unsafe { x86::avx2::gelu_erf(&mut avx2) };
        } else {
            avx2 = got.clone();
        }
        for ((x, g), v) in xs.iter().zip(&got).zip(&avx2) {
            assert!(
                (g - v).abs() <= 1e-6 * (1.0 + g.abs()),
                "gelu({x}): AVX2 {v} vs {g}"
            );
            let want = 0.5 * *x as f64 * (1.0 + erf64(*x as f64 / 2f64.sqrt()));
            assert!(
                (*g as f64 - want).abs() < 2e-6 * (1.0 + want.abs()),
                "gelu({x}) = {g}, want {want}"
            );
            assert!((gelu_erf_scalar(*x) as f64 - want).abs() < 2e-6 * (1.0 + want.abs()));
        }
    }

    #[test]
    fn gelu_backward_matches_the_derivative() {
        let xs: Vec<f32> = (-900..=900)
            .map(|i| i as f32 * 0.01)
            .chain([-40.0, 40.0, 0.0])
            .collect();
        let dy: Vec<f32> = (0..xs.len()).map(|i| (i % 5) as f32 - 1.5).collect();
        let mut got = xs.clone();
        gelu_erf_backward_serial(&mut got, &dy);
        for (i, x) in xs.iter().enumerate() {
            let x64 = *x as f64;
            let cdf = 0.5 * (1.0 + erf64(x64 / 2f64.sqrt()));
            let density = (-x64 * x64 / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let want = dy[i] as f64 * (cdf + x64 * density);
            assert!(
                (got[i] as f64 - want).abs() < 3e-6 * (1.0 + want.abs()),
                "GELU'({x}) · {}: {} vs {want}",
                dy[i],
                got[i]
            );
            let scalar = dy[i] * gelu_erf_derivative_scalar(*x);
            assert!((scalar as f64 - want).abs() < 3e-6 * (1.0 + want.abs()));
        }
    }

    #[test]
    fn silu_and_swiglu_match_the_definition() {
        let xs: Vec<f32> = (-1000..=1003)
            .map(|i| i as f32 * 0.013)
            .chain([-100.0, 100.0, 0.0])
            .collect();
        let up: Vec<f32> = (0..xs.len()).map(|i| (i % 7) as f32 - 3.25).collect();
        let want = |x: f32| x as f64 / (1.0 + (-x as f64).exp());
        let mut silu = xs.clone();
        silu_inplace(&mut silu);
        let mut swiglu = xs.clone();
        silu_mul_inplace(&mut swiglu, &up);
        let mut scalar = xs.clone();
        for (i, g) in scalar.iter_mut().enumerate() {
            *g = *g / (1.0 + (-*g).exp()) * up[i];
        }
        for i in 0..xs.len() {
            let w = want(xs[i]);
            assert!(
                (silu[i] as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()),
                "silu({})",
                xs[i]
            );
            let w = w * up[i] as f64;
            assert!(
                (swiglu[i] as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()),
                "swiglu at {i}"
            );
            assert!((scalar[i] as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()));
        }
    }

    #[test]
    fn shifted_exponentials_match_libm() {
        let mut values: Vec<f32> = (0..37).map(|i| i as f32 * 0.7 - 20.0).collect();
        let want: Vec<f64> = values.iter().map(|&v| ((v - 5.0) as f64).exp()).collect();
        let sum = exp_shifted_inplace(&mut values, 5.0);
        for (got, want) in values.iter().zip(&want) {
            assert!(
                (*got as f64 - want).abs() <= 3e-7 * want + 1e-30,
                "{got} vs {want}"
            );
        }
        let total: f64 = want.iter().sum();
        assert!((sum as f64 - total).abs() <= 1e-6 * total);
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::features().avx2 {
            let mut values: Vec<f32> = (0..37).map(|i| i as f32 * 0.7 - 20.0).collect();
            // SAFETY: AVX2 and FMA detected.
            let sum = unsafe { x86::avx2::exp_shifted(&mut values, 5.0) };
            for (got, want) in values.iter().zip(&want) {
                assert!(
                    (*got as f64 - want).abs() <= 3e-7 * want + 1e-30,
                    "AVX2 {got} vs {want}"
                );
            }
            assert!((sum as f64 - total).abs() <= 1e-6 * total);
        }
    }

    #[test]
    fn tanh_gelu_matches_its_definition() {
        let xs: Vec<f32> = (-1000..=1000)
            .map(|i| i as f32 * 0.01)
            .chain([-100.0, -40.0, 40.0, 100.0, 0.0])
            .collect();
        let mut got = xs.clone();
        gelu_tanh_inplace(&mut got);
        let mut avx2 = xs.clone();
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::features().avx2 {
            // SAFETY: AVX2 and FMA detected.
            unsafe { x86::avx2::gelu_tanh(&mut avx2) };
        } else {
            avx2 = got.clone();
        }
        for ((x, g), v) in xs.iter().zip(&got).zip(&avx2) {
            assert!(
                (g - v).abs() <= 1e-6 * (1.0 + g.abs()),
                "gelu_tanh({x}): AVX2 {v} vs {g}"
            );
            let x = *x as f64;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            let want = 0.5 * x * (1.0 + u.tanh());
            assert!(
                (*g as f64 - want).abs() < 2e-6 * (1.0 + want.abs()),
                "gelu_tanh({x}) = {g}, want {want}"
            );
        }
    }
}
