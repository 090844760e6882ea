//! The paged KV cache's bookkeeping: a pool of fixed-size blocks, each
//! sequence's block table, and prefix caching.
//!
//! The pool's tensors live in `model::batch::PagedKv`; this module only
//! decides which block holds what. A block that is full is keyed by
//! [`block_hash`], which chains every token up to the block's end (and the
//! adapter's content identity), so two requests that share a prefix — the
//! same system prompt, the same retrieval instruction — share its blocks
//! instead of computing them again. A block whose last user leaves keeps its
//! key on the free list, in the order it was freed, and can still be hit
//! until it is reused for something else (vLLM's block pool does the same).

use std::collections::{BTreeMap, HashMap};

pub type BlockId = u32;

/// The key of a full block: the parent block's key, the block's tokens and
/// `extra` (the adapter's content hash; 0 for the base model), as xxh3.
pub fn block_hash(parent: Option<u64>, tokens: &[u32], extra: u64) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&parent.unwrap_or(0).to_le_bytes());
    h.update(&[parent.is_some() as u8]);
    h.update(&extra.to_le_bytes());
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    h.digest()
}

#[derive(Clone, Debug, Default)]
struct Block {
    /// Sequences using this block.
    refs: u32,
    /// Its key once it is full and registered.
    hash: Option<u64>,
    /// Its place on the free list while `refs` is 0.
    free_stamp: Option<u64>,
}

/// Fixed-size KV blocks, their reference counts and the prefix-cache map.
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<Block>,
    /// Free blocks, oldest first (the next to be reused).
    free: BTreeMap<u64, BlockId>,
    next_stamp: u64,
    /// Full blocks by key, whether in use or free.
    cached: HashMap<u64, BlockId>,
}

/// The blocks a sequence holds, in position order, and the keys of those
/// that are full and registered (a prefix of the table).
#[derive(Clone, Debug, Default)]
pub struct SeqBlocks {
    pub table: Vec<BlockId>,
    hashes: Vec<u64>,
}

