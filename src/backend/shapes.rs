//! The shape rules of the ops, checked in one place for every device. A
//! mismatch is a bug in the calling model code, not bad user input, so these
//! panic with the shapes involved — except the serving ops' at the end, whose
//! batch bookkeeping is checked into an error.

use crate::backend::{Backend, LoraRef, PagedSeq, QTensor, NO_ADAPTER};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// out [n, m] = x [n, k] · w [m, k]ᵀ; returns (n, m, k).
pub fn matmul_nt<B: Backend>(
    out: &Tensor<B>,
    x: &Tensor<B>,
    w: &Tensor<B>,
) -> (usize, usize, usize) {
    let (n, k) = x.rows_cols();
    let (m, wk) = w.rows_cols();
    assert_eq!(k, wk, "inner dims {:?} · {:?}ᵀ", x.shape, w.shape);
    assert_eq!(out.rows_cols(), (n, m), "output {:?}", out.shape);
    (n, m, k)
}

/// `matmul_q`'s sizes (n, m, k): out [n, m] = x [n, k] · deq(w [m, k])ᵀ.
pub fn matmul_q<B: Backend>(
    out: &Tensor<B>,
    x: &Tensor<B>,
    w: &QTensor<B>,
) -> (usize, usize, usize) {
    let (n, k) = x.rows_cols();
    assert_eq!(
        k, w.cols,
        "inner dims {:?} · [{}, {}]ᵀ",
        x.shape, w.rows, w.cols
    );
    assert_eq!(out.rows_cols(), (n, w.rows), "output {:?}", out.shape);
    (n, w.rows, k)
}

/// Attention of q [n, heads·hd] over k, v [capacity, kv_heads·hd] with the
/// first query at pos0; returns (n, hd).
pub fn attention<B: Backend>(
    out: &Tensor<B>,
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    heads: usize,
    kv_heads: usize,
    pos0: usize,
) -> (usize, usize) {
    let (n, width) = q.rows_cols();
    let (capacity, kv_width) = k.rows_cols();
    assert_eq!(out.shape, q.shape);
    assert_eq!(k.shape, v.shape);
    assert!(heads.is_multiple_of(kv_heads) && width.is_multiple_of(heads));
    let hd = width / heads;
    assert_eq!(
        kv_width,
        kv_heads * hd,
        "kv width for {kv_heads} heads of {hd}"
    );
    assert!(
        pos0 + n <= capacity,
        "cache of {capacity} rows holds {}",
        pos0 + n
    );
    (n, hd)
}

/// dst[dst_row..+rows] = src[src_row..+rows]; returns the row width.
pub fn copy_rows<B: Backend>(
    dst: &Tensor<B>,
    dst_row: usize,
    src: &Tensor<B>,
    src_row: usize,
    rows: usize,
) -> usize {
    let (dn, d) = dst.rows_cols();
    let (sn, sd) = src.rows_cols();
    assert_eq!(d, sd, "row widths differ");
    assert_eq!(dst.dtype, src.dtype);
    assert!(
        dst_row + rows <= dn && src_row + rows <= sn,
        "rows out of range"
    );
    d
}

/// x [n, heads·hd] for rope; returns (n, hd).
pub fn rope<B: Backend>(x: &Tensor<B>, heads: usize) -> (usize, usize) {
    let (n, width) = x.rows_cols();
    assert!(
        width.is_multiple_of(heads),
        "width {width} for {heads} heads"
    );
    (n, width / heads)
}

// ----- backward ops and the optimizer -----

/// dtable [vocab, d] += scatter of dout [ids.len(), d]; returns (vocab, d).
pub fn embedding_backward<B: Backend>(
    dtable: &Tensor<B>,
    dout: &Tensor<B>,
    ids: &[u32],
) -> (usize, usize) {
    let (vocab, d) = dtable.rows_cols();
    assert_eq!(
        dout.rows_cols(),
        (ids.len(), d),
        "dout {:?} for {} ids into a table {:?}",
        dout.shape,
        ids.len(),
        dtable.shape
    );
    (vocab, d)
}

