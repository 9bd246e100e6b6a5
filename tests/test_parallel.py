"""Image-parallel inference (swinkit.parallel): same numbers as the serial paths, thread settings kept."""

from __future__ import annotations

import threading

import pytest
import torch

import swinkit
from swinkit import parallel
from swinkit.parallel import image_splits, worker_pool


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
    with torch.no_grad():
        for batch in (3, 2, 5, 1, 2):  # shares of 3, 2, 3, none, 2 images
            model(torch.randn(batch, 3, 64, 64))
    assert worker_pool() is pool
    # The pool's own threads (an earlier pool's may still be winding down, so not a global count).
    assert 1 <= len(pool._threads) <= 3


# -- training: each share's forward and backward in its own worker ---------------------------------


def _training_models(**options):
    split, _ = _models(**options)
    serial = swinkit.create_model("swin_test", **options)
    serial.load_state_dict(split.state_dict())
    serial.image_parallel = False
    return split.train(), serial.train()


def _gradients(model, x, weights, create_graph=False):
    """Parameter and image gradients of a weighted sum of the outputs (a list for a backbone)."""
    x = x.clone().requires_grad_(True)
    outputs = model(x)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    loss = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], create_graph=create_graph, allow_unused=True)
    return outputs, grads[0], dict(zip(names, grads[1:], strict=True))


