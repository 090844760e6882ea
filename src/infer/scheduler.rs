//! Continuous batching at token granularity.
//!
//! There is no prefill phase and no decode phase: every step, each sequence
//! catches up on the tokens it has not computed yet, within the step's token
//! budget (vLLM's v1 scheduler works this way). A running sequence that
//! decodes needs one token; a new prompt needs all of its tokens less what
//! the prefix cache already holds, and is cut into chunks when the budget is
//! short, so a long prompt never stalls the others' decoding.
//!
//! Running sequences go first, in the order they were admitted; waiting ones
//! are admitted in arrival order while there is budget, a free place
//! (`max_seqs`) and cache blocks. When a running sequence needs a block and
//! none is free, the most recently admitted sequence is preempted: its
//! blocks are freed and it waits again at the front, to be recomputed (with
//! whatever of it the prefix cache still holds).

use crate::infer::kv_blocks::{BlockPool, SeqBlocks};
use crate::model::batch::Batch;
use std::collections::VecDeque;

#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Most tokens (rows) in one step.
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_seqs: usize,
}

/// A sequence as the scheduler sees it: token ids, no text.
#[derive(Debug)]
pub struct Sequence {
    pub id: u64,
    /// The prompt, then each generated token.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// The adapter's content hash (0: the base model); part of every cache
    /// key, so one adapter's keys and values never serve another.
    pub extra: u64,
    /// The adapter's slot in the engine (`NO_ADAPTER`: the base model).
    pub adapter: u32,
    /// Tokens whose keys and values are in the cache.
    pub computed: usize,
    /// Prompt tokens the prefix cache held at the first admission.
    pub cached_tokens: Option<usize>,
    blocks: SeqBlocks,
}

impl Sequence {
    pub fn new(id: u64, prompt: Vec<u32>, adapter: u32, extra: u64) -> Self {
        Sequence {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            extra,
            adapter,
            computed: 0,
            cached_tokens: None,
            blocks: SeqBlocks::default(),
        }
    }

    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
}

/// A step's plan: the batch, and for each sequence in it (in batch order)
/// its id, its new tokens and whether a next token is sampled after it.
pub struct Step {
    pub batch: Batch,
    pub work: Vec<Work>,
}

