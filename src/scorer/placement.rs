//! Which execution provider runs each node of a model, as ONNX Runtime placed them: the model
//! is opened as the processor opens it (same optimisation level, same provider), one batch is
//! scored with the runtime's profiler on, and the profile's node events name each node's
//! provider. `kscore check-runtime --topology` prints it; a node of a `cuda` model that runs
//! on the CPU is reported, since it costs two copies per batch and CPU time.

use std::path::Path;

use ort::value::Tensor;

use super::session::{ScorerError, ScoringSession};
use crate::topology::Loaded;
use crate::topology::config::{ExecutionProvider, Model};

/// One node of the optimised graph and where it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The node's name in the optimised graph.
    pub node: String,
    /// Its operator.
    pub op: String,
    /// The execution provider that ran it (`CPUExecutionProvider`, `CUDAExecutionProvider`).
    pub provider: String,
}

/// The placement of every node of `model` that ran for one batch of `rows` zero rows.
pub fn placement(model: &Model, path: &Path, rows: usize) -> Result<Vec<Placement>, ScorerError> {
    let err = |reason: String| ScorerError::Run {
        model: model.name.clone(),
        reason,
    };
    let prefix = std::env::temp_dir().join(format!(
        "kscore-placement-{}-{}",
        model.name,
        std::process::id()
    ));
    let mut session = ScoringSession::load_profiled(model, path, Some(&prefix))?;
    let input = session
        .inputs()
        .first()
        .map(|i| i.name().to_string())
        .ok_or_else(|| err("the model has no input".into()))?;
    let batch = Tensor::<f32>::from_array((
        [rows, model.features.len()],
        vec![0.0f32; rows * model.features.len()],
    ))
    .map_err(|e| err(e.to_string()))?;
    session
        .run(ort::inputs![input.as_str() => batch])
        .map_err(|e| err(e.to_string()))?;
    let file = session.end_profiling().map_err(|e| err(e.to_string()))?;
    let profile = std::fs::read_to_string(&file).map_err(|e| err(format!("{file}: {e}")));
    let _ = std::fs::remove_file(&file);
    parse(&profile?).map_err(|e| err(format!("{file}: {e}")))
}

/// Every model of a topology, opened with its own provider or with `provider` instead: one
/// line per model and per node, and whether every node of a model asked to run on CUDA does.
pub fn report(
    loaded: &Loaded,
    provider: Option<ExecutionProvider>,
) -> Result<(Vec<String>, bool), ScorerError> {
    let mut lines = Vec::new();
    let mut all_where_asked = true;
    for (model, path) in loaded.topology.models.iter().zip(&loaded.model_paths) {
        let mut model = model.clone();
        if let Some(p) = provider {
            model.execution_provider = p;
        }
        let nodes = placement(&model, path, model.batching.max_rows.clamp(1, 512))?;
        let cuda = model.execution_provider == ExecutionProvider::Cuda;
        let on_cpu = nodes
            .iter()
            .filter(|n| n.provider == "CPUExecutionProvider")
            .count();
        lines.push(format!(
            "model {} ({}), execution_provider {}: {} nodes, {} on CUDAExecutionProvider, {on_cpu} on CPUExecutionProvider",
            model.name,
            path.display(),
            model.execution_provider.name(),
            nodes.len(),
            nodes.len() - on_cpu,
        ));
        for n in &nodes {
            lines.push(format!("  {:<22} {:<16} {}", n.provider, n.op, n.node));
        }
        if cuda && on_cpu > 0 {
            all_where_asked = false;
            lines.push(format!(
                "  model {}: {on_cpu} node(s) run on the CPU although it asks for cuda",
                model.name
            ));
        }
    }
    Ok((lines, all_where_asked))
}

/// The node events of an ONNX Runtime profile (a JSON array of trace events; a node's kernel
/// event is `{"cat": "Node", "name": "<node>_kernel_time", "args": {"op_name", "provider"}}`),
/// one per node, in the order they first ran.
pub fn parse(profile: &str) -> Result<Vec<Placement>, String> {
    let events: Vec<serde_json::Value> =
        serde_json::from_str(profile).map_err(|e| format!("not a profile: {e}"))?;
    let mut nodes: Vec<Placement> = Vec::new();
    for e in &events {
        let (Some("Node"), Some(name)) = (e["cat"].as_str(), e["name"].as_str()) else {
            continue;
        };
        let Some(node) = name.strip_suffix("_kernel_time") else {
            continue;
        };
        if nodes.iter().any(|n| n.node == node) {
            continue;
        }
        nodes.push(Placement {
            node: node.to_string(),
            op: e["args"]["op_name"].as_str().unwrap_or("?").to_string(),
            provider: e["args"]["provider"].as_str().unwrap_or("?").to_string(),
        });
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_gives_each_node_once_with_its_provider() {
        let profile = r#"[
          {"cat": "Session", "name": "model_run", "args": {}},
          {"cat": "Node", "name": "Gather_1_fence_before", "args": {"op_name": "Gather"}},
          {"cat": "Node", "name": "Gather_1_kernel_time", "args": {"op_name": "Gather", "provider": "CUDAExecutionProvider"}},
          {"cat": "Node", "name": "Memcpy_kernel_time", "args": {"op_name": "MemcpyFromHost", "provider": "CUDAExecutionProvider"}},
          {"cat": "Node", "name": "Gather_1_kernel_time", "args": {"op_name": "Gather", "provider": "CUDAExecutionProvider"}},
          {"cat": "Node", "name": "Sigmoid_9_kernel_time", "args": {"op_name": "Sigmoid", "provider": "CPUExecutionProvider"}}
        ]"#;
        let p = |node: &str, op: &str, provider: &str| Placement {
            node: node.into(),
            op: op.into(),
            provider: provider.into(),
        };
        assert_eq!(
            parse(profile).unwrap(),
            vec![
                p("Gather_1", "Gather", "CUDAExecutionProvider"),
                p("Memcpy", "MemcpyFromHost", "CUDAExecutionProvider"),
                p("Sigmoid_9", "Sigmoid", "CPUExecutionProvider"),
            ]
        );
        assert!(parse("not json").is_err());
    }
}