/// dx, dout, x [n, d]; weight, dweight [d]; returns d.
pub fn rmsnorm_backward<B: Backend>(
    dx: &Tensor<B>,
    dweight: &Tensor<B>,
    dout: &Tensor<B>,
    x: &Tensor<B>,
    weight: &Tensor<B>,
) -> usize {
    let (_, d) = x.rows_cols();
    assert_eq!(dx.shape, x.shape, "dx {:?} for x {:?}", dx.shape, x.shape);
    assert_eq!(
        dout.shape, x.shape,
        "dout {:?} for x {:?}",
        dout.shape, x.shape
    );
    assert_eq!(
        weight.numel(),
        d,
        "weight {:?} for rows of {d}",
        weight.shape
    );
    assert_eq!(dweight.shape, weight.shape, "dweight {:?}", dweight.shape);
    d
}

/// The backward of out [n, m] = x [n, k] · w [m, k]ᵀ: dx like x, dw (if any)
/// like w, dout like out; returns (n, m, k).
pub fn matmul_nt_backward<B: Backend>(
    dx: &Tensor<B>,
    dw: Option<&Tensor<B>>,
    dout: &Tensor<B>,
    x: &Tensor<B>,
    w: &Tensor<B>,
) -> (usize, usize, usize) {
    let (n, m, k) = matmul_nt(dout, x, w);
    assert_eq!(
        dx.rows_cols(),
        (n, k),
        "dx {:?} for x {:?}",
        dx.shape,
        x.shape
    );
    if let Some(dw) = dw {
        assert_eq!(
            dw.rows_cols(),
            (m, k),
            "dw {:?} for w {:?}",
            dw.shape,
            w.shape
        );
    }
    (n, m, k)
}

/// The backward of `attention`: dq, dout like q; dk, dv like k, v; returns
/// (n, hd).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<B: Backend>(
    dq: &Tensor<B>,
    dk: &Tensor<B>,
    dv: &Tensor<B>,
    dout: &Tensor<B>,
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    out: &Tensor<B>,
    lse: &Tensor<B>,
    heads: usize,
    kv_heads: usize,
    pos0: usize,
) -> (usize, usize) {
    let dims = attention(dout, q, k, v, heads, kv_heads, pos0);
    assert_eq!(
        out.shape, q.shape,
        "out {:?} for q {:?}",
        out.shape, q.shape
    );
    attention_lse(lse, heads, dims.0);
    assert_eq!(dq.shape, q.shape, "dq {:?} for q {:?}", dq.shape, q.shape);
    assert_eq!(dk.shape, k.shape, "dk {:?} for k {:?}", dk.shape, k.shape);
    assert_eq!(dv.shape, v.shape, "dv {:?} for v {:?}", dv.shape, v.shape);
    dims
}

/// The log-sum-exp of attention's n rows per head: [heads, n].
pub fn attention_lse<B: Backend>(lse: &Tensor<B>, heads: usize, n: usize) {
    assert_eq!(
        lse.shape,
        [heads, n],
        "lse {:?} for {heads} heads, {n} rows",
        lse.shape
    );
}

/// Element-wise ops whose tensors all share one shape (swiglu and its
/// backward, AdamW).
pub fn same_shape<B: Backend>(op: &str, tensors: &[&Tensor<B>]) {
    let first = &tensors[0].shape;
    for t in &tensors[1..] {
        assert_eq!(&t.shape, first, "{op}: shapes differ");
    }
}

/// logits [n, vocab] with n targets, dlogits (if any) like logits; returns
/// (n, vocab).
pub fn cross_entropy<B: Backend>(
    dlogits: Option<&Tensor<B>>,
    logits: &Tensor<B>,
    targets: &[u32],
) -> (usize, usize) {
    let (n, vocab) = logits.rows_cols();
    assert_eq!(
        n,
        targets.len(),
        "{} targets for logits {:?}",
        targets.len(),
        logits.shape
    );
    if let Some(dl) = dlogits {
        assert_eq!(dl.shape, logits.shape, "dlogits {:?}", dl.shape);
    }
    (n, vocab)
}

