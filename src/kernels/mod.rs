//! CPU kernels for GGUF-quantized matrix multiplication.
//!
//! Pure Rust (`std::arch` intrinsics behind runtime feature detection, with a portable scalar
//! fallback).  The public entry points are [`quant_matmul`] and [`dequantize_row`].
//!
//! # Numerics
//! Like llama.cpp, the activations are quantized to 8 bits per 32-element block (symmetric,
//! scale `amax/127`, round-to-nearest-even) and the dot products run in integer arithmetic
//! with the block scales applied in f32.  The only approximation versus an exact f32 matmul of the
//! dequantized weights is that activation rounding: per output element the error is bounded by
//! `Σ_blocks (Σ_j |w_j|) · d_x / 2` (plus f32 rounding), see the tests.
//!
//! Every block format is mapped onto one form, `w = u·d + m` with `u` an unsigned byte:
//! * Q4_0: `u` = nibble, `m = -8·d`;
//! * Q4_1: `u` = nibble, `m` = the block min;
//! * Q8_0: `u = q + 128`, `m = -128·d`.
//!
//! so that `Σ w·x = d·d_x·Σ u·q_x + m·(d_x·Σ q_x)`, which maps directly onto the
//! `vpdpbusd` (u8 × i8) instruction.
//!
//! # Layout
//! Weights are interleaved once at load ([`QuantTensor::from_gguf`]): rows in groups of 16, and
//! for each group and block one chunk of `16 × block_bytes` bytes (the GGUF size, nothing
//! added): the quant bytes as `n` 64-byte lines, line `j` holding bytes `4j..4j+4` of each of
//! the 16 rows (one row per 32-bit lane), then the 16 scales `d` (f16), then for Q4_1 the 16
//! mins (f16). Q8_0 bytes are stored as `u = q ^ 0x80`. Q4 line `j` carries elements
//! `4j..4j+4` in its low nibbles and `16+4j..` in its high ones. So one `vpdpbusd` with four
//! broadcast activation bytes advances 16 rows at once, the scales are one `vcvtph2ps`, and a
//! group's weights are one sequential stream.
//!
//! # Paths (AVX-512 VNNI)
//! * `m <= SMALL_M` (decode, batched decode): the group-streaming kernel above, 16 rows × up to
//!   4 activation rows per pass over a group while it is in L1.
//! * `m > SMALL_M` (prefill): each task unpacks a panel of 32 weight rows (two groups) to one
//!   byte per weight with f32 scales and runs a register-blocked 6×32 int8 micro-kernel over all
//!   activation rows (~12 instructions per 512 MACs).
//!
//! Without AVX-512 VNNI but with AVX2+FMA+F16C, the group-streaming kernel on 256-bit halves
//! (`maddubs`) serves all m; otherwise portable scalar code.  `WORDLOOM_KERNELS_AVX2=1` /
//! `WORDLOOM_KERNELS_SCALAR=1` force the lower paths (testing).
//!
//! Threading: contiguous chunks of weight rows (multiples of the panel height), at most 4 per
//! thread and none under ~48 KB of weights, so small matrices run on the calling thread.

#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

/// `fn $name(args) -> R` running `$portable(args)` compiled for AVX2 + FMA where the CPU has
/// them: `$portable` is `#[inline(always)]` plain Rust whose loops then vectorise 8 wide.
macro_rules! with_avx2 {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $portable:ident) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }
                if $crate::kernels::features().avx2 {
                    // SAFETY: AVX2 and FMA detected.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}

pub mod activation;
#[cfg(target_arch = "x86_64")]
mod amx;
pub mod attention;
pub mod dense;
pub mod norm;
mod pool;
mod scalar;
pub mod strided;
pub mod weight_memory;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::cell::RefCell;

/// GGUF block quantization formats supported by these kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantKind {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QuantKind {
    /// Elements per block.
    #[inline]
    pub fn block_elems(self) -> usize {
        32
    }
    /// Bytes per block.
    #[inline]
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_0 => 18,
            QuantKind::Q4_1 => 20,
            QuantKind::Q8_0 => 34,
        }
    }
    /// Bytes of one row of `cols` elements (`cols` must be a multiple of `block_elems`).
    #[inline]
    pub fn row_bytes(self, cols: usize) -> usize {
        debug_assert_eq!(cols % self.block_elems(), 0);
        cols / self.block_elems() * self.block_bytes()
    }
}

/// Rows per interleaved group (see the module docs).
pub const GROUP: usize = 16;

