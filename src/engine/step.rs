//! One forward step of the engine over a batch: every running sequence contributes a segment of
//! rows (a chunk of its prompt, or its one newest token), all rows go through each base linear
//! layer as one matrix product, each group of rows that shares an adapter adds that adapter's
//! LoRA update (segments are ordered so a group's rows are contiguous: on the CPU one kernel pass
//! per linear layer for all groups, decode rows and prompt chunks alike; on a GPU a pair of matrix
//! products per group),
//! and each segment attends over its own KV cache (decode rows through one kernel for all of
//! them).
//!
//! [`KvCache`] owns a sequence's keys and values: one `(kv_heads, capacity, head_dim)` buffer per
//! layer, sized once for its adapter's virtual tokens (which it starts with), the prompt and the
//! answer's token limit, written in place.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};

use super::adapter::{LoraMatrix, LoraPair, ResidentAdapter};
use super::kernels::{self, DecodeRow, LoraRows, LoraValues, Q8Matrix};
use crate::llama::{Hooks, LlamaConfig, VirtualKv};

/// The f32 values of a contiguous CPU tensor, from its storage and layout.
fn host<'a>(storage: &'a Storage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    crate::llama::ops::f32_values(storage, layout).ok_or_else(|| {
        candle_core::Error::Msg("the engine's CPU kernels need contiguous f32 CPU tensors".into())
    })
}

/// A LoRA matrix's values (f32 or f16) of a contiguous CPU tensor.
fn lora_values<'a>(storage: &'a Storage, layout: &Layout) -> candle_core::Result<LoraValues<'a>> {
    if let Storage::Cpu(CpuStorage::F16(data)) = storage {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("the engine's LoRA kernel needs contiguous matrices".into())
        })?;
        return Ok(LoraValues::F16(&data[start..end]));
    }
    host(storage, layout).map(LoraValues::F32)
}

/// A LoRA matrix held for reading by the CPU kernel: a tensor's storage, or 8-bit values.
enum Held<'a> {
    Tensor(std::sync::RwLockReadGuard<'a, Storage>, &'a Layout),
    Q8(&'a Q8Matrix),
}

impl<'a> Held<'a> {
    fn of(m: &'a LoraMatrix) -> Held<'a> {
        match m {
            LoraMatrix::Tensor(t) => {
                let (storage, layout) = t.storage_and_layout();
                Held::Tensor(storage, layout)
            }
            LoraMatrix::Q8(q) => Held::Q8(q),
        }
    }

    fn values(&self) -> candle_core::Result<LoraValues<'_>> {
        match self {
            Held::Tensor(storage, layout) => lora_values(storage, layout),
            Held::Q8(q) => Ok(LoraValues::Q8(q)),
        }
    }
}

/// One sequence's keys and values.
#[derive(Debug)]
pub(super) struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// Room for `capacity` tokens in every layer, starting with `prefix`'s (which count
    /// against the capacity).
    pub(super) fn new(
        config: &LlamaConfig,
        capacity: usize,
        prefix: Option<&VirtualKv>,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let shape = (config.kv_heads(), capacity, config.head_dim());
        let mut k = Vec::with_capacity(config.num_hidden_layers);
        let mut v = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            k.push(Tensor::zeros(shape, DType::F32, device)?);
            v.push(Tensor::zeros(shape, DType::F32, device)?);
        }
        let mut cache = KvCache {
            k,
            v,
            len: 0,
            capacity,
        };
        if let Some(prefix) = prefix {
            for layer in 0..config.num_hidden_layers {
                cache.write(layer, &prefix.k[layer], &prefix.v[layer])?;
            }
            cache.advance(prefix.tokens);
        }
        Ok(cache)
    }

    /// Tokens cached.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Write the step's keys and values `(kv_heads, n, head_dim)` of `layer` after the cached
    /// ones; the cached and new keys and values together, `(kv_heads, len + n, head_dim)`. The
    /// length moves on once every layer is written ([`KvCache::advance`]).
    fn write(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        if self.len + n > self.capacity {
            candle_core::bail!(
                "KV cache overflow: {} + {n} tokens, room for {}",
                self.len,
                self.capacity
            );
        }
        self.k[layer].slice_set(&k.contiguous()?, 1, self.len)?;
        self.v[layer].slice_set(&v.contiguous()?, 1, self.len)?;
        Ok((
            self.k[layer].narrow(1, 0, self.len + n)?,
            self.v[layer].narrow(1, 0, self.len + n)?,
        ))
    }

    /// Layer `layer`'s key and value buffers `(kv_heads, capacity, head_dim)`.
    fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.k[layer], &self.v[layer])
    }

    /// `n` more tokens are cached (after a step wrote them in every layer).
    pub(super) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// One sequence's part of a step.
