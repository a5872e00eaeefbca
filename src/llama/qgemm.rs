//! Products of prompt chunks (more rows than a decode step) with blockwise quantised weights,
//! straight from the codes. The input rows are quantised to 16-bit blocks (one scale per 32
//! values, a step of 1/32767 of the block's largest), and each block's 32 products are summed in
//! integers by AVX-512 VNNI (`vpdpwssd`: 32 multiply-adds of 16-bit pairs per instruction, against
//! 16 float ones per fused multiply-add), then scaled and added in f32 once per block. Before it,
//! every prompt chunk dequantised each matrix to f32 (4 fresh bytes per weight, per chunk) for
//! candle's f32 gemm. The input is not quantised to 8 bits as a decode step's is (and as
//! llama.cpp's is): the prompt's rows make the KV cache every later token reads, and with 8-bit
//! prompt rows the demo model's q8_0 answer to "What is the capital of France?" lost "Paris".
//!
//! Layout: weight rows go [`LANES`] at a time into a panel, one per 32-bit lane of a register,
//! each block's codes widened to 16 bits and interleaved two by two (`[block][pair][lane][2]`),
//! so that one register holds two consecutive codes of each of the 16 rows and a broadcast of two
//! consecutive input codes multiplies them all. The panel (`cols * 32` bytes, packed per chunk
//! into a buffer of the task's own) serves every input row of the chunk.
//!
//! Needs AVX-512F and VNNI (checked at run time, [`available`]); elsewhere
//! [`super::quant::QMatrix::linear`] keeps the dequantised product.

use rayon::prelude::*;

use super::quant::QMatrix;
use super::simd::QBLOCK as BLOCK;

/// Weight rows per panel: one per 32-bit lane of a 512-bit register.
const LANES: usize = 16;

/// Pairs of codes per block.
const PAIRS: usize = BLOCK / 2;

/// Pairs of a block held in registers at once (half a block).
const HELD: usize = PAIRS / 2;

/// Input rows multiplied at once against a panel: their sums and accumulators stay in registers
/// (8 + 8, beside 8 registers of weight codes).
const ROWS: usize = 8;

/// Largest 16-bit input code.
const TOP: f32 = 32767.0;

/// Whether this CPU runs the kernel (the build targets AVX2; the check is a cached load).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x·Wᵢᵀ` for `x` `(m, cols)` (row-major f32) and matrices of `cols` columns read by the same
/// rows, as if stacked into one: `(m, Σ rows)`. The caller checks [`available`].
pub(crate) fn stacked(mats: &[&QMatrix], x: &[f32], m: usize) -> Vec<f32> {
    let k = mats[0].cols;
    assert!(
        available() && mats.iter().all(|q| q.cols == k) && x.len() == m * k,
        "qgemm: inputs do not fit, or the CPU lacks AVX-512 VNNI"
    );
    let input = Input::quantize(x, k);
    let n: usize = mats.iter().map(|q| q.rows).sum();
    let mut panels = Vec::with_capacity(n.div_ceil(LANES));
    let mut col = 0;
    for (i, q) in mats.iter().enumerate() {
        for first in (0..q.rows).step_by(LANES) {
            panels.push((i, first, (q.rows - first).min(LANES), col + first));
        }
        col += q.rows;
    }
    let mut out = vec![0f32; m * n];
    let dst = Out {
        ptr: out.as_mut_ptr(),
        n,
    };
    panels.par_iter().for_each_init(
        || (Panel::default(), Vec::new()),
        |(panel, scratch), &(i, first, lanes, col)| {
            panel.pack(mats[i], first, lanes, scratch);
            // SAFETY: `available()` was asserted above; the panel holds `k` columns of codes and
            // the input `m` rows of `k`; this task alone writes columns `col..col + lanes` of
            // `out` (`m` rows of `n`, alive until every task has returned).
            unsafe { kernel::panel(panel, &input, m, &dst, col, lanes) };
        },
    );
    out
}

/// Input rows as 16-bit blocks, one scale per block.
struct Input {
    codes: Vec<i16>,
    scales: Vec<f32>,
    k: usize,
}

