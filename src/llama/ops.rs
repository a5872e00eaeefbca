//! The custom ops of the Llama forward pass on CPU, shared by training and serving: the frozen
//! linear layer, RMSNorm, rotary embeddings, causal attention probabilities and dropout. Each runs
//! as one fused pass whose backward computes the input gradient only and keeps as little as
//! possible for it: candle's generic matmul backward also computes the gradient of the (frozen)
//! weight, which would double the cost of every backward pass, and attention as separate ops
//! keeps four `T x T` tensors per head and layer. On other devices the same maths runs as plain
//! tensor ops.

use candle_core::{CpuStorage, D, Device, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::simd;
use crate::rng::Rng;
/// Elements per parallel chunk of the element-wise custom ops.
const ROWS_CHUNK: usize = 16 * 1024;

/// Inverted dropout. On the CPU the mask is never stored: it is a pure function of a seed and
/// the element index (a counter-based hash), recomputed by the backward pass; the op runs as one
/// pass each way and keeps no mask tensor in the graph.
pub(crate) fn dropout(x: &Tensor, p: f32, rng: &mut Rng) -> candle_core::Result<Tensor> {
    let seed = rng.next_u64();
    if x.device().is_cpu() {
        return x.contiguous()?.apply_op1(Dropout { seed, p });
    }
    let n = x.elem_count();
    let mask: Vec<f32> = (0..n).map(|i| Dropout { seed, p }.factor(i)).collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?
}

struct Dropout {
    seed: u64,
    p: f32,
}

impl Dropout {
    /// 0 or 1/(1-p) for element `i`: 16 bits of splitmix64(seed, i / 4) per element.
    fn factor(&self, i: usize) -> f32 {
        let mut z = self
            .seed
            .wrapping_add(((i / 4) as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let u = (z >> (16 * (i % 4))) & 0xFFFF;
        if u < (self.p * 65536.0) as u64 {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }

    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ROWS_CHUNK)
            .zip(x.par_chunks(ROWS_CHUNK))
            .enumerate()
            .for_each(|(c, (dst, src))| {
                for (k, (d, v)) in dst.iter_mut().zip(src).enumerate() {
                    *d = v * self.factor(c * ROWS_CHUNK + k);
                }
            });
        out
    }
}

impl candle_core::CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout-hashed"
    }
    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout)?;
        Ok((CpuStorage::F32(self.apply(x)), layout.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = host_f32(grad)?;
        Ok(Some(Tensor::from_vec(
            self.apply(&g),
            grad.shape(),
            grad.device(),
        )?))
    }
}

/// `cos`, `sin` tables `(positions, head_dim)` for HF-layout (half-split) rotary embeddings, one
/// row per position of `positions` (a training sequence's `0..T`, or the rows of a serving step,
/// each at its own position).
pub(crate) fn rope_tables(
    positions: &[u32],
    hd: usize,
    theta: f64,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = hd / 2;
    let inv: Vec<f64> = (0..hd)
        .map(|j| 1.0 / theta.powf((2 * (j % half)) as f64 / hd as f64))
        .collect();
    let t = positions.len();
    let mut cos = Vec::with_capacity(t * hd);
    let mut sin = Vec::with_capacity(t * hd);
    for &pos in positions {
        for f in &inv {
            let angle = pos as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, hd), device)?,
        Tensor::from_vec(sin, (t, hd), device)?,
    ))
}

