//! Bidirectional (encoder) attention straight from a fused QKV projection in host memory.
//!
//! For encoder inputs of a few dozen tokens the arithmetic is tiny; what costs is the framework
//! around it (transposes to head-major copies, a GEMM call per head, a mask tensor, softmax as
//! another pass). This walks each (sequence, head) once: dot products, softmax and the weighted
//! sum of values, reading q, k and v where the projection wrote them.

/// `qkv`: (batch × t, 3 × hidden) rows holding [q | k | v]; `lengths[b]` real tokens of sequence
/// b (keys past it are padding). Writes `out`: (batch × t, hidden). q is scaled by 1/√head_dim here.
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
        let len = lengths[b].min(t);
        let mut scores = vec![0f32; len];
        let mut acc = vec![0f32; head_dim];
        for i in 0..t {
            let q = &qkv[(b * t + i) * row + h * head_dim..][..head_dim];
            for (j, s) in scores.iter_mut().enumerate() {
                let k = &qkv[(b * t + j) * row + hidden + h * head_dim..][..head_dim];
                *s = dot(q, k) * scale;
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            acc.fill(0.0);
            for (j, p) in scores.iter().enumerate() {
                let v = &qkv[(b * t + j) * row + 2 * hidden + h * head_dim..][..head_dim];
                for (a, x) in acc.iter_mut().zip(v) {
                    *a += p * x;
                }
            }
            let inv = 1.0 / sum;
            acc.iter_mut().for_each(|a| *a *= inv);
            out_rows(b * t + i, &acc);
        }
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
        use rayon::prelude::*;
        (0..tasks).into_par_iter().for_each(work);
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
        scale,
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

    use super::GroupQuery;

    /// Query heads one call holds in registers.
    pub(super) const MAX_GROUP: usize = 4;

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

/// Dot product in 8 independent lanes, so the compiler can keep it in vector registers.
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
        let (batch, t, heads, hd) = (2, 5, 3, 4);
        let hidden = heads * hd;
        let qkv: Vec<f32> = (0..batch * t * 3 * hidden)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let lengths = [5, 3];
        let mut out = vec![0f32; batch * t * hidden];
        bidirectional_attention(&qkv, batch, t, heads, hd, &lengths, &mut out);
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
