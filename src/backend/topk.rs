//! Top-k selection on the host: the CPU device's `Backend::top_k`, the
//! index's streaming search over row blocks, and the merge of per-block
//! candidates a device found. One ranking everywhere: [`top_k_order`].

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// `Backend::top_k`'s order of (column, score) entries, best first: higher
/// score (in `f32::total_cmp`'s order), then lower column. Every device ranks
/// by it, after [`rank_score`].
pub fn top_k_order(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The score a value ranks and is reported by: numeric order, so −0 is +0
/// (ties go to the lower id), and a NaN (a corrupt vector, an overflowed
/// product) is −∞, below every number.
pub fn rank_score(s: f32) -> f32 {
    if s.is_nan() {
        f32::NEG_INFINITY
    } else {
        s + 0.0 // −0 + 0 = +0
    }
}

/// A kept (score, id): worse is greater, so the max-heap keeps the worst of
/// the kept on top.
#[derive(Clone, Copy, Debug)]
struct Entry {
    score: f32,
    id: usize,
}

impl Ord for Entry {
    fn cmp(&self, o: &Self) -> Ordering {
        o.score.total_cmp(&self.score).then(self.id.cmp(&o.id))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}

impl Eq for Entry {}

/// The k best (id, score) offered so far, in [`top_k_order`] with ids for
/// columns.
#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Entry>,
    /// The worst kept score once k are kept; −∞ before.
    bar: f32,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k.min(1024) + 1),
            bar: f32::NEG_INFINITY,
        }
    }

    /// Offers one entry; a NaN score ranks as [`rank_score`] says.
    pub fn offer(&mut self, id: usize, score: f32) {
        let e = Entry {
            score: rank_score(score),
            id,
        };
        if self.heap.len() < self.k {
            self.heap.push(e);
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if e < *worst {
                *worst = e;
            } else {
                return;
            }
        }
        if self.heap.len() == self.k {
            self.bar = self.heap.peek().map_or(f32::NEG_INFINITY, |w| w.score);
        }
    }

    /// Offers ids `base..base + scores.len()`, those whose bit is set in
    /// `live` only (every one when None; bit i of word i / 64 is id i).
    pub fn scan(&mut self, scores: &[f32], base: usize, live: Option<&[u64]>) {
        for (j, &s) in scores.iter().enumerate() {
            // The common case: below the bar (−∞ until k are kept). Only a
            // score strictly below it in every order is skipped here.
            if s < self.bar {
                continue;
            }
            let id = base + j;
            if let Some(bits) = live {
                if bits[id / 64] >> (id % 64) & 1 == 0 {
                    continue;
                }
            }
            self.offer(id, s);
        }
    }

    pub fn merge(&mut self, other: TopK) {
        for e in other.heap {
            self.offer(e.id, e.score);
        }
    }

    /// The kept entries, best first.
    pub fn into_sorted(self) -> Vec<(usize, f32)> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|e| (e.id, e.score))
            .collect()
    }
}

/// The k best of one row's candidates from a device (columns and scores in
/// any order, e.g. `topk_f32`'s segments), in [`top_k_order`].
pub fn merge_top_k(cols: &[u32], scores: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best = TopK::new(k);
    for (&c, &s) in cols.iter().zip(scores) {
        best.offer(c as usize, s);
    }
    let sorted = best.into_sorted().into_iter();
    sorted.map(|(c, s)| (c as u32, s)).collect()
}