/// `x * cos + rotate_half(x) * sin` for `x` of shape `(heads, T, head_dim)`.
pub(crate) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() {
        return x.contiguous()?.apply_op1(Rope {
            cos: cos.clone(),
            sin: sin.clone(),
        });
    }
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Rotary embedding as one pass (and its transpose as the backward pass).
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Rotate every `(T, head_dim)` block of `x` by the tables; `sign = -1` rotates back (the
    /// transpose of the rotation, which is the backward pass).
    fn rotate(&self, x: &[f32], dims: &[usize], sign: f32) -> candle_core::Result<Vec<f32>> {
        let (t, hd) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let half = hd / 2;
        let cos = host_f32(&self.cos)?;
        let sin = host_f32(&self.sin)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_exact_mut(t * hd)
            .zip(x.par_chunks_exact(t * hd))
            .for_each(|(dst, block)| {
                for p in 0..t {
                    let row = &block[p * hd..(p + 1) * hd];
                    let d = &mut dst[p * hd..(p + 1) * hd];
                    for j in 0..half {
                        let (c, s) = (cos[p * hd + j], sign * sin[p * hd + j]);
                        let (x1, x2) = (row[j], row[j + half]);
                        d[j] = x1 * c - x2 * s;
                        d[j + half] = x2 * c + x1 * s;
                    }
                }
            });
        Ok(out)
    }
}

impl candle_core::CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-half-split"
    }
    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout)?;
        let out = self.rotate(x, layout.shape().dims(), 1.0)?;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = host_f32(grad)?;
        let dx = self.rotate(&g, grad.dims(), -1.0)?;
        Ok(Some(Tensor::from_vec(dx, grad.shape(), grad.device())?))
    }
}

pub(crate) fn causal_mask(t: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, t), device)
}

/// A tensor's values, row-major, as a host vector (the input of a fused backward loop).
fn host_f32(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// The f32 data of a contiguous CPU storage.
fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    cpu_f32_values(storage, layout).ok_or_else(|| {
        candle_core::Error::Msg("the trainer's fused ops need contiguous f32 tensors".into())
    })
}

/// The f32 values of a contiguous CPU tensor, from its storage and layout (`None` for another
/// dtype or device, or a layout that is not contiguous).
pub(crate) fn f32_values<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) => cpu_f32_values(cpu, layout),
        _ => None,
    }
}

fn cpu_f32_values<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    Some(&data[start..end])
}

/// `x @ w.T` for a frozen `w (out, in)`: the backward gives `x` its gradient and nothing to `w`.
pub(crate) fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return x.broadcast_matmul(&w.detach().t()?);
    }
    x.contiguous()?.apply_op1(FrozenLinear { w: w.clone() })
}

struct FrozenLinear {
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }
    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        // One gemm straight on the storages: no copy of the input or the output.
        let dims = layout.shape().dims();
        let k = *dims.last().unwrap_or(&1);
        let m = layout.shape().elem_count() / k.max(1);
        let (n, wk) = self.w.dims2()?;
        if wk != k || layout.contiguous_offsets().is_none() {
            candle_core::bail!(
                "frozen-linear: input {:?} does not fit weight ({n}, {wk})",
                dims
            );
        }
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cpu(w_cpu) = &*w_storage else {
            candle_core::bail!("frozen-linear: the weight is not on the CPU");
        };
        let out = match (storage, w_cpu, w_layout.contiguous_offsets()) {
            (CpuStorage::F32(xs), CpuStorage::F32(ws), Some((w0, w1))) if m <= FEW_ROWS => {
                let x0 = layout.start_offset();
                CpuStorage::F32(few_rows_linear(&xs[x0..x0 + m * k], &ws[w0..w1], m, n, k))
            }
            _ => {
                let lhs = Layout::contiguous_with_offset((m, k), layout.start_offset());
                storage.matmul(w_cpu, (1, m, n, k), &lhs, &w_layout.transpose(0, 1)?)?
            }
        };
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        Ok((out, Shape::from(out_dims)))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.broadcast_matmul(&self.w)?))
    }
}

/// Inputs of at most this many rows (decode steps) go through [`few_rows_linear`] instead of gemm.
pub(crate) const FEW_ROWS: usize = 16;

/// `x·Wᵀ` for a few rows `x` `(m, k)` and `W` `(n, k)` row-major, weight row by weight row, each
/// read once for all `m` rows ([`simd::dots_rows`]). gemm would first pack all of `W` (it multiplies
/// `W·xᵀ`, and a row-major `W` is the wrong layout for its left operand): for one decode row
/// that packing was ~36% of the engine's time, more than the product itself.
fn few_rows_linear(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    debug_assert_eq!(w.len(), n * k);
    few_rows_linear_stacked(x, &[w], m, k)
}

