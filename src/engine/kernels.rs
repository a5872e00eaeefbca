//! CPU kernels of the engine's steps where the per-sequence work is too small or too thin for a
//! matrix library: candle/gemm calls of a few hundred multiply-adds each (a decode row), or of
//! rank-16 products (LoRA), cost more in dispatch, packing and copies than in arithmetic.
//!
//! - [`add_lora_rows`]: every group of rows (a sequence's decode row or prompt chunk) adds its own
//!   adapter's LoRA update in one pass (`h = A·x` by dot products, `y += hᵀ·(scale·B)ᵀ` by row
//!   updates), blocks of rows in parallel; matrices kept in f16 or 8 bits ([`Q8Matrix`]) are
//!   widened to f32 per task.
//! - [`decode_attention`]: one query row per sequence attending over that sequence's cached keys
//!   and values, all sequences, key/value heads and runs of cached positions in parallel (the
//!   runs' partial softmaxes merged), each key read once for the query heads that share it.

use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::llama::simd::dots_rows;

/// A LoRA matrix's values as the adapter keeps them (`generate.lora_dtype`).
#[derive(Debug, Clone, Copy)]
pub(super) enum LoraValues<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    Q8(&'a Q8Matrix),
}

impl LoraValues<'_> {
    /// The values as f32: borrowed, or widened into `scratch`.
    fn as_f32<'s>(&'s self, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        match self {
            LoraValues::F32(v) => v,
            LoraValues::F16(v) => {
                scratch.resize(v.len(), 0.0);
                v.convert_to_f32_slice(scratch);
                scratch
            }
            LoraValues::Q8(q) => {
                q.widen_into(scratch);
                scratch
            }
        }
    }
}

/// Values per scale of a [`Q8Matrix`] (as GGML's q8_0).
pub(super) const Q8_BLOCK: usize = 32;

/// A row-major matrix in blocks of [`Q8_BLOCK`] consecutive values, each block one f32 scale
/// (its largest magnitude / 127) and a signed byte per value: 1.125 bytes a value.
#[derive(Debug)]
pub struct Q8Matrix {
    values: Vec<i8>,
    scales: Vec<f32>,
}

impl Q8Matrix {
    pub fn quantize(values: &[f32]) -> Q8Matrix {
        let mut q = Vec::with_capacity(values.len());
        let mut scales = Vec::with_capacity(values.len().div_ceil(Q8_BLOCK));
        for block in values.chunks(Q8_BLOCK) {
            let largest = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = largest / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            q.extend(block.iter().map(|v| (v * inverse).round() as i8));
            scales.push(scale);
        }
        Q8Matrix { values: q, scales }
    }

    /// Bytes it takes.
    pub fn bytes(&self) -> usize {
        self.values.len() + 4 * self.scales.len()
    }

    fn widen_into(&self, out: &mut Vec<f32>) {
        out.clear();
        out.reserve(self.values.len());
        for (block, scale) in self.values.chunks(Q8_BLOCK).zip(&self.scales) {
            out.extend(block.iter().map(|v| f32::from(*v) * scale));
        }
    }
}

/// One group's LoRA pair: `a` `(rank, in)`, `b_t` `(rank, out)` = `(scale·B)ᵀ`.
pub(super) struct LoraRows<'a> {
    pub(super) rows: Range<usize>,
    pub(super) a: LoraValues<'a>,
    pub(super) b_t: LoraValues<'a>,
    pub(super) rank: usize,
}

/// Rows of one group per task: enough to spread a prompt chunk over every thread, few enough
/// that a task's `h` and output rows stay in cache.
const LORA_ROWS_PER_TASK: usize = 16;