impl SeqBlocks {
    /// Full blocks already keyed (hit at admission or registered since).
    pub fn full_blocks(&self) -> usize {
        self.hashes.len()
    }
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0 && num_blocks < u32::MAX as usize);
        let mut pool = BlockPool {
            block_size,
            blocks: vec![Block::default(); num_blocks],
            free: BTreeMap::new(),
            next_stamp: 0,
            cached: HashMap::new(),
        };
        for id in 0..num_blocks as BlockId {
            pool.push_free(id);
        }
        pool
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks no sequence uses (some still hold a cached prefix).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The longest run of full blocks at the start of `tokens` that the
    /// cache holds, taken for a new sequence (their references counted).
    /// It stops one token short of the end: the last token is always
    /// computed, since its logits give the next token.
    pub fn take_prefix(&mut self, tokens: &[u32], extra: u64) -> SeqBlocks {
        let mut seq = SeqBlocks::default();
        let full = tokens.len().saturating_sub(1) / self.block_size;
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size).take(full) {
            let hash = block_hash(parent, chunk, extra);
            let Some(&id) = self.cached.get(&hash) else {
                break;
            };
            self.take(id);
            seq.table.push(id);
            seq.hashes.push(hash);
            parent = Some(hash);
        }
        seq
    }

    /// Grows `seq`'s table to hold `tokens` positions. All or nothing:
    /// false, with nothing taken, when the free blocks do not suffice.
    pub fn allocate(&mut self, seq: &mut SeqBlocks, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(seq.table.len());
        if need > self.free.len() {
            return false;
        }
        for _ in 0..need {
            let (_, id) = self.free.pop_first().expect("counted above");
            let block = &mut self.blocks[id as usize];
            block.free_stamp = None;
            // Reusing a cached block evicts its prefix.
            if let Some(hash) = block.hash.take() {
                if self.cached.get(&hash) == Some(&id) {
                    self.cached.remove(&hash);
                }
            }
            block.refs = 1;
            seq.table.push(id);
        }
        true
    }

    /// Keys every block of `seq` that `tokens` (the sequence's computed
    /// tokens, from position 0) fills, so later requests can hit it.
    pub fn register_full(&mut self, seq: &mut SeqBlocks, tokens: &[u32], extra: u64) {
        let full = (tokens.len() / self.block_size).min(seq.table.len());
        for i in seq.hashes.len()..full {
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let hash = block_hash(seq.hashes.last().copied(), chunk, extra);
            let id = seq.table[i];
            // Another sequence may have computed the same block at the same
            // time; the first one registered stays the cached copy.
            self.cached.entry(hash).or_insert(id);
            self.blocks[id as usize].hash = Some(hash);
            seq.hashes.push(hash);
        }
    }

    /// Gives back every block of `seq`, the last ones first, so that the
    /// ends of prefixes are evicted before their starts.
    pub fn free(&mut self, seq: &mut SeqBlocks) {
        for &id in seq.table.iter().rev() {
            let block = &mut self.blocks[id as usize];
            block.refs -= 1;
            if block.refs == 0 {
                self.push_free(id);
            }
        }
        seq.table.clear();
        seq.hashes.clear();
    }

    fn take(&mut self, id: BlockId) {
        let block = &mut self.blocks[id as usize];
        if let Some(stamp) = block.free_stamp.take() {
            self.free.remove(&stamp);
        }
        block.refs += 1;
    }

    fn push_free(&mut self, id: BlockId) {
        self.blocks[id as usize].free_stamp = Some(self.next_stamp);
        self.free.insert(self.next_stamp, id);
        self.next_stamp += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut pool = BlockPool::new(4, 16);
        let mut a = SeqBlocks::default();
        assert!(pool.allocate(&mut a, 33)); // 3 blocks
        assert_eq!(a.table.len(), 3);
        let mut b = SeqBlocks::default();
        assert!(!pool.allocate(&mut b, 20)); // needs 2, 1 free
        assert!(b.table.is_empty());
        assert_eq!(pool.num_free(), 1);
        assert!(pool.allocate(&mut a, 48)); // still 3 blocks
        assert!(pool.allocate(&mut a, 49));
        assert_eq!(pool.num_free(), 0);
        pool.free(&mut a);
        assert_eq!(pool.num_free(), 4);
    }

    #[test]
    fn a_shared_prefix_is_hit_and_stops_short_of_the_last_token() {
        let mut pool = BlockPool::new(8, 4);
        let prompt = tokens(10, 1);
        let mut a = pool.take_prefix(&prompt, 0);
        assert_eq!(a.table.len(), 0);
        assert!(pool.allocate(&mut a, prompt.len()));
        pool.register_full(&mut a, &prompt, 0);
        assert_eq!(a.full_blocks(), 2);

        // Same first 8 tokens: two blocks hit, shared.
        let mut other = tokens(8, 1);
        other.extend([999, 998]);
        let b = pool.take_prefix(&other, 0);
        assert_eq!(b.table, a.table[..2]);
        // Another adapter never hits the base model's blocks.
        assert!(pool.take_prefix(&other, 42).table.is_empty());
        // A prompt of exactly 8 tokens: only the first block, so the last
        // token is computed.
        let c = pool.take_prefix(&tokens(8, 1), 0);
        assert_eq!(c.table, a.table[..1]);
        // A different first block breaks the chain even if later ones match.
        let mut d = tokens(10, 1);
        d[0] = 12345;
        assert!(pool.take_prefix(&d, 0).table.is_empty());
    }

    #[test]
    fn freed_blocks_stay_cached_until_reused_oldest_first() {
        let mut pool = BlockPool::new(3, 2);
        let p = tokens(5, 3);
        let mut a = pool.take_prefix(&p, 0);
        assert!(pool.allocate(&mut a, 5));
        pool.register_full(&mut a, &p, 0);
        let first_two = a.table[..2].to_vec();
        pool.free(&mut a);
        assert_eq!(pool.num_free(), 3);
        // Still hit after the free.
        let mut b = pool.take_prefix(&p, 0);
        assert_eq!(b.table, first_two);
        assert_eq!(pool.num_free(), 1);
        pool.free(&mut b);
        // Allocating everything evicts them; the prefix is gone.
        let mut c = SeqBlocks::default();
        assert!(pool.allocate(&mut c, 6));
        pool.free(&mut c);
        assert!(pool.take_prefix(&p, 0).table.is_empty());
    }

    #[test]
    fn freeing_evicts_the_tail_of_a_prefix_first() {
        let mut pool = BlockPool::new(3, 2);
        let p = tokens(7, 5);
        let mut a = SeqBlocks::default();
        assert!(pool.allocate(&mut a, 6));
        pool.register_full(&mut a, &p[..6], 0);
        pool.free(&mut a);
        // One new block evicts the last block of the prefix, not the first.
        let mut b = SeqBlocks::default();
        assert!(pool.allocate(&mut b, 1));
        assert_eq!(pool.take_prefix(&p, 0).table.len(), 2);
    }

    #[test]
    fn shared_blocks_are_freed_by_their_last_user() {
        let mut pool = BlockPool::new(4, 2);
        let p = tokens(5, 9);
        let mut a = SeqBlocks::default();
        assert!(pool.allocate(&mut a, 5));
        pool.register_full(&mut a, &p, 0);
        let mut b = pool.take_prefix(&p, 0);
        assert_eq!(b.table.len(), 2);
        assert!(pool.allocate(&mut b, 5));
        assert_eq!(pool.num_free(), 0);
        pool.free(&mut a);
        assert_eq!(pool.num_free(), 1); // a's private third block
        pool.free(&mut b);
        assert_eq!(pool.num_free(), 4);
    }
}
