//! A GGUF file written with every supported tensor type and metadata value type reads back
//! exactly; each kind of malformed file yields its own error naming the file and tensor, and
//! no corruption of the header makes the reader panic.

use mdi_core::gguf::{Gguf, GgufWriter, Value};
use mdi_core::quant::{dequantize, quantize};
use mdi_core::sampling::Rng;
use mdi_core::{DType, Error, MemSource, StageSpec, StageWeights};
use mdi_tests::tiny::{Shape, TinyModel};

fn random_values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.next_f32() * 4.0 - 2.0).collect()
}

/// A tensor as written: name, type, row-major shape, stored bytes.
type Written = (String, DType, Vec<usize>, Vec<u8>);

fn all_types_file() -> (Vec<u8>, Vec<Written>) {
    let mut w = GgufWriter::new();
    let metadata = [
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(60000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.f32", Value::F32(1.5e-5)),
        ("t.bool", Value::Bool(true)),
        ("t.string", Value::String("héllo ✓".into())),
        ("t.u64", Value::U64(u64::MAX - 3)),
        ("t.i64", Value::I64(i64::MIN + 5)),
        ("t.f64", Value::F64(-2.5e100)),
        (
            "t.array",
            Value::Array(vec![Value::String("a".into()), Value::String("bc".into())]),
        ),
        (
            "t.nested",
            Value::Array(vec![
                Value::Array(vec![Value::I32(1), Value::I32(-2)]),
                Value::Array(vec![Value::I32(3)]),
            ]),
        ),
        ("t.empty", Value::Array(vec![])),
    ];
    for (k, v) in &metadata {
        w.metadata(*k, v.clone());
    }
    let mut tensors = Vec::new();
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        // Odd row counts, rows of several blocks; a 1-D and a 3-D tensor too.
        for (j, shape) in [vec![7, 96], vec![64], vec![3, 2, 32]]
            .into_iter()
            .enumerate()
        {
            let n: usize = shape.iter().product();
            let bytes = quantize(dtype, &random_values(n, (i * 10 + j) as u64));
            let name = format!("tensor.{dtype}.{j}");
            w.tensor(name.clone(), dtype, &shape, bytes.clone());
            tensors.push((name, dtype, shape, bytes));
        }
    }
    let bytes = w.to_bytes();
    let g = Gguf::read(&MemSource::new("all.gguf", bytes.clone())).expect("reads");
    for (k, v) in &metadata {
        assert_eq!(g.get(k), Some(v), "metadata {k}");
    }
    (bytes, tensors)
}

#[test]
fn every_tensor_type_reads_back_exactly() {
    let (bytes, tensors) = all_types_file();
    let src = MemSource::new("all.gguf", bytes);
    let g = Gguf::read(&src).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.tensors.len(), tensors.len());
    for (name, dtype, shape, raw) in &tensors {
        let info = g.tensor(name).expect("listed");
        assert_eq!(info.dtype, *dtype);
        assert_eq!(&info.shape, shape);
        assert_eq!(info.offset % g.alignment, 0, "{name} aligned");
        let back = g.read_bytes(&src, name).unwrap();
        assert_eq!(&back, raw, "{name} raw bytes");
        let n = shape.iter().product();
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        dequantize(*dtype, &back, &mut a);
        dequantize(*dtype, raw, &mut b);
        assert_eq!(a, b);
    }
}

fn expect_err(bytes: Vec<u8>) -> Error {
    match Gguf::read(&MemSource::new("bad.gguf", bytes)) {
        Ok(_) => panic!("malformed file was accepted"),
        Err(e) => e,
    }
}