#[derive(Clone, Copy, Debug)]
pub struct Work {
    pub id: u64,
    pub tokens: usize,
    /// The sequence caught up with its tokens: its last row's logits give
    /// the next token. False for a chunk of a prompt that continues.
    pub sample: bool,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: BlockPool,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    /// Prompt tokens looked up in the prefix cache, and those found.
    pub prefix_queried: u64,
    pub prefix_hits: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, pool: BlockPool) -> Self {
        assert!(cfg.max_batch_tokens > 0 && cfg.max_seqs > 0);
        Scheduler {
            cfg,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            prefix_queried: 0,
            prefix_hits: 0,
        }
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Sequence> {
        self.running
            .iter_mut()
            .chain(self.waiting.iter_mut())
            .find(|s| s.id == id)
    }

    /// Removes a sequence (finished or cancelled) and frees its blocks at once.
    pub fn remove(&mut self, id: u64) -> Option<Sequence> {
        let mut seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)?
        };
        self.pool.free(&mut seq.blocks);
        Some(seq)
    }

    /// Plans the next step; None when there is nothing to compute.
    pub fn schedule(&mut self) -> Option<Step> {
        let mut budget = self.cfg.max_batch_tokens;
        // (index into running, new tokens)
        let mut planned: Vec<(usize, usize)> = Vec::new();
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let n = (seq.tokens.len() - seq.computed).min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            let want = seq.computed + n;
            let seq = &mut self.running[i];
            if self.pool.allocate(&mut seq.blocks, want) {
                planned.push((i, n));
                budget -= n;
                i += 1;
                continue;
            }
            // No block free: preempt the latest admitted sequence (perhaps
            // this one) and try again.
            preempted = true;
            let mut victim = self.running.pop().expect("running is not empty");
            self.pool.free(&mut victim.blocks);
            victim.computed = 0;
            self.waiting.push_front(victim);
        }
        // Admit waiting sequences, unless the cache is short already.
        while !preempted && budget > 0 && self.running.len() < self.cfg.max_seqs {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if seq.computed == 0 && seq.blocks.table.is_empty() {
                seq.blocks = self.pool.take_prefix(&seq.tokens, seq.extra);
                seq.computed = seq.blocks.table.len() * self.pool.block_size();
            }
            let n = (seq.tokens.len() - seq.computed).min(budget);
            if !self.pool.allocate(&mut seq.blocks, seq.computed + n) {
                self.pool.free(&mut seq.blocks);
                seq.computed = 0;
                self.waiting.push_front(seq);
                break;
            }
            if seq.cached_tokens.is_none() {
                seq.cached_tokens = Some(seq.computed);
                self.prefix_queried += seq.prompt_len as u64;
                self.prefix_hits += seq.computed as u64;
            }
            self.running.push(seq);
            planned.push((self.running.len() - 1, n));
            budget -= n;
        }
        if planned.is_empty() {
            return None;
        }
        let bs = self.pool.block_size();
        let mut step = Step {
            batch: Batch::default(),
            work: Vec::with_capacity(planned.len()),
        };
        for (i, n) in planned {
            let seq = &self.running[i];
            let sample = seq.computed + n == seq.tokens.len();
            let ids = &seq.tokens[seq.computed..seq.computed + n];
            step.batch.push_seq(
                ids,
                seq.computed,
                &seq.blocks.table,
                bs,
                seq.adapter,
                sample,
            );
            step.work.push(Work {
                id: seq.id,
                tokens: n,
                sample,
            });
        }
        Some(step)
    }

    /// Marks a step's tokens computed (the forward ran) and keys the blocks
    /// they filled for the prefix cache.
    pub fn complete(&mut self, step: &Step) {
        for w in &step.work {
            let Some(seq) = self.running.iter_mut().find(|s| s.id == w.id) else {
                continue;
            };
            seq.computed += w.tokens;
            self.pool
                .register_full(&mut seq.blocks, &seq.tokens[..seq.computed], seq.extra);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::NO_ADAPTER;

    fn sched(blocks: usize, budget: usize, max_seqs: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_batch_tokens: budget,
                max_seqs,
            },
            BlockPool::new(blocks, 4),
        )
    }

    fn prompt(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 3 + salt).collect()
    }

    /// Runs a step and appends `next` to every sequence that samples.
    fn run(s: &mut Scheduler, next: u32) -> Vec<Work> {
        let step = s.schedule().expect("a step");
        s.complete(&step);
        for w in &step.work {
            if w.sample {
                s.get_mut(w.id).unwrap().tokens.push(next);
            }
        }
        step.work
    }

    #[test]
    fn long_prompts_are_chunked_while_others_decode() {
        let mut s = sched(64, 8, 8);
        s.add(Sequence::new(1, prompt(3, 0), NO_ADAPTER, 0));
        let w = run(&mut s, 100);
        assert_eq!((w[0].tokens, w[0].sample), (3, true));
        s.add(Sequence::new(2, prompt(20, 1), NO_ADAPTER, 0));
        // Sequence 1 decodes one token; 2 gets the other 7 of the budget.
        let w = run(&mut s, 101);
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].id, w[0].tokens, w[0].sample), (1, 1, true));
        assert_eq!((w[1].id, w[1].tokens, w[1].sample), (2, 7, false));
        let w = run(&mut s, 102);
        assert_eq!((w[1].tokens, w[1].sample), (7, false));
        let w = run(&mut s, 103);
        assert_eq!((w[1].tokens, w[1].sample), (6, true));
        let w = run(&mut s, 104);
        assert_eq!((w[1].tokens, w[1].sample), (1, true));
    }

    #[test]
    fn batch_rows_carry_positions_and_slots() {
        let mut s = sched(64, 64, 8);
        s.add(Sequence::new(1, prompt(6, 0), NO_ADAPTER, 0));
        s.add(Sequence::new(2, prompt(2, 50), NO_ADAPTER, 0));
        let step = s.schedule().unwrap();
        let b = &step.batch;
        assert_eq!(b.rows(), 8);
        assert_eq!(b.positions, [0, 1, 2, 3, 4, 5, 0, 1]);
        assert_eq!(b.logit_rows, [5, 7]);
        let t1 = &b.seqs[0].blocks;
        assert_eq!(t1.len(), 2);
        assert_eq!(b.slots[5], t1[1] * 4 + 1);
        assert_eq!((b.seqs[1].row, b.seqs[1].rows, b.seqs[1].ctx), (6, 2, 2));
    }

    #[test]
    fn a_shared_prefix_is_not_computed_again() {
        let mut s = sched(64, 64, 8);
        let p = prompt(13, 0);
        s.add(Sequence::new(1, p.clone(), NO_ADAPTER, 0));
        run(&mut s, 7);
        s.remove(1);
        let mut q = p[..12].to_vec();
        q.push(999);
        s.add(Sequence::new(2, q, NO_ADAPTER, 0));
        let step = s.schedule().unwrap();
        // 12 tokens = 3 full blocks hit; only the last token is computed.
        assert_eq!(step.work[0].tokens, 1);
        assert_eq!(step.batch.positions, [12]);
        assert_eq!(s.get_mut(2).unwrap().cached_tokens, Some(12));
        assert_eq!((s.prefix_queried, s.prefix_hits), (26, 12));
    }

    #[test]
    fn max_seqs_and_free_blocks_bound_admission() {
        let mut s = sched(64, 64, 2);
        for id in 0..3 {
            s.add(Sequence::new(id, prompt(2, id as u32 * 10), NO_ADAPTER, 0));
        }
        let w = run(&mut s, 1);
        assert_eq!(w.len(), 2);
        assert_eq!(s.num_waiting(), 1);
        s.remove(0);
        let w = run(&mut s, 1);
        assert_eq!(w.iter().map(|w| w.id).collect::<Vec<_>>(), [1, 2]);

        // 3 blocks of 4: a 9-token prompt takes all of them; the next waits.
        let mut s = sched(3, 64, 8);
        s.add(Sequence::new(1, prompt(9, 0), NO_ADAPTER, 0));
        s.add(Sequence::new(2, prompt(2, 5), NO_ADAPTER, 0));
        let w = run(&mut s, 1);
        assert_eq!(w.len(), 1);
        assert_eq!(s.num_waiting(), 1);
        assert_eq!(s.pool().num_free(), 0);
        s.remove(1);
        assert_eq!(s.pool().num_free(), 3);
        assert_eq!(run(&mut s, 1)[0].id, 2);
    }

    #[test]
    fn a_sequence_that_outgrows_the_cache_preempts_the_latest() {
        // 4 blocks of 4 tokens. Two prompts of 7 tokens take 2 blocks each.
        let mut s = sched(4, 64, 8);
        s.add(Sequence::new(1, prompt(7, 0), NO_ADAPTER, 0));
        s.add(Sequence::new(2, prompt(7, 40), NO_ADAPTER, 0));
        run(&mut s, 5); // prompts computed: 8 tokens each, 7 computed
        run(&mut s, 6); // 9 tokens each, 8 computed: two full blocks each
                        // Position 8 needs a third block each: none is free, so 2 (the
                        // latest) is preempted and 1 takes one of its blocks.
        let w = run(&mut s, 7);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].id, 1);
        assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
        let two = s.get_mut(2).unwrap();
        assert_eq!((two.computed, two.tokens.len()), (0, 9));
        // Once 1 leaves, 2 comes back: its first block is still cached, the
        // second was reused by 1 and is computed again.
        s.remove(1);
        let w = run(&mut s, 8);
        assert_eq!((w[0].id, w[0].tokens, w[0].sample), (2, 5, true));
    }
}