pub(super) struct Segment<'a> {
    /// Its rows in the step's input.
    pub(super) rows: Range<usize>,
    pub(super) cache: &'a mut KvCache,
}

/// The serving side of [`crate::llama::Weights::forward`] for one step.
pub(super) struct StepHooks<'a> {
    /// In row order.
    pub(super) segments: Vec<Segment<'a>>,
    /// Contiguous row ranges that use an adapter, with it.
    pub(super) groups: Vec<(Range<usize>, Arc<ResidentAdapter>)>,
}

impl StepHooks<'_> {
    /// Each group's (IA)³ vector picked by `pick`, with its rows (groups without one left out).
    fn scales<'s>(
        &'s self,
        pick: impl Fn(&'s ResidentAdapter) -> Option<&'s Tensor>,
    ) -> Vec<(Range<usize>, &'s Tensor)> {
        self.groups
            .iter()
            .filter_map(|(rows, a)| pick(a).map(|l| (rows.clone(), l)))
            .collect()
    }

    /// Each group's LoRA update through the CPU kernel.
    fn lora_on_cpu(
        &self,
        x: &Tensor,
        y: &Tensor,
        pairs: &[(Range<usize>, &LoraPair)],
    ) -> candle_core::Result<Tensor> {
        let (rows, in_f) = x.dims2()?;
        let out_f = y.dim(1)?;
        let (x, y) = (x.contiguous()?, y.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (ys, yl) = y.storage_and_layout();
        let xs = &host(&xs, xl)?[..rows * in_f];
        let ys = &host(&ys, yl)?[..rows * out_f];
        let held: Vec<_> = pairs
            .iter()
            .map(|(r, p)| (r, Held::of(&p.a), Held::of(&p.b_t), p.rank))
            .collect();
        let groups = held
            .iter()
            .map(|(rows, a, b, rank)| {
                Ok(LoraRows {
                    rows: (*rows).clone(),
                    a: a.values()?,
                    b_t: b.values()?,
                    rank: *rank,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let out = kernels::add_lora_rows(xs, ys, in_f, out_f, &groups);
        Tensor::from_vec(out, (rows, out_f), x.device())
    }
}

impl Hooks for StepHooks<'_> {
    fn stacked_products(&self) -> bool {
        true
    }

    fn input(&mut self, layer: usize, m: usize, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let scales = self.scales(|a| a.input_scale(layer, m));
        if scales.is_empty() {
            return Ok(None);
        }
        scale_rows(x, &scales).map(Some)
    }

    fn linear(
        &mut self,
        layer: usize,
        m: usize,
        x: &Tensor,
        y: Tensor,
    ) -> candle_core::Result<Tensor> {
        let scales = self.scales(|a| a.output_scale(layer, m));
        let y = if scales.is_empty() {
            y
        } else {
            scale_rows(&y, &scales)?
        };
        let pairs: Vec<(Range<usize>, &LoraPair)> = self
            .groups
            .iter()
            .filter_map(|(rows, a)| a.lora(layer, m).map(|p| (rows.clone(), p)))
            .collect();
        if pairs.is_empty() {
            return Ok(y);
        }
        if x.device().is_cpu() {
            return self.lora_on_cpu(x, &y, &pairs);
        }
        per_group(&y, &pairs, |y_rows, range, pair| {
            // f16 pairs (`generate.lora_dtype`) widened on the device (a no-op for f32); 8-bit
            // ones are refused on a GPU when the adapter is loaded.
            let on_device = |m: &LoraMatrix| match m {
                LoraMatrix::Tensor(t) => t.to_dtype(x.dtype()),
                LoraMatrix::Q8(_) => Err(candle_core::Error::Msg(
                    "8-bit LoRA matrices are read by the CPU kernel only".into(),
                )),
            };
            let delta = x
                .narrow(0, range.start, range.len())?
                .matmul(&on_device(&pair.a)?.t()?)?
                .matmul(&on_device(&pair.b_t)?)?;
            y_rows + delta
        })
    }

    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (nh, rows, hd) = q.dims3()?;
        let nkv = k.dim(0)?;
        let mut out = vec![0f32; rows * nh * hd];
        let mut decode = Vec::new();
        for seg in &mut self.segments {
            let (start, n) = (seg.rows.start, seg.rows.len());
            let past = seg.cache.len();
            let (k_all, v_all) =
                seg.cache
                    .write(layer, &k.narrow(1, start, n)?, &v.narrow(1, start, n)?)?;
            if n == 1 && q.device().is_cpu() {
                decode.push((start, layer, &*seg.cache));
                continue;
            }
            let qs = q.narrow(1, start, n)?.contiguous()?;
            let o = attention(&qs, &k_all, &v_all, past)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            out[start * nh * hd..(start + n) * nh * hd].copy_from_slice(&o);
        }
        if !decode.is_empty() {
            let q = q.contiguous()?;
            let (qs, ql) = q.storage_and_layout();
            let qs = &host(&qs, ql)?[..nh * rows * hd];
            let guards: Vec<_> = decode
                .iter()
                .map(|(row, layer, cache)| {
                    let (k, v) = cache.layer(*layer);
                    (*row, k.storage_and_layout(), v.storage_and_layout(), cache)
                })
                .collect();
            let seqs = guards
                .iter()
                .map(|(row, (k, kl), (v, vl), cache)| {
                    Ok(DecodeRow {
                        row: *row,
                        k: host(k, kl)?,
                        v: host(v, vl)?,
                        capacity: cache.capacity,
                        len: cache.len() + 1,
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            kernels::decode_attention(qs, rows, nh, nkv, hd, &seqs, &mut out);
        }
        Tensor::from_vec(out, (rows, nh * hd), q.device())
    }
}

/// `t` `(rows, features)` with each group's rows multiplied channel-wise by its vector
/// `(features,)`; the other rows as they are.
fn scale_rows(t: &Tensor, groups: &[(Range<usize>, &Tensor)]) -> candle_core::Result<Tensor> {
    per_group(t, groups, |rows, _, l| rows.broadcast_mul(l))
}

/// `t` `(rows, _)` with each group's rows replaced by `f(those rows, their range, the group's
/// value)`; the other rows as they are. Groups are in row order and do not overlap.
fn per_group<G>(
    t: &Tensor,
    groups: &[(Range<usize>, G)],
    f: impl Fn(&Tensor, &Range<usize>, &G) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let rows = t.dim(0)?;
    let mut parts = Vec::with_capacity(2 * groups.len() + 1);
    let mut at = 0;
    for (range, value) in groups {
        if range.start > at {
            parts.push(t.narrow(0, at, range.start - at)?);
        }
        parts.push(f(&t.narrow(0, range.start, range.len())?, range, value)?);
        at = range.end;
    }
    if at < rows {
        parts.push(t.narrow(0, at, rows - at)?);
    }
    Tensor::cat(&parts, 0)
}

/// Attention of `n` new queries `(heads, n, head_dim)` at positions `past..past + n` over keys and
/// values `(kv_heads, past + n, head_dim)` (causal among the new ones). Returns
/// `(n, heads * head_dim)`. Heads share key/value heads in groups (GQA), so the queries of one
/// key/value head are multiplied together instead of copying the keys per head.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, past: usize) -> candle_core::Result<Tensor> {
    let (nh, n, hd) = q.dims3()?;
    let (nkv, total, _) = k.dims3()?;
    let rep = nh / nkv;
    let q = q.reshape((nkv, rep * n, hd))?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
    let scores = if n > 1 {
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| {
                (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, total), q.device())?;
        scores
            .reshape((nkv, rep, n, total))?
            .broadcast_add(&mask)?
            .reshape((nkv, rep * n, total))?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs
        .matmul(v)?
        .reshape((nh, n, hd))?
        .transpose(0, 1)?
        .reshape((n, nh * hd))
}
