//! Bidirectional (encoder) attention straight from a fused QKV projection in host memory.
//!
//! For encoder inputs of a few dozen tokens the arithmetic is tiny; what costs is the framework
//! around it (transposes to head-major copies, a GEMM call per head, a mask tensor, softmax as
//! another pass). This walks each (sequence, head) once: dot products, softmax and the weighted
//! sum of values, reading q, k and v where the projection wrote them.

use super::strided::{self, MatrixView};

/// `qkv`: (batch × t, 3 × hidden) rows holding [q | k | v]; `lengths[b]` real tokens of sequence
/// b (keys past it are padding). Writes `out`: (batch × t, hidden), zeros on padding rows. q is
/// scaled by 1/√head_dim here.
pub fn bidirectional_attention(
    qkv: &[f32],
    batch: usize,
    t: usize,
    heads: usize,
    head_dim: usize,
    lengths: &[usize],
    out: &mut [f32],
) {
    let hidden = heads * head_dim;
    assert_eq!(qkv.len(), batch * t * 3 * hidden, "qkv shape");
    assert_eq!(out.len(), batch * t * hidden, "out shape");
    assert_eq!(lengths.len(), batch, "one length per sequence");
    let scale = 1.0 / (head_dim as f32).sqrt();
    let row = 3 * hidden;
    let job = |b: usize, h: usize, out_rows: &mut dyn FnMut(usize, &[f32])| {
        let head = Head {
            qkv: &qkv[b * t * row..(b + 1) * t * row],
            row,
            hidden,
            offset: h * head_dim,
            head_dim,
            len: lengths[b].min(t),
            scale,
        };
        let out_rows = &mut |i: usize, values: &[f32]| out_rows(b * t + i, values);
        // Padding queries are never read (their keys are masked for everyone else too): zeros.
        if head.len < t {
            let zeros = vec![0f32; head_dim];
            for i in head.len..t {
                out_rows(i, &zeros);
            }
        }
        #[cfg(target_arch = "x86_64")]
        if super::features().avx512
            && head_dim.is_multiple_of(16)
            && head_dim <= 16 * x86::MAX_VECTORS
        {
            // SAFETY: AVX-512F detected; head_dim checked.
            unsafe { x86::attend_head(head, out_rows) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if super::features().avx2 {
            // SAFETY: AVX2 and FMA detected.
            unsafe { attend_head_avx2(head, out_rows) };
            return;
        }
        attend_head(head, out_rows);
    };
    let outp = super::SendPtr(out.as_mut_ptr());
    let tasks = batch * heads;
    let work = |task: usize| {
        let (b, h) = (task / heads, task % heads);
        job(b, h, &mut |r, values| {
            // SAFETY: row r, columns of head h: written by this task only.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(outp.get().add(r * hidden + h * head_dim), head_dim)
            };
            dst.copy_from_slice(values);
        });
    };
    // ~t² · head_dim · 4 flops per task; below ~100k flops in all, threads cost more than they save.
    if tasks * t * t * head_dim < 25_000 || rayon::current_num_threads() == 1 {
        (0..tasks).for_each(work);
    } else {
        super::parallel_tasks(tasks, work);
    }
}

/// One head of one sequence in the fused projections: row `i` of the sequence holds
/// [q | k | v], this head at `offset` in each part; the first `len` rows are real.
#[derive(Clone, Copy)]
struct Head<'a> {
    qkv: &'a [f32],
    row: usize,
    hidden: usize,
    offset: usize,
    head_dim: usize,
    len: usize,
    scale: f32,
}