/// A quantized `rows × cols` matrix (`rows` = out_features) in the interleaved layout of the
/// module docs, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct QuantMatrix<'a> {
    pub kind: QuantKind,
    pub rows: usize,
    pub cols: usize,
    /// `rows.div_ceil(16)` groups × `cols / 32` chunks of `16 × block_bytes`.
    pub data: &'a [u8],
}

impl QuantMatrix<'_> {
    #[inline]
    pub fn row_bytes(&self) -> usize {
        self.kind.row_bytes(self.cols)
    }
    /// Bytes of one group-block chunk.
    #[inline]
    pub(crate) fn chunk_bytes(&self) -> usize {
        GROUP * self.kind.block_bytes()
    }
    /// Offset of the scales inside a chunk (after the quant lines).
    #[inline]
    pub(crate) fn scales_offset(&self) -> usize {
        quant_lines(self.kind) * 64
    }
}

/// 64-byte lines of quant bytes per chunk: 16 rows × 16 (Q4) or 32 (Q8) bytes.
#[inline]
pub(crate) const fn quant_lines(kind: QuantKind) -> usize {
    match kind {
        QuantKind::Q8_0 => 8,
        _ => 4,
    }
}

/// An owned quantized matrix in the interleaved layout.
#[derive(Debug)]
pub struct QuantTensor {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    data: weight_memory::WeightBuf<u8>,
}

impl QuantTensor {
    /// Interleave a matrix stored as GGUF does (`rows` rows of `cols / 32` consecutive blocks).
    pub fn from_gguf(kind: QuantKind, rows: usize, cols: usize, gguf: &[u8]) -> Self {
        assert_eq!(
            cols % kind.block_elems(),
            0,
            "cols must be a multiple of the block size"
        );
        let rb = kind.row_bytes(cols);
        assert!(gguf.len() >= rows * rb, "quantized data too short");
        let (nb, bb) = (cols / 32, kind.block_bytes());
        let chunk = GROUP * bb;
        let group_bytes = nb * chunk;
        let mut data = weight_memory::WeightBuf::zeroed(rows.div_ceil(GROUP) * group_bytes);
        let (qs, lines) = match kind {
            QuantKind::Q4_1 => (4, 4),
            QuantKind::Q4_0 => (2, 4),
            QuantKind::Q8_0 => (2, 8),
        };
        let flip = if kind == QuantKind::Q8_0 { 0x80 } else { 0 };
        let fill = |g: usize, out: &mut [u8]| {
            for r in 0..GROUP.min(rows - g * GROUP) {
                let row = &gguf[(g * GROUP + r) * rb..][..rb];
                for b in 0..nb {
                    let blk = &row[b * bb..][..bb];
                    let c = &mut out[b * chunk..][..chunk];
                    for j in 0..lines {
                        for t in 0..4 {
                            c[j * 64 + r * 4 + t] = blk[qs + 4 * j + t] ^ flip;
                        }
                    }
                    let scales = lines * 64;
                    c[scales + 2 * r..][..2].copy_from_slice(&blk[..2]);
                    if kind == QuantKind::Q4_1 {
                        c[scales + 32 + 2 * r..][..2].copy_from_slice(&blk[2..4]);
                    }
                }
            }
        };
        use rayon::prelude::*;
        data.par_chunks_mut(group_bytes)
            .enumerate()
            .with_min_len(8)
            .for_each(|(g, out)| fill(g, out));
        QuantTensor {
            kind,
            rows,
            cols,
            data,
        }
    }