/// [`few_rows_linear`] for several weights `(nᵢ, k)` read by the same rows `x`, as if stacked
/// into one `(Σnᵢ, k)` matrix: one parallel pass over all their rows, `(m, Σnᵢ)`.
/// Weight rows go [`simd::TILE_ROWS`] at a time through [`simd::dots_tile`].
pub(crate) fn few_rows_linear_stacked(x: &[f32], ws: &[&[f32]], m: usize, k: usize) -> Vec<f32> {
    let stack = Stacked::new(ws.iter().map(|w| w.len() / k));
    by_weight_blocks(m, stack.rows(), |first, block| {
        for (t, dst) in block.chunks_mut(simd::TILE_ROWS * m).enumerate() {
            let j = first + t * simd::TILE_ROWS;
            let n = dst.len() / m;
            let mut rows: [&[f32]; simd::TILE_ROWS] = [&[]; simd::TILE_ROWS];
            for (a, row) in rows[..n].iter_mut().enumerate() {
                let (i, r) = stack.locate(j + a);
                *row = &ws[i][r * k..(r + 1) * k];
            }
            simd::dots_tile(&rows[..n], x, m, dst);
        }
    })
}

/// Matrices stacked by rows: where row `j` of the stack lives.
pub(crate) struct Stacked {
    /// Each matrix's first row in the stack, then the total.
    starts: Vec<usize>,
}

impl Stacked {
    pub(crate) fn new(rows: impl Iterator<Item = usize>) -> Stacked {
        let mut starts = vec![0];
        for n in rows {
            starts.push(starts[starts.len() - 1] + n);
        }
        Stacked { starts }
    }

    /// Rows in all.
    pub(crate) fn rows(&self) -> usize {
        self.starts[self.starts.len() - 1]
    }

    /// `(matrix, its row)` of stack row `j < rows()`.
    pub(crate) fn locate(&self, j: usize) -> (usize, usize) {
        let i = self.starts[1..].iter().take_while(|&&end| end <= j).count();
        (i, j - self.starts[i])
    }
}

/// The `(m, n)` output of a few-rows product, weight row by weight row: `row(j, dst, scratch)`
/// writes the `m` entries of output column `j` (every input row against weight row `j`) into
/// `dst`; `scratch` is the caller's buffer, reused between the rows of one task.
pub(crate) fn by_weight_rows<S: Default>(
    m: usize,
    n: usize,
    row: impl Fn(usize, &mut [f32], &mut S) + Sync,
) -> Vec<f32> {
    by_weight_blocks(m, n, |first, block| {
        let mut scratch = S::default();
        for (jj, dst) in block.chunks_exact_mut(m).enumerate() {
            row(first + jj, dst, &mut scratch);
        }
    })
}

/// The `(m, n)` output of a few-rows product in blocks of weight rows, the blocks in parallel:
/// `block(first, dst)` writes output columns `first..` (as many as `dst` holds, `m` entries
/// each: every input row against that weight row) into `dst`.
pub(crate) fn by_weight_blocks(
    m: usize,
    n: usize,
    block: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    const BLOCK: usize = 64;
    // Output columns in blocks, transposed `(n, m)`, so each task writes one slice.
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(BLOCK * m)
        .enumerate()
        .for_each(|(b, chunk)| block(b * BLOCK, chunk));
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for (j, col) in out_t.chunks_exact(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            out[i * n + j] = *v;
        }
    }
    out
}

/// RMSNorm with a frozen scale `w`: `x / sqrt(mean(x^2) + eps) * w`.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        return x.broadcast_mul(&r)?.broadcast_mul(&w.detach());
    }
    x.contiguous()?.apply_op1(RmsNorm { w: w.clone(), eps })
}

struct RmsNorm {
    w: Tensor,
    eps: f64,
}

