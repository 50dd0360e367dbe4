//! Prefix cache: the KV state of prompt prefixes that requests share (system prompts, earlier
//! turns of a conversation), kept after a sequence ends and reused by later requests instead of
//! recomputing them — what DeepSeek's API bills as a "cache hit".
//!
//! Block-hashed, as vLLM's automatic prefix caching: a token sequence is cut into blocks of
//! `block_size` tokens; block i is keyed by a hash chained over blocks 0..=i, so a key names the
//! whole prefix up to the block's end. Each block holds a copy of its rows of every layer's
//! cache ([`CachedRows`]); a hit appends those copies to the new sequence's cache. Only whole
//! blocks are cached, and a lookup never covers the prompt's last token (its logits are needed).
//! Eviction is least-recently-used among leaf blocks (a block with no cached continuation), so a
//! cached chain never has holes.

use fathom_model::{CachedRows, KvCache};
use std::collections::HashMap;
use std::sync::Arc;

struct Block {
    parent: Option<u64>,
    tokens: Vec<u32>,
    rows: Arc<CachedRows>,
    last_used: u64,
    children: usize,
}

pub struct PrefixCache {
    block_size: usize,
    blocks: HashMap<u64, Block>,
    bytes: usize,
    clock: u64,
}

/// FNV-1a over the parent's key and the block's tokens: deterministic across runs, and a key
/// collision is caught by comparing the stored tokens.
fn chain_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    };
    for b in parent.unwrap_or(0).to_le_bytes() {
        eat(b);
    }
    for t in tokens {
        for b in t.to_le_bytes() {
            eat(b);
        }
    }
    h
}

impl PrefixCache {
    pub fn new(block_size: usize) -> Self {
        PrefixCache {
            block_size: block_size.max(1),
            blocks: HashMap::new(),
            bytes: 0,
            clock: 0,
        }
    }

    /// Bytes of KV state held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The cached blocks covering the longest prefix of `prompt` (leaving its last token to be
    /// computed), in order; marks them used.
    pub fn lookup(&mut self, prompt: &[u32]) -> Vec<Arc<CachedRows>> {
        self.clock += 1;
        let usable = prompt.len().saturating_sub(1) / self.block_size;
        let mut out = vec![];
        let mut parent = None;
        for chunk in prompt.chunks(self.block_size).take(usable) {
            let key = chain_hash(parent, chunk);
            match self.blocks.get_mut(&key) {
                Some(b) if b.parent == parent && b.tokens == chunk => {
                    b.last_used = self.clock;
                    out.push(b.rows.clone());
                }
                _ => break,
            }
            parent = Some(key);
        }
        out
    }

    /// Cache every whole block of `tokens` that `cache` holds (tokens[i] at position i) and is
    /// not cached yet. Returns the bytes added.
    pub fn insert(&mut self, tokens: &[u32], cache: &KvCache) -> candle_core::Result<usize> {
        self.clock += 1;
        let held = tokens.len().min(cache.seq_len()) / self.block_size;
        let mut parent = None;
        let mut added = 0;
        for (i, chunk) in tokens.chunks(self.block_size).take(held).enumerate() {
            let key = chain_hash(parent, chunk);
            match self.blocks.get_mut(&key) {
                Some(b) if b.parent == parent && b.tokens == chunk => b.last_used = self.clock,
                // A hash collision with another prefix: leave the cached one alone.
                Some(_) => return Ok(added),
                None => {
                    let rows = cache.copy_rows(i * self.block_size, self.block_size)?;
                    let bytes = rows.bytes();
                    if let Some(p) = parent.and_then(|p| self.blocks.get_mut(&p)) {
                        p.children += 1;
                    }
                    self.blocks.insert(
                        key,
                        Block {
                            parent,
                            tokens: chunk.to_vec(),
                            rows: Arc::new(rows),
                            last_used: self.clock,
                            children: 0,
                        },
                    );
                    self.bytes += bytes;
                    added += bytes;
                }
            }
            parent = Some(key);
        }
        Ok(added)
    }

    /// Evict least-recently-used leaf blocks until at most `limit` bytes are held.
    pub fn evict_to(&mut self, limit: usize) {
        while self.bytes > limit {
            let Some((&key, _)) = self
                .blocks
                .iter()
                .filter(|(_, b)| b.children == 0)
                .min_by_key(|(_, b)| b.last_used)
            else {
                return;
            };
            let b = self.blocks.remove(&key).expect("present");
            self.bytes -= b.rows.bytes();
            if let Some(p) = b.parent.and_then(|p| self.blocks.get_mut(&p)) {
                p.children -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// A one-layer grouped cache whose rows hold their own position (to check which rows come back).
    fn cache_of(n: usize) -> KvCache {
        let mut c = KvCache::new_latent(1);
        let pos: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let t = Tensor::from_vec(pos, (1, n, 1), &Device::Cpu).unwrap();
        c.layers[0].append_grouped(&t, &t).unwrap();
        c
    }

    fn positions(blocks: &[Arc<CachedRows>]) -> Vec<f32> {
        let mut c = KvCache::new_latent(1);
        c.append_rows(&blocks.iter().map(|b| &**b).collect::<Vec<_>>())
            .unwrap();
        if c.seq_len() == 0 {
            return vec![];
        }
        c.layers[0]
            .k_grouped
            .copy_rows(0, c.seq_len())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn longest_whole_block_prefix_is_reused_and_last_token_left() {
        let mut pc = PrefixCache::new(4);
        let tokens: Vec<u32> = (0..10).collect();
        pc.insert(&tokens, &cache_of(10)).unwrap();
        assert_eq!(pc.blocks(), 2, "two whole blocks of 4 in 10 tokens");
        // Same first 9 tokens: both blocks reused.
        let hit = pc.lookup(&(0..9).collect::<Vec<_>>());
        assert_eq!(
            positions(&hit),
            (0..8).map(|i| i as f32).collect::<Vec<_>>()
        );
        // A prompt of exactly 8 tokens: the last must be computed, so only one block.
        assert_eq!(pc.lookup(&(0..8).collect::<Vec<_>>()).len(), 1);
        // Diverging inside the second block: only the first.
        let mut other: Vec<u32> = (0..12).collect();
        other[5] = 99;
        assert_eq!(pc.lookup(&other).len(), 1);
        // Diverging in the first block: nothing, even if later tokens agree.
        other[0] = 99;
        other[5] = 5;
        assert!(pc.lookup(&other).is_empty());
    }

    #[test]
    fn eviction_is_lru_over_leaves_and_respects_the_bound() {
        let mut pc = PrefixCache::new(2);
        let a: Vec<u32> = vec![1, 2, 3, 4, 5];
        let b: Vec<u32> = vec![1, 2, 7, 8, 9];
        pc.insert(&a, &cache_of(5)).unwrap();
        pc.insert(&b, &cache_of(5)).unwrap();
        assert_eq!(pc.blocks(), 3, "[1,2] shared, [3,4] and [7,8] leaves");
        let per_block = pc.bytes() / 3;
        pc.lookup(&a); // a is now more recent than b
        pc.evict_to(2 * per_block);
        assert_eq!(pc.lookup(&a).len(), 2, "recently used chain kept");
        assert_eq!(
            pc.lookup(&b).len(),
            1,
            "b's leaf evicted, the shared root kept"
        );
        pc.evict_to(0);
        assert_eq!(pc.bytes(), 0);
        assert_eq!(pc.blocks(), 0);
    }
}