    pub fn matrix(&self) -> QuantMatrix<'_> {
        QuantMatrix {
            kind: self.kind,
            rows: self.rows,
            cols: self.cols,
            data: &self.data,
        }
    }

    pub fn kind(&self) -> QuantKind {
        self.kind
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Activation rows quantized to 8 bits per 32-element block.
pub(crate) struct QuantizedActs {
    /// `m × cols` int8 values.
    pub q: Vec<i8>,
    /// `m × nb` block scales.
    pub d: Vec<f32>,
    /// `m × nb`: `d · Σ q` per block (for the weight-min term).
    pub s: Vec<f32>,
    pub cols: usize,
    pub nb: usize,
}

impl QuantizedActs {
    fn new() -> Self {
        QuantizedActs {
            q: Vec::new(),
            d: Vec::new(),
            s: Vec::new(),
            cols: 0,
            nb: 0,
        }
    }
    fn resize(&mut self, m: usize, cols: usize) {
        let nb = cols / 32;
        self.cols = cols;
        self.nb = nb;
        self.q.resize(m * cols, 0);
        self.d.resize(m * nb, 0.0);
        self.s.resize(m * nb, 0.0);
    }
}

/// Quantize one block of 32 activations; returns (d, d·Σq).  Round-to-nearest-even.
#[inline]
pub(crate) fn quantize_block_scalar(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    let amax = x.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (qi, &v) in q.iter_mut().zip(x) {
        let r = (v * id).round_ties_even() as i32;
        *qi = r as i8;
        sum += r;
    }
    (d, d * sum as f32)
}

/// Quantize one row (`x.len()` = `q.len()`, a multiple of 32) into int8 blocks.
fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if features().avx512 {
        // SAFETY: feature checked at runtime.
        unsafe { x86::quantize_row_avx512(x, q, d, s) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if features().avx2 {
        // SAFETY: feature checked at runtime.
        unsafe { x86::quantize_row_avx2(x, q, d, s) };
        return;
    }
    for (b, (xb, qb)) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).enumerate() {
        (d[b], s[b]) = quantize_block_scalar(xb, qb);
    }
}

/// One activation row of [`QuantizedActs`]: int8 values, block scales, scaled block sums.
pub(crate) type ActRow<'a> = (&'a mut [i8], &'a mut [f32], &'a mut [f32]);

/// The rows of a [`QuantizedActs`] for pool tasks that each fill rows of their own.
#[derive(Clone, Copy)]
struct ActRowsPtr {
    q: *mut i8,
    d: *mut f32,
    s: *mut f32,
    cols: usize,
    nb: usize,
}
// SAFETY: only a pointer to buffers that outlive the parallel call; tasks write disjoint rows.
unsafe impl Send for ActRowsPtr {}
unsafe impl Sync for ActRowsPtr {}

impl ActRowsPtr {
    fn new(acts: &mut QuantizedActs) -> Self {
        ActRowsPtr {
            q: acts.q.as_mut_ptr(),
            d: acts.d.as_mut_ptr(),
            s: acts.s.as_mut_ptr(),
            cols: acts.cols,
            nb: acts.nb,
        }
    }

    /// # Safety
    /// `r` is a row of the buffers, and no other reference to it exists while this one lives.
    unsafe fn row<'a>(self, r: usize) -> ActRow<'a> {
        use std::slice::from_raw_parts_mut;
        let (cols, nb) = (self.cols, self.nb);
        unsafe {
            (
                from_raw_parts_mut(self.q.add(r * cols), cols),
                from_raw_parts_mut(self.d.add(r * nb), nb),
                from_raw_parts_mut(self.s.add(r * nb), nb),
            )
        }
    }
}

/// Quantize the `m` rows of `x` into `acts`; `parallel`: on the kernel pool where worth it.
fn quantize_rows(x: &[f32], m: usize, cols: usize, acts: &mut QuantizedActs, parallel: bool) {
    acts.resize(m, cols);
    let rows = ActRowsPtr::new(acts);
    let job = |r0: usize, r1: usize| {
        for r in r0..r1 {
            // SAFETY: r < m rows were sized above; each task has rows of its own.
            let (q, d, s) = unsafe { rows.row(r) };
            quantize_row(&x[r * cols..][..cols], q, d, s);
        }
    };
    if parallel {
        parallel_chunks(m, cols * 4, job);
    } else {
        job(0, m);
    }
}

/// Rows 0..m of `acts`: `x` quantized; rows m..2m: what that int8 rounding left over,
/// quantized again (see [`quant_matmul_precise`]). On the kernel pool: a prefill's 512 rows
/// took 3% of it on one thread while the others waited.
fn quantize_rows_precise(x: &[f32], m: usize, cols: usize, acts: &mut QuantizedActs) {
    acts.resize(2 * m, cols);
    let rows = ActRowsPtr::new(acts);
    parallel_chunks(m, cols * 8, |r0, r1| {
        for r in r0..r1 {
            let xr = &x[r * cols..][..cols];
            // SAFETY: rows r and m + r (< 2m, sized above) belong to this task alone.
            let ((q, d, s), residual) = unsafe { (rows.row(r), rows.row(m + r)) };
            quantize_row(xr, q, d, s);
            quantize_residual_row(xr, (q, d), residual);
        }
    });
}

