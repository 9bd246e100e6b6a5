"""On a CUDA GPU: every attn_impl against the reference path, float32 and bfloat16 (skipped without one)."""

from __future__ import annotations

import pytest
import torch

import swinkit
from helpers import (
    TINY_DETECTOR,
    assert_bfloat16_as_close_as_the_reference,
    assert_tables_cached_under_inference_mode_serve_training,
    outputs_and_gradients,
    perturb,
    relative_error,
)
from swinkit.attention import ATTENTION_IMPLS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
IMPLS = [impl for impl in ATTENTION_IMPLS if impl != "reference"]
SHAPES = [(2, 3, 64, 64), (3, 3, 33, 71)]  # whole windows; padding in every stage


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("always_shift", [False, True])  # True: the dense backbones' window rule
def test_float32_outputs_and_gradients_match_reference(impl, variant, shape, always_shift):
    model = swinkit.create_model(variant, num_classes=4, always_shift=always_shift)
    model = perturb(model, scale=0.05).cuda().train()
    x = torch.randn(shape, device="cuda")
    expected, expected_input_grad, expected_grads = outputs_and_gradients(model, "reference", x)
    out, input_grad, grads = outputs_and_gradients(model, impl, x)
    assert relative_error(out, expected) < 1e-5
    assert relative_error(input_grad, expected_input_grad) < 1e-5
    for name, grad in grads.items():
        assert relative_error(grad, expected_grads[name]) < 1e-4, name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
def test_bfloat16_is_as_close_to_float32_as_the_reference_path(impl, variant):
    model = perturb(swinkit.create_model(variant, num_classes=4), scale=0.05).cuda().train()
    assert_bfloat16_as_close_as_the_reference(model, impl, torch.randn(SHAPES[1], device="cuda"))


@pytest.mark.parametrize("impl", IMPLS)
def test_eval_is_deterministic_and_matches_reference(impl):
    model = perturb(swinkit.create_model("swin_test", num_classes=4, attn_drop_rate=0.5), scale=0.05).cuda().eval()
    x = torch.randn(SHAPES[1], device="cuda")
    with torch.no_grad():
        model.set_attn_impl("reference")
        expected = model(x)
        model.set_attn_impl(impl)
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    assert relative_error(first, expected) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["swin_test", "swinv2_test"])
def test_bfloat16_inference_keeps_the_reference_dtype(impl, variant):
    # The fused path once crashed here: under CUDA autocast the residual stream is float32.
    model = perturb(swinkit.create_model(variant, num_classes=4), scale=0.05).cuda().eval()
    x = torch.randn(SHAPES[1], device="cuda")
    with torch.inference_mode():
        model.set_attn_impl("reference")
        expected = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            baseline = model(x)
            model.set_attn_impl(impl)
            out = model(x)
    assert out.dtype == baseline.dtype
    assert relative_error(out.float(), expected) < 3e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_inference_first_then_training_on_the_same_shapes(impl):
    # `swinkit bench` order: tables cached under inference mode must serve a training step.
    model = perturb(swinkit.create_model("swin_test", num_classes=4), scale=0.05).cuda()
    assert_tables_cached_under_inference_mode_serve_training(model, impl, torch.randn(2, 3, 36, 44, device="cuda"))


def test_a_pt2_program_predicts_on_the_gpu_as_on_the_cpu(tmp_path):
    from swinkit.export import ProgramClassifier, save_program

    model = perturb(swinkit.create_model("swin_test", num_classes=3), scale=0.05).eval()
    path = tmp_path / "model.pt2"
    save_program(model, path)  # size-generic, traced on the CPU
    on_cpu, on_gpu = ProgramClassifier(path), ProgramClassifier(path, "cuda")
    for shape in SHAPES:
        x = torch.randn(shape)
        with torch.no_grad():
            expected, got = on_cpu(x), on_gpu(x.cuda())
        assert got.device.type == "cuda"
        assert relative_error(got.cpu(), expected) < 1e-5


def test_masks_pasted_on_the_gpu_equal_the_cpu():
    from swinkit.dense.mmdet import paste_masks

    masks = torch.rand(3, 1, 28, 28)
    boxes = torch.tensor([[10.3, 5.7, 80.2, 60.1], [-5.0, 30.0, 140.0, 99.0], [50.5, 50.5, 51.0, 52.0]])
    on_gpu = paste_masks(masks.cuda(), boxes.cuda(), (90, 120)).cpu()
    torch.testing.assert_close(on_gpu, paste_masks(masks, boxes, (90, 120)), rtol=0, atol=1e-5)


def test_multi_scale_flip_detection_on_the_gpu_equals_the_cpu():
    from swinkit.dense import augmented_views, create_detector, detect_augmented

    options = dict(TINY_DETECTOR, score_threshold=0.0, cascade=True)
    torch.manual_seed(0)
    model = create_detector("swin_test", 3, detector_options=options).double().eval()
    image = torch.rand(3, 50, 70, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    views = augmented_views(model, [0.75, 1.25], flip=True)
    expected = detect_augmented(model, image, views)
    found = {k: v.cpu() for k, v in detect_augmented(model.cuda(), image.cuda(), views).items()}
    assert torch.equal(found["labels"], expected["labels"])
    for name in ("boxes", "scores", "masks"):
        torch.testing.assert_close(found[name], expected[name], rtol=1e-7, atol=1e-7, msg=name)
