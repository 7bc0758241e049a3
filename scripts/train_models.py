#!/usr/bin/env python3
"""Trains the shipped models on simulated, labelled payments.

Features come from `kscore features` (the processor's own feature code), never recomputed
here, so training and serving cannot drift. Run through scripts/train.sh, which pins the
Python packages (models/requirements.txt) and produces the inputs.

Writes to models/:
  fraud_gbt_trees.onnx     the trained gradient-boosted trees as an ONNX TreeEnsembleClassifier
                           (ai.onnx.ml: CPU only), kept as the source of the compiled model and
                           to benchmark against
  fraud_gbt.onnx           the same trees compiled to a tensor graph (scripts/compile_trees.py;
                           runs on a GPU too): P(fraud) in output `probabilities`[:, 1]
  anomaly_ae.onnx          autoencoder, a pure tensor graph (runs on a GPU too): per-row mean
                           squared reconstruction error in output `reconstruction_error`
  report.json              held-out quality: PR-AUC and recall at 1% FPR, with and without the
                           rolling features; the compiled model against the trees on the
                           held-out set (largest score difference, decisions that differ)
  reference_scores.json    a fixed batch of feature rows and their scores from Python onnxruntime

Each model also carries, in its metadata under `kscore.reference`, the reference the processor
measures drift against: the mean of each input feature and, per score, decile bin edges and
the share of rows in each bin, all over the held-out set. `--reference-only` writes just that
into the existing models (their graphs, and so their versions, unchanged).
"""

import csv
import hashlib
import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import average_precision_score, roc_curve
from sklearn.neural_network import MLPRegressor

from compile_trees import compile_classifier

SEED = 7


def load(features_csv, labels_csv):
    with open(labels_csv) as f:
        labels = {r["event_id"]: int(r["is_fraud"]) for r in csv.DictReader(f)}
    with open(features_csv) as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    names = header[3:]
    ids = [r[0] for r in rows]
    times = np.array([int(r[2]) for r in rows], dtype=np.int64)
    x = np.array([[float(v) for v in r[3:]] for r in rows], dtype=np.float64)
    y = np.array([labels[i] for i in ids], dtype=np.int64)
    return ids, times, names, x, y


def columns(names, wanted):
    return [names.index(w) for w in wanted]


def recall_at_fpr(y, score, fpr_max=0.01):
    fpr, tpr, _ = roc_curve(y, score)
    return float(tpr[fpr <= fpr_max].max())


def quality(y, score):
    return {"pr_auc": round(float(average_precision_score(y, score)), 4),
            "recall_at_1pct_fpr": round(recall_at_fpr(y, score), 4)}


def stamp(model: onnx.ModelProto, name: str, doc: str) -> onnx.ModelProto:
    """Version = name + digest of the graph, so a retrained model gets a new version."""
    digest = hashlib.sha256(model.graph.SerializeToString()).hexdigest()[:12]
    model.doc_string = doc
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {"version": f"{name}-{digest}", "features": ""})
    return model


def reference(sess, rows, scores, source):
    """The drift reference: feature means, and per score decile edges with bin shares.

    A value v falls in bin searchsorted(edges, v, side="right"): the number of edges <= v,
    which is how the processor bins it too."""
    out = sess.run(None, {"features": rows.astype(np.float32)})
    by_name = {o.name: v for o, v in zip(sess.get_outputs(), out)}
    ref = {"source": source, "rows": int(len(rows)),
           "feature_means": [float(v) for v in rows.mean(axis=0)], "scores": []}
    for output, column in scores:
        v = by_name[output]
        v = v[:, column] if v.ndim == 2 else v
        edges = np.unique(np.quantile(v, np.linspace(0.1, 0.9, 9)))
        bins = np.searchsorted(edges, v, side="right")
        shares = np.bincount(bins, minlength=len(edges) + 1) / len(v)
        ref["scores"].append({"output": output, "column": column,
                              "edges": [float(e) for e in edges],
                              "proportions": [float(p) for p in shares]})
    return ref


def with_reference(path, rows, scores, source):
    """Writes the reference into the model's metadata, graph untouched."""
    model = onnx.load(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    props = {p.key: p.value for p in model.metadata_props}
    props["kscore.reference"] = json.dumps(reference(sess, rows, scores, source))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, path)