impl candle_core::CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-frozen"
    }
    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout)?;
        let w = self.w.to_vec1::<f32>()?;
        let n = w.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_exact_mut(n)
            .zip(x.par_chunks_exact(n))
            .for_each(|(dst, row)| {
                let ms = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
                let r = 1.0 / (ms + self.eps as f32).sqrt();
                for ((d, v), g) in dst.iter_mut().zip(row).zip(&w) {
                    *d = v * r * g;
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dx = r * gw - x * r^3 * mean(gw * x), with gw = grad * w: one fused pass on the CPU
        // (candle's element-wise ops run one thread each, eight of them would dominate).
        if x.device().is_cpu() {
            let n = self.w.dim(0)?;
            let w = self.w.to_vec1::<f32>()?;
            let xs = host_f32(x)?;
            let gs = host_f32(grad)?;
            let mut dx = vec![0f32; xs.len()];
            dx.par_chunks_exact_mut(n)
                .zip(xs.par_chunks_exact(n).zip(gs.par_chunks_exact(n)))
                .for_each(|(dr, (xr, gr))| {
                    let ms = xr.iter().map(|v| v * v).sum::<f32>() / n as f32;
                    let r = 1.0 / (ms + self.eps as f32).sqrt();
                    let dot = xr
                        .iter()
                        .zip(gr)
                        .zip(&w)
                        .map(|((x, g), w)| g * w * x)
                        .sum::<f32>()
                        / n as f32;
                    let k = r * r * r * dot;
                    for (((d, x), g), w) in dr.iter_mut().zip(xr).zip(gr).zip(&w) {
                        *d = r * g * w - x * k;
                    }
                });
            return Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?));
        }
        let gw = grad.broadcast_mul(&self.w)?;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let dot = (&gw * x)?.mean_keepdim(D::Minus1)?;
        let dx = (gw.broadcast_mul(&r)? - x.broadcast_mul(&(r.powf(3.0)? * dot)?)?)?;
        Ok(Some(dx))
    }
}

/// Causal attention probabilities `softmax(q·kᵀ·scale + causal mask)`, shape `(heads, T, T)`,
/// for `q` and `k` of shape `(heads, T, head_dim)`. On the CPU this is one op: the scores are
/// scaled, masked and normalised in place in the matmul's output, and the backward pass needs
/// only the probabilities, so each layer keeps one `T x T` tensor per head for the backward pass
/// instead of four (scores, scaled, masked, probabilities: ~5 GB more per 1300-token sequence
/// across 30 layers, which is what a retrieved-context triplet is). `mask` (the additive causal
/// mask) is used off the CPU only, where plain tensor ops run.
pub(crate) fn causal_attention_probs(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if !q.device().is_cpu() {
        let t = q.dim(1)?;
        let owned;
        let mask = match mask {
            Some(m) => m,
            None => {
                owned = causal_mask(t, q.device())?;
                &owned
            }
        };
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let e = scores
            .broadcast_sub(&scores.max_keepdim(D::Minus1)?)?
            .exp()?;
        return e.broadcast_div(&e.sum_keepdim(D::Minus1)?);
    }
    q.contiguous()?
        .apply_op2(&k.contiguous()?, CausalProbs { scale })
}

struct CausalProbs {
    scale: f64,
}

