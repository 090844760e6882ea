//! Quantization: the block quantizers against gguf-py and ggml-quants.c
//! (tests/fixtures/make_quant_fixtures.py), quantize → dequantize round trips,
//! and `engine quantize` end to end.

mod common;

use common::{fixture, Golden};
use engine::quant::dequant::dequantize_vec;
use engine::quant::quantize::{first_nonfinite_block, quantize, quantize_rows};
use engine::quant::GgmlType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::SafeTensors;

const ROW: usize = 512;

/// Every type's bytes are those gguf-py (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0)
/// or ggml's reference quantizers (Q4_K, Q6_K) wrote for the same rows.
#[test]
fn quantizers_match_gguf_py_and_ggml() {
    let path = fixture("quant/quant_expected.safetensors");
    let golden = Golden::open(&path);
    let input = golden.f32("input");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let rows = input.len() / ROW;
    for (name, ty) in [
        ("f16", GgmlType::F16),
        ("bf16", GgmlType::BF16),
        ("q8_0", GgmlType::Q8_0),
        ("q4_0", GgmlType::Q4_0),
        ("q4_1", GgmlType::Q4_1),
        ("q5_0", GgmlType::Q5_0),
        ("q4_k", GgmlType::Q4_K),
        ("q6_k", GgmlType::Q6_K),
    ] {
        let want = st.tensor(name).unwrap();
        let want = want.data();
        let row_bytes = want.len() / rows;
        for r in 0..rows {
            let mut got = vec![0u8; row_bytes];
            quantize(ty, &input[r * ROW..(r + 1) * ROW], &mut got).unwrap();
            let w = &want[r * row_bytes..(r + 1) * row_bytes];
            if let Some(i) = (0..row_bytes).find(|&i| got[i] != w[i]) {
                panic!(
                    "{ty}: row {r}, byte {i} (block {}): got {:#04x}, reference {:#04x}",
                    i / ty.type_size(),
                    got[i],
                    w[i]
                );
            }
        }
        // The parallel path writes the same bytes.
        assert_eq!(quantize_rows(ty, &input, ROW).unwrap(), want, "{ty}");
    }
}

fn rmse(a: &[f32], b: &[f32]) -> f64 {
    let s: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    (s / a.len() as f64).sqrt()
}

/// quantize → dequantize stays within each type's error: every value within
/// half a quantization step of its block (plus the rounding of the block's
/// f16 scales; a whole step for the K types, whose sub-block scales are
/// themselves quantized), and the K types closer than the 32-block types of
/// as many bits.
#[test]
fn round_trip_errors() {
    let mut rng = StdRng::seed_from_u64(7);
    let n = 64 * ROW;
    let x: Vec<f32> = (0..n)
        .map(|i| {
            let scale = [0.02f32, 1.0, 30.0][i / ROW % 3];
            (rng.random::<f32>() - 0.5) * 2.0 * scale
        })
        .collect();
    let mut errors = Vec::new();
    for &ty in engine::quant::quantize::QUANTIZABLE {
        let q = quantize_rows(ty, &x, ROW).unwrap();
        assert_eq!(q.len(), ty.bytes_for(n).unwrap(), "{ty}");
        assert_eq!(first_nonfinite_block(ty, &q), None, "{ty}");
        let y = dequantize_vec(ty, &q, n).unwrap();
        // The largest error allowed in each block, relative to its largest |x|.
        let step = match ty {
            GgmlType::F32 => 0.0,
            GgmlType::F16 => 1.0 / 1024.0,
            GgmlType::BF16 => 1.0 / 128.0,
            GgmlType::Q8_0 => 1.0 / 127.0,
            // Levels −8..7 of d = max / −8: the side opposite max clips a step.
            GgmlType::Q4_0 => 2.0 / 8.0,
            GgmlType::Q4_1 => 2.0 / 15.0,
            GgmlType::Q5_0 => 2.0 / 16.0,
            GgmlType::Q4_K => 2.0 * 2.0 / 15.0,
            GgmlType::Q6_K => 2.0 / 32.0,
            _ => unreachable!(),
        };
        // Block types also round their scales to f16 (2⁻¹¹ relative, times
        // up to a few levels' worth).
        let slack = if ty.block_size() > 1 {
            1.0 / 512.0
        } else {
            0.0
        };
        let bs = ty.block_size().max(32);
        for (b, (xb, yb)) in x.chunks(bs).zip(y.chunks(bs)).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (a, c)) in xb.iter().zip(yb).enumerate() {
                assert!(
                    (a - c).abs() <= (step * 0.5 + slack) * amax,
                    "{ty}: block {b} value {i}: {a} came back as {c} (|max| {amax})"
                );
            }
        }
        errors.push((ty, rmse(&x, &y)));
    }
    let err = |t| errors.iter().find(|(ty, _)| *ty == t).unwrap().1;
    println!("rmse: {errors:?}");
    assert!(err(GgmlType::Q4_K) < err(GgmlType::Q4_0));
    assert!(err(GgmlType::Q6_K) < err(GgmlType::Q5_0));
    assert!(err(GgmlType::Q8_0) < err(GgmlType::Q6_K));
    assert_eq!(err(GgmlType::F32), 0.0);
}

#[test]
fn bad_arguments_are_errors() {
    let x = vec![1.0f32; 100];
    let msg = quantize_rows(GgmlType::Q4_K, &x, 100)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("Q4_K"), "{msg}");
    let msg = quantize_rows(GgmlType::Q2_K, &[0.0; 256], 256)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("quantizing to ggml type Q2_K is not supported"),
        "{msg}"
    );
    assert!(quantize(GgmlType::Q8_0, &[0.0; 32], &mut [0u8; 33]).is_err());
    // A value beyond f16's range makes an infinite scale, which is caught.
    let mut big = vec![0.0f32; 32];
    big[3] = 1e7;
    let q = quantize_rows(GgmlType::Q8_0, &big, 32).unwrap();
    assert_eq!(first_nonfinite_block(GgmlType::Q8_0, &q), Some(0));
}