impl Input {
    fn quantize(x: &[f32], k: usize) -> Input {
        let mut codes = vec![0i16; x.len()];
        let mut scales = vec![0f32; x.len() / BLOCK];
        codes
            .par_chunks_mut(BLOCK)
            .zip(scales.par_iter_mut())
            .zip(x.par_chunks(BLOCK))
            .with_min_len(64)
            .for_each(|((codes, scale), v)| *scale = quantize_block(v, codes));
        Input { codes, scales, k }
    }
}

/// Quantise one block `v` into `codes`, returning its scale: the value of largest magnitude maps
/// to ±32767, the rest round to the nearest code.
fn quantize_block(v: &[f32], codes: &mut [i16]) -> f32 {
    let top = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = top / TOP;
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    for (c, x) in codes.iter_mut().zip(v) {
        *c = (x * inv).round().clamp(-TOP, TOP) as i16;
    }
    scale
}

/// Up to [`LANES`] weight rows in the kernel's layout (see the module doc); lanes past the rows
/// hold zeros.
#[derive(Default)]
struct Panel {
    /// `[block][pair][lane][2]`.
    codes: Vec<i16>,
    /// `[block][lane]`.
    scales: Vec<f32>,
}

impl Panel {
    /// Rows `first..first + lanes` of `q`; `scratch` widens 4-bit rows.
    fn pack(&mut self, q: &QMatrix, first: usize, lanes: usize, scratch: &mut Vec<i8>) {
        let nb = q.cols / BLOCK;
        self.codes.clear();
        self.codes.resize(q.cols * LANES, 0);
        self.scales.clear();
        self.scales.resize(nb * LANES, 0.0);
        for l in 0..lanes {
            let scales = q.row_scales(first + l);
            let codes = q.row_codes(first + l, scratch);
            for (b, block) in codes.chunks_exact(BLOCK).enumerate() {
                self.scales[b * LANES + l] = scales[b];
                for (p, pair) in block.chunks_exact(2).enumerate() {
                    let at = ((b * PAIRS + p) * LANES + l) * 2;
                    self.codes[at] = pair[0] as i16;
                    self.codes[at + 1] = pair[1] as i16;
                }
            }
        }
    }
}

/// The output `(m, n)`, written by many tasks, each in columns of its own.
struct Out {
    ptr: *mut f32,
    n: usize,
}