/// What rounding `x` to (`q`, `d`) left over, rounded to int8 again at the fixed scale
/// `d / 256` per block. A power of two apart, a token's two integer block sums combine exactly
/// as `main · 256 + residual` (the AVX2 kernel relies on it); `|x − d·q| ≤ d/2` puts the
/// residual within ±128 steps, clamped to ±127 (so `sign_epi8` never meets −128).
fn quantize_residual_row(x: &[f32], (q, d): (&[i8], &[f32]), residual: ActRow) {
    #[cfg(target_arch = "x86_64")]
    if features().avx2 {
        // SAFETY: feature checked at runtime.
        unsafe { x86::quantize_residual_row_avx2(x, (q, d), residual) };
        return;
    }
    quantize_residual_row_scalar(x, (q, d), residual);
}

/// [`quantize_residual_row`] without vector instructions (and the reference its AVX2 version is
/// tested against).
pub(crate) fn quantize_residual_row_scalar(x: &[f32], (q, d): (&[i8], &[f32]), residual: ActRow) {
    let (rq, rd, rs) = residual;
    for (b, ((xb, qb), rb)) in x
        .chunks_exact(32)
        .zip(q.chunks_exact(32))
        .zip(rq.chunks_exact_mut(32))
        .enumerate()
    {
        let inverse = if d[b] > 0.0 { 256.0 / d[b] } else { 0.0 };
        let mut sum = 0i32;
        for ((r, &xv), &qv) in rb.iter_mut().zip(xb).zip(qb) {
            let rest = xv - d[b] * qv as f32;
            let v = ((rest * inverse).round_ties_even() as i32).clamp(-127, 127);
            *r = v as i8;
            sum += v;
        }
        rd[b] = d[b] / 256.0;
        rs[b] = rd[b] * sum as f32;
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Features {
    /// AVX-512 F/BW/VL + VNNI + FMA + F16C.
    pub avx512: bool,
    /// AVX2 + FMA + F16C (`maddubs` row-streaming kernel for all m).
    pub avx2: bool,
}

fn detect() -> Features {
    #[cfg(target_arch = "x86_64")]
    {
        if std::env::var_os("WORDLOOM_KERNELS_SCALAR").is_some() {
            return Features {
                avx512: false,
                avx2: false,
            };
        }
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        if std::env::var_os("WORDLOOM_KERNELS_AVX2").is_some() {
            return Features {
                avx512: false,
                avx2,
            };
        }
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        Features { avx512, avx2 }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Features {
            avx512: false,
            avx2: false,
        }
    }
}

pub(crate) fn features() -> Features {
    static F: std::sync::OnceLock<Features> = std::sync::OnceLock::new();
    *F.get_or_init(detect)
}

/// How exactly f32 matrix products are computed (the meaning of PyTorch's
/// `torch.set_float32_matmul_precision`, which these names follow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 arithmetic throughout (the default): results match PyTorch's f32 to rounding.
    Highest,
    /// Products of 16 rows or more on the AMX tile unit where the CPU has one, in bf16×3
    /// (each operand as two bf16 halves: ~16 bits of mantissa per product instead of 24; the
    /// sums stay f32). 1.5–2× faster on batches; elsewhere the same as `Highest`.
    High,
}

static MATMUL_PRECISION: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets the process-wide [`MatmulPrecision`] (read at each product).
pub fn set_matmul_precision(precision: MatmulPrecision) {
    let high = precision == MatmulPrecision::High;
    MATMUL_PRECISION.store(high, std::sync::atomic::Ordering::Relaxed);
}

pub fn matmul_precision() -> MatmulPrecision {
    if MATMUL_PRECISION.load(std::sync::atomic::Ordering::Relaxed) {
        MatmulPrecision::High
    } else {
        MatmulPrecision::Highest
    }
}

/// What f32 products of many rows run on here, given the [`MatmulPrecision`] (for reports).
pub fn dense_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if matmul_precision() == MatmulPrecision::High && amx::available() {
        return "amx-bf16x3";
    }
    "f32"
}

/// Name of the instruction path [`quant_matmul`] uses on this machine (for logs).
pub fn kernel_path() -> &'static str {
    let f = features();
    if f.avx512 {
        "avx512-vnni"
    } else if f.avx2 {
        "avx2"
    } else {
        "scalar"
    }
}

/// Activation-row count up to which the group-streaming kernel is used; above it the panel GEMM
/// takes over (AVX-512 only). Measured (benches/kernels.rs, SmolLM2 shapes, 2 threads): the
/// streaming kernel is 1.3–1.7× faster at 2–8 rows, even at 16, slower at 32.
pub const SMALL_M: usize = 12;