/// The sizes of a LoRA branch: x [n, inp], A [r, inp], B [out, r].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraDims {
    pub n: usize,
    pub inp: usize,
    pub out: usize,
    pub r: usize,
}

/// `lora_forward`'s y [n, out], t [n, r] for x [n, in], A [r, in], B [out, r].
pub fn lora_forward<B: Backend>(
    y: &Tensor<B>,
    t: &Tensor<B>,
    x: &Tensor<B>,
    a: &Tensor<B>,
    b: &Tensor<B>,
) -> LoraDims {
    let (n, inp) = x.rows_cols();
    let (r, a_in) = a.rows_cols();
    let (out, b_r) = b.rows_cols();
    assert_eq!(a_in, inp, "A {:?} for x {:?}", a.shape, x.shape);
    assert_eq!(b_r, r, "B {:?} for A {:?}", b.shape, a.shape);
    assert_eq!(y.rows_cols(), (n, out), "y {:?}", y.shape);
    assert_eq!(t.rows_cols(), (n, r), "t {:?}", t.shape);
    LoraDims { n, inp, out, r }
}

/// `lora_backward`'s tensors: those of the forward, their gradients shaped
/// alike, and dt [n, r].
#[allow(clippy::too_many_arguments)]
pub fn lora_backward<B: Backend>(
    dx: &Tensor<B>,
    da: &Tensor<B>,
    db: &Tensor<B>,
    dt: &Tensor<B>,
    dy: &Tensor<B>,
    x: &Tensor<B>,
    t: &Tensor<B>,
    a: &Tensor<B>,
    b: &Tensor<B>,
) -> LoraDims {
    let dims = lora_forward(dy, t, x, a, b);
    assert_eq!(dx.shape, x.shape, "dx {:?} for x {:?}", dx.shape, x.shape);
    assert_eq!(da.shape, a.shape, "dA {:?} for A {:?}", da.shape, a.shape);
    assert_eq!(db.shape, b.shape, "dB {:?} for B {:?}", db.shape, b.shape);
    assert_eq!(dt.shape, t.shape, "dt {:?} for t {:?}", dt.shape, t.shape);
    dims
}

// ----- encoder ops -----

/// `layernorm`'s out, x [n, d] with weight, bias [d]; returns d.
pub fn layernorm<B: Backend>(
    out: &Tensor<B>,
    x: &Tensor<B>,
    weight: &Tensor<B>,
    bias: &Tensor<B>,
) -> usize {
    let (_, d) = x.rows_cols();
    assert_eq!(
        out.shape, x.shape,
        "out {:?} for x {:?}",
        out.shape, x.shape
    );
    assert_eq!(
        weight.numel(),
        d,
        "weight {:?} for rows of {d}",
        weight.shape
    );
    assert_eq!(bias.numel(), d, "bias {:?} for rows of {d}", bias.shape);
    d
}

/// `add_bias`'s x [n, d] and bias [d]; returns d.
pub fn add_bias<B: Backend>(x: &Tensor<B>, bias: &Tensor<B>) -> usize {
    let (_, d) = x.rows_cols();
    assert_eq!(
        bias.numel(),
        d,
        "bias {:?} for rows {:?}",
        bias.shape,
        x.shape
    );
    d
}

/// `attention_bidirectional`'s out, q, k, v [batch·seq, heads·hd] for
/// `lens.len()` sequences of at most seq tokens; returns (seq, hd).
pub fn attention_bidirectional<B: Backend>(
    out: &Tensor<B>,
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    heads: usize,
    lens: &[usize],
) -> (usize, usize) {
    let (rows, width) = q.rows_cols();
    same_shape("attention_bidirectional", &[q, k, v, out]);
    assert!(
        heads > 0 && width.is_multiple_of(heads),
        "width {width} for {heads} heads"
    );
    assert!(
        !lens.is_empty() && rows.is_multiple_of(lens.len()),
        "{rows} rows for {} sequences",
        lens.len()
    );
    let seq = rows / lens.len();
    assert!(
        lens.iter().all(|&len| len <= seq),
        "sequence lengths {lens:?} for {seq} rows each"
    );
    (seq, width / heads)
}

