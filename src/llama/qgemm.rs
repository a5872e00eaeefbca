//! Products of prompt chunks (more rows than a decode step) with blockwise quantised weights,
//! straight from the codes. The input rows are quantised to 8-bit blocks, as a decode step's are
//! ([`super::quant`]), and each block's 32 products are summed in integers by AVX-512 VNNI
//! (`vpdpbusd`: 64 byte multiply-adds per instruction, against 16 float ones per fused
//! multiply-add), then scaled and added in f32 once per block. Before it, every prompt chunk
//! dequantised each matrix to f32 (4 fresh bytes per weight, page faults included) for candle's
//! f32 gemm, which made 8-bit prefill slower than f32's.
//!
//! Layout: weight rows go [`LANES`] at a time into a panel, one per 32-bit lane of a register,
//! each block's codes interleaved four by four (`[block][quad][lane][4]`), so that one register
//! holds four consecutive codes of each of the 16 rows and a broadcast of four consecutive input
//! codes multiplies them all. A panel (`cols * 16` bytes, packed per chunk into a buffer of the
//! task's own) serves every input row of the chunk. `vpdpbusd` multiplies unsigned by signed
//! bytes: input codes go in plus 128, and each panel keeps `-128 · Σ codes` per row and block to
//! start that block's sums from, which takes the shift back out.
//!
//! Needs AVX-512F and VNNI (checked at run time, [`available`]); elsewhere
//! [`super::quant::QMatrix::linear`] keeps the dequantised product.

use rayon::prelude::*;

use super::quant::{QMatrix, quantize_block};
use super::simd::QBLOCK as BLOCK;

/// Weight rows per panel: one per 32-bit lane of a 512-bit register.
const LANES: usize = 16;

/// Groups of four codes per block.
const QUADS: usize = BLOCK / 4;

/// Input rows multiplied at once against a panel: their sums and accumulators stay in registers
/// (8 + 8, beside the block's 8 registers of weight codes).
const ROWS: usize = 8;

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

/// Input rows as 8-bit blocks: codes plus 128 (unsigned), one scale per block.
struct Input {
    codes: Vec<u8>,
    scales: Vec<f32>,
    k: usize,
}

impl Input {
    fn quantize(x: &[f32], k: usize) -> Input {
        let mut codes = vec![0u8; x.len()];
        let mut scales = vec![0f32; x.len() / BLOCK];
        codes
            .par_chunks_mut(k)
            .zip(scales.par_chunks_mut(k / BLOCK))
            .zip(x.par_chunks(k))
            .for_each(|((codes, scales), row)| {
                let mut q = [0i8; BLOCK];
                for ((c, s), v) in codes
                    .chunks_exact_mut(BLOCK)
                    .zip(scales.iter_mut())
                    .zip(row.chunks_exact(BLOCK))
                {
                    *s = quantize_block(v, 127.0, &mut q);
                    for (d, q) in c.iter_mut().zip(&q) {
                        *d = (*q as i16 + 128) as u8;
                    }
                }
            });
        Input { codes, scales, k }
    }
}

/// Up to [`LANES`] weight rows in the kernel's layout (see the module doc); lanes past the rows
/// hold zeros.
#[derive(Default)]
struct Panel {
    /// `[block][quad][lane][4]`.
    codes: Vec<i8>,
    /// `-128 · Σ codes`, `[block][lane]`.
    shift: Vec<i32>,
    /// `[block][lane]`.
    scales: Vec<f32>,
}

impl Panel {
    /// Rows `first..first + lanes` of `q`; `scratch` widens 4-bit rows.
    fn pack(&mut self, q: &QMatrix, first: usize, lanes: usize, scratch: &mut Vec<i8>) {
        let nb = q.cols / BLOCK;
        self.codes.clear();
        self.codes.resize(q.cols * LANES, 0);
        self.shift.clear();
        self.shift.resize(nb * LANES, 0);
        self.scales.clear();
        self.scales.resize(nb * LANES, 0.0);
        for l in 0..lanes {
            let scales = q.row_scales(first + l);
            let codes = q.row_codes(first + l, scratch);
            for (b, block) in codes.chunks_exact(BLOCK).enumerate() {
                self.scales[b * LANES + l] = scales[b];
                self.shift[b * LANES + l] = -128 * block.iter().map(|&c| c as i32).sum::<i32>();
                for (t, quad) in block.chunks_exact(4).enumerate() {
                    let at = ((b * QUADS + t) * LANES + l) * 4;
                    self.codes[at..at + 4].copy_from_slice(quad);
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
    use super::{BLOCK, Input, LANES, Out, Panel, QUADS, ROWS};
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
            // `QUADS * LANES * 4` codes at `b * BLOCK * LANES` and `LANES` shifts and scales at
            // `b * LANES`; input row `first + r < m` spans `k` codes and `nb` scales.
            unsafe {
                let mut w = [_mm512_setzero_si512(); QUADS];
                for (t, v) in w.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(codes.add((b * QUADS + t) * LANES * 4) as *const _);
                }
                let shift = _mm512_loadu_si512(panel.shift.as_ptr().add(b * LANES) as *const _);
                let scales = _mm512_loadu_ps(panel.scales.as_ptr().add(b * LANES));
                let mut sums = [shift; R];
                for (t, w) in w.iter().enumerate() {
                    for (r, s) in sums.iter_mut().enumerate() {
                        let at = x.add((first + r) * k + b * BLOCK + 4 * t) as *const i32;
                        *s = _mm512_dpbusd_epi32(*s, _mm512_set1_epi32(at.read_unaligned()), *w);
                    }
                }
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
    /// counts on both sides of a multiple of [`ROWS`]; the decode kernel (which quantises its
    /// input the same way) agrees too.
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
                    .map(|(e, &c)| (c as f64 - 128.0) * input.scales[e / BLOCK] as f64)
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
                        }
                        j += 1;
                    }
                }
                if m <= crate::llama::ops::FEW_ROWS {
                    let decode = crate::llama::quant::few_rows_stacked(&refs, &x, m);
                    for (a, b) in decode.iter().zip(&ours) {
                        assert!((a - b).abs() < 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
                    }
                }
            }
        }
        Ok(())
    }
}