impl Head<'_> {
    /// This head's q (`which` 0), k (1) or v (2) rows as a matrix, read where they lie.
    fn view(&self, which: usize) -> MatrixView {
        MatrixView::strided(&self.qkv[which * self.hidden + self.offset..], self.row)
    }

    /// Row `i`'s q (`which` 0), k (1) or v (2) of this head.
    fn part(&self, i: usize, which: usize) -> &[f32] {
        &self.qkv[i * self.row + which * self.hidden + self.offset..][..self.head_dim]
    }

    /// The real keys as head_dim rows of `stride` ≥ len positions (zeros past len).
    fn keys_transposed(&self, stride: usize) -> Vec<f32> {
        let mut keys_t = vec![0f32; self.head_dim * stride];
        for j in 0..self.len {
            for (d, v) in self.part(j, 1).iter().enumerate() {
                keys_t[d * stride + j] = *v;
            }
        }
        keys_t
    }
}

/// [`attend_head`] compiled for AVX2 + FMA: its loops over contiguous rows vectorise 8 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_head_avx2(head: Head<'_>, out_row: &mut dyn FnMut(usize, &[f32])) {
    attend_head(head, out_row)
}

/// Every real query row of `head` against its real keys, each result row to `out_row`: keys
/// transposed once, so the scores of all keys grow by one query element at a time.
#[inline(always)]
fn attend_head(head: Head<'_>, out_row: &mut dyn FnMut(usize, &[f32])) {
    let (head_dim, len, scale) = (head.head_dim, head.len, head.scale);
    let part = |i: usize, which: usize| head.part(i, which);
    let keys_t = head.keys_transposed(len);
    let mut scores = vec![0f32; len];
    let mut acc = vec![0f32; head_dim];
    for i in 0..len {
        scores.fill(0.0);
        for (d, q) in part(i, 0).iter().enumerate() {
            let q = q * scale;
            for (s, k) in scores.iter_mut().zip(&keys_t[d * len..(d + 1) * len]) {
                *s += q * k;
            }
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum = super::activation::exp_shifted_inplace(&mut scores, max);
        acc.fill(0.0);
        for (j, p) in scores.iter().enumerate() {
            for (a, v) in acc.iter_mut().zip(part(j, 2)) {
                *a += p * v;
            }
        }
        let inv = 1.0 / sum;
        acc.iter_mut().for_each(|a| *a *= inv);
        out_row(i, &acc);
    }
}

/// Keys or values of one cache head: row `j` (a position) starts at `data[j * stride]` and holds
/// `head_dim` contiguous floats.
#[derive(Clone, Copy)]
pub struct HeadRows<'a> {
    pub data: &'a [f32],
    pub stride: usize,
}

impl HeadRows<'_> {
    fn row(&self, j: usize, head_dim: usize) -> &[f32] {
        &self.data[j * self.stride..][..head_dim]
    }
}

/// One decode position of the query heads that share one key/value head (grouped query
/// attention): `q` is group × head_dim; the first `n` rows of `keys` and `values` are attended.
#[derive(Clone, Copy)]
pub struct GroupQuery<'a> {
    pub q: &'a [f32],
    pub head_dim: usize,
    pub keys: HeadRows<'a>,
    pub values: HeadRows<'a>,
    pub n: usize,
    pub scale: f32,
}