/// `y` `(rows, out)` plus each group's update for its rows of `x` `(rows, in)`: decode rows (one
/// per sequence) and prompt chunks alike, in tasks of up to [`LORA_ROWS_PER_TASK`] rows of one
/// group, each computing `h = x·Aᵀ` four rows per load of `A`'s rows, then `y += h·(scale·B)ᵀ`.
/// f16 and 8-bit matrices are widened once per task: a rank-16 pair is ~34k values on the demo
/// model, as many as one row's multiply-adds, against the base layer's ~900k per row.
pub(super) fn add_lora_rows(
    x: &[f32],
    y: &[f32],
    in_f: usize,
    out_f: usize,
    groups: &[LoraRows<'_>],
) -> Vec<f32> {
    let mut out = y.to_vec();
    let mut tasks: Vec<(usize, &mut [f32], &LoraRows<'_>)> = Vec::new();
    let mut rest: &mut [f32] = &mut out;
    let mut at = 0;
    for g in groups {
        let (_, tail) = rest.split_at_mut((g.rows.start - at) * out_f);
        let (mine, tail) = tail.split_at_mut(g.rows.len() * out_f);
        for (i, block) in mine.chunks_mut(LORA_ROWS_PER_TASK * out_f).enumerate() {
            tasks.push((g.rows.start + i * LORA_ROWS_PER_TASK, block, g));
        }
        rest = tail;
        at = g.rows.end;
    }
    tasks.into_par_iter().for_each(|(first, dst, g)| {
        let n = dst.len() / out_f;
        let xs = &x[first * in_f..(first + n) * in_f];
        let (mut a_f32, mut b_f32) = (Vec::new(), Vec::new());
        let (a, b_t) = (g.a.as_f32(&mut a_f32), g.b_t.as_f32(&mut b_f32));
        // h[k][i] = A_k · x_i
        let mut h = vec![0f32; g.rank * n];
        for (k, hk) in h.chunks_exact_mut(n).enumerate() {
            dots_rows(&a[k * in_f..(k + 1) * in_f], xs, hk);
        }
        // Row i's h, contiguous: h_rows[i * rank + k] = h[k][i] (one buffer per task).
        let mut h_rows = vec![0f32; n * g.rank];
        for (k, hk) in h.chunks_exact(n).enumerate() {
            for (i, v) in hk.iter().enumerate() {
                h_rows[i * g.rank + k] = *v;
            }
        }
        let mut rows = dst.chunks_exact_mut(out_f).zip(h_rows.chunks_exact(g.rank));
        while let Some((r0, h0)) = rows.next() {
            match rows.next() {
                Some((r1, h1)) => add_rank_update([r0, r1], [h0, h1], b_t),
                None => add_rank_update([r0], [h0], b_t),
            }
        }
    });
    out
}

/// Output columns per register block of [`add_rank_update`]: two rows' accumulators of this
/// many f32 stay in 8 AVX2 registers while the rank's rows of `(scale·B)ᵀ` stream past.
const OUT_BLOCK: usize = 32;

/// `rows[i] += hs[i]·B` for `b_t` `(rank, out)` = `Bᵀ` and `R` rows (1 or 2), in blocks of
/// [`OUT_BLOCK`] columns held in registers across the whole rank, each load of `b_t` serving
/// every row: one pass over each output row instead of one per rank.
fn add_rank_update<const R: usize>(mut rows: [&mut [f32]; R], hs: [&[f32]; R], b_t: &[f32]) {
    let out = rows[0].len();
    let rank = hs[0].len();
    let full = out - out % OUT_BLOCK;
    for j in (0..full).step_by(OUT_BLOCK) {
        let mut acc = [[0f32; OUT_BLOCK]; R];
        for (a, row) in acc.iter_mut().zip(&rows) {
            a.copy_from_slice(&row[j..j + OUT_BLOCK]);
        }
        for k in 0..rank {
            let b: &[f32; OUT_BLOCK] = b_t[k * out + j..k * out + j + OUT_BLOCK]
                .try_into()
                .expect("a block of OUT_BLOCK");
            for (a, h) in acc.iter_mut().zip(&hs) {
                let x = h[k];
                for t in 0..OUT_BLOCK {
                    a[t] = x.mul_add(b[t], a[t]);
                }
            }
        }
        for (a, row) in acc.iter().zip(rows.iter_mut()) {
            row[j..j + OUT_BLOCK].copy_from_slice(a);
        }
    }
    for (row, h) in rows.into_iter().zip(hs) {
        for (k, &x) in h.iter().enumerate() {
            for (d, v) in row[full..]
                .iter_mut()
                .zip(&b_t[k * out + full..(k + 1) * out])
            {
                *d = x.mul_add(*v, *d);
            }
        }
    }
}

/// One decoding sequence's part of an attention step.
pub(super) struct DecodeRow<'a> {
    /// Its row in the step.
    pub(super) row: usize,
    /// Cached keys and values `(kv_heads, capacity, head_dim)`, the first `len` positions valid
    /// (the step's own key and value already written).
    pub(super) k: &'a [f32],
    pub(super) v: &'a [f32],
    pub(super) capacity: usize,
    pub(super) len: usize,
}

/// Cached positions per attention task: a long sequence's keys are split into runs of this many,
/// so one sequence's decode attention still spreads over every thread (a 700-token RAG prompt
/// with 3 key/value heads was 3 tasks on 2 threads); the runs' partial softmaxes are merged.
const KEYS_PER_TASK: usize = 256;

/// Attention of decode rows: `q` `(heads, rows, head_dim)` of the whole step; writes each
/// sequence's output into `out` `(rows, heads * head_dim)` at its row.
pub(super) fn decode_attention(
    q: &[f32],
    rows: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    seqs: &[DecodeRow<'_>],
    out: &mut [f32],
) {
    decode_attention_in_runs(q, rows, heads, kv_heads, hd, seqs, out, KEYS_PER_TASK);
}

/// One task's part: for each of the `rep` query heads of a key/value head, the largest score,
/// the sum of `exp(score - max)` and the output weighted by those, not yet divided by the sum.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    out: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn decode_attention_in_runs(
    q: &[f32],
    rows: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    seqs: &[DecodeRow<'_>],
    out: &mut [f32],
    run: usize,
) {
    let rep = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let width = heads * hd;
    // (sequence, kv head, run of positions) tasks, in that order.
    let tasks: Vec<(&DecodeRow<'_>, usize, Range<usize>)> = seqs
        .iter()
        .flat_map(|s| {
            (0..kv_heads).flat_map(move |g| {
                (0..s.len)
                    .step_by(run)
                    .map(move |start| (s, g, start..(start + run).min(s.len)))
            })
        })
        .collect();
    let partials: Vec<Partial> = tasks
        .par_iter()
        .map(|(s, g, positions)| {
            // This kv head's query heads side by side, so each key is read once for all of them.
            let mut qs = vec![0f32; rep * hd];
            for (h, dst) in qs.chunks_exact_mut(hd).enumerate() {
                let head = g * rep + h;
                dst.copy_from_slice(&q[(head * rows + s.row) * hd..][..hd]);
            }
            let base = g * s.capacity * hd;
            let keys = &s.k[base + positions.start * hd..base + positions.end * hd];
            let values = &s.v[base + positions.start * hd..base + positions.end * hd];
            let mut scores = vec![0f32; positions.len() * rep];
            for (sc, key) in scores.chunks_exact_mut(rep).zip(keys.chunks_exact(hd)) {
                dots_rows(key, &qs, sc);
            }
            let mut max = vec![f32::NEG_INFINITY; rep];
            for sc in scores.chunks_exact(rep) {
                for (m, v) in max.iter_mut().zip(sc) {
                    *m = m.max(v * scale);
                }
            }
            let mut sum = vec![0f32; rep];
            let mut o = vec![0f32; rep * hd];
            for (sc, value) in scores.chunks_exact(rep).zip(values.chunks_exact(hd)) {
                for h in 0..rep {
                    let p = (sc[h] * scale - max[h]).exp();
                    sum[h] += p;
                    for (d, v) in o[h * hd..(h + 1) * hd].iter_mut().zip(value) {
                        *d = p.mul_add(*v, *d);
                    }
                }
            }
            Partial { max, sum, out: o }
        })
        .collect();
    // Merge each (sequence, kv head)'s runs: rescale to the largest maximum, then divide.
    let mut at = 0;
    while at < tasks.len() {
        let (s, g, _) = &tasks[at];
        let end = at
            + tasks[at..]
                .iter()
                .take_while(|(t, tg, _)| t.row == s.row && tg == g)
                .count();
        let group = &partials[at..end];
        let dst = &mut out[s.row * width + g * rep * hd..][..rep * hd];
        for h in 0..rep {
            let top = group.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.max[h]));
            let mut total = 0.0;
            let oh = &mut dst[h * hd..(h + 1) * hd];
            oh.fill(0.0);
            for p in group {
                let f = (p.max[h] - top).exp();
                total += f * p.sum[h];
                for (d, v) in oh.iter_mut().zip(&p.out[h * hd..(h + 1) * hd]) {
                    *d = f.mul_add(*v, *d);
                }
            }
            oh.iter_mut().for_each(|d| *d /= total);
        }
        at = end;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::rng::Rng;

    fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.uniform() - 0.5).collect()
    }

    fn gap(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Two groups with different adapters and an untouched row between them, against the same
    /// products in candle; the second group a prompt chunk of 41 rows (three tasks, the last
    /// one short) whose matrices are kept in f16 (checked against the products of their f16
    /// values). Odd row counts (a row updated alone) and 70 output columns (a register block
    /// of 32 twice and a tail of 6).
    #[test]
    fn lora_rows_match_matrix_products() -> candle_core::Result<()> {
        let (rows, in_f, out_f, rank) = (45, 37, 70, 4);
        let mut rng = Rng::new(5);
        let dev = Device::Cpu;
        let x = rand(&mut rng, rows * in_f);
        let y = rand(&mut rng, rows * out_f);
        let (a1, b1) = (rand(&mut rng, rank * in_f), rand(&mut rng, rank * out_f));
        let half = |v: Vec<f32>| {
            v.iter()
                .map(|x| half::f16::from_f32(*x))
                .collect::<Vec<_>>()
        };
        let (a2h, b2h) = (
            half(rand(&mut rng, rank * in_f)),
            half(rand(&mut rng, rank * out_f)),
        );
        let (a2, b2): (Vec<f32>, Vec<f32>) = (
            a2h.iter().map(|x| x.to_f32()).collect(),
            b2h.iter().map(|x| x.to_f32()).collect(),
        );
        let groups = [
            LoraRows {
                rows: 0..3,
                a: LoraValues::F32(&a1),
                b_t: LoraValues::F32(&b1),
                rank,
            },
            LoraRows {
                rows: 4..45,
                a: LoraValues::F16(&a2h),
                b_t: LoraValues::F16(&b2h),
                rank,
            },
        ];
        let got = add_lora_rows(&x, &y, in_f, out_f, &groups);
        let xt = Tensor::from_vec(x, (rows, in_f), &dev)?;
        let mut want = Tensor::from_vec(y.clone(), (rows, out_f), &dev)?.to_vec2::<f32>()?;
        for (g, (a, b)) in [(0..3, (&a1, &b1)), (4..45, (&a2, &b2))] {
            let at = Tensor::from_slice(a, (rank, in_f), &dev)?;
            let bt = Tensor::from_slice(b, (rank, out_f), &dev)?;
            let delta = xt
                .narrow(0, g.start, g.len())?
                .matmul(&at.t()?)?
                .matmul(&bt)?
                .to_vec2::<f32>()?;
            for (i, d) in g.zip(delta) {
                for (w, v) in want[i].iter_mut().zip(d) {
                    *w += v;
                }
            }
        }
        assert!(gap(&got, &want.concat()) < 1e-5);
        // The row outside every group is y's.
        assert_eq!(&got[3 * out_f..4 * out_f], &y[3 * out_f..4 * out_f]);
        Ok(())
    }

    /// An 8-bit matrix widens to within half a step of each value (a block of zeros to zeros),
    /// and the kernel gives with it exactly what it gives with the widened values in f32.
    #[test]
    fn q8_matrices_widen_to_within_half_a_step() {
        let (rows, in_f, out_f, rank) = (5, 70, 40, 3);
        let mut rng = Rng::new(11);
        let mut a = rand(&mut rng, rank * in_f);
        a[..Q8_BLOCK].fill(0.0);
        let b = rand(&mut rng, rank * out_f);
        let (qa, qb) = (Q8Matrix::quantize(&a), Q8Matrix::quantize(&b));
        assert_eq!(
            qa.bytes(),
            rank * in_f + 4 * (rank * in_f).div_ceil(Q8_BLOCK)
        );
        let (mut wa, mut wb) = (Vec::new(), Vec::new());
        qa.widen_into(&mut wa);
        qb.widen_into(&mut wb);
        assert!(wa[..Q8_BLOCK].iter().all(|v| *v == 0.0));
        for (q, (w, v)) in [(&qa, (&wa, &a)), (&qb, (&wb, &b))] {
            for ((block, scale), (wb, vb)) in q
                .values
                .chunks(Q8_BLOCK)
                .zip(&q.scales)
                .zip(w.chunks(Q8_BLOCK).zip(v.chunks(Q8_BLOCK)))
            {
                assert_eq!(block.len(), wb.len());
                assert!(gap(wb, vb) <= scale / 2.0 + 1e-7, "{scale}");
            }
        }
        let (x, y) = (rand(&mut rng, rows * in_f), rand(&mut rng, rows * out_f));
        let group = |a, b_t| {
            [LoraRows {
                rows: 0..rows,
                a,
                b_t,
                rank,
            }]
        };
        let got = add_lora_rows(
            &x,
            &y,
            in_f,
            out_f,
            &group(LoraValues::Q8(&qa), LoraValues::Q8(&qb)),
        );
        let want = add_lora_rows(
            &x,
            &y,
            in_f,
            out_f,
            &group(LoraValues::F32(&wa), LoraValues::F32(&wb)),
        );
        assert_eq!(got, want);
    }

    /// Decode attention with grouped heads against softmax(q·kᵀ/√d)·v per head, with the keys
    /// in one run and split into runs of 2 and 3 (partial softmaxes merged).
    #[test]
    fn decode_attention_matches_softmax_attention() {
        let (heads, kv_heads, hd, capacity, rows) = (6, 2, 8, 10, 3);
        let mut rng = Rng::new(9);
        let q = rand(&mut rng, heads * rows * hd);
        let caches: Vec<(Vec<f32>, Vec<f32>, usize)> = [7usize, 3]
            .iter()
            .map(|&len| {
                let k = rand(&mut rng, kv_heads * capacity * hd);
                let v = rand(&mut rng, kv_heads * capacity * hd);
                (k, v, len)
            })
            .collect();
        // Rows 0 and 2 decode; row 1 belongs to someone else.
        let seqs: Vec<DecodeRow<'_>> = caches
            .iter()
            .zip([0, 2])
            .map(|((k, v, len), row)| DecodeRow {
                row,
                k,
                v,
                capacity,
                len: *len,
            })
            .collect();
        for run in [2, 3, KEYS_PER_TASK] {
            let mut out = vec![0f32; rows * heads * hd];
            decode_attention_in_runs(&q, rows, heads, kv_heads, hd, &seqs, &mut out, run);
            check_decode_attention(&q, rows, heads, kv_heads, hd, capacity, &seqs, &out);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_decode_attention(
        q: &[f32],
        rows: usize,
        heads: usize,
        kv_heads: usize,
        hd: usize,
        capacity: usize,
        seqs: &[DecodeRow<'_>],
        out: &[f32],
    ) {
        for s in seqs {
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let qh = &q[(h * rows + s.row) * hd..][..hd];
                let scores: Vec<f32> = (0..s.len)
                    .map(|j| {
                        let key = &s.k[(g * capacity + j) * hd..][..hd];
                        qh.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                let want: Vec<f32> = (0..hd)
                    .map(|d| {
                        (0..s.len)
                            .map(|j| e[j] / sum * s.v[(g * capacity + j) * hd + d])
                            .sum()
                    })
                    .collect();
                let got = &out[s.row * heads * hd + h * hd..][..hd];
                assert!(gap(got, &want) < 1e-5, "row {} head {h}", s.row);
            }
        }
        assert!(out[heads * hd..2 * heads * hd].iter().all(|v| *v == 0.0));
    }
}
