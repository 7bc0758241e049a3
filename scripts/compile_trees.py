"""Compiles a binary tree-ensemble classifier into a tensor graph of standard ONNX operators.

ONNX Runtime's CUDA provider has no kernel for the `ai.onnx.ml` tree operators, and on a CPU
its TreeEnsemble walks every tree node by node. This rewrites the ensemble as a few whole-batch
tensor operations that both providers run well:

  1. every distinct (feature, threshold) test of the ensemble is evaluated for every row at
     once: Gather the tested feature columns, LessOrEqual their thresholds (the ensemble's
     `BRANCH_LEQ`: true goes to the left child), Cast to uint8;
  2. each tree is padded to a perfect tree of the ensemble's depth (a leaf above the last
     level repeats its value below it, so padding never changes a result) and its node slots
     are numbered heap-fashion; gathering each slot's test result and adding them up as the
     bits of an integer gives every (tree, row) a code of 2^(2^depth - 1) values;
  3. a table per tree maps each code to the value of the leaf the row reaches (the bits off
     its path do not matter): GatherElements;
  4. the trees' values are summed (a MatMul with ones), the base value added and the logistic
     taken, as the ensemble's `post_transform = LOGISTIC` does; `label` is 1 where that
     probability is over 0.5, as the tree model's `label` output.

Every threshold is the ensemble's own float32 value and every comparison is the ensemble's, so
each row takes the same path through every tree; only the float32 order of summing the trees
differs. The graph works on rows as columns ([features, rows]), so a Gather copies whole
contiguous rows.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _attributes(model):
    nodes = [n for n in model.graph.node if n.op_type == "TreeEnsembleClassifier"]
    if len(nodes) != 1:
        raise ValueError(f"expected one TreeEnsembleClassifier, found {len(nodes)}")
    return {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}


def perfect_trees(model):
    """(features [T, S], thresholds [T, S], leaves [T, 2^depth], base, depth) of the ensemble,
    each tree padded to a perfect tree; S = 2^depth - 1 node slots in heap order (slot s has
    children 2s+1, left, and 2s+2)."""
    a = _attributes(model)
    if a.get("post_transform") != b"LOGISTIC" or list(a.get("classlabels_int64s", [])) != [0, 1]:
        raise ValueError("only binary classifiers with a logistic post-transform are compiled")
    if any(a.get("nodes_missing_value_tracks_true", [])):
        raise ValueError("missing-value tracking is not compiled")
    index = {(t, n): i for i, (t, n) in enumerate(zip(a["nodes_treeids"], a["nodes_nodeids"]))}
    weight = {}
    for t, n, c, w in zip(a["class_treeids"], a["class_nodeids"], a["class_ids"], a["class_weights"]):
        if c != 0:
            raise ValueError("a binary classifier's weights are for class id 0")
        weight[(t, n)] = weight.get((t, n), 0.0) + w
    trees = sorted(set(a["nodes_treeids"]))
    if trees != list(range(len(trees))):
        raise ValueError("tree ids are not 0..T-1")

    def depth_of(t, n):
        i = index[(t, n)]
        if a["nodes_modes"][i] == b"LEAF":
            return 0
        return 1 + max(depth_of(t, a["nodes_truenodeids"][i]), depth_of(t, a["nodes_falsenodeids"][i]))

    depth = max(depth_of(t, 0) for t in trees)
    slots, leaves = 2 ** depth - 1, 2 ** depth
    feat = np.zeros((len(trees), slots), np.int64)
    thr = np.zeros((len(trees), slots), np.float32)
    leaf = np.zeros((len(trees), leaves), np.float32)

    def walk(t, n, slot, d):
        i = index[(t, n)]
        mode = a["nodes_modes"][i]
        if mode == b"LEAF":
            first = (slot - (2 ** d - 1)) * 2 ** (depth - d)
            leaf[t, first:first + 2 ** (depth - d)] = weight.get((t, n), 0.0)
            return
        if mode != b"BRANCH_LEQ":
            raise ValueError(f"tree {t} node {n}: mode {mode!r} is not compiled")
        feat[t, slot] = a["nodes_featureids"][i]
        thr[t, slot] = a["nodes_values"][i]
        walk(t, a["nodes_truenodeids"][i], 2 * slot + 1, d + 1)
        walk(t, a["nodes_falsenodeids"][i], 2 * slot + 2, d + 1)

    for t in trees:
        walk(t, 0, 0, 0)
    # Slots under a padded leaf test feature 0 against 0: their bits are off every path.
    return feat, thr, leaf, np.float32(a["base_values"][0]), depth


def leaf_table(leaf, depth):
    """[T, 2^slots]: the value of the leaf that each code reaches (bit s of a code is slot s's
    test, 1 = went left)."""
    slots = 2 ** depth - 1
    table = np.zeros((leaf.shape[0], 2 ** slots), np.float32)
    for code in range(2 ** slots):
        slot = 0
        for _ in range(depth):
            left = (code >> slot) & 1
            slot = 2 * slot + (1 if left else 2)
        table[:, code] = leaf[:, slot - slots]
    return table


def compile_classifier(model, width):
    """The tensor-graph model: input `features` [rows, width] float, outputs `label` [rows]
    int64 and `probabilities` [rows, 2] float (column 1 the positive class), as the tree
    model's."""
    feat, thr, leaf, base, depth = perfect_trees(model)
    trees, slots = feat.shape
    if slots > 7:
        raise ValueError(f"depth {depth}: codes of {slots} bits do not fit a uint8")
    tests = sorted(set(zip(feat.reshape(-1).tolist(), thr.reshape(-1).tolist())))
    position = {test: k for k, test in enumerate(tests)}
    init = [
        numpy_helper.from_array(np.array([f for f, _ in tests], np.int64), "test_feature"),
        numpy_helper.from_array(np.array([t for _, t in tests], np.float32).reshape(-1, 1), "test_threshold"),
        numpy_helper.from_array(leaf_table(leaf, depth), "leaf_table"),
        numpy_helper.from_array(np.ones((1, trees), np.float32), "ones"),
        numpy_helper.from_array(np.array([base], np.float32), "base"),
        numpy_helper.from_array(np.array([1.0], np.float32), "one"),
        numpy_helper.from_array(np.array([0.5], np.float32), "half"),
    ]
    nodes = [
        helper.make_node("Transpose", ["features"], ["columns"], perm=[1, 0]),
        helper.make_node("Gather", ["columns", "test_feature"], ["tested"], axis=0),
        helper.make_node("LessOrEqual", ["tested", "test_threshold"], ["went_left"]),
        helper.make_node("Cast", ["went_left"], ["test_bit"], to=TensorProto.UINT8),
    ]
    for s in range(slots):
        where = [position[(int(f), float(t))] for f, t in zip(feat[:, s], thr[:, s])]
        init.append(numpy_helper.from_array(np.array(where, np.int64), f"slot{s}_test"))
        nodes.append(helper.make_node("Gather", ["test_bit", f"slot{s}_test"], [f"slot{s}_bit"], axis=0))
    # code = sum of bit_s * 2^s, by Horner's rule in uint8 (code < 2^7).
    code = f"slot{slots - 1}_bit"
    for s in range(slots - 2, -1, -1):
        nodes += [helper.make_node("Add", [code, code], [f"code{s}_doubled"]),
                  helper.make_node("Add", [f"code{s}_doubled", f"slot{s}_bit"], [f"code{s}"])]
        code = f"code{s}"
    nodes += [
        helper.make_node("Cast", [code], ["leaf_code"], to=TensorProto.INT32),
        helper.make_node("GatherElements", ["leaf_table", "leaf_code"], ["tree_value"], axis=1),
        helper.make_node("MatMul", ["ones", "tree_value"], ["sum_columns"]),
        helper.make_node("Transpose", ["sum_columns"], ["sum"], perm=[1, 0]),
        helper.make_node("Add", ["sum", "base"], ["margin"]),
        helper.make_node("Sigmoid", ["margin"], ["positive"]),
        helper.make_node("Sub", ["one", "positive"], ["negative"]),
        helper.make_node("Concat", ["negative", "positive"], ["probabilities"], axis=1),
        helper.make_node("Greater", ["positive", "half"], ["is_positive"]),
        helper.make_node("Cast", ["is_positive"], ["label_column"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["label_column", "rows"], ["label"]),
    ]
    init.append(numpy_helper.from_array(np.array([-1], np.int64), "rows"))
    graph = helper.make_graph(
        nodes, "fraud_gbt_compiled",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        init)
    # Opset 17: Add on uint8 needs 14 or later.
    compiled = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    compiled.ir_version = 8
    onnx.checker.check_model(compiled)
    return compiled, {"trees": int(trees), "depth": int(depth), "distinct_tests": len(tests),
                      "node_slots": int(trees * slots)}