/// Attention of one [`GroupQuery`], each key and value row read once for the whole group.
/// `scores` (group × n) is scratch; writes `out` (group × head_dim).
pub fn decode_group_attention(query: GroupQuery<'_>, scores: &mut [f32], out: &mut [f32]) {
    let GroupQuery {
        q,
        head_dim,
        keys,
        values,
        n,
        ..
    } = query;
    let group = q.len() / head_dim;
    assert_eq!(out.len(), group * head_dim, "out shape");
    assert_eq!(scores.len(), group * n, "scores shape");
    if n == 0 {
        out.fill(0.0);
        return;
    }
    for rows in [keys, values] {
        assert!(
            rows.data.len() >= (n - 1) * rows.stride + head_dim,
            "cache rows"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if super::features().avx512 && head_dim.is_multiple_of(16) && head_dim <= 128 {
        // The kernel holds up to 4 query heads in registers: larger groups (Qwen2's 7) go in
        // chunks of 4, each reading the rows once.
        let heads = x86::MAX_GROUP;
        let chunks = q
            .chunks(heads * head_dim)
            .zip(scores.chunks_mut(heads * n))
            .zip(out.chunks_mut(heads * head_dim));
        for ((q, scores), out) in chunks {
            // SAFETY: AVX-512F detected; shapes checked above, at most MAX_GROUP heads.
            unsafe { x86::decode_group(GroupQuery { q, ..query }, scores, out) };
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::features().avx2 {
        // SAFETY: AVX2 and FMA detected.
        unsafe { decode_group_avx2(query, scores, out) };
        return;
    }
    decode_group_portable(query, scores, out);
}

/// [`decode_group_portable`] compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_group_avx2(query: GroupQuery<'_>, scores: &mut [f32], out: &mut [f32]) {
    decode_group_portable(query, scores, out)
}

/// [`decode_group_attention`] in plain loops (shapes already checked).
#[inline(always)]
fn decode_group_portable(query: GroupQuery<'_>, scores: &mut [f32], out: &mut [f32]) {
    let GroupQuery {
        q,
        head_dim,
        keys,
        values,
        n,
        scale,
    } = query;
    let group = q.len() / head_dim;
    for j in 0..n {
        let key = keys.row(j, head_dim);
        for g in 0..group {
            scores[g * n + j] = dot(&q[g * head_dim..][..head_dim], key) * scale;
        }
    }
    out.fill(0.0);
    normalize_scores(scores, group, n);
    for j in 0..n {
        let value = values.row(j, head_dim);
        for g in 0..group {
            let p = scores[g * n + j];
            for (o, x) in out[g * head_dim..][..head_dim].iter_mut().zip(value) {
                *o += p * x;
            }
        }
    }
}

/// Each head's scores become softmax weights.
fn normalize_scores(scores: &mut [f32], group: usize, n: usize) {
    scores
        .chunks_exact_mut(n)
        .take(group)
        .for_each(super::activation::softmax_inplace);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{GroupQuery, Head};
    use crate::kernels::activation::x86::exp_clamped;
    use crate::kernels::x86::lane_mask;

    /// Query heads one call holds in registers.
    pub(super) const MAX_GROUP: usize = 4;
    /// Vectors of one head's output row held in registers (head_dim ≤ 128).
    pub(super) const MAX_VECTORS: usize = 8;

    /// [`super::attend_head`] in registers: the scores of 16 keys at a time accumulate over the
    /// query's elements in one vector, the output row (head_dim / 16 vectors) over the keys; a
    /// block of queries goes together, so each key and value vector loaded serves all of them
    /// and the block's sums are independent chains of FMAs. head_dim a multiple of 16, at most
    /// 16 · MAX_VECTORS.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn attend_head(head: Head<'_>, out_row: &mut dyn FnMut(usize, &[f32])) {
        unsafe {
            match head.head_dim / 16 {
                1 => attend_blocks::<1, 4>(head, out_row),
                2 => attend_blocks::<2, 4>(head, out_row),
                3 => attend_blocks::<3, 4>(head, out_row),
                4 => attend_blocks::<4, 4>(head, out_row),
                5 => attend_blocks::<5, 2>(head, out_row),
                6 => attend_blocks::<6, 2>(head, out_row),
                7 => attend_blocks::<7, 2>(head, out_row),
                _ => attend_blocks::<8, 2>(head, out_row),
            }
        }
    }

    /// `VECTORS` = head_dim / 16; `QUERIES` per block (their accumulators fill the registers).
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn attend_blocks<const VECTORS: usize, const QUERIES: usize>(
        head: Head<'_>,
        out_row: &mut dyn FnMut(usize, &[f32]),
    ) {
        let (head_dim, len, scale) = (head.head_dim, head.len, head.scale);
        let part = |i: usize, which: usize| head.part(i, which);
        let padded = len.div_ceil(16) * 16;
        let keys_t = head.keys_transposed(padded);
        let mut scores = vec![0f32; QUERIES * padded];
        let mut result = [0f32; 16 * MAX_VECTORS];
        unsafe {
            for first in (0..len).step_by(QUERIES) {
                let real = QUERIES.min(len - first);
                // Rows past the last query repeat it: computed, never written out.
                let q: [&[f32]; QUERIES] =
                    std::array::from_fn(|r| part(first + r.min(real - 1), 0));
                let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); QUERIES];
                for c in 0..padded / 16 {
                    let mut s = [_mm512_setzero_ps(); QUERIES];
                    for d in 0..head_dim {
                        let k = _mm512_loadu_ps(keys_t.as_ptr().add(d * padded + c * 16));
                        for r in 0..QUERIES {
                            s[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][d] * scale), k, s[r]);
                        }
                    }
                    let keys = lane_mask(len - c * 16);
                    for r in 0..QUERIES {
                        max[r] = _mm512_mask_max_ps(max[r], keys, max[r], s[r]);
                        _mm512_storeu_ps(scores.as_mut_ptr().add(r * padded + c * 16), s[r]);
                    }
                }
                let mut inverse = [0f32; QUERIES];
                for r in 0..QUERIES {
                    let max = _mm512_set1_ps(_mm512_reduce_max_ps(max[r]));
                    let mut sum = _mm512_setzero_ps();
                    for c in 0..padded / 16 {
                        let at = scores.as_mut_ptr().add(r * padded + c * 16);
                        let e = _mm512_maskz_mov_ps(
                            lane_mask(len - c * 16),
                            exp_clamped(_mm512_sub_ps(_mm512_loadu_ps(at), max)),
                        );
                        sum = _mm512_add_ps(sum, e);
                        _mm512_storeu_ps(at, e);
                    }
                    inverse[r] = 1.0 / _mm512_reduce_add_ps(sum);
                }
                let mut acc = [[_mm512_setzero_ps(); VECTORS]; QUERIES];
                for j in 0..len {
                    let v = part(j, 2).as_ptr();
                    for x in 0..VECTORS {
                        let vx = _mm512_loadu_ps(v.add(x * 16));
                        for r in 0..QUERIES {
                            let p = _mm512_set1_ps(*scores.get_unchecked(r * padded + j));
                            acc[r][x] = _mm512_fmadd_ps(p, vx, acc[r][x]);
                        }
                    }
                }
                for r in 0..real {
                    let inv = _mm512_set1_ps(inverse[r]);
                    for x in 0..VECTORS {
                        _mm512_storeu_ps(
                            result.as_mut_ptr().add(x * 16),
                            _mm512_mul_ps(acc[r][x], inv),
                        );
                    }
                    out_row(first + r, &result[..head_dim]);
                }
            }
        }
    }

    /// [`super::decode_group_attention`] with the group's queries and outputs held in
    /// registers: head_dim ≤ 128 (8 vectors), group ≤ MAX_GROUP.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn decode_group(query: GroupQuery<'_>, scores: &mut [f32], out: &mut [f32]) {
        let (q, head_dim, n) = (query.q, query.head_dim, query.n);
        let (keys, values, scale) = (query.keys, query.values, query.scale);
        let group = q.len() / head_dim;
        let vectors = head_dim / 16;
        unsafe {
            let mut qv = [[_mm512_setzero_ps(); 8]; MAX_GROUP];
            for g in 0..group {
                for c in 0..vectors {
                    qv[g][c] = _mm512_loadu_ps(q.as_ptr().add(g * head_dim + c * 16));
                }
            }
            for j in 0..n {
                let key = keys.data.as_ptr().add(j * keys.stride);
                let mut sums = [_mm512_setzero_ps(); MAX_GROUP];
                for c in 0..vectors {
                    let k = _mm512_loadu_ps(key.add(c * 16));
                    for g in 0..group {
                        sums[g] = _mm512_fmadd_ps(qv[g][c], k, sums[g]);
                    }
                }
                for g in 0..group {
                    *scores.get_unchecked_mut(g * n + j) = _mm512_reduce_add_ps(sums[g]) * scale;
                }
            }
            super::normalize_scores(scores, group, n);
            let mut acc = [[_mm512_setzero_ps(); 8]; MAX_GROUP];
            for j in 0..n {
                let value = values.data.as_ptr().add(j * values.stride);
                let mut p = [_mm512_setzero_ps(); MAX_GROUP];
                for g in 0..group {
                    p[g] = _mm512_set1_ps(*scores.get_unchecked(g * n + j));
                }
                for c in 0..vectors {
                    let v = _mm512_loadu_ps(value.add(c * 16));
                    for g in 0..group {
                        acc[g][c] = _mm512_fmadd_ps(p[g], v, acc[g][c]);
                    }
                }
            }
            for g in 0..group {
                for c in 0..vectors {
                    _mm512_storeu_ps(out.as_mut_ptr().add(g * head_dim + c * 16), acc[g][c]);
                }
            }
        }
    }
}

