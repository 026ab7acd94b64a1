//! f32 matmul against weights repacked once at load time.
//!
//! A general GEMM (candle's, via the `gemm` crate) packs the weight matrix again on every call;
//! for the few-row activations of encoders and of decoder steps that packing costs as much as the
//! arithmetic. Here the weights are stored as panels of `NR` output columns, k-major, so the
//! micro-kernel streams them straight from memory: `MR` activation rows × `NR` columns held in
//! AVX-512 registers, one broadcast and two FMAs per (row, k).

#[cfg(target_arch = "x86_64")]
use std::sync::OnceLock;

use super::weight_memory::WeightBuf;
use super::{features, par_ranges, SendPtr};

/// Output columns per panel (two AVX-512 registers).
pub const NR: usize = 32;
/// Activation rows per micro-kernel call.
const MR: usize = 12;
/// k-block length: one panel slice (KC × NR floats = 32 KB) stays in L1/L2 across row blocks.
const KC: usize = 256;
/// From this many activation rows on, `MatmulPrecision::High` runs the product on the AMX tiles
/// where the CPU has them (`cargo bench --bench kernels`: 1.4x the f32 kernel at 16 rows).
#[cfg(target_arch = "x86_64")]
const AMX_MIN_ROWS: usize = 16;

/// An (n × k) row-major weight matrix (HF's `out_features × in_features`), repacked into
/// `ceil(n / NR)` panels of `k × NR` floats; the last panel is zero-padded.
pub struct PackedMatrix {
    n: usize,
    k: usize,
    panels: WeightBuf<f32>,
    /// The same weights as AMX tiles, made on the first product with many rows.
    #[cfg(target_arch = "x86_64")]
    tiles: OnceLock<super::amx::AmxWeights>,
}

impl PackedMatrix {
    /// Packed on the heap: for short-lived matrices (attention's keys).
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        Self::pack_into(
            w,
            n,
            k,
            WeightBuf::on_heap(vec![0f32; n.div_ceil(NR) * k * NR]),
        )
    }

    /// Packed into huge-page weight memory: for a model's weights.
    pub fn pack_weights(w: &[f32], n: usize, k: usize) -> Self {
        Self::pack_into(w, n, k, WeightBuf::zeroed(n.div_ceil(NR) * k * NR))
    }

    /// `panels`: zeroed, `ceil(n / NR) · k · NR` long.
    fn pack_into(w: &[f32], n: usize, k: usize, mut panels: WeightBuf<f32>) -> Self {
        assert_eq!(w.len(), n * k, "weight length is n × k");
        for (p, panel) in panels.chunks_exact_mut(k * NR).enumerate() {
            for j in 0..NR.min(n - p * NR) {
                let row = &w[(p * NR + j) * k..(p * NR + j + 1) * k];
                for (kk, v) in row.iter().enumerate() {
                    panel[kk * NR + j] = *v;
                }
            }
        }
        PackedMatrix::from_panels(n, k, panels)
    }

    /// The same packing from the transpose, a (k × n) row-major matrix (e.g. attention values,
    /// positions × head_dim, as the weights of `P·V`): its rows are the panels' k-rows already.
    pub fn pack_transposed(wt: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(wt.len(), n * k, "weight length is n × k");
        let count = n.div_ceil(NR);
        let mut panels = vec![0f32; count * k * NR];
        for (p, panel) in panels.chunks_exact_mut(k * NR).enumerate() {
            let cols = NR.min(n - p * NR);
            for (kk, dst) in panel.chunks_exact_mut(NR).enumerate() {
                dst[..cols].copy_from_slice(&wt[kk * n + p * NR..][..cols]);
            }
        }
        PackedMatrix::from_panels(n, k, WeightBuf::on_heap(panels))
    }

    fn from_panels(n: usize, k: usize, panels: WeightBuf<f32>) -> Self {
        PackedMatrix {
            n,
            k,
            panels,
            #[cfg(target_arch = "x86_64")]
            tiles: OnceLock::new(),
        }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Element (row, col) of the (n × k) matrix.
    fn element(&self, row: usize, col: usize) -> f32 {
        self.panels[((row / NR) * self.k + col) * NR + row % NR]
    }

    /// Row `row` of the (n × k) matrix, into `out` (k floats).
    pub fn row_into(&self, row: usize, out: &mut [f32]) {
        for (col, v) in out.iter_mut().enumerate() {
            *v = self.element(row, col);
        }
    }

    /// Back to the (n × k) row-major layout.
    pub fn unpack(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let k = self.k;
        let mut w = vec![0f32; self.n * k];
        // A panel is the transpose of its NR rows: read in 8 × NR blocks (1 KB, in L1) and
        // written 8 contiguous columns per row, a panel per task. Element by element with the
        // panel's stride this was 3.6% of a LoRA SFT step (each backward pass unpacks).
        w.par_chunks_mut(NR * k)
            .zip(self.panels.par_chunks_exact(NR * k))
            .for_each(|(rows, panel)| {
                for k0 in (0..k).step_by(8) {
                    let width = 8.min(k - k0);
                    for (j, row) in rows.chunks_exact_mut(k).enumerate() {
                        for (i, v) in row[k0..k0 + width].iter_mut().enumerate() {
                            *v = panel[(k0 + i) * NR + j];
                        }
                    }
                }
            });
        w
    }
}