thread_local! {
    static ACTS: RefCell<QuantizedActs> = RefCell::new(QuantizedActs::new());
    /// Scratch of [`quant_matmul_precise`]: the product of the stacked rows.
    static PRECISE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A raw pointer that may be shared across rayon tasks writing disjoint output elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// `f(start, end, partial)` over chunks of `chunk` items covering `0..n`, in parallel (see
/// [`parallel_tasks`]), each adding its items' contribution into its own zeroed `partial` of
/// `width` floats; returns the partials summed in chunk order. The chunks depend on `n` alone,
/// so the sums come out the same on any number of threads.
pub(crate) fn chunked_sums(
    n: usize,
    chunk: usize,
    width: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let chunks = n.div_ceil(chunk.max(1));
    let mut partials = vec![0f32; chunks * width];
    let base = SendPtr(partials.as_mut_ptr());
    parallel_tasks(chunks, |c| {
        // SAFETY: chunk c alone writes partial c; `partials` outlives the call.
        let partial = unsafe { std::slice::from_raw_parts_mut(base.get().add(c * width), width) };
        f(c * chunk, ((c + 1) * chunk).min(n), partial);
    });
    let mut sums = vec![0f32; width];
    for partial in partials.chunks_exact(width) {
        sums.iter_mut().zip(partial).for_each(|(s, p)| *s += p);
    }
    sums
}

/// `f(start, end, rows)` over chunks of `chunk` rows of `width` floats covering `out`, in
/// parallel (see [`parallel_tasks`]), `rows` being that chunk's rows of `out`.
pub(crate) fn parallel_rows(
    out: &mut [f32],
    width: usize,
    chunk: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    let n = out.len() / width.max(1);
    let base = SendPtr(out.as_mut_ptr());
    parallel_tasks(n.div_ceil(chunk.max(1)), |c| {
        let (start, end) = (c * chunk, ((c + 1) * chunk).min(n));
        // SAFETY: rows start..end of `out` belong to this task; `out` outlives the call.
        let rows = unsafe {
            std::slice::from_raw_parts_mut(base.get().add(start * width), (end - start) * width)
        };
        f(start, end, rows);
    });
}

/// Column sums of a row-major matrix of `width` columns (a bias's gradient), in parallel.
pub fn column_sums(values: &[f32], width: usize) -> Vec<f32> {
    assert!(
        width > 0 && values.len().is_multiple_of(width),
        "rows of `width` columns"
    );
    let rows = values.len() / width;
    chunked_sums(rows, 64, width, |r0, r1, sums| {
        add_rows(&values[r0 * width..r1 * width], sums)
    })
}

/// `values ← values + bias` on every row of `bias.len()` columns, in parallel.
pub fn add_bias(values: &mut [f32], bias: &[f32]) {
    let width = bias.len();
    assert!(
        width > 0 && values.len().is_multiple_of(width),
        "rows of the bias's width"
    );
    parallel_rows(values, width, (16_384 / width).max(1), |_, _, rows| {
        add_to_rows(rows, bias)
    });
}

with_avx2! {
    /// `sums ← sums + Σ rows` over the rows (of `sums.len()`) of `rows`.
    fn add_rows(rows: &[f32], sums: &mut [f32]) = add_rows_portable
}

#[inline(always)]
fn add_rows_portable(rows: &[f32], sums: &mut [f32]) {
    for row in rows.chunks_exact(sums.len()) {
        sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
    }
}

with_avx2! {
    /// `rows ← rows + row` for every row (of `row.len()`) of `rows`.
    fn add_to_rows(rows: &mut [f32], row: &[f32]) = add_to_rows_portable
}

#[inline(always)]
fn add_to_rows_portable(rows: &mut [f32], row: &[f32]) {
    for r in rows.chunks_exact_mut(row.len()) {
        r.iter_mut().zip(row).for_each(|(v, b)| *v += b);
    }
}

/// Split `n` items into contiguous chunks (multiples of `align`) and run `f(start, end)` on
/// rayon's current pool; `work_per_item` (≈ bytes of weights streamed, or equivalent work)
/// decides how many chunks are worth it.
/// `spinning` picks the spinning pool (decode: many short matmuls in a row) over rayon's
/// (prefill: long matmuls between which candle's own parallel ops need the cores).
fn par_ranges(
    n: usize,
    align: usize,
    work_per_item: usize,
    spinning: bool,
    f: impl Fn(usize, usize) + Sync,
) {
    let spinning = spinning || on_kernel_pool_only();
    let threads = rayon::current_num_threads().max(1);
    let total = n.saturating_mul(work_per_item);
    // Below ~48 KB of weight stream (a few µs) per chunk a fork-join is not worth it.
    let max_chunks = (total / 49_152).max(1);
    let chunks = if threads == 1 {
        1
    } else {
        max_chunks.min(threads * 4)
    };
    let units = n.div_ceil(align);
    let chunks = chunks.min(units).max(1);
    if chunks == 1 {
        f(0, n);
        return;
    }
    let per = units.div_ceil(chunks);
    let chunks = units.div_ceil(per);
    let task = |c: usize| {
        let s = c * per * align;
        let e = ((c + 1) * per * align).min(n);
        if s < e {
            f(s, e);
        }
    };
    if spinning {
        pool::global().run(chunks, &task);
    } else {
        use rayon::prelude::*;
        (0..chunks).into_par_iter().for_each(task);
    }
}

thread_local! {
    static KERNEL_POOL_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every kernel it calls on this thread parallelised over the spinning kernel
/// pool, rayon left idle. For a forward pass made of our kernels alone (nothing of candle's in
/// between): two pools would otherwise take turns spinning on each other's cores.
pub fn on_kernel_pool<R>(f: impl FnOnce() -> R) -> R {
    /// Restores the flag however `f` ends (an unwinding panic included).
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            KERNEL_POOL_ONLY.set(self.0);
        }
    }
    let _restore = Restore(KERNEL_POOL_ONLY.replace(true));
    f()
}

