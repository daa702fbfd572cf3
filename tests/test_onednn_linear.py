"""The model's linear layers run their CPU inference products in oneDNN (:mod:`lib.modeling.onednn_linear`), and
everywhere else (training, autocast, export, small products) exactly as ``nn.Linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib.modeling import onednn_linear
from lib.modeling.onednn_linear import OneDnnLinear, linear, onednn_available

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


@pytest.fixture
def amd_rule(products_rule):
    """The products from 2M multiply-adds in oneDNN, as on AMD processors, whatever this machine's vendor."""
    products_rule("AuthenticAMD")


def ran_onednn(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(event.name == "mkldnn::_linear_pointwise" for event in prof.events())


def test_inference_products_run_in_onednn_and_equal_the_published_ones(amd_rule):
    """Inputs and weights of any strides (a transposed input, a batch expanded from one row, a weight stored
    input-major as the decoder stores its own): the same values as ``F.linear``, computed by oneDNN."""
    torch.manual_seed(0)
    layer = OneDnnLinear(256, 512)
    input_major = torch.randn(512, 256).t().contiguous().t()
    inputs = {
        "contiguous": torch.randn(2, 64, 256),
        "transposed": torch.randn(2, 256, 64).transpose(1, 2),
        "expanded": torch.randn(1, 64, 256).expand(3, -1, -1),
    }
    with torch.inference_mode():
        for name, x in inputs.items():
            assert ran_onednn(lambda x=x: layer(x)), name
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(linear(x, input_major), F.linear(x, input_major), atol=1e-4, rtol=1e-5)


def test_each_cpu_runs_a_click_s_products_where_they_are_faster_and_the_encoder_s_in_onednn(products_rule):
    """Where MKL runs AVX2 code (AMD) oneDNN takes a click's MLP and up-scaling products; where MKL runs AVX-512
    (Intel) it keeps every product of a click. The encoder's products run in oneDNN on both."""
    torch.manual_seed(0)
    click_products = {"MLP, 7 prompt tokens": (7, 256, 2048), "up-scaling, 256 image tokens": (256, 256, 256)}
    encoder_products = {"attention output, 256 image tokens": (256, 768, 768)}
    for vendor, click_in_onednn in (("AuthenticAMD", True), ("GenuineIntel", False)):
        products_rule(vendor)
        with torch.inference_mode():
            for products, in_onednn in ((click_products, click_in_onednn), (encoder_products, True)):
                for name, (rows, features_in, features_out) in products.items():
                    layer, x = OneDnnLinear(features_in, features_out), torch.randn(rows, features_in)
                    assert ran_onednn(lambda layer=layer, x=x: layer(x)) == in_onednn, (vendor, name)


def test_training_autocast_and_small_products_keep_the_published_computation():
    torch.manual_seed(0)
    layer = OneDnnLinear(256, 512)
    plain = torch.nn.Linear(256, 512)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(64, 256)
    # Gradients on (training): F.linear itself, gradient for gradient.
    assert not ran_onednn(lambda: layer(x).square().sum().backward())
    plain(x).square().sum().backward()
    assert torch.equal(layer.weight.grad, plain.weight.grad) and torch.equal(layer.bias.grad, plain.bias.grad)
    with torch.inference_mode():
        # bf16 autocast (the opt-in bf16 encoder) must still get its bf16 product.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        # A product below the threshold stays in MKL, which is faster there.
        few = torch.randn(onednn_linear.ONEDNN_MIN_MULTIPLY_ADDS // (256 * 512) - 1, 256)
        assert not ran_onednn(lambda: layer(few))
        assert torch.equal(layer(few), plain(few))


def test_a_trace_records_the_onednn_product_and_onnx_export_keeps_the_published_one(tmp_path, amd_rule):
    """The server's decoder graphs are traces (lib.serving.decoder_graphs): they must replay the oneDNN product; an
    ONNX export must hold the standard operator that ONNX Runtime runs."""
    torch.manual_seed(0)
    layer = OneDnnLinear(256, 512).requires_grad_(False)
    x = torch.randn(64, 256)
    with torch.inference_mode():
        traced = torch.jit.trace(layer, (x,))
        assert "mkldnn::_linear_pointwise" in str(traced.inlined_graph)
        assert torch.equal(traced(x), layer(x))
    with torch.no_grad():
        torch.onnx.export(layer, (x,), str(tmp_path / "linear.onnx"), dynamo=False)
    onnx = pytest.importorskip("onnx")
    operators = {node.op_type for node in onnx.load(str(tmp_path / "linear.onnx")).graph.node}
    assert operators & {"Gemm", "MatMul"} and not any("mkldnn" in op for op in operators)