impl candle_core::CustomOp2 for CausalProbs {
    fn name(&self) -> &'static str {
        "causal-attention-probs"
    }
    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (h, t, d) = ql.shape().dims3()?;
        if kl.shape().dims3()? != (h, t, d)
            || ql.contiguous_offsets().is_none()
            || kl.contiguous_offsets().is_none()
        {
            candle_core::bail!(
                "causal-attention-probs: q {:?} and k {:?} must be the same contiguous (heads, T, head_dim)",
                ql.shape(),
                kl.shape()
            );
        }
        let CpuStorage::F32(mut scores) = qs.matmul(ks, (h, t, t, d), ql, &kl.transpose(1, 2)?)?
        else {
            candle_core::bail!("the trainer runs in f32");
        };
        let scale = self.scale as f32;
        scores
            .par_chunks_exact_mut(t)
            .enumerate()
            .for_each(|(r, row)| {
                // Row r is query position r % t: it sees keys 0..=i.
                let (live, future) = row.split_at_mut(r % t + 1);
                let mut max = f32::NEG_INFINITY;
                for v in live.iter_mut() {
                    *v *= scale;
                    max = max.max(*v);
                }
                let mut sum = 0.0;
                for v in live.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                let inv = 1.0 / sum;
                for v in live.iter_mut() {
                    *v *= inv;
                }
                future.fill(0.0);
            });
        Ok((CpuStorage::F32(scores), Shape::from((h, t, t))))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // d(scores) = scale * y * (g - sum(g * y)) in one fused pass (masked entries have y = 0),
        // then the two matmuls of q·kᵀ's backward.
        let t = y.dim(D::Minus1)?;
        let ys = host_f32(y)?;
        let gs = host_f32(grad)?;
        let scale = self.scale as f32;
        let mut ds = vec![0f32; ys.len()];
        ds.par_chunks_exact_mut(t)
            .zip(ys.par_chunks_exact(t).zip(gs.par_chunks_exact(t)))
            .enumerate()
            .for_each(|(r, (dr, (yr, gr)))| {
                let n = r % t + 1;
                let dot = yr[..n]
                    .iter()
                    .zip(&gr[..n])
                    .map(|(y, g)| y * g)
                    .sum::<f32>();
                for ((d, y), g) in dr[..n].iter_mut().zip(&yr[..n]).zip(&gr[..n]) {
                    *d = scale * y * (g - dot);
                }
            });
        let ds = Tensor::from_vec(ds, y.shape(), y.device())?;
        let dq = ds.matmul(k)?;
        let dk = ds.t()?.matmul(q)?;
        Ok((Some(dq), Some(dk)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;
    use candle_core::{DType, Var};

    /// The few-rows kernel and gemm agree, for row counts on both sides of the switch and sizes
    /// that are not multiples of its lanes and blocks.
    #[test]
    fn few_rows_linear_matches_gemm() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(11);
        for (m, n, k) in [
            (1, 130, 37),
            (3, 64, 16),
            (6, 70, 40),
            (8, 33, 64),
            (16, 200, 100),
            (17, 65, 33),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.uniform() - 0.5).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.uniform() - 0.5).collect();
            let xt = Tensor::from_vec(x, (m, k), &dev)?;
            let wt = Tensor::from_vec(w, (n, k), &dev)?;
            let ours = frozen_linear(&xt, &wt)?;
            let plain = xt.matmul(&wt.t()?)?;
            let gap = (ours - plain)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(gap < 1e-5, "({m}, {n}, {k}): {gap}");
        }
        Ok(())
    }

    /// The custom ops' forward and backward agree with the same maths in plain tensor ops.
    #[test]
    fn custom_ops_match_plain_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(3);
        let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform() - 0.5).collect() };
        let x = Var::from_vec(rand(4 * 6), (4, 6), &dev)?;
        let w = Tensor::from_vec(rand(5 * 6), (5, 6), &dev)?;
        let g = Tensor::from_vec(rand(6), 6, &dev)?;
        let close = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        // The largest difference between d(sum(out * weights))/dx through each implementation.
        let input_grad_gap = |custom: &Tensor, plain: &Tensor, weights: &Tensor| {
            let gc = (custom * weights)?.sum_all()?.backward()?;
            let gp = (plain * weights)?.sum_all()?.backward()?;
            close(
                gc.get(x.as_tensor()).expect("custom grad"),
                gp.get(x.as_tensor()).expect("plain grad"),
            )
        };
        // Linear.
        let custom = frozen_linear(x.as_tensor(), &w)?;
        let plain = x.as_tensor().matmul(&w.t()?)?;
        assert!(close(&custom, &plain)? < 1e-6);
        let gc = custom.sqr()?.sum_all()?.backward()?;
        let gp = plain.sqr()?.sum_all()?.backward()?;
        assert!(
            close(
                gc.get(x.as_tensor()).unwrap(),
                gp.get(x.as_tensor()).unwrap()
            )? < 1e-5
        );
        // RMSNorm.
        let custom = rms_norm(x.as_tensor(), &g, 1e-5)?;
        let r = (x.as_tensor().sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?
            .sqrt()?
            .recip()?;
        let plain = x.as_tensor().broadcast_mul(&r)?.broadcast_mul(&g)?;
        assert!(close(&custom, &plain)? < 1e-5);
        let weights = Tensor::from_vec(rand(4 * 6), (4, 6), &dev)?;
        assert!(input_grad_gap(&custom, &plain, &weights)? < 1e-5);
        // RoPE (heads=2, T=2, head_dim=6 from the 4x6 input).
        let xr = x.as_tensor().reshape((2, 2, 6))?;
        let (cos, sin) = rope_tables(&[0, 1], 6, 10_000.0, &dev)?;
        let custom = apply_rope(&xr, &cos, &sin)?;
        let x1 = xr.narrow(D::Minus1, 0, 3)?;
        let x2 = xr.narrow(D::Minus1, 3, 3)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let plain = (xr.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
        assert!(close(&custom, &plain)? < 1e-6);
        let wr = weights.reshape((2, 2, 6))?;
        assert!(input_grad_gap(&custom, &plain, &wr)? < 1e-5);
        Ok(())
    }

    /// The CPU's fused causal attention op against scores, scale, mask and softmax as plain
    /// ops: same probabilities, same gradients for q and k.
    #[test]
    fn causal_attention_matches_plain_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(5);
        let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform() - 0.5).collect() };
        let (h, t, d) = (3, 7, 4);
        let q = Var::from_vec(rand(h * t * d), (h, t, d), &dev)?;
        let k = Var::from_vec(rand(h * t * d), (h, t, d), &dev)?;
        let weights = Tensor::from_vec(rand(h * t * t), (h, t, t), &dev)?;
        let scale = 0.5;
        let custom = causal_attention_probs(q.as_tensor(), k.as_tensor(), scale, None)?;
        let scores = (q.as_tensor().matmul(&k.as_tensor().t()?)? * scale)?
            .broadcast_add(&causal_mask(t, &dev)?)?;
        let e = scores
            .broadcast_sub(&scores.max_keepdim(D::Minus1)?)?
            .exp()?;
        let plain = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let gap = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(gap(&custom, &plain)? < 1e-6);
        // Rows sum to one and nothing attends to the future.
        let sums = custom.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        assert_eq!(
            custom
                .i((.., 0, 1..))?
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?,
            0.0
        );
        let gc = (&custom * &weights)?.sum_all()?.backward()?;
        let gp = (&plain * &weights)?.sum_all()?.backward()?;
        for v in [&q, &k] {
            let (a, b) = (gc.get(v.as_tensor()), gp.get(v.as_tensor()));
            assert!(gap(a.expect("custom grad"), b.expect("plain grad"))? < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn dropout_keeps_the_expected_fraction() -> candle_core::Result<()> {
        let x = Tensor::ones(100_000, DType::F32, &Device::Cpu)?;
        let y = dropout(&x, 0.25, &mut Rng::new(1))?;
        let kept = y
            .ne(0f32)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        assert!((kept - 0.75).abs() < 0.01, "{kept}");
        // Inverted dropout keeps the mean.
        let mean = y.mean_all()?.to_scalar::<f32>()?;
        assert!((mean - 1.0).abs() < 0.02, "{mean}");
        // The backward pass applies the same mask as the forward pass.
        let v = Var::ones(1000, DType::F32, &Device::Cpu)?;
        let y = dropout(v.as_tensor(), 0.3, &mut Rng::new(9))?;
        let g = y.sum_all()?.backward()?;
        let grad = g.get(v.as_tensor()).unwrap().to_vec1::<f32>()?;
        assert_eq!(grad, y.to_vec1::<f32>()?);
        Ok(())
    }
}