/// `out (m × n) = x (m × k) · Wᵀ (+ bias)`, split over panels on rayon's current pool.
pub fn packed_matmul(w: &PackedMatrix, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    packed_matmul_forced(w, x, m, bias, out, None)
}

/// [`packed_matmul`] with the AMX tile path forced on (where the CPU has it) or off
/// (`Some(true / false)`) instead of chosen by precision and row count: benchmarks and tests.
pub fn packed_matmul_forced(
    w: &PackedMatrix,
    x: &[f32],
    m: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    amx: Option<bool>,
) {
    let (n, k) = (w.n, w.k);
    assert!(x.len() >= m * k, "x too short");
    assert!(out.len() >= m * n, "out too short");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "bias length");
    }
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let high = super::matmul_precision() == super::MatmulPrecision::High;
        if amx.unwrap_or(high && m >= AMX_MIN_ROWS) && super::amx::available() {
            let tiles = w
                .tiles
                .get_or_init(|| super::amx::AmxWeights::pack(n, k, |j, i| w.element(j, i)));
            super::amx::matmul(tiles, x, m, k, bias, out);
            return;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = amx; // no tile unit to force
    let outp = SendPtr(out.as_mut_ptr());
    let panels = n.div_ceil(NR);
    // Work per panel in the units par_ranges expects (≈ bytes streamed): weights plus FMAs.
    let per_panel = k * NR * 4 + m * k * NR / 4;
    let feats = features();
    // Few rows (decode steps, single short inputs): a chain of short matmuls, where the
    // spinning pool's quick wake-up wins (measured: 1.08x on MiniLM at batch 1).
    par_ranges(panels, 1, per_panel, m <= 64, |p0, p1| {
        #[cfg(target_arch = "x86_64")]
        if feats.avx512 {
            // SAFETY: AVX-512 detected; this task writes only columns of panels p0..p1.
            unsafe { x86::gemm(w, x, m, bias, p0, p1, outp.get()) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if feats.avx2 {
            // SAFETY: AVX2 and FMA detected; as above.
            unsafe { x86::avx2::gemm(w, x, m, bias, p0, p1, outp.get()) };
            return;
        }
        scalar_gemm(w, x, m, bias, p0, p1, outp.get());
    });
}

fn scalar_gemm(
    w: &PackedMatrix,
    x: &[f32],
    m: usize,
    bias: Option<&[f32]>,
    p0: usize,
    p1: usize,
    out: *mut f32,
) {
    let (n, k) = (w.n, w.k);
    for p in p0..p1 {
        let panel = &w.panels[p * k * NR..(p + 1) * k * NR];
        let cols = NR.min(n - p * NR);
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            let mut acc = [0f32; NR];
            for (kk, xv) in xr.iter().enumerate() {
                let wk = &panel[kk * NR..(kk + 1) * NR];
                for j in 0..NR {
                    acc[j] += xv * wk[j];
                }
            }
            for (j, a) in acc.iter().enumerate().take(cols) {
                let b = bias.map_or(0.0, |b| b[p * NR + j]);
                // SAFETY: (r, p*NR + j) is inside out (m × n) and owned by this task.
                unsafe { *out.add(r * n + p * NR + j) = a + b };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{PackedMatrix, KC, MR, NR};
    use crate::kernels::x86::lane_mask;

    /// Panels `[p0, p1)` of `out = x · Wᵀ + bias`.
    ///
    /// # Safety
    /// AVX-512F available; `out` is (m × n) and no other thread writes these panels' columns.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn gemm(
        w: &PackedMatrix,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        p0: usize,
        p1: usize,
        out: *mut f32,
    ) {
        let (n, k) = (w.n, w.k);
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            let first = k0 == 0;
            for p in p0..p1 {
                let cols = NR.min(n - p * NR);
                let (m0, m1) = (lane_mask(cols), lane_mask(cols.saturating_sub(16)));
                let b = w.panels.as_ptr().add((p * k + k0) * NR);
                let bias = if first {
                    bias.map(|b| b.as_ptr().add(p * NR))
                } else {
                    None
                };
                let mut r0 = 0;
                while r0 < m {
                    let rows = (m - r0).min(MR);
                    let a = x.as_ptr().add(r0 * k + k0);
                    let c = out.add(r0 * n + p * NR);
                    let args = (a, k, b, kc, c, n, m0, m1, first, bias);
                    match rows {
                        1 => micro::<1>(args),
                        2 => micro::<2>(args),
                        3 => micro::<3>(args),
                        4 => micro::<4>(args),
                        5 => micro::<5>(args),
                        6 => micro::<6>(args),
                        7 => micro::<7>(args),
                        8 => micro::<8>(args),
                        9 => micro::<9>(args),
                        10 => micro::<10>(args),
                        11 => micro::<11>(args),
                        _ => micro::<MR>(args),
                    }
                    r0 += rows;
                }
            }
            k0 += kc;
        }
    }

    /// The same products on AVX2 + FMA (16 registers of 8 floats): 6 rows × half a panel
    /// (16 columns) per micro-kernel call, 12 accumulators, two weight registers and one
    /// broadcast. (3 rows × the whole panel needs 19 registers; the spilled accumulators
    /// halved the rate.)
    pub(super) mod avx2 {
        use std::arch::x86_64::*;

        use super::super::{PackedMatrix, KC, NR};
        use crate::kernels::activation::x86::avx2::mask8;

        const MR: usize = 6;
        /// Rows per L2 block (a multiple of MR).
        const MC: usize = 192;
        /// Columns per micro-kernel call: half a panel.
        const HALF: usize = NR / 2;

        /// Panels `[p0, p1)` of `out = x · Wᵀ + bias`.
        ///
        /// # Safety
        /// AVX2 and FMA available; `out` is (m × n) and no other thread writes these panels'
        /// columns.
        #[target_feature(enable = "avx2,fma")]
        pub(in super::super) unsafe fn gemm(
            w: &PackedMatrix,
            x: &[f32],
            m: usize,
            bias: Option<&[f32]>,
            p0: usize,
            p1: usize,
            out: *mut f32,
        ) {
            let k = w.k;
            if m == 1 {
                for p in p0..p1 {
                    gemv_panel(w, x, bias, p, out);
                }
                return;
            }
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                // Rows in blocks whose k-slices (MC × KC floats, 192 KB) stay in L2 while every
                // panel passes over them; all of a large batch's rows would not.
                for m0 in (0..m).step_by(MC) {
                    for p in p0..p1 {
                        panel_rows(w, x, bias, p, m0..(m0 + MC).min(m), k0..k0 + kc, out);
                    }
                }
                k0 += kc;
            }
        }

        /// Rows `rows` of panel `p` over the k-slice `ks`: MR rows × half a panel per
        /// micro-kernel call.
        #[inline(always)]
        unsafe fn panel_rows(
            w: &PackedMatrix,
            x: &[f32],
            bias: Option<&[f32]>,
            p: usize,
            rows: std::ops::Range<usize>,
            ks: std::ops::Range<usize>,
            out: *mut f32,
        ) {
            let (n, k) = (w.n, w.k);
            let mut r0 = rows.start;
            while r0 < rows.end {
                let count = (rows.end - r0).min(MR);
                for half in 0..2 {
                    let col = p * NR + half * HALF;
                    let cols = n.saturating_sub(col).min(HALF);
                    if cols == 0 {
                        continue;
                    }
                    let args = Micro {
                        a: x.as_ptr().add(r0 * k + ks.start),
                        lda: k,
                        b: w.panels.as_ptr().add((p * k + ks.start) * NR + half * HALF),
                        kc: ks.len(),
                        c: out.add(r0 * n + col),
                        ldc: n,
                        masks: [mask8(cols), mask8(cols.saturating_sub(8))],
                        start: match (ks.start == 0, bias) {
                            (true, Some(bias)) => Start::Bias(bias.as_ptr().add(col)),
                            (true, None) => Start::Zero,
                            (false, _) => Start::Partial,
                        },
                    };
                    match count {
                        1 => micro::<1>(args),
                        2 => micro::<2>(args),
                        3 => micro::<3>(args),
                        4 => micro::<4>(args),
                        5 => micro::<5>(args),
                        _ => micro::<MR>(args),
                    }
                }
                r0 += count;
            }
        }

        /// Where a micro-kernel's sums start: the bias, zero, or what earlier k-blocks stored.
        #[derive(Clone, Copy)]
        enum Start {
            Bias(*const f32),
            Zero,
            Partial,
        }

        #[derive(Clone, Copy)]
        struct Micro {
            a: *const f32,
            lda: usize,
            /// The half panel's first k-row; k-rows are NR floats apart.
            b: *const f32,
            kc: usize,
            c: *mut f32,
            ldc: usize,
            masks: [__m256i; 2],
            start: Start,
        }

        /// R rows × HALF columns over kc steps.
        #[inline(always)]
        unsafe fn micro<const R: usize>(m: Micro) {
            unsafe {
                let mut acc = [[_mm256_setzero_ps(); 2]; R];
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, sum) in row.iter_mut().enumerate() {
                        *sum = match m.start {
                            Start::Bias(bias) => _mm256_maskload_ps(bias.add(8 * v), m.masks[v]),
                            Start::Zero => _mm256_setzero_ps(),
                            Start::Partial => {
                                _mm256_maskload_ps(m.c.add(r * m.ldc + 8 * v), m.masks[v])
                            }
                        };
                    }
                }
                for kk in 0..m.kc {
                    let w0 = _mm256_loadu_ps(m.b.add(kk * NR));
                    let w1 = _mm256_loadu_ps(m.b.add(kk * NR + 8));
                    for (r, row) in acc.iter_mut().enumerate() {
                        let xv = _mm256_broadcast_ss(&*m.a.add(r * m.lda + kk));
                        row[0] = _mm256_fmadd_ps(xv, w0, row[0]);
                        row[1] = _mm256_fmadd_ps(xv, w1, row[1]);
                    }
                }
                for (r, row) in acc.iter().enumerate() {
                    for (v, sum) in row.iter().enumerate() {
                        _mm256_maskstore_ps(m.c.add(r * m.ldc + 8 * v), m.masks[v], *sum);
                    }
                }
            }
        }

        /// Panel `p` for one activation row: read front to back once, two independent FMA
        /// chains per output register. (Software prefetch 4 KiB ahead, which the AVX-512
        /// quantized kernels need, made this stream slower on the AMD EPYC measured:
        /// `BENCH_GEMV_ONLY=1 cargo bench --bench kernels`, 19–23 vs 25–30 GB/s median.)
        #[inline(always)]
        unsafe fn gemv_panel(
            w: &PackedMatrix,
            x: &[f32],
            bias: Option<&[f32]>,
            p: usize,
            out: *mut f32,
        ) {
            unsafe {
                let (n, k) = (w.n, w.k);
                let b = w.panels.as_ptr().add(p * k * NR);
                let mut even = [_mm256_setzero_ps(); 4];
                let mut odd = [_mm256_setzero_ps(); 4];
                let mut kk = 0;
                while kk + 2 <= k {
                    let (x0, x1) = (
                        _mm256_broadcast_ss(x.get_unchecked(kk)),
                        _mm256_broadcast_ss(x.get_unchecked(kk + 1)),
                    );
                    for v in 0..4 {
                        let w0 = _mm256_loadu_ps(b.add(kk * NR + 8 * v));
                        let w1 = _mm256_loadu_ps(b.add((kk + 1) * NR + 8 * v));
                        even[v] = _mm256_fmadd_ps(x0, w0, even[v]);
                        odd[v] = _mm256_fmadd_ps(x1, w1, odd[v]);
                    }
                    kk += 2;
                }
                if kk < k {
                    let x0 = _mm256_broadcast_ss(x.get_unchecked(kk));
                    for v in 0..4 {
                        let w0 = _mm256_loadu_ps(b.add(kk * NR + 8 * v));
                        even[v] = _mm256_fmadd_ps(x0, w0, even[v]);
                    }
                }
                let cols = NR.min(n - p * NR);
                for v in 0..4 {
                    let mask = mask8(cols.saturating_sub(8 * v));
                    let mut sum = _mm256_add_ps(even[v], odd[v]);
                    if let Some(bias) = bias {
                        let bv = _mm256_maskload_ps(bias.as_ptr().add(p * NR + 8 * v), mask);
                        sum = _mm256_add_ps(sum, bv);
                    }
                    _mm256_maskstore_ps(out.add(p * NR + 8 * v), mask, sum);
                }
            }
        }
    }

    type MicroArgs = (
        *const f32,
        usize,
        *const f32,
        usize,
        *mut f32,
        usize,
        __mmask16,
        __mmask16,
        bool,
        Option<*const f32>,
    );

    /// R rows × NR columns over kc steps; the first k-block starts from the bias (or zero),
    /// later ones from what earlier blocks stored.
    #[inline(always)]
    unsafe fn micro<const R: usize>((a, lda, b, kc, c, ldc, m0, m1, first, bias): MicroArgs) {
        unsafe {
            let mut acc0 = [_mm512_setzero_ps(); R];
            let mut acc1 = [_mm512_setzero_ps(); R];
            if first {
                if let Some(bias) = bias {
                    let b0 = _mm512_maskz_loadu_ps(m0, bias);
                    let b1 = _mm512_maskz_loadu_ps(m1, bias.add(16));
                    for r in 0..R {
                        acc0[r] = b0;
                        acc1[r] = b1;
                    }
                }
            } else {
                for r in 0..R {
                    acc0[r] = _mm512_maskz_loadu_ps(m0, c.add(r * ldc));
                    acc1[r] = _mm512_maskz_loadu_ps(m1, c.add(r * ldc + 16));
                }
            }
            for kk in 0..kc {
                let w0 = _mm512_loadu_ps(b.add(kk * NR));
                let w1 = _mm512_loadu_ps(b.add(kk * NR + 16));
                for r in 0..R {
                    let xv = _mm512_set1_ps(*a.add(r * lda + kk));
                    acc0[r] = _mm512_fmadd_ps(xv, w0, acc0[r]);
                    acc1[r] = _mm512_fmadd_ps(xv, w1, acc1[r]);
                }
            }
            for r in 0..R {
                _mm512_mask_storeu_ps(c.add(r * ldc), m0, acc0[r]);
                _mm512_mask_storeu_ps(c.add(r * ldc + 16), m1, acc1[r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(w: &[f32], n: usize, k: usize, x: &[f32], m: usize, bias: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                    .sum();
                out[r * n + j] = dot as f32 + bias[j];
            }
        }
        out
    }

    #[test]
    fn matches_a_plain_matmul_on_ragged_shapes() {
        let mut seed = 7u32;
        let mut rand = move || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &(m, n, k) in &[
            (1, 3, 5),
            (13, 70, 300),
            (25, 64, 513),
            (2, 32, 256),
            (1, 70, 769),
            (4, 50, 600),
            (40, 33, 17),
        ] {
            let w: Vec<f32> = (0..n * k).map(|_| rand()).collect();
            let x: Vec<f32> = (0..m * k).map(|_| rand()).collect();
            let bias: Vec<f32> = (0..n).map(|_| rand()).collect();
            let packed = PackedMatrix::pack(&w, n, k);
            assert_eq!(packed.unpack(), w);
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            assert_eq!(PackedMatrix::pack_transposed(&wt, n, k).unpack(), w);
            let want = reference(&w, n, k, &x, m, &bias);
            let mut got = vec![f32::NAN; m * n];
            packed_matmul(&packed, &x, m, Some(&bias), &mut got);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-4, "({m},{n},{k}): {g} vs {e}");
            }
            let mut plain = vec![0f32; m * n];
            scalar_gemm(&packed, &x, m, None, 0, n.div_ceil(NR), plain.as_mut_ptr());
            for ((g, e), b) in plain.iter().zip(&want).zip(bias.iter().cycle()) {
                assert!((g + b - e).abs() < 1e-4);
            }
            // The AVX2 kernels too where the CPU also has AVX-512 (which the dispatch prefers).
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::features().avx2 {
                let mut got = vec![f32::NAN; m * n];
                let panels = n.div_ceil(NR);
                // SAFETY: AVX2 + FMA detected; one thread writes all of `got`.
                unsafe {
                    x86::avx2::gemm(&packed, &x, m, Some(&bias), 0, panels, got.as_mut_ptr())
                };
                for (g, e) in got.iter().zip(&want) {
                    assert!((g - e).abs() < 1e-4, "AVX2 ({m},{n},{k}): {g} vs {e}");
                }
            }
        }
    }
}