// ----- serving: a ragged batch over a paged KV pool -----
//
// The per-row positions, slots and block tables of these ops come from the
// scheduler's bookkeeping rather than from fixed model shapes, so a mismatch
// is reported as `Error::Invalid` (before anything is written), not a panic.

fn invalid<T>(msg: String) -> Result<T> {
    Err(Error::Invalid(msg))
}

/// `rope_rows`' x [n, heads·hd] with one position per row; returns (n, hd).
pub fn rope_rows<B: Backend>(
    x: &Tensor<B>,
    heads: usize,
    positions: &[u32],
) -> Result<(usize, usize)> {
    let (n, width) = x.rows_cols();
    if heads == 0 || !width.is_multiple_of(heads) || !(width / heads).is_multiple_of(2) {
        return invalid(format!(
            "rope_rows: width {width} is no {heads} heads of an even width"
        ));
    }
    if positions.len() != n {
        return invalid(format!(
            "rope_rows: {} positions for {n} rows",
            positions.len()
        ));
    }
    Ok((n, width / heads))
}

/// `scatter_rows`' dst [num_slots, d] and src [slots.len(), d] of one element
/// type, every slot < num_slots and no two alike; returns (n, d).
pub fn scatter_rows<B: Backend>(
    dst: &Tensor<B>,
    src: &Tensor<B>,
    slots: &[u32],
) -> Result<(usize, usize)> {
    let (num_slots, d) = dst.rows_cols();
    let (n, sd) = src.rows_cols();
    if d != sd {
        return invalid(format!("scatter_rows: rows of {sd} into rows of {d}"));
    }
    if dst.dtype != src.dtype {
        return invalid(format!(
            "scatter_rows: {} rows into a {} tensor",
            src.dtype, dst.dtype
        ));
    }
    if slots.len() != n {
        return invalid(format!("scatter_rows: {} slots for {n} rows", slots.len()));
    }
    if let Some((i, &s)) = slots
        .iter()
        .enumerate()
        .find(|(_, &s)| s as usize >= num_slots)
    {
        return invalid(format!(
            "scatter_rows: slot {s} (row {i}) outside {num_slots} slots"
        ));
    }
    let mut sorted = slots.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return invalid(format!("scatter_rows: slot {} named twice", w[0]));
    }
    Ok((n, d))
}