fn on_kernel_pool_only() -> bool {
    KERNEL_POOL_ONLY.get()
}

/// `f(i)` for `i` in `0..tasks`, on the kernel pool inside [`on_kernel_pool`], on rayon's pool
/// otherwise.
pub(crate) fn parallel_tasks(tasks: usize, f: impl Fn(usize) + Sync) {
    if on_kernel_pool_only() {
        pool::global().run(tasks, &f);
    } else {
        use rayon::prelude::*;
        (0..tasks).into_par_iter().for_each(&f);
    }
}

/// `f(i)` for `i` in `0..tasks` on the spinning kernel pool, each task taken by whichever thread
/// is free: for a few dozen unequal tasks. Kernels called inside a task run on its thread.
pub(crate) fn spinning_tasks(tasks: usize, f: impl Fn(usize) + Sync) {
    pool::global().run(tasks, &f);
}

/// `f(start, end)` over contiguous chunks of `0..n` on the spinning kernel pool (as the decode
/// matmuls), for per-token work between them; `work_per_item` in the same units as `par_ranges`
/// (≈ bytes touched) keeps small jobs on the calling thread.
pub(crate) fn parallel_chunks(n: usize, work_per_item: usize, f: impl Fn(usize, usize) + Sync) {
    par_ranges(n, 1, work_per_item, true, f)
}

/// `out (m × rows, row-major) = x (m × cols, row-major) · Wᵀ`.
///
/// Parallelised with rayon's current pool in coarse chunks of weight rows.
pub fn quant_matmul(w: &QuantMatrix, x: &[f32], m: usize, out: &mut [f32]) {
    quant_matmul_forced(w, x, m, out, None)
}

/// [`quant_matmul`] with the path forced: `Some(false)` = row-streaming (decode) kernel,
/// `Some(true)` = repacking GEMM kernel (ignored without AVX-512).  For benchmarks and tests.
#[doc(hidden)]
pub fn quant_matmul_forced(
    w: &QuantMatrix,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    gemm: Option<bool>,
) {
    let (rows, cols) = (w.rows, w.cols);
    assert_eq!(cols % 32, 0);
    assert!(x.len() >= m * cols, "x too short");
    assert!(out.len() >= m * rows, "out too short");
    assert!(
        w.data.len() >= rows.div_ceil(GROUP) * GROUP * w.row_bytes(),
        "weights too short"
    );
    if m == 0 || rows == 0 {
        return;
    }
    if cols == 0 {
        out[..m * rows].fill(0.0);
        return;
    }
    ACTS.with(|a| {
        // A rayon worker waiting inside `par_ranges` may steal a task that calls us again on
        // this thread; then the scratch is busy and that call uses a fresh buffer.
        match a.try_borrow_mut() {
            Ok(mut acts) => {
                quantize_rows(x, m, cols, &mut acts, true);
                quant_matmul_q8(w, &acts, m, out, gemm);
            }
            Err(_) => {
                let mut acts = QuantizedActs::new();
                quantize_rows(x, m, cols, &mut acts, true);
                quant_matmul_q8(w, &acts, m, out, gemm);
            }
        }
    });
}