/// A batch of fused projections: `batch` sequences of `t` rows of [q | k | v], each part
/// `heads × head_dim` wide.
#[derive(Clone, Copy, Debug)]
pub struct QkvShape {
    pub batch: usize,
    pub t: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl QkvShape {
    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Floats of the per-head probability matrices: batch × heads × t × t.
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.t * self.t
    }

    /// Panics unless the buffers of a training pass fit this shape: `probs` and `rows` (the
    /// output or its gradient, batch·t × hidden) are lengths.
    fn check(
        &self,
        qkv: &[f32],
        lengths: &[usize],
        dropout: Option<&[f32]>,
        probs: usize,
        rows: usize,
    ) {
        let hidden = self.hidden();
        assert_eq!(qkv.len(), self.batch * self.t * 3 * hidden, "qkv shape");
        assert_eq!(probs, self.probs_len(), "probs shape");
        assert_eq!(rows, self.batch * self.t * hidden, "output rows shape");
        assert_eq!(lengths.len(), self.batch, "one length per sequence");
        if let Some(mask) = dropout {
            assert_eq!(mask.len(), self.probs_len(), "dropout mask shape");
        }
    }

    /// Head `task` (sequence-major) of `qkv`, and where its t × t probabilities start.
    fn head<'a>(&self, qkv: &'a [f32], lengths: &[usize], task: usize) -> (usize, Head<'a>, usize) {
        let (b, h) = (task / self.heads, task % self.heads);
        let row = 3 * self.hidden();
        let head = Head {
            qkv: &qkv[b * self.t * row..(b + 1) * self.t * row],
            row,
            hidden: self.hidden(),
            offset: h * self.head_dim,
            head_dim: self.head_dim,
            len: lengths[b].min(self.t),
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        };
        (b, head, task * self.t * self.t)
    }
}