/// `attention_paged`'s out, q [n, heads·hd] and k_cache, v_cache
/// [num_slots, kv_heads·hd], with every sequence's rows, context and block
/// table checked (see `Backend::attention_paged`); returns (n, hd).
#[allow(clippy::too_many_arguments)]
pub fn attention_paged<B: Backend>(
    out: &Tensor<B>,
    q: &Tensor<B>,
    k_cache: &Tensor<B>,
    v_cache: &Tensor<B>,
    seqs: &[PagedSeq<'_>],
    heads: usize,
    kv_heads: usize,
    block_size: usize,
) -> Result<(usize, usize)> {
    let (n, width) = q.rows_cols();
    let (num_slots, kv_width) = k_cache.rows_cols();
    if out.shape != q.shape {
        return invalid(format!(
            "attention_paged: out {:?} for q {:?}",
            out.shape, q.shape
        ));
    }
    if v_cache.shape != k_cache.shape {
        return invalid(format!(
            "attention_paged: v_cache {:?} beside k_cache {:?}",
            v_cache.shape, k_cache.shape
        ));
    }
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return invalid(format!(
            "attention_paged: {heads} heads over {kv_heads} kv heads"
        ));
    }
    if !width.is_multiple_of(heads) || kv_width != kv_heads * (width / heads) {
        return invalid(format!(
            "attention_paged: q width {width} for {heads} heads, kv width {kv_width} for {kv_heads}"
        ));
    }
    if block_size == 0 || !num_slots.is_multiple_of(block_size) {
        return invalid(format!(
            "attention_paged: {num_slots} slots in blocks of {block_size}"
        ));
    }
    let num_blocks = num_slots / block_size;
    let mut spans = Vec::with_capacity(seqs.len());
    for (i, s) in seqs.iter().enumerate() {
        if s.rows > s.ctx {
            return invalid(format!(
                "attention_paged: sequence {i} has {} rows but ctx {}",
                s.rows, s.ctx
            ));
        }
        if s.row + s.rows > n {
            return invalid(format!(
                "attention_paged: sequence {i}'s rows {}..{} outside q's {n}",
                s.row,
                s.row + s.rows
            ));
        }
        if s.blocks.len() * block_size < s.ctx {
            return invalid(format!(
                "attention_paged: sequence {i} has {} blocks of {block_size} for ctx {}",
                s.blocks.len(),
                s.ctx
            ));
        }
        if let Some(&b) = s.blocks.iter().find(|&&b| b as usize >= num_blocks) {
            return invalid(format!(
                "attention_paged: sequence {i}'s block {b} outside {num_blocks} blocks"
            ));
        }
        if s.rows > 0 {
            spans.push((s.row, s.row + s.rows, i));
        }
    }
    spans.sort_unstable();
    if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
        return invalid(format!(
            "attention_paged: sequences {} and {} share row {}",
            w[0].2, w[1].2, w[1].0
        ));
    }
    Ok((n, width / heads))
}

/// `lora_gathered`'s y [n, out] and x [n, in], with one `row_adapter` entry
/// per row, each < adapters.len() or NO_ADAPTER, every adapter's A [r, in]
/// and B [out, r] with r ≥ 1, and x, y, A, B of one element type; returns
/// (n, in, out).
pub fn lora_gathered<B: Backend>(
    y: &Tensor<B>,
    x: &Tensor<B>,
    adapters: &[LoraRef<'_, B>],
    row_adapter: &[u32],
) -> Result<(usize, usize, usize)> {
    let (n, inp) = x.rows_cols();
    let (yn, out) = y.rows_cols();
    if yn != n {
        return invalid(format!(
            "lora_gathered: y {:?} for x {:?} (rows differ)",
            y.shape, x.shape
        ));
    }
    if y.dtype != x.dtype {
        return invalid(format!("lora_gathered: y is {}, x is {}", y.dtype, x.dtype));
    }
    if row_adapter.len() != n {
        return invalid(format!(
            "lora_gathered: {} row_adapter entries for {n} rows",
            row_adapter.len()
        ));
    }
    if let Some((i, &a)) = (row_adapter.iter().enumerate())
        .find(|(_, &a)| a != NO_ADAPTER && a as usize >= adapters.len())
    {
        return invalid(format!(
            "lora_gathered: row {i} names adapter {a} of {} (NO_ADAPTER is u32::MAX)",
            adapters.len()
        ));
    }
    for (i, l) in adapters.iter().enumerate() {
        let (r, a_in) = l.a.rows_cols();
        let (b_out, b_r) = l.b.rows_cols();
        if r == 0 || a_in != inp || l.a.shape.len() != 2 {
            return invalid(format!(
                "lora_gathered: adapter {i}'s A {:?} is not [r ≥ 1, {inp}] for x {:?}",
                l.a.shape, x.shape
            ));
        }
        if (b_out, b_r) != (out, r) || l.b.shape.len() != 2 {
            return invalid(format!(
                "lora_gathered: adapter {i}'s B {:?} is not [{out}, {r}] for y {:?} and A {:?}",
                l.b.shape, y.shape, l.a.shape
            ));
        }
        if l.a.dtype != x.dtype || l.b.dtype != x.dtype {
            return invalid(format!(
                "lora_gathered: adapter {i}'s A is {}, B {}, for x of {}",
                l.a.dtype, l.b.dtype, x.dtype
            ));
        }
    }
    Ok((n, inp, out))
}
