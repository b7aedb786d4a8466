"""Export for inference: the routed module exports to ONNX and runs in onnxruntime, dense
(eval) and with routing forced on (the branches of sparse guidance)."""

import onnxruntime as ort
import torch

import tread_fx
from conftest import dit_inputs, tiny_dit


def _run(program, inputs):
    sess = ort.InferenceSession(program.model_proto.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, [v.numpy() for v in inputs])))[0]


def test_eval_export_matches_torch_and_routed_export_runs():
    model = tiny_dit(depth=4, class_dropout_prob=0.0).eval()
    routed = tread_fx.route(model, "1:2@0.5").eval()
    inputs = dit_inputs()
    dense = torch.onnx.export(routed, inputs, dynamo=True, verbose=False)
    with torch.no_grad():
        expected = model(*inputs).numpy()
    assert abs(_run(dense, inputs) - expected).max() < 1e-5
    ops = {n.op_type for n in dense.model_proto.graph.node}
    assert not ops & {"RandomUniformLike", "TopK", "ScatterElements"}  # eval is dense
    with tread_fx.routing(routed, 0.5):
        sparse = torch.onnx.export(routed, inputs, dynamo=True, verbose=False)
    ops = {n.op_type for n in sparse.model_proto.graph.node}
    assert {"RandomUniformLike", "TopK", "GatherElements", "ScatterElements"} <= ops
    out = _run(sparse, inputs)
    assert out.shape == expected.shape and abs(out - expected).max() > 1e-4  # it routed