@pytest.mark.parametrize("options", [{"num_classes": 5}, {"features_only": True, "out_indices": (1, 3)}])
def test_split_training_step_matches_the_serial_path(two_threads, options):
    split, serial = _training_models(drop_path_rate=0.0, **options)
    for model in (split, serial):
        model.patch_embed.requires_grad_(False)  # a frozen part gets no gradient either way
    x = torch.randn(3, 3, 70, 57)  # shares of 2 and 1 images; a padded size
    assert image_splits(split, x) == 2 and image_splits(serial, x) == 1
    with torch.no_grad():
        shapes = [o.shape for o in (split(x) if "features_only" in options else [split(x)])]
    weights = [torch.randn(s) for s in shapes]
    calls = []
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(threading.current_thread().name)
        return original(*args, **kwargs)

    torch.autograd.grad = counting
    try:
        outputs, image_grad, grads = _gradients(split, x, weights)
    finally:
        torch.autograd.grad = original
    assert sum(name.startswith("swinkit-images") for name in calls) == 2  # one backward per share, in workers
    expected_outputs, expected_image_grad, expected = _gradients(serial, x, weights)
    for a, b in zip(outputs, expected_outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image_grad, expected_image_grad, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected.keys() and not any(k.startswith("patch_embed") for k in grads)
    for name, grad in grads.items():
        # Relative to the tensor's scale: a weight gradient sums thousands of products (float32 rounding).
        error = (grad - expected[name]).abs().max() / expected[name].abs().max()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"


def test_split_training_adds_share_gradients_in_share_order_as_they_arrive():
    """The shares' gradients of a parameter are added in share order whatever order they arrive in
    (bit for bit), without writing to a gradient the engine handed over, and a share whose graph
    never reaches the parameter is left out; the engine keeps a stand-in with no storage of its own."""
    parameter = torch.zeros(64, requires_grad=True)
    shares = [torch.randn(64) * 10**i for i in range(4)]
    expected = ((shares[0] + shares[1]) + shares[2]) + shares[3]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        handed = [g.clone() for g in shares]
        sums = parallel._RunningSums([parameter])
        (take,) = [hook for hook in parameter._backward_hooks.values()]
        for share in order:
            parallel._local.share = share
            kept = take(handed[share])
            assert kept.shape == parameter.shape and kept.untyped_storage().nbytes() <= 4 and not kept.any()
        sums.remove_hooks()
        assert not parameter._backward_hooks
        (total,) = sums.totals()
        assert torch.equal(total, expected), order
        assert all(torch.equal(h, g) for h, g in zip(handed, shares, strict=True))  # none written to
    sums = parallel._RunningSums([parameter])
    for share in (2, 1):  # share 0 never reaches the parameter
        parallel._local.share = share
        sums._taker(0)(shares[share])
    sums.remove_hooks()
    assert torch.equal(sums.totals()[0], shares[1] + shares[2])


def test_split_training_with_parameter_hooks_stays_serial(two_threads):
    split, _ = _training_models(num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    assert image_splits(split, x) == 2
    handle = split.head.weight.register_hook(lambda grad: grad * 2)  # would see each share's gradient
    assert image_splits(split, x) == 1
    handle.remove()
    assert image_splits(split, x) == 2


def test_split_training_draws_stochastic_depth_per_share_reproducibly(two_threads):
    split, serial = _training_models(num_classes=5, drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    weights = [torch.randn(4, 5)]
    torch.manual_seed(3)
    first, _, first_grads = _gradients(split, x, weights)
    torch.manual_seed(3)
    again, _, again_grads = _gradients(split, x, weights)
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(first_grads[k], again_grads[k]) for k in first_grads)
    # Each share's masks come from a generator seeded from the caller's: rebuilt here share by share.
    torch.manual_seed(3)
    seeds = torch.randint(2**62, (2,)).tolist()
    expected = []
    for images, seed in zip(x.tensor_split(2), seeds, strict=True):
        parallel._local.generator = torch.Generator().manual_seed(seed)
        try:
            expected.append(serial(images))
        finally:
            parallel._local.generator = None
    torch.testing.assert_close(first[0], torch.cat(expected), rtol=1e-5, atol=1e-5)
    torch.manual_seed(4)
    other, _, _ = _gradients(split, x, weights)
    assert not torch.allclose(other[0], first[0])  # the masks are drawn, not fixed


def test_split_training_gives_second_order_gradients(two_threads):
    split, serial = _training_models(num_classes=3, drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    weights = [torch.randn(2, 3)]
    results = []
    for model in (split, serial):
        _, image_grad, _ = _gradients(model, x, weights, create_graph=True)
        penalty = image_grad.square().sum()
        results.append(torch.autograd.grad(penalty, model.head.weight))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_split_training_refuses_a_second_backward_by_name(two_threads):
    split, _ = _training_models(num_classes=3)
    loss = split(torch.randn(2, 3, 64, 64)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="image_parallel = False"):
        loss.backward()


def test_no_training_split_where_it_could_change_results_or_semantics(two_threads):
    split, _ = _training_models(num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    assert image_splits(split, x) == 2
    with torch.no_grad():
        assert image_splits(split, x) == 1  # training mode without autograd: dropout order
    assert image_splits(split.eval(), x) == 1  # autograd in eval mode: explanations look inside
    split.train()
    split.set_grad_checkpointing(True)
    assert image_splits(split, x) == 1
    split.set_grad_checkpointing(False)
    split.layers[0].blocks[0].mlp.drop.p = 0.1  # plain dropout draws from the global generator
    assert image_splits(split, x) == 1
    split.layers[0].blocks[0].mlp.drop.p = 0.0
    assert image_splits(split, x) == 2
    handle = split.layers[1].register_forward_hook(lambda *args: None)
    assert image_splits(split, x) == 1  # a hook would see shares, in worker threads
    with torch.no_grad():
        assert image_splits(split.eval(), x) == 1
    handle.remove()
    with torch.no_grad():
        assert image_splits(split, x) == 2


def test_workers_flush_subnormals_and_the_caller_keeps_its_mode(two_threads, monkeypatch):
    tiny = torch.full((4, 8), 1e-39)  # subnormal in float32
    with torch.no_grad():
        assert parallel.run_split(lambda t: t * 1.0, tiny, 2).eq(0).all()  # flushed in the workers
        assert (tiny * 1.0).ne(0).all()  # not in the caller's thread
        monkeypatch.setattr(parallel, "FLUSH_SUBNORMALS", False)
        assert parallel.run_split(lambda t: t * 1.0, tiny, 2).eq(tiny).all()


def test_split_training_adds_into_a_gradient_only_where_swinkit_made_it_alone():
    """Gradients marked by sole_gradient (swinkit's own backward made them for one parameter) take
    the sum in place, with the same bits as adding into fresh memory; unmarked ones are never written."""
    parameter = torch.zeros(64, requires_grad=True)
    shares = [torch.randn(64) * 10**i for i in range(4)]
    expected = ((shares[0] + shares[1]) + shares[2]) + shares[3]
    for sole in ([0], [1], [2], [0, 1, 2, 3]):
        for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2]):
            handed = [g.clone() for g in shares]
            parallel._local.share = 0  # as inside a share's backward
            for share in sole:
                parallel.sole_gradient(handed[share])
            sums = parallel._RunningSums([parameter])
            for share in order:
                parallel._local.share = share
                sums._taker(0)(handed[share])
            parallel._local.share = None
            sums.remove_hooks()
            (total,) = sums.totals()
            assert torch.equal(total, expected), (sole, order)
            if {0, 1} & set(sole):  # the first addition finds a marked gradient: summed into it
                assert any(total is handed[share] for share in sole)
            assert not hasattr(total, "_swinkit_sole")  # no mark left on what becomes .grad
            for share in set(range(4)) - set(sole):
                assert torch.equal(handed[share], shares[share])
    outside = parallel.sole_gradient(torch.ones(3))  # not in a share's backward: not marked
    assert not hasattr(outside, "_swinkit_sole")


def test_split_training_marks_the_linear_gradients_it_sums_in_place(two_threads, monkeypatch):
    """In a real split step the linear layers' weight and bias gradients arrive marked and are summed
    in place; the result is what fresh sums give, bit for bit."""
    split, _ = _training_models(num_classes=3, drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    original = parallel._is_sole
    results, marked = [], []
    for in_place in (True, False):
        seen = []
        monkeypatch.setattr(parallel, "_is_sole", lambda grad, seen=seen: seen.append(original(grad)) or seen[-1])
        monkeypatch.setattr(parallel, "ADD_IN_PLACE", in_place)
        _, _, grads = _gradients(split, x, [torch.ones(2, 3)])
        results.append(grads)
        marked.append(sum(seen))
    # The blocks' linear layers run through the fused path's own backward: weight and bias each.
    linears = sum(isinstance(m, torch.nn.Linear) for layer in split.layers for m in layer.blocks.modules())
    assert marked == [2 * linears, 0]
    for name, grad in results[0].items():
        assert torch.equal(grad, results[1][name]), name


class _LowRankUpdate(torch.nn.Module):
    """weight + A B, as a LoRA-style parametrization computes it (A starts nonzero here)."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(rows, 2) * 0.1)
        self.B = torch.nn.Parameter(torch.randn(2, cols) * 0.1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.A @ self.B


def test_split_training_keeps_gradients_a_parametrized_weight_shares(two_threads):
    """A weight computed from parameters (here original + A B) is not a gradient the fused path made
    for one parameter: autograd hands the same tensor to the original and to A B's product, so it
    must not be summed into. Split and serial gradients agree for all three."""
    from torch.nn.utils import parametrize

    split, serial = _training_models(num_classes=3, drop_path_rate=0.0)
    for model in (split, serial):
        torch.manual_seed(1)
        fc1 = model.layers[0].blocks[0].mlp.fc1
        parametrize.register_parametrization(fc1, "weight", _LowRankUpdate(*fc1.weight.shape))
    x = torch.randn(2, 3, 64, 64)
    _, _, grads = _gradients(split, x, [torch.ones(2, 3)])
    _, _, expected = _gradients(serial, x, [torch.ones(2, 3)])
    names = [n for n in grads if "parametrizations" in n]
    assert len(names) == 3  # original, A, B
    for name in names:
        error = (grads[name] - expected[name]).abs().max() / expected[name].abs().max()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"