fn quant_matmul_q8(
    w: &QuantMatrix,
    acts: &QuantizedActs,
    m: usize,
    out: &mut [f32],
    gemm: Option<bool>,
) {
    let rows = w.rows;
    let outp = SendPtr(out.as_mut_ptr());
    let feats = features();
    let use_gemm = feats.avx512 && gemm.unwrap_or(m > SMALL_M);
    if !use_gemm {
        // Tasks start on group boundaries: a group's 16 outputs are written by one task.
        let per_row = streaming_cost_per_row(w, m);
        par_ranges(rows, GROUP, per_row, true, |r0, r1| {
            #[cfg(target_arch = "x86_64")]
            if feats.avx512 {
                // SAFETY: feature checked; the range [r0, r1) of every output row is only
                // written by this task.
                unsafe { x86::gemv::<true>(w, acts, m, r0, r1, outp.get()) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if feats.avx2 {
                // SAFETY: as above.
                unsafe { x86::gemv::<false>(w, acts, m, r0, r1, outp.get()) };
                return;
            }
            scalar::gemv_scalar(w, acts, m, r0, r1, outp.get());
        });
    } else {
        #[cfg(target_arch = "x86_64")]
        {
            // ~0.1 cycle per MAC at m = 512; the same units as the decode path (≈ bytes).
            let per_row = acts.nb * (40 + m * 12) * 4;
            // Few rows (batched decode steps): the spinning pool, as for single-row decode.
            par_ranges(rows, x86::NR, per_row, m <= 32, |r0, r1| {
                // SAFETY: as above.
                unsafe { x86::gemm_avx512(w, acts, m, r0, r1, outp.get()) };
            });
        }
    }
}

/// Work per weight row of the group-streaming kernels over `act_rows` activation rows, in
/// `par_ranges`' units (≈ bytes streamed): memory-bound for few rows, more per row after.
fn streaming_cost_per_row(w: &QuantMatrix, act_rows: usize) -> usize {
    w.row_bytes() * (2 + act_rows) / 3
}

/// [`quant_matmul`] with about 15-bit activations: each activation block is rounded to int8, and
/// the rounding residual is rounded to int8 again as an extra activation row, so the int8 kernels
/// apply every weight block to both while reading it once. The result matches an f32 matmul of
/// the dequantized weights to ~1e-5 relative (what `transformers` computes for a GGUF file), where
/// plain int8 activations are off by ~1e-2 — enough to change a greedy answer.
pub fn quant_matmul_precise(w: &QuantMatrix, x: &[f32], m: usize, out: &mut [f32]) {
    quant_matmul_precise_many(&[*w], x, m, &mut [out]);
}

/// [`quant_matmul_precise`] of several matrices with the same input (a layer's q, k and v
/// projections): `outs[i] (m × ws[i].rows) = x · ws[i]ᵀ`. The activations are quantized once and
/// all the matrices' rows are one job for the pool, so small matrices (SmolLM2's k and v: 70 KB)
/// are split over the threads too instead of each running on one.
pub fn quant_matmul_precise_many(ws: &[QuantMatrix], x: &[f32], m: usize, outs: &mut [&mut [f32]]) {
    assert_eq!(ws.len(), outs.len(), "one output per matrix");
    let Some(cols) = ws.first().map(|w| w.cols) else {
        return;
    };
    assert_eq!(cols % 32, 0);
    assert!(x.len() >= m * cols, "x too short");
    for (w, out) in ws.iter().zip(outs.iter()) {
        assert_eq!(w.cols, cols, "matrices sharing an input have its width");
        assert!(out.len() >= m * w.rows, "out too short");
    }
    if m == 0 {
        return;
    }
    let mut run = |acts: &mut QuantizedActs, product: &mut Vec<f32>| {
        quantize_rows_precise(&x[..m * cols], m, cols, acts);
        #[cfg(target_arch = "x86_64")]
        if features().avx2 && !features().avx512 {
            // Each token's two rows summed inside the kernel: no 2m-row product to write and
            // add up (the same sums as below, combined in integers before the scaling).
            // Every matrix's rows start at a group boundary of the joint row range.
            let (mut starts, mut total) = (Vec::with_capacity(ws.len()), 0);
            for w in ws {
                starts.push(total);
                total += w.rows.next_multiple_of(GROUP);
            }
            let outps: Vec<SendPtr> = outs.iter_mut().map(|o| SendPtr(o.as_mut_ptr())).collect();
            let per_row = streaming_cost_per_row(&ws[0], 2 * m);
            par_ranges(total, GROUP, per_row, true, |r0, r1| {
                for ((w, &start), outp) in ws.iter().zip(&starts).zip(&outps) {
                    let (lo, hi) = (r0.max(start), r1.min(start + w.rows));
                    if lo < hi {
                        // SAFETY: AVX2 detected; rows [lo, hi) of this matrix's output are only
                        // written by this task.
                        let (lo, hi) = (lo - start, hi - start);
                        unsafe { x86::gemv_precise_avx2(w, acts, m, lo, hi, outp.get()) };
                    }
                }
            });
            return;
        }
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            let rows = w.rows;
            if rows == 0 {
                continue;
            }
            product.resize(2 * m * rows, 0.0);
            quant_matmul_q8(w, acts, 2 * m, product, None);
            let (main, correction) = product.split_at(m * rows);
            let outp = SendPtr(out.as_mut_ptr());
            // Megabytes at a prefill: on the pool, like the product itself.
            parallel_chunks(m * rows, 12, |start, end| {
                // SAFETY: the chunks are disjoint pieces of `out`, which outlives the call.
                let out =
                    unsafe { std::slice::from_raw_parts_mut(outp.get().add(start), end - start) };
                for ((o, a), b) in out
                    .iter_mut()
                    .zip(&main[start..end])
                    .zip(&correction[start..end])
                {
                    *o = a + b;
                }
            });
        }
    };
    let mut done = false;
    ACTS.with(|a| {
        PRECISE.with(|p| {
            if let (Ok(mut acts), Ok(mut scratch)) = (a.try_borrow_mut(), p.try_borrow_mut()) {
                run(&mut acts, &mut scratch);
                done = true;
            }
        })
    });
    if !done {
        // A nested call from inside a rayon task: fresh buffers rather than a borrow panic.
        run(&mut QuantizedActs::new(), &mut Vec::new());
    }
}

/// Dequantize one row (for embedding lookups) into `out` (`cols` elements), with exactly
/// ggml's arithmetic.
pub fn dequantize_row(w: &QuantMatrix, row: usize, out: &mut [f32]) {
    assert!(row < w.rows, "row out of range");
    assert!(out.len() >= w.cols, "out too short");
    let mut u = [0u8; 32];
    for (b, o) in out[..w.cols].chunks_exact_mut(32).enumerate() {
        let (d, m) = scalar::block_of(w, row, b, &mut u);
        match w.kind {
            QuantKind::Q4_0 => o
                .iter_mut()
                .zip(&u)
                .for_each(|(o, &q)| *o = (q as i32 - 8) as f32 * d),
            QuantKind::Q4_1 => o
                .iter_mut()
                .zip(&u)
                .for_each(|(o, &q)| *o = q as f32 * d + m),
            QuantKind::Q8_0 => o
                .iter_mut()
                .zip(&u)
                .for_each(|(o, &q)| *o = (q ^ 0x80) as i8 as f32 * d),
        }
    }
}

/// Reference implementations (exposed for tests and benchmarks).
pub mod reference {
    use super::*;

    /// Dequantize the whole matrix to f32 (`rows × cols`).
    pub fn dequantize(w: &QuantMatrix) -> Vec<f32> {
        let mut v = vec![0.0f32; w.rows * w.cols];
        for r in 0..w.rows {
            dequantize_row(w, r, &mut v[r * w.cols..(r + 1) * w.cols]);
        }
        v
    }

    /// Naive `out = x · Wᵀ` with f64 accumulation over the dequantized weights.
    pub fn matmul_f64(wd: &[f32], rows: usize, cols: usize, x: &[f32], m: usize, out: &mut [f32]) {
        for i in 0..m {
            for r in 0..rows {
                let mut acc = 0.0f64;
                for k in 0..cols {
                    acc += wd[r * cols + k] as f64 * x[i * cols + k] as f64;
                }
                out[i * rows + r] = acc as f32;
            }
        }
    }

    /// Quantize a row-major f32 matrix (`rows × cols`) into ggml block bytes.
    pub fn quantize(kind: QuantKind, w: &[f32], rows: usize, cols: usize) -> Vec<u8> {
        let mut outb = Vec::with_capacity(rows * kind.row_bytes(cols));
        for r in 0..rows {
            for b in 0..cols / 32 {
                scalar::quantize_block(
                    kind,
                    &w[r * cols + b * 32..r * cols + b * 32 + 32],
                    &mut outb,
                );
            }
        }
        outb
    }
}

#[cfg(test)]
mod tests;
