//! Kernel microbenchmarks (being written).
fn main() {}
