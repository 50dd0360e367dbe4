//! KV caches for incremental decoding.
//!
//! - Plain: per layer the keys and values of every past position, [batch, heads, seq, dim],
//!   appended with `cat` (the reference path MLA's latent cache is tested against).
//! - Grouped (Qwen2/Llama): k and v of the kv heads only, [batch·kv_heads, seq, dim], in buffers
//!   written in place; query heads attend to their kv head without repeating it.
//! - Latent (MLA, DeepSeek-V2 §2.1.1): per layer only the normalised compressed KV c_kv
//!   [batch, seq, kv_lora_rank] and the roped shared key part k_pe [batch, seq, qk_rope_head_dim]:
//!   (kv_lora_rank + qk_rope_head_dim) values per token per layer instead of
//!   heads·(qk_head_dim + v_head_dim). Stored in buffers that grow by doubling and are written in
//!   place, so appending a token costs O(1) copies, not O(t).

use candle_core::{Result, Tensor};

/// Rows start..start+len of a packed batch [1, T, ·] that belong to one sequence, whose first row
/// sits at position `offset` of that sequence (continuous batching packs several sequences, each
/// with its own cache, into one forward pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
    pub offset: usize,
}

/// A [batch, seq, dim] sequence buffer written in place; capacity doubles when full.
#[derive(Debug, Clone, Default)]
pub struct SeqBuffer {
    data: Option<Tensor>,
    len: usize,
    /// Positions to allocate room for at the first append (a server reserves a sequence's whole
    /// budget up front, so its memory is known and buffers never double past it).
    reserve: usize,
}

impl SeqBuffer {
    /// Append x [b, s, d] along the sequence axis; returns the whole filled part [b, len, d].
    pub fn append(&mut self, x: &Tensor) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        let cap = self.data.as_ref().map_or(0, |t| t.dim(1).unwrap_or(0));
        if self.len + s > cap {
            let new_cap = (self.len + s).max(2 * cap).max(16).max(self.reserve);
            let grown = Tensor::zeros((b, new_cap, d), x.dtype(), x.device())?;
            if let Some(old) = &self.data {
                grown.slice_set(&old.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            self.data = Some(grown);
        }
        let data = self.data.as_ref().unwrap();
        data.slice_set(&x.contiguous()?, 1, self.len)?;
        self.len += s;
        data.narrow(1, 0, self.len)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole buffer [b, capacity, d], of which the first `len` positions are filled.
    pub fn data(&self) -> Option<&Tensor> {
        self.data.as_ref()
    }

    /// Copy of positions start..start+len [b, len, d].
    pub fn copy_rows(&self, start: usize, len: usize) -> Result<Tensor> {
        match &self.data {
            Some(t) if start + len <= self.len => t.narrow(1, start, len)?.copy(),
            _ => candle_core::bail!(
                "positions {start}..{} are not cached ({} are)",
                start + len,
                self.len
            ),
        }
    }

    /// Forget positions ≥ n (speculative decoding rolls rejected drafts back this way).
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Bytes held by the filled part.
    pub fn bytes(&self) -> usize {
        self.data.as_ref().map_or(0, |t| {
            let (b, _, d) = t.dims3().unwrap_or((0, 0, 0));
            b * self.len * d * t.dtype().size_in_bytes()
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// Plain cache: k [b, heads, t, d].
    pub k: Option<Tensor>,
    /// Plain cache: v [b, heads, t, d].
    pub v: Option<Tensor>,
    /// Whether MLA layers cache the latent form (c_kv, k_pe) instead of k and v.
    pub latent_mode: bool,
    /// Latent cache: normalised c_kv [b, t, kv_lora_rank].
    pub latent: SeqBuffer,
    /// Latent cache: roped k_pe [b, t, qk_rope_head_dim].
    pub k_rope: SeqBuffer,
    /// Grouped-query cache (Qwen2/Llama): k [b·kv_heads, t, d], written in place.
    pub k_grouped: SeqBuffer,
    /// Grouped-query cache: v [b·kv_heads, t, d].
    pub v_grouped: SeqBuffer,
}

impl LayerCache {
    /// The in-place buffers (latent c_kv, k_pe, grouped k, grouped v), in a fixed order.
    fn seq_buffers(&self) -> [&SeqBuffer; 4] {
        [&self.latent, &self.k_rope, &self.k_grouped, &self.v_grouped]
    }

    fn seq_buffers_mut(&mut self) -> [&mut SeqBuffer; 4] {
        [
            &mut self.latent,
            &mut self.k_rope,
            &mut self.k_grouped,
            &mut self.v_grouped,
        ]
    }

    /// Append this step's k, v and return the full k, v to attend over.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match (&self.k, &self.v) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
            _ => (k.clone(), v.clone()),
        };
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        Ok((k, v))
    }

    /// Append k, v [b·kv_heads, s, d] in place; returns views of everything cached
    /// [b·kv_heads, t, d] (no copy of the past: decode cost does not grow with a copy per token).
    pub fn append_grouped(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.k_grouped.append(k)?, self.v_grouped.append(v)?))
    }

    pub fn len(&self) -> usize {
        if self.latent_mode && !self.latent.is_empty() {
            return self.latent.len();
        }
        if !self.k_grouped.is_empty() {
            return self.k_grouped.len();
        }
        self.k.as_ref().map(|k| k.dim(2).unwrap_or(0)).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of cached state.
    pub fn bytes(&self) -> usize {
        let t = |x: &Option<Tensor>| {
            x.as_ref()
                .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes())
        };
        t(&self.k)
            + t(&self.v)
            + self.latent.bytes()
            + self.k_rope.bytes()
            + self.k_grouped.bytes()
            + self.v_grouped.bytes()
    }

    /// Forget positions ≥ n.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        self.latent.truncate(n);
        self.k_rope.truncate(n);
        self.k_grouped.truncate(n);
        self.v_grouped.truncate(n);
        if let (Some(k), Some(v)) = (&self.k, &self.v) {
            let keep = n.min(k.dim(2)?);
            self.k = Some(k.narrow(2, 0, keep)?);
            self.v = Some(v.narrow(2, 0, keep)?);
        }
        Ok(())
    }
}