/// Training's [`bidirectional_attention`] (same layout, zeros on padding rows), keeping each
/// head's probabilities in `probs` ([`QkvShape::probs_len`] floats; row i of a head starts at
/// i·t and holds its `len` keys' probabilities) for [`bidirectional_attention_backward`].
/// `dropout` (the same shape, entries 0 or 1/(1−p)), where given, scales the probabilities
/// before the values are summed. One task per (sequence, head) on rayon's pool, its two
/// products GEMMs on the operands where they lie.
pub fn bidirectional_attention_train(
    qkv: &[f32],
    shape: QkvShape,
    lengths: &[usize],
    dropout: Option<&[f32]>,
    probs: &mut [f32],
    out: &mut [f32],
) {
    shape.check(qkv, lengths, dropout, probs.len(), out.len());
    let (t, hidden, hd) = (shape.t, shape.hidden(), shape.head_dim);
    let probs_ptr = super::SendPtr(probs.as_mut_ptr());
    let out_ptr = super::SendPtr(out.as_mut_ptr());
    super::parallel_tasks(shape.batch * shape.heads, |task| {
        let (b, head, at) = shape.head(qkv, lengths, task);
        let len = head.len;
        // SAFETY: this head's probabilities are written by this task alone; probs outlives
        // the call.
        let probs = unsafe { std::slice::from_raw_parts_mut(probs_ptr.get().add(at), t * t) };
        // This head's columns of the sequence's output rows: this task's alone.
        // SAFETY: an offset inside out (the sequence's first row).
        let head_out = unsafe { out_ptr.get().add(b * t * hidden + head.offset) };
        // S = scale·Q·Kᵀ, then each row's softmax.
        // SAFETY: q and k are len rows of the sequence; probs holds len rows of t ≥ len.
        unsafe {
            strided::matmul(
                (len, len, hd),
                probs.as_mut_ptr(),
                t,
                head.view(0),
                head.view(1).t(),
                head.scale,
                false,
                false,
            )
        };
        for p in probs.chunks_exact_mut(t).take(len) {
            let p = &mut p[..len];
            let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let inverse = 1.0 / super::activation::exp_shifted_inplace(p, max);
            p.iter_mut().for_each(|v| *v *= inverse);
        }
        // O = A·V with A = P ⊙ mask.
        let masked;
        let weights = match dropout {
            Some(m) => {
                masked = masked_probs(probs, &m[at..at + t * t], t, len);
                MatrixView::rows(&masked, len)
            }
            None => MatrixView::strided(probs, t),
        };
        // SAFETY: v is len rows; head_out is valid for t rows of hidden, this head's columns.
        unsafe {
            strided::matmul(
                (len, hd, len),
                head_out,
                hidden,
                weights,
                head.view(2),
                1.0,
                false,
                false,
            );
            zero_rows(head_out, hidden, hd, len..t);
        }
    });
}

