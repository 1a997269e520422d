"""The captured MAE training step: graph-safe masking, and replay equal to eager steps (CUDA only)."""

from __future__ import annotations

import copy

import pytest
import torch

from hiera_perception.config import get_config
from hiera_perception.cuda_graph import WARMUP, CudaGraphStep
from hiera_perception.mae import HieraMAE
from hiera_perception.model import Hiera

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_kept_units_are_the_true_positions_in_order():
    keep = torch.tensor([[False, True, True, False, True], [True, False, False, True, True]])
    assert Hiera.kept_units(keep, 3).tolist() == [[1, 2, 4], [0, 3, 4]]
    assert Hiera.kept_units(~keep, 2).tolist() == [[0, 3], [1, 2]]


def test_counted_and_given_keep_counts_give_the_same_step():
    cfg = get_config("hiera_tiny_8x64")
    torch.manual_seed(0)
    mae = HieraMAE(cfg)
    x = torch.randn(2, 3, *cfg.input_size)
    keep = mae.encoder.random_keep(2, 0.75, generator=torch.Generator().manual_seed(1))
    a, b = mae.forward_keep(x, keep), mae.forward_keep(x, keep, mae.encoder.units_kept(0.75))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.pred, b.pred) and torch.equal(a.label, b.label)
    assert a.pred.shape == (2 * 12 * 4, 16 * 16 * 3)  # 12 dropped units of 4 final tokens a sample, 16 px patches


def test_capture_refuses_cpu_tensors_and_an_uncapturable_optimizer():
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        CudaGraphStep(lambda x: (w * x).sum(), torch.optim.AdamW([w]), torch.ones(3))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="capturable=True"):
            CudaGraphStep(lambda x: (w * x).sum(), torch.optim.AdamW([w]), torch.ones(3, device="cuda"))


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_captured_mae_step_trains_like_eager_steps(precision):
    cfg = get_config("hiera_tiny_8x64")
    torch.manual_seed(0)
    eager = HieraMAE(cfg).cuda().train()
    graphed = copy.deepcopy(eager)
    n_keep = eager.encoder.units_kept(0.75)
    g = torch.Generator(device="cuda").manual_seed(2)
    batches = [(torch.randn(2, 3, *cfg.input_size, device="cuda", generator=g),
                eager.encoder.random_keep(2, 0.75, device="cuda", generator=g)) for _ in range(4)]

    def loss_of(model):
        def f(x, keep):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False):
                return model.forward_keep(x, keep, n_keep).loss
        return f

    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3, capturable=True)
    opt_g = torch.optim.AdamW(graphed.parameters(), lr=1e-3, capturable=True)
    # the graph's warm-up: WARMUP eager steps on the first batch, which the eager twin takes too
    step = CudaGraphStep(loss_of(graphed), opt_g, *batches[0], grad_clip=1.0)
    f = loss_of(eager)
    for i, (x, keep) in enumerate([batches[0]] * WARMUP + batches[1:]):
        loss = f(x, keep)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(eager.parameters()), 1.0)
        opt_e.step()
        opt_e.zero_grad(set_to_none=True)
        if i >= WARMUP:  # the steps after the warm-up: the twin's replays
            replayed = step(x, keep)
            tol = 1e-5 if precision == "fp32" else 2e-2
            torch.testing.assert_close(replayed, loss.detach(), rtol=tol, atol=tol)
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4 if precision == "fp32" else 2e-2, atol=1e-5 if precision == "fp32"
                                   else 2e-3, msg=name)