/// A copy of the cached state of a run of positions, per layer and in-place buffer: what a
/// prefix cache keeps for a block of prompt tokens and later appends to a new sequence's cache.
#[derive(Debug, Clone)]
pub struct CachedRows {
    layers: Vec<[Option<Tensor>; 4]>,
    pub len: usize,
}

impl CachedRows {
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    /// The plain cache (full k and v per head).
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![LayerCache::default(); n_layers],
        }
    }

    /// MLA's latent cache (c_kv and k_pe per token); GQA layers ignore the flag.
    pub fn new_latent(n_layers: usize) -> Self {
        let layer = LayerCache {
            latent_mode: true,
            ..Default::default()
        };
        KvCache {
            layers: vec![layer; n_layers],
        }
    }

    /// Positions already cached (the offset of the next token).
    pub fn seq_len(&self) -> usize {
        self.layers.first().map(|l| l.len()).unwrap_or(0)
    }

    /// Bytes of cached state over all layers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bytes()).sum()
    }

    /// Forget positions ≥ n in every layer.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        for l in &mut self.layers {
            l.truncate(n)?;
        }
        Ok(())
    }

    /// Allocate room for `positions` at the first append of every buffer.
    pub fn reserve(&mut self, positions: usize) {
        for l in &mut self.layers {
            for b in l.seq_buffers_mut() {
                b.reserve = positions;
            }
        }
    }

    /// Copy out positions start..start+len (in-place caches only: latent or grouped).
    pub fn copy_rows(&self, start: usize, len: usize) -> Result<CachedRows> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                if l.k.is_some() {
                    candle_core::bail!("the plain cache cannot be copied by rows")
                }
                let mut out: [Option<Tensor>; 4] = Default::default();
                for (o, b) in out.iter_mut().zip(l.seq_buffers()) {
                    if !b.is_empty() {
                        *o = Some(b.copy_rows(start, len)?);
                    }
                }
                Ok(out)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CachedRows { layers, len })
    }

    /// Append runs of cached rows (consecutive blocks, in order) after the positions held now.
    pub fn append_rows(&mut self, runs: &[&CachedRows]) -> Result<()> {
        if runs.is_empty() {
            return Ok(());
        }
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (slot, buf) in layer.seq_buffers_mut().into_iter().enumerate() {
                let parts: Vec<&Tensor> = runs
                    .iter()
                    .filter_map(|r| r.layers.get(i).and_then(|l| l[slot].as_ref()))
                    .collect();
                if parts.is_empty() {
                    continue;
                }
                if parts.len() != runs.len() {
                    candle_core::bail!("cached rows of layer {i} come from different cache kinds")
                }
                buf.append(&Tensor::cat(&parts, 1)?)?;
            }
        }
        Ok(())
    }

    pub fn clear(&mut self) {
        for l in &mut self.layers {
            let latent_mode = l.latent_mode;
            *l = LayerCache {
                latent_mode,
                ..Default::default()
            };
        }
    }
}