/// A = P ⊙ mask for the first `len` rows and columns of a head's t × t probabilities, len × len.
fn masked_probs(probs: &[f32], mask: &[f32], t: usize, len: usize) -> Vec<f32> {
    let mut masked = Vec::with_capacity(len * len);
    for (p, m) in probs.chunks_exact(t).zip(mask.chunks_exact(t)).take(len) {
        masked.extend(p[..len].iter().zip(&m[..len]).map(|(p, m)| p * m));
    }
    masked
}

/// Zeros in `width` floats at each of `rows`, rows `stride` apart from `at`: padding rows.
///
/// # Safety
/// Each of those floats must be valid for writes and this caller's alone.
unsafe fn zero_rows(at: *mut f32, stride: usize, width: usize, rows: std::ops::Range<usize>) {
    for i in rows {
        // SAFETY: as the caller promises.
        unsafe { std::ptr::write_bytes(at.add(i * stride), 0, width) };
    }
}

/// The gradient of [`bidirectional_attention_train`] with respect to `qkv`, given the output's
/// gradient `dout` and the forward pass's `probs` and `dropout`: writes all of `dqkv` (zeros on
/// padding rows). Per head, with A = P ⊙ mask: dV = Aᵀ·dO, dP = (dO·Vᵀ) ⊙ mask,
/// dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ = dS·K·scale, dK = dSᵀ·Q·scale; each product a GEMM
/// on the operands where they lie, writing straight into the head's columns of `dqkv`.
pub fn bidirectional_attention_backward(
    qkv: &[f32],
    shape: QkvShape,
    lengths: &[usize],
    dropout: Option<&[f32]>,
    probs: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
) {
    shape.check(qkv, lengths, dropout, probs.len(), dout.len());
    assert_eq!(dqkv.len(), qkv.len(), "dqkv shape");
    let (t, hidden, hd) = (shape.t, shape.hidden(), shape.head_dim);
    let grad_ptr = super::SendPtr(dqkv.as_mut_ptr());
    super::parallel_tasks(shape.batch * shape.heads, |task| {
        let (b, head, at) = shape.head(qkv, lengths, task);
        let len = head.len;
        let mask = dropout.map(|m| &m[at..at + t * t]);
        let probs = &probs[at..at + t * t];
        let d_out = MatrixView::strided(&dout[b * t * hidden + head.offset..], hidden);
        // This head's columns of [dq | dk | dv] in the sequence's rows: this task's alone.
        // SAFETY: an offset inside dqkv (the sequence's first row).
        let grad = |which: usize| unsafe {
            grad_ptr
                .get()
                .add(b * t * head.row + which * hidden + head.offset)
        };
        // dS·scale, row by row: dP = (dO·Vᵀ) ⊙ mask, then dS = P ⊙ (dP − Σ dP ⊙ P).
        let mut scores = vec![0f32; len * len];
        // SAFETY: dout and v hold len rows of this head; scores is len × len.
        unsafe {
            strided::matmul(
                (len, len, hd),
                scores.as_mut_ptr(),
                len,
                d_out,
                head.view(2).t(),
                1.0,
                false,
                false,
            )
        };
        for (i, ds) in scores.chunks_exact_mut(len.max(1)).enumerate().take(len) {
            let p = &probs[i * t..i * t + len];
            if let Some(m) = mask {
                ds.iter_mut().zip(&m[i * t..]).for_each(|(s, m)| *s *= m);
            }
            let centre = dot(ds, p);
            ds.iter_mut()
                .zip(p)
                .for_each(|(s, p)| *s = p * (*s - centre) * head.scale);
        }
        let masked;
        let weights = match mask {
            Some(m) => {
                masked = masked_probs(probs, m, t, len);
                MatrixView::rows(&masked, len)
            }
            None => MatrixView::strided(probs, t),
        };
        let d_scores = MatrixView::rows(&scores, len);
        // dQ = dS·K, dK = dSᵀ·Q, dV = Aᵀ·dO (scale already in dS).
        let products = [
            (d_scores, head.view(1)),
            (d_scores.t(), head.view(0)),
            (weights.t(), d_out),
        ];
        for (which, (a, b)) in products.into_iter().enumerate() {
            // SAFETY: operands of len rows as above; the gradient's head columns are valid
            // for t rows of 3·hidden and this task's alone.
            unsafe {
                strided::matmul(
                    (len, hd, len),
                    grad(which),
                    head.row,
                    a,
                    b,
                    1.0,
                    false,
                    false,
                );
                zero_rows(grad(which), head.row, hd, len..t);
            }
        }
    });
}

