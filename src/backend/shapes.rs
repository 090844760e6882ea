//! The shape rules of the ops, checked in one place for every device. A
//! mismatch is a bug in the calling model code, not bad user input, so these
//! panic with the shapes involved.

use crate::backend::Backend;
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