/// Offset of the type field of tensor `name` in the tensor table.
fn type_field(bytes: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend(name.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("name in table");
    let dims_at = at + needle.len();
    let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
    dims_at + 4 + 8 * n_dims
}

#[test]
fn bad_magic_and_unknown_versions_are_named() {
    let (bytes, _) = all_types_file();
    let mut bad = bytes.clone();
    bad[..4].copy_from_slice(b"GGML");
    let e = expect_err(bad).to_string();
    assert!(e.contains("bad.gguf") && e.contains("magic"), "{e}");
    for version in [1u32, 4, 99] {
        let mut bad = bytes.clone();
        bad[4..8].copy_from_slice(&version.to_le_bytes());
        let e = expect_err(bad).to_string();
        assert!(e.contains(&format!("version {version}")), "{e}");
    }
}

#[test]
fn unknown_tensor_type_names_the_tensor() {
    let (mut bytes, _) = all_types_file();
    let at = type_field(&bytes, "tensor.q4_1.0");
    bytes[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    match expect_err(bytes) {
        Error::UnsupportedType {
            file,
            tensor,
            dtype,
        } => {
            assert_eq!(file, "bad.gguf");
            assert_eq!(tensor, "tensor.q4_1.0");
            assert!(dtype.contains("99"));
        }
        e => panic!("wrong error: {e}"),
    }
}

#[test]
fn tensor_past_end_of_file_names_the_tensor() {
    let (mut bytes, _) = all_types_file();
    let at = type_field(&bytes, "tensor.f16.0") + 4;
    bytes[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    match expect_err(bytes) {
        Error::Truncated { file, what, .. } => {
            assert_eq!(file, "bad.gguf");
            assert!(what.contains("tensor.f16.0"), "{what}");
        }
        e => panic!("wrong error: {e}"),
    }
}

#[test]
fn truncation_anywhere_is_an_error_not_a_panic() {
    let (bytes, _) = all_types_file();
    let header_end = Gguf::read(&MemSource::new("x", bytes.clone()))
        .unwrap()
        .data_start as usize;
    let cuts = (0..header_end).chain((header_end..bytes.len()).step_by(97));
    for cut in cuts {
        let e = expect_err(bytes[..cut].to_vec());
        let msg = e.to_string();
        assert!(msg.contains("bad.gguf"), "cut at {cut}: {msg}");
        assert!(
            matches!(e, Error::Truncated { .. } | Error::Format { .. }),
            "cut at {cut}: {msg}"
        );
    }
}

#[test]
fn random_corruption_never_panics() {
    let (bytes, _) = all_types_file();
    let header_end = Gguf::read(&MemSource::new("x", bytes.clone()))
        .unwrap()
        .data_start as usize;
    let mut rng = Rng::new(99);
    for _ in 0..3000 {
        let mut bad = bytes.clone();
        for _ in 0..1 + rng.next_u64() % 4 {
            let at = (rng.next_u64() as usize) % header_end;
            bad[at] = rng.next_u64() as u8;
        }
        // Either it still parses (a harmless byte) or it fails cleanly.
        let _ = Gguf::read(&MemSource::new("bad.gguf", bad));
    }
}

#[test]
fn missing_tensor_and_wrong_shape_name_the_tensor() {
    let tiny = TinyModel::random(Shape::default(), 3);
    let config = tiny.gguf_config(DType::F32);
    let spec = StageSpec::whole(&config);

    let mut missing = TinyModel::random(Shape::default(), 3);
    missing
        .tensors
        .retain(|(n, _, _)| n != "model.layers.2.mlp.up_proj.weight");
    let store = missing.gguf_store(DType::F32);
    match StageWeights::load(&store, &config, &spec) {
        Err(Error::MissingTensor { file, tensor }) => {
            assert_eq!(file, "tiny.gguf");
            assert_eq!(tensor, "blk.2.ffn_up.weight");
        }
        other => panic!("wrong result: {:?}", other.err()),
    }
    // Loading only layers 0..2 does not need the missing tensor.
    let first = StageSpec {
        layers: 0..2,
        embed: true,
        head: false,
    };
    StageWeights::load(&store, &config, &first).expect("layers 0..2 load");

    let mut wrong = TinyModel::random(Shape::default(), 3);
    for (n, dims, data) in &mut wrong.tensors {
        if n == "model.layers.1.self_attn.k_proj.weight" {
            // Drop one row of 64.
            dims[0] -= 1;
            data.truncate(dims[0] * dims[1]);
        }
    }
    match StageWeights::load(&wrong.gguf_store(DType::F32), &config, &spec) {
        Err(Error::Shape {
            tensor,
            expected,
            actual,
            ..
        }) => {
            assert_eq!(tensor, "blk.1.attn_k.weight");
            assert_eq!(expected, vec![32, 64]);
            assert_eq!(actual, vec![31, 64]);
        }
        other => panic!("wrong result: {:?}", other.err()),
    }
}
