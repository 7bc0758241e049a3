"""Writes the tiny ONNX models the tests use (run with any Python that has `onnx`):

    python tests/models/make_models.py

sqrt.onnx: y = sqrt(x) for a [rows, 1] float input: NaN for a negative input, so a test can
make a model give non-finite scores for chosen records.

fraud_linear.onnx: a logistic regression over the shipped topology's 21 fraud features, with
`probabilities` [rows, 2] like fraud_gbt.onnx: a second version of the fraud model whose scores
differ clearly from the shipped one's, for the reload, canary and shadow tests.

log.onnx: y = log(x) for a [rows, 1] float input: -inf for a row of zeros (the warm-up row).
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = os.path.dirname(os.path.abspath(__file__))


def save(graph, version, file):
    """Writes `graph` as an opset-13 model with `version` metadata to tests/models/`file`."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="kscore tests/models/make_models.py")
    model.ir_version = 8
    model.metadata_props.add(key="version", value=version)
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(HERE, file))


x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 1])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 1])
graph = helper.make_graph([helper.make_node("Sqrt", ["x"], ["y"])], "sqrt", [x], [y])
save(graph, "sqrt-1", "sqrt.onnx")

# fraud_linear.onnx: weights per feature, in the shipped topology's fraud_gbt order.
WEIGHTS = [
    1e-5,  # amount
    0.5,   # online
    0.3,   # atm
    1.5,   # manual_entry
    0.8,   # magstripe
    2.0,   # abroad
    0.3,   # count_10m
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0,  # count_1h, count_24h, sum_1h, max_24h, mean_7d, std_7d
    0.2,   # amount_to_mean_7d
    0.0, 0.0, 0.0,  # merchants_1h, merchants_24h, countries_24h
    0.5,   # new_merchant_7d
    1.0,   # new_country_7d
    0.7,   # new_device_7d
    0.0,   # secs_since_last
]
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", len(WEIGHTS)])
probabilities = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["rows", 2])
w = helper.make_tensor("w", TensorProto.FLOAT, [len(WEIGHTS), 1],
                       np.array(WEIGHTS, dtype=np.float32).tolist())
b = helper.make_tensor("b", TensorProto.FLOAT, [1], [-4.0])
one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
graph = helper.make_graph(
    [
        helper.make_node("MatMul", ["x", "w"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p"]),
        helper.make_node("Sub", ["one", "p"], ["q"]),
        helper.make_node("Concat", ["q", "p"], ["probabilities"], axis=1),
    ],
    "fraud_linear", [x], [probabilities], initializer=[w, b, one])
save(graph, "linear-1", "fraud_linear.onnx")

# log.onnx: y = log(x) for a [rows, 1] float input: -inf for the warm-up row of zeros, so a test
# can show a model that fails its warm-up is refused.
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 1])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 1])
graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "log", [x], [y])
save(graph, "log-1", "log.onnx")