// SAFETY: tasks write disjoint columns (see `stacked`), and nothing reads `out` meanwhile.
unsafe impl Sync for Out {}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{BLOCK, HELD, Input, LANES, Out, PAIRS, Panel, ROWS};
    use std::arch::x86_64::*;

    /// Every input row against the panel, [`ROWS`] at a time, into columns `col..col + lanes`.
    ///
    /// # Safety
    /// The CPU runs AVX-512F and VNNI; the panel was packed for `input.k` columns; `out` holds
    /// `m` rows of `out.n >= col + lanes` columns.
    pub(super) unsafe fn panel(
        panel: &Panel,
        input: &Input,
        m: usize,
        out: &Out,
        col: usize,
        lanes: usize,
    ) {
        let mut first = 0;
        while first < m {
            // SAFETY: as for this function; `rows` covers `first..first + R <= m`.
            unsafe {
                match (m - first).min(ROWS) {
                    1 => rows::<1>(panel, input, first, out, col, lanes),
                    2 => rows::<2>(panel, input, first, out, col, lanes),
                    3 => rows::<3>(panel, input, first, out, col, lanes),
                    4 => rows::<4>(panel, input, first, out, col, lanes),
                    5 => rows::<5>(panel, input, first, out, col, lanes),
                    6 => rows::<6>(panel, input, first, out, col, lanes),
                    7 => rows::<7>(panel, input, first, out, col, lanes),
                    _ => rows::<ROWS>(panel, input, first, out, col, lanes),
                }
            }
            first += ROWS;
        }
    }

    /// Input rows `first..first + R` against the panel.
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn rows<const R: usize>(
        panel: &Panel,
        input: &Input,
        first: usize,
        out: &Out,
        col: usize,
        lanes: usize,
    ) {
        let k = input.k;
        let nb = k / BLOCK;
        let codes = panel.codes.as_ptr();
        let x = input.codes.as_ptr();
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            // SAFETY (every pointer below): block `b < nb` of a panel of `k` columns spans
            // `PAIRS * LANES * 2` codes at `b * BLOCK * LANES` and `LANES` scales at
            // `b * LANES`; input row `first + r < m` spans `k` codes and `nb` scales.
            unsafe {
                let mut sums = [_mm512_setzero_si512(); R];
                for half in 0..PAIRS / HELD {
                    let mut w = [_mm512_setzero_si512(); HELD];
                    for (t, v) in w.iter_mut().enumerate() {
                        let pair = b * PAIRS + half * HELD + t;
                        *v = _mm512_loadu_si512(codes.add(pair * LANES * 2) as *const _);
                    }
                    for (t, w) in w.iter().enumerate() {
                        let column = b * BLOCK + 2 * (half * HELD + t);
                        for (r, s) in sums.iter_mut().enumerate() {
                            let at = x.add((first + r) * k + column) as *const i32;
                            let xv = _mm512_set1_epi32(at.read_unaligned());
                            *s = _mm512_dpwssd_epi32(*s, xv, *w);
                        }
                    }
                }
                let scales = _mm512_loadu_ps(panel.scales.as_ptr().add(b * LANES));
                for (r, (a, s)) in acc.iter_mut().zip(&sums).enumerate() {
                    let xs = *input.scales.get_unchecked((first + r) * nb + b);
                    let scale = _mm512_mul_ps(scales, _mm512_set1_ps(xs));
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*s), scale, *a);
                }
            }
        }
        let mask: __mmask16 = if lanes == LANES { !0 } else { (1 << lanes) - 1 };
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: row `first + r < m` of `out`, columns `col..col + lanes` (the mask).
            unsafe { _mm512_mask_storeu_ps(out.ptr.add((first + r) * out.n + col), mask, *a) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::{Input, Out, Panel};

    /// Never called: [`super::available`] is false here.
    pub(super) unsafe fn panel(_: &Panel, _: &Input, _: usize, _: &Out, _: usize, _: usize) {
        unreachable!("qgemm without x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::quant::QFormat;
    use crate::rng::Rng;
    use candle_core::{Device, Tensor};

    /// Against the same sums in f64 from the dequantised weights and the quantised input, for
    /// both formats, two stacked matrices whose rows are not a multiple of a panel's, and row
    /// counts on both sides of a multiple of [`ROWS`]; and within 16-bit rounding of the input of
    /// the product with the input as it was.
    #[test]
    fn chunk_products_equal_the_blockwise_sums() -> candle_core::Result<()> {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return Ok(());
        }
        let dev = Device::Cpu;
        let mut rng = Rng::new(7);
        let k = 96;
        for format in [QFormat::Q8_0, QFormat::Q4_0] {
            let mats: Vec<(QMatrix, Vec<f32>)> = [40, 19]
                .into_iter()
                .map(|n| {
                    let w: Vec<f32> = (0..n * k).map(|_| rng.uniform() - 0.5).collect();
                    let q = QMatrix::quantize(&Tensor::from_vec(w, (n, k), &dev)?, format)?;
                    let back = q.dequantize(&dev)?.flatten_all()?.to_vec1::<f32>()?;
                    Ok((q, back))
                })
                .collect::<candle_core::Result<_>>()?;
            let refs: Vec<&QMatrix> = mats.iter().map(|(q, _)| q).collect();
            let n = 59;
            for m in [1, 7, 8, 17, 23] {
                let x: Vec<f32> = (0..m * k).map(|_| 2.0 * rng.uniform() - 1.0).collect();
                let ours = stacked(&refs, &x, m);
                let input = Input::quantize(&x, k);
                let xq: Vec<f64> = input
                    .codes
                    .iter()
                    .enumerate()
                    .map(|(e, &c)| c as f64 * input.scales[e / BLOCK] as f64)
                    .collect();
                let mut j = 0;
                for (q, back) in &mats {
                    for r in 0..q.rows {
                        let w = &back[r * k..(r + 1) * k];
                        for i in 0..m {
                            let want: f64 = xq[i * k..(i + 1) * k]
                                .iter()
                                .zip(w)
                                .map(|(a, b)| a * *b as f64)
                                .sum();
                            let got = ours[i * n + j] as f64;
                            assert!(
                                (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                                "{format:?} m={m} row {i} col {j}: {got} vs {want}"
                            );
                            let exact: f64 = x[i * k..(i + 1) * k]
                                .iter()
                                .zip(w)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum();
                            assert!((got - exact).abs() < 1e-3, "{got} vs {exact}");
                        }
                        j += 1;
                    }
                }
            }
        }
        Ok(())
    }
}
