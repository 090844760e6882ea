//! Ragged batches over a paged KV pool, for the tests of `rope_rows`,
//! `scatter_rows` and `attention_paged`: each sequence's queries, keys and
//! values made contiguous first, then laid out in a pool through a block
//! table of shuffled block ids, with every slot no sequence owns set to NaN
//! (so an op that reads a wrong slot produces NaN).

use engine::backend::PagedSeq;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// Random values already representable in bf16, so the CPU and the CUDA
/// device see the same inputs.
pub fn data(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| half::bf16::from_f32(rng.random_range(-scale..scale)).to_f32())
        .collect()
}

#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
    pub block_size: usize,
}

impl Dims {
    pub fn width(&self) -> usize {
        self.heads * self.hd
    }
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.hd
    }
}

/// One sequence of a step: `rows` queries at positions ctx − rows .. ctx,
/// and its keys and values at positions 0..ctx, contiguous.
#[derive(Clone, Debug)]
pub struct SeqData {
    pub rows: usize,
    pub ctx: usize,
    /// [rows, heads·hd]
    pub q: Vec<f32>,
    /// [ctx, kv_heads·hd]
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl SeqData {
    pub fn new(rng: &mut StdRng, d: Dims, rows: usize, ctx: usize) -> Self {
        SeqData {
            rows,
            ctx,
            q: data(rng, rows * d.width(), 1.0),
            k: data(rng, ctx * d.kv_width(), 1.0),
            v: data(rng, ctx * d.kv_width(), 2.0),
        }
    }

    /// Its queries first..first + rows as a sequence of its own, whose ctx
    /// ends at the last of them (a decode row, or a smaller chunk).
    pub fn part(&self, d: Dims, first: usize, rows: usize) -> SeqData {
        let w = d.width();
        let ctx = self.ctx - self.rows + first + rows;
        SeqData {
            rows,
            ctx,
            q: self.q[first * w..(first + rows) * w].to_vec(),
            k: self.k[..ctx * d.kv_width()].to_vec(),
            v: self.v[..ctx * d.kv_width()].to_vec(),
        }
    }

    /// out rows [rows, heads·hd] in f64: softmax(q·k / sqrt(hd)) v over
    /// positions 0..=P for each query.
    pub fn reference(&self, d: Dims) -> Vec<f64> {
        let (w, kvw, hd) = (d.width(), d.kv_width(), d.hd);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0.0; self.rows * w];
        for i in 0..self.rows {
            let pos = self.ctx - self.rows + i;
            for h in 0..d.heads {
                let g = h / (d.heads / d.kv_heads);
                let qi = &self.q[i * w + h * hd..][..hd];
                let s: Vec<f64> = (0..=pos)
                    .map(|p| {
                        let kp = &self.k[p * kvw + g * hd..][..hd];
                        qi.iter()
                            .zip(kp)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (p, e) in e.iter().enumerate() {
                    let vp = &self.v[p * kvw + g * hd..][..hd];
                    for c in 0..hd {
                        out[i * w + h * hd + c] += e / sum * vp[c] as f64;
                    }
                }
            }
        }
        out
    }
}

/// A step's batch: the sequences' rows in q one after another, `gap`
/// uncovered rows (random queries no sequence owns) before each, and their
/// keys and values in a pool of shuffled blocks.
pub struct Batch {
    pub d: Dims,
    /// Rows of q and out.
    pub n: usize,
    pub q: Vec<f32>,
    /// [num_slots, kv_heads·hd]; NaN in every slot no sequence owns.
    pub k_pool: Vec<f32>,
    pub v_pool: Vec<f32>,
    pub num_slots: usize,
    /// Each sequence's first row, and its block table.
    pub rows: Vec<usize>,
    pub tables: Vec<Vec<u32>>,
    pub seqs: Vec<SeqData>,
}

impl Batch {
    /// Lays `seqs` out with `gap` uncovered rows before each; three spare
    /// blocks stay NaN, and the last sequence's table names one of them
    /// past its ctx (a block allocated ahead, which must not be read).
    pub fn new(rng: &mut StdRng, d: Dims, seqs: &[SeqData], gap: usize) -> Self {
        let bs = d.block_size;
        let needed: usize = seqs.iter().map(|s| s.ctx.div_ceil(bs)).sum();
        let num_blocks = needed + 3;
        let num_slots = num_blocks * bs;
        let kvw = d.kv_width();
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.shuffle(rng);
        let mut k_pool = vec![f32::NAN; num_slots * kvw];
        let mut v_pool = vec![f32::NAN; num_slots * kvw];
        let (mut tables, mut rows, mut next, mut n) = (Vec::new(), Vec::new(), 0, 0);
        for s in seqs {
            let table: Vec<u32> = ids[next..next + s.ctx.div_ceil(bs)].to_vec();
            next += table.len();
            for p in 0..s.ctx {
                let slot = table[p / bs] as usize * bs + p % bs;
                k_pool[slot * kvw..][..kvw].copy_from_slice(&s.k[p * kvw..][..kvw]);
                v_pool[slot * kvw..][..kvw].copy_from_slice(&s.v[p * kvw..][..kvw]);
            }
            tables.push(table);
            n += gap;
            rows.push(n);
            n += s.rows;
        }
        if let Some(t) = tables.last_mut() {
            t.push(ids[next]);
        }
        let w = d.width();
        let mut q = data(rng, n * w, 1.0);
        for (s, &r) in seqs.iter().zip(&rows) {
            q[r * w..(r + s.rows) * w].copy_from_slice(&s.q);
        }
        Batch {
            d,
            n,
            q,
            k_pool,
            v_pool,
            num_slots,
            rows,
            tables,
            seqs: seqs.to_vec(),
        }
    }

    pub fn paged_seqs(&self) -> Vec<PagedSeq<'_>> {
        self.seqs
            .iter()
            .zip(&self.rows)
            .zip(&self.tables)
            .map(|((s, &row), blocks)| PagedSeq {
                row,
                rows: s.rows,
                ctx: s.ctx,
                blocks,
            })
            .collect()
    }

    /// Whether row r belongs to a sequence.
    pub fn covered(&self, r: usize) -> bool {
        self.seqs
            .iter()
            .zip(&self.rows)
            .any(|(s, &row)| (row..row + s.rows).contains(&r))
    }
}