/// Dot product in 8 independent lanes, so the compiler can keep it in vector registers.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_group_attention_matches_a_plain_softmax_average() {
        // head_dim 64 takes the AVX-512 path where the CPU has it, 12 the portable one; the
        // cache rows sit at a stride wider than a row, as in the KV cache.
        for (head_dim, group, n) in [
            (64, 3, 37),
            (64, 1, 1),
            (12, 2, 5),
            (128, 4, 300),
            (64, 7, 37),
        ] {
            let stride = head_dim + 8;
            let cell = |i: usize, salt: usize| ((i * 31 + salt) % 97) as f32 / 48.0 - 1.0;
            let q: Vec<f32> = (0..group * head_dim).map(|i| cell(i, 3)).collect();
            let keys: Vec<f32> = (0..n * stride).map(|i| cell(i, 11)).collect();
            let values: Vec<f32> = (0..n * stride).map(|i| cell(i, 29)).collect();
            let scale = 0.125;
            let mut scores = vec![0.0; group * n];
            let mut out = vec![f32::NAN; group * head_dim];
            let query = GroupQuery {
                q: &q,
                head_dim,
                keys: HeadRows {
                    data: &keys,
                    stride,
                },
                values: HeadRows {
                    data: &values,
                    stride,
                },
                n,
                scale,
            };
            decode_group_attention(query, &mut scores, &mut out);
            for g in 0..group {
                let logits: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..head_dim)
                            .map(|d| q[g * head_dim + d] as f64 * keys[j * stride + d] as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..head_dim {
                    let want: f64 = (0..n)
                        .map(|j| weights[j] / total * values[j * stride + d] as f64)
                        .sum();
                    let got = out[g * head_dim + d] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "head_dim {head_dim} group {g} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn matches_naive_attention_with_padding() {
        // head_dim 4: the portable loops; 32 and 64: the AVX-512 kernel in four-query blocks,
        // one and several 16-key chunks, partly filled.
        for (batch, t, heads, hd, lengths) in [
            (2, 5, 3, 4, vec![5, 3]),
            (2, 21, 2, 32, vec![21, 17]),
            (2, 40, 1, 64, vec![7, 40]),
            // Two-query blocks (head_dim 80 and 128), a last block of one query.
            (2, 9, 2, 80, vec![9, 5]),
            (1, 19, 1, 128, vec![19]),
        ] {
            check_against_naive(batch, t, heads, hd, &lengths);
        }
    }

    #[test]
    fn training_attention_matches_inference_and_finite_differences() {
        // Padding (length 4 of 7) and dropout masks; a tiny head and MiniLM's.
        for head_dim in [4, 32] {
            check_training_attention(QkvShape {
                batch: 2,
                t: 7,
                heads: 2,
                head_dim,
            });
        }
    }

    fn check_training_attention(shape: QkvShape) {
        let lengths = [7, 4];
        let hidden = shape.heads * shape.head_dim;
        let n = shape.batch * shape.t * 3 * hidden;
        let qkv: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let dout: Vec<f32> = (0..n / 3)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 10.0)
            .collect();
        let mask: Vec<f32> = (0..shape.probs_len())
            .map(|i| if i % 5 == 0 { 0.0 } else { 1.25 })
            .collect();
        let forward = |qkv: &[f32], mask: Option<&[f32]>| {
            let mut probs = vec![0f32; shape.probs_len()];
            let mut out = vec![f32::NAN; n / 3];
            bidirectional_attention_train(qkv, shape, &lengths, mask, &mut probs, &mut out);
            (probs, out)
        };
        let mut inference = vec![0f32; n / 3];
        bidirectional_attention(&qkv, 2, 7, 2, shape.head_dim, &lengths, &mut inference);
        let (_, out) = forward(&qkv, None);
        for (a, b) in out.iter().zip(&inference) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        for mask in [None, Some(&mask[..])] {
            let (probs, _) = forward(&qkv, mask);
            let mut grad = vec![f32::NAN; n];
            bidirectional_attention_backward(&qkv, shape, &lengths, mask, &probs, &dout, &mut grad);
            // loss = Σ dout · out
            let loss = |qkv: &[f32]| -> f64 {
                let (_, out) = forward(qkv, mask);
                out.iter()
                    .zip(&dout)
                    .map(|(o, d)| *o as f64 * *d as f64)
                    .sum()
            };
            for i in (0..n).step_by(5) {
                let (mut plus, mut minus) = (qkv.clone(), qkv.clone());
                plus[i] += 1e-2;
                minus[i] -= 1e-2;
                let want = (loss(&plus) - loss(&minus)) / 2e-2;
                assert!(
                    (grad[i] as f64 - want).abs() < 2e-3,
                    "dqkv[{i}] {} vs {want} (mask {})",
                    grad[i],
                    mask.is_some()
                );
            }
        }
    }

    fn check_against_naive(batch: usize, t: usize, heads: usize, hd: usize, lengths: &[usize]) {
        let hidden = heads * hd;
        let qkv: Vec<f32> = (0..batch * t * 3 * hidden)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let mut out = vec![f32::NAN; batch * t * hidden];
        bidirectional_attention(&qkv, batch, t, heads, hd, lengths, &mut out);
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..t {
                    let at = |r: usize, part: usize, d: usize| {
                        qkv[(b * t + r) * 3 * hidden + part * hidden + h * hd + d] as f64
                    };
                    let s: Vec<f64> = (0..lengths[b])
                        .map(|j| {
                            (0..hd).map(|d| at(i, 0, d) * at(j, 1, d)).sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    if i >= lengths[b] {
                        let row = &out[(b * t + i) * hidden + h * hd..][..hd];
                        assert!(row.iter().all(|v| *v == 0.0), "padding row b{b} i{i}");
                        continue;
                    }
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        let want: f64 = (0..lengths[b]).map(|j| e[j] / z * at(j, 2, d)).sum();
                        let got = out[(b * t + i) * hidden + h * hd + d] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "b{b} h{h} i{i} d{d}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
