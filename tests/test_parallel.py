"""Image-parallel inference (swinkit.parallel): same numbers as the serial paths, thread settings kept."""

from __future__ import annotations

import threading

import pytest
import torch

import swinkit
from swinkit.parallel import image_splits, worker_pool


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _models(**options):
    fused = swinkit.create_model("swin_test", **options).eval()
    reference = swinkit.create_model("swin_test", attn_impl="reference", **options).eval()
    with torch.no_grad():
        for parameter in fused.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    reference.load_state_dict(fused.state_dict())
    return fused, reference


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_split_batch_matches_the_serial_and_reference_paths(two_threads, mode):
    fused, reference = _models(num_classes=5)
    x = torch.randn(3, 3, 70, 57)  # odd batch: shares of 2 and 1 images; a padded size
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with context():
        assert image_splits(fused, x) == 2
        split = fused(x)
        serial = fused._forward(x)
        expected = reference(x)
    assert split.shape == (3, 5) and split.is_inference() == (mode == "inference_mode")
    torch.testing.assert_close(split, serial, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split, expected, rtol=1e-5, atol=1e-5)


def test_split_batch_under_autocast_runs_every_worker_in_bfloat16(two_threads):
    fused, reference = _models(num_classes=5)
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert image_splits(fused, x) == 2  # autocast is per thread: the workers take the caller's
        split = fused(x)
        serial = fused._forward(x)
    with torch.inference_mode():
        plain = reference(x)
    assert split.dtype == serial.dtype == torch.bfloat16
    torch.testing.assert_close(split, serial, rtol=1e-2, atol=1e-2)
    assert not torch.equal(split.float(), plain)
    torch.testing.assert_close(split.float(), plain, rtol=0.05, atol=0.05)


def test_split_backbone_returns_every_map(two_threads):
    fused, reference = _models(features_only=True, out_indices=(1, 3))
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        split, expected = fused(x), reference(x)
    assert isinstance(split, list) and [m.shape[0] for m in split] == [4, 4]
    for a, b in zip(split, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_split_where_it_could_change_results_or_semantics(two_threads):
    fused, reference = _models()
    x = torch.randn(2, 3, 64, 64)
    assert image_splits(fused, x) == 1  # autograd on
    with torch.no_grad():
        assert image_splits(fused, x) == 2
        assert image_splits(reference, x) == 1  # whole-batch tensors: PyTorch's own threads
        assert image_splits(fused, x[:1]) == 1
        assert image_splits(fused.train(), x) == 1  # dropout's random numbers would reorder
        fused.eval()
        fused.image_parallel = False  # the caller's switch
        assert image_splits(fused, x) == 1
        fused.image_parallel = True
        torch.set_num_threads(1)
        assert image_splits(fused, x) == 1


def test_workers_use_one_thread_and_leave_the_callers_count(two_threads):
    workers = worker_pool()
    assert workers.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == 2
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [2]  # a new thread takes the process-wide count, not the workers' one


def test_one_pool_serves_every_share_count(two_threads):
    model = swinkit.create_model("swin_test", num_classes=4).eval()
    torch.set_num_threads(3)  # the fixture restores the count
    pool = worker_pool()

    def pool_threads():
        return sum(thread.name.startswith("swinkit-images") for thread in threading.enumerate())

    before = pool_threads()
    with torch.no_grad():
        for batch in (3, 2, 5, 1, 2):  # shares of 3, 2, 3, none, 2 images
            model(torch.randn(batch, 3, 64, 64))
    assert worker_pool() is pool
    assert pool_threads() == before
