//! Every shipped model is a tensor graph that ONNX Runtime's CUDA provider runs whole: each
//! node is a standard `ai.onnx` operator with a CUDA kernel for the model's opset and for the
//! element types the node uses. A node outside the list (a tree-ensemble operator of
//! `ai.onnx.ml`, say) would fall back to the CPU under `execution_provider = "cuda"`.
//!
//! The list is read from ONNX Runtime's own table of registered kernels,
//! `docs/OperatorKernels.md`, section "Operators implemented by CUDAExecutionProvider", domain
//! `ai.onnx` (microsoft/onnxruntime at commit 001d12d, the 1.31 line the project pins). Each
//! entry is the opset range of the kernel and the types it registers that our models use.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

/// (operator, first opset, last opset, the types our models use that the kernel has).
const CUDA_KERNELS: &[(&str, i64, i64, &str)] = &[
    ("Abs", 13, i64::MAX, "float"),
    ("Add", 14, i64::MAX, "float, uint8"),
    (
        "Cast",
        13,
        18,
        "bool -> uint8, uint8 -> int32, bool -> int64",
    ),
    ("Concat", 13, i64::MAX, "float"),
    ("Div", 14, i64::MAX, "float"),
    ("Gather", 13, i64::MAX, "float, uint8; int64 indices"),
    ("Identity", 1, i64::MAX, "any"),
    ("GatherElements", 13, i64::MAX, "float; int32 indices"),
    ("Greater", 13, i64::MAX, "float -> bool"),
    ("LessOrEqual", 16, i64::MAX, "float -> bool"),
    ("Log", 13, i64::MAX, "float"),
    ("MatMul", 13, i64::MAX, "float"),
    ("Mul", 14, i64::MAX, "float"),
    ("ReduceMean", 1, 17, "float"),
    ("Relu", 14, i64::MAX, "float"),
    ("Reshape", 14, 18, "int64"),
    ("Sigmoid", 13, i64::MAX, "float"),
    ("Sign", 13, i64::MAX, "float"),
    ("Sub", 14, i64::MAX, "float"),
    ("Transpose", 13, 20, "float"),
];

/// The fields of one protobuf message: (field number, wire type, varint or bytes).
fn fields(mut buf: &[u8]) -> Vec<(u64, u64, u64, &[u8])> {
    fn varint(buf: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (b, rest) = buf.split_first().expect("truncated varint");
            *buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
        }
        v
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf);
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => out.push((field, wire, varint(&mut buf), &[][..])),
            1 => buf = &buf[8..],
            2 => {
                let len = varint(&mut buf) as usize;
                out.push((field, wire, 0, &buf[..len]));
                buf = &buf[len..];
            }
            5 => buf = &buf[4..],
            other => panic!("wire type {other}"),
        }
    }
    out
}

/// (opset of the default domain, every node's (domain, op_type)), from an ONNX ModelProto:
/// graph = 7, opset_import = 8 (domain = 1, version = 2); GraphProto node = 1; NodeProto
/// op_type = 4, domain = 7.
fn operators(model: &[u8]) -> (i64, BTreeSet<(String, String)>) {
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).expect("utf-8");
    let mut opset = None;
    let mut ops = BTreeSet::new();
    for (field, _, _, bytes) in fields(model) {
        match field {
            8 => {
                let f = fields(bytes);
                let domain = f.iter().find(|x| x.0 == 1).map(|x| text(x.3));
                let version = f.iter().find(|x| x.0 == 2).map(|x| x.2 as i64);
                if matches!(domain.as_deref(), None | Some("" | "ai.onnx")) {
                    opset = version;
                }
            }
            7 => {
                for (_, _, _, node) in fields(bytes).into_iter().filter(|x| x.0 == 1) {
                    let f = fields(node);
                    let op = f.iter().find(|x| x.0 == 4).map(|x| text(x.3));
                    let domain = f.iter().find(|x| x.0 == 7).map(|x| text(x.3));
                    ops.insert((domain.unwrap_or_default(), op.expect("op_type")));
                }
            }
            _ => {}
        }
    }
    (opset.expect("an ai.onnx opset import"), ops)
}

fn shipped_models() -> Vec<std::path::PathBuf> {
    let topology = std::fs::read_to_string("topologies/fraud.toml").expect("topology");
    let value: toml::Value = toml::from_str(&topology).expect("toml");
    value["model"]
        .as_array()
        .expect("models")
        .iter()
        .map(|m| std::path::Path::new("topologies").join(m["path"].as_str().expect("path")))
        .collect()
}

/// What in the model at `path` the CUDA provider cannot run, one line each.
fn not_on_cuda(path: &std::path::Path) -> Vec<String> {
    let (opset, ops) = operators(&std::fs::read(path).expect("model"));
    assert!(!ops.is_empty(), "{}: no nodes read", path.display());
    let mut problems = Vec::new();
    for (domain, op) in &ops {
        if !(domain.is_empty() || domain == "ai.onnx") {
            problems.push(format!("{op}: domain {domain:?} has no CUDA kernels"));
            continue;
        }
        match CUDA_KERNELS.iter().find(|k| k.0 == op) {
            None => problems.push(format!("{op}: not on the list of CUDA kernels")),
            Some((_, first, last, _)) if !(*first..=*last).contains(&opset) => problems.push(
                format!("{op}: opset {opset}, but the CUDA kernel covers {first}..={last}"),
            ),
            Some(_) => {}
        }
    }
    problems
}

#[test]
fn every_shipped_model_uses_only_operators_the_cuda_provider_implements() {
    let models = shipped_models();
    assert_eq!(models.len(), 2, "{models:?}");
    for path in models {
        assert_eq!(
            not_on_cuda(&path),
            Vec::<String>::new(),
            "{}",
            path.display()
        );
    }
}

/// The check itself: the tree-ensemble model the fraud model is compiled from is refused.
#[test]
fn the_check_refuses_the_tree_ensemble_model() {
    let problems = not_on_cuda(std::path::Path::new("models/fraud_gbt_trees.onnx"));
    assert_eq!(
        problems,
        vec!["TreeEnsembleClassifier: domain \"ai.onnx.ml\" has no CUDA kernels".to_string()]
    );
}
