"""Writes the tiny ONNX models the tests use (run with any Python that has `onnx`):

    python tests/models/make_models.py

sqrt.onnx: y = sqrt(x) for a [rows, 1] float input: NaN for a negative input, so a test can
make a model give non-finite scores for chosen records.
"""
import os

import onnx
from onnx import TensorProto, helper

HERE = os.path.dirname(os.path.abspath(__file__))

x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 1])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 1])
graph = helper.make_graph([helper.make_node("Sqrt", ["x"], ["y"])], "sqrt", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                          producer_name="kscore tests/models/make_models.py")
model.ir_version = 8
model.metadata_props.add(key="version", value="sqrt-1")
onnx.checker.check_model(model)
onnx.save(model, os.path.join(HERE, "sqrt.onnx"))