def train_gbt(x, y):
    clf = GradientBoostingClassifier(n_estimators=120, max_depth=3, learning_rate=0.1,
                                     subsample=0.8, random_state=SEED)
    clf.fit(x, y)
    return clf


def gbt_onnx(clf, n):
    model = convert_sklearn(clf, initial_types=[("features", FloatTensorType([None, n]))],
                            options={id(clf): {"zipmap": False}}, target_opset=17)
    return model


def autoencoder_onnx(mlp, mean, std, n):
    """sign(x)·log1p(|x|), standardise, the MLP, then the mean squared error per row."""
    init = [numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
            numpy_helper.from_array(mean.astype(np.float32), "mean"),
            numpy_helper.from_array(std.astype(np.float32), "std")]
    nodes = [helper.make_node("Abs", ["features"], ["abs"]),
             helper.make_node("Add", ["abs", "one"], ["abs1"]),
             helper.make_node("Log", ["abs1"], ["log1p"]),
             helper.make_node("Sign", ["features"], ["sign"]),
             helper.make_node("Mul", ["sign", "log1p"], ["slog"]),
             helper.make_node("Sub", ["slog", "mean"], ["centred"]),
             helper.make_node("Div", ["centred", "std"], ["z"])]
    h = "z"
    last = len(mlp.coefs_) - 1
    for i, (w, b) in enumerate(zip(mlp.coefs_, mlp.intercepts_)):
        init += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                 numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"mm{i}"]),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"a{i}"])]
        h = f"a{i}"
        if i < last:
            nodes.append(helper.make_node("Relu", [h], [f"r{i}"]))
            h = f"r{i}"
    nodes += [helper.make_node("Sub", ["z", h], ["diff"]),
              helper.make_node("Mul", ["diff", "diff"], ["sq"]),
              helper.make_node("ReduceMean", ["sq"], ["reconstruction_error"], axes=[1], keepdims=0)]
    graph = helper.make_graph(
        nodes, "anomaly_ae",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, n])],
        [helper.make_tensor_value_info("reconstruction_error", TensorProto.FLOAT, [None])],
        init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def compare_compiled(out, topology, rows, shape):
    """The compiled model against the tree ensemble on the held-out rows: the largest score
    difference, and how many rows get another decision at each of the topology's thresholds
    on the fraud score (and at 0.5). Any decision that differs stops the training."""
    def scores(name):
        sess = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        label, p = sess.run(["label", "probabilities"], {"features": rows.astype(np.float32)})
        return label, p[:, 1]
    (trees_label, trees), (compiled_label, compiled) = scores("fraud_gbt_trees.onnx"), scores("fraud_gbt.onnx")
    labels_differ = int(np.count_nonzero(trees_label != compiled_label))
    thresholds = sorted({0.5} | {a["threshold"] for a in topology["alert"] if a["score"] == "fraud_gbt.fraud"})
    # The processor compares a score, widened to f64, with the threshold: so does this.
    trees, compiled = trees.astype(np.float64), compiled.astype(np.float64)
    differ = {str(t): int(np.count_nonzero((trees >= t) != (compiled >= t))) for t in thresholds}
    if any(differ.values()) or labels_differ:
        raise SystemExit(f"the compiled fraud model decides differently from its trees: {differ}, "
                         f"{labels_differ} labels")
    return {**shape, "held_out_rows": int(len(rows)), "labels_that_differ": labels_differ,
            "max_abs_score_difference": float(np.abs(trees - compiled).max()),
            "decisions_that_differ_at_threshold": differ}


def slog(x):
    return np.sign(x) * np.log1p(np.abs(x))


def write_references(out, topology, names, x, test):
    source = f"held-out set: last 30% of event time, {len(test)} events"
    for m in topology["model"]:
        c = columns(names, m["features"])
        scores = [(sc["output"], sc.get("column", 0)) for sc in m["scores"]]
        with_reference(out / f"{m['name']}.onnx", x[test][:, c], scores, source)


def main():
    root = Path(__file__).resolve().parent.parent
    args = [a for a in sys.argv[1:] if a != "--reference-only"]
    data = Path(args[0]) if args else root / ".local" / "train"
    out = root / "models"
    topology = tomllib.loads((root / "topologies" / "fraud.toml").read_text())
    models = {m["name"]: m["features"] for m in topology["model"]}

    ids, times, names, x, y = load(data / "features.csv", data / "labels.csv")
    order = np.argsort(times, kind="stable")
    cut = int(len(order) * 0.7)
    train, test = order[:cut], order[cut:]
    if "--reference-only" in sys.argv:
        write_references(out, topology, names, x, test)
        return
    print(f"{len(y)} events, {y.sum()} fraud ({y.mean():.2%}); train {len(train)}, test {len(test)} (split by event time)")

    report = {"data": {"events": int(len(y)), "fraud": int(y.sum()), "train": int(len(train)), "test": int(len(test)),
                       "split": "first 70% of event time for training, last 30% held out"}}

    # Fraud classifier, with all features and with the event's own features only.
    cols = columns(names, models["fraud_gbt"])
    gbt = train_gbt(x[train][:, cols], y[train])
    trees_model = stamp(gbt_onnx(gbt, len(cols)), "fraud_gbt_trees",
                        "kscore fraud classifier: gradient-boosted trees (TreeEnsembleClassifier)")
    onnx.save(trees_model, out / "fraud_gbt_trees.onnx")
    compiled, shape = compile_classifier(trees_model, len(cols))
    onnx.save(stamp(compiled, "fraud_gbt", "kscore fraud classifier: gradient-boosted trees compiled "
                    "to a tensor graph (scripts/compile_trees.py)"), out / "fraud_gbt.onnx")
    own = ["amount", "online", "atm", "manual_entry", "magstripe", "abroad"]
    own_cols = columns(names, own)
    gbt_own = train_gbt(x[train][:, own_cols], y[train])
    report["fraud_gbt"] = {
        "with_rolling_features": quality(y[test], gbt.predict_proba(x[test][:, cols])[:, 1]),
        "event_features_only": quality(y[test], gbt_own.predict_proba(x[test][:, own_cols])[:, 1]),
        "compiled_against_trees": compare_compiled(out, topology, x[test][:, cols], shape),
    }

    # Autoencoder on legitimate training events; its error is the anomaly score.
    acols = columns(names, models["anomaly_ae"])
    legit = train[y[train] == 0]
    rng = np.random.default_rng(SEED)
    fit_rows = rng.choice(legit, size=min(len(legit), 60000), replace=False)
    s = slog(x[fit_rows][:, acols])
    mean, std = s.mean(axis=0), s.std(axis=0)
    std[std == 0] = 1.0
    mlp = MLPRegressor(hidden_layer_sizes=(16, 4, 16), activation="relu", max_iter=60, random_state=SEED)
    mlp.fit((s - mean) / std, (s - mean) / std)
    ae_model = stamp(autoencoder_onnx(mlp, mean, std, len(acols)), "anomaly_ae", "kscore anomaly detector: autoencoder")
    onnx.save(ae_model, out / "anomaly_ae.onnx")
    ae = ort.InferenceSession(str(out / "anomaly_ae.onnx"), providers=["CPUExecutionProvider"])
    err = ae.run(None, {"features": x[test][:, acols].astype(np.float32)})[0]
    legit_err = err[y[test] == 0]
    report["anomaly_ae"] = {
        "unsupervised": quality(y[test], err),
        "legit_error_p99": round(float(np.quantile(legit_err, 0.99)), 3),
        "legit_error_p999": round(float(np.quantile(legit_err, 0.999)), 3),
    }

    # Reference scores for a fixed batch, from Python onnxruntime.
    batch = test[:64]
    gbt_sess = ort.InferenceSession(str(out / "fraud_gbt.onnx"), providers=["CPUExecutionProvider"])
    ref = {"event_ids": [ids[i] for i in batch]}
    for name, sess, c, output, column in [("fraud_gbt", gbt_sess, cols, "probabilities", 1),
                                          ("anomaly_ae", ae, acols, "reconstruction_error", None)]:
        rows = x[batch][:, c].astype(np.float32)
        result = sess.run([output], {"features": rows})[0]
        scores = result[:, column] if column is not None else result
        ref[name] = {"features": [names[i] for i in c], "rows": rows.tolist(), "output": output,
                     "scores": [float(v) for v in scores]}
    write_references(out, topology, names, x, test)
    (out / "reference_scores.json").write_text(json.dumps(ref, indent=1) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
