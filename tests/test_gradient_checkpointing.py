"""Gradient checkpointing (``[train] gradient_checkpointing``): the UNet's blocks and the text encoder's layers are
recomputed in the backward pass; the gradients and a short training run equal those without it (fp32 tolerance:
the recomputation runs the same ops on the same inputs, but autograd may sum a gradient in another order)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from sumie.checkpoints.io import save_safetensors_atomic
from sumie.checkpoints.loader import load_models
from sumie.checkpoints.save import random_single_file
from sumie.cli.main import main
from sumie.configs import TINY
from sumie.models.clip import CLIPTextModel
from sumie.models.unet import UNetModel
from tests.test_training import write_shapes


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)


def test_unet_gradients_equal_with_checkpointing() -> None:
    cfg = TINY["sd1"].unet
    plain = UNetModel(cfg).train()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing = True
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g)
    runs = []
    for model in (plain, ckpt):
        calls: list[int] = []
        handle = model.middle_block[0].register_forward_hook(lambda *a, calls=calls: calls.append(1))
        out = model(x, t, ctx)
        (out.square().mean()).backward()
        handle.remove()
        runs.append((out.detach(), _grads(model), len(calls)))
    assert torch.equal(runs[0][0], runs[1][0])  # the forward pass is the same computation
    _assert_same_grads(runs[0][1], runs[1][1])
    assert (runs[0][2], runs[1][2]) == (1, 2)  # checkpointed: the middle ResBlock ran again in the backward pass
    with torch.no_grad():  # sampling (no autograd) takes the plain path
        calls = []
        handle = ckpt.middle_block[0].register_forward_hook(lambda *a: calls.append(1))
        assert torch.equal(ckpt(x, t, ctx), runs[0][0])
        handle.remove()
    assert calls == [1]


def test_text_encoder_gradients_equal_with_checkpointing() -> None:
    plain = CLIPTextModel(TINY["sd1"].text_encoders[0]).train()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing = True
    tokens = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(1))
    results, counts = [], []
    for model in (plain, ckpt):
        calls: list[int] = []
        handle = model.text_model.encoder.layers[0].mlp.register_forward_pre_hook(lambda *a, c=calls: c.append(1))
        hidden, pooled = model(tokens)
        (hidden.square().mean() + pooled.sum()).backward()  # type: ignore[union-attr]
        handle.remove()
        results.append(_grads(model))
        counts.append(len(calls))
    _assert_same_grads(results[0], results[1])
    assert counts == [1, 2]


def test_training_run_with_checkpointing_equals_the_plain_run(tmp_path: Path) -> None:
    """``sumie train`` fine-tuning the UNet and the text encoder for 3 steps, with and without the option."""
    base = tmp_path / "tiny_sd1.safetensors"
    save_safetensors_atomic(random_single_file(TINY["sd1"]), base)
    shapes = write_shapes(tmp_path / "shapes", 8, size=32)
    weights = []
    for flag in ("false", "true"):
        cfg = tmp_path / f"gc_{flag}.toml"
        cfg.write_text(f'[model]\ninit_from = "{base}"\n[data]\nfolder = "{shapes}"\nresolution = 32\n'
                       f'[train]\nsteps = 3\nbatch_size = 2\nlr = 1e-4\ntrain_text_encoder = true\n'
                       f'gradient_checkpointing = {flag}\n[output]\ndir = "run_{flag}"\nsample_every = 0\n')
        assert main(["train", str(cfg)]) == 0
        m = load_models(tmp_path / f"run_{flag}" / "model.safetensors")
        weights.append({**{f"unet.{k}": v for k, v in m.unet.state_dict().items()},
                        **{f"te.{k}": v for k, v in m.text_encoders[0].state_dict().items()}})
    before = load_models(base)
    assert any(not torch.equal(weights[0][f"unet.{k}"], v) for k, v in before.unet.state_dict().items())
    assert any(not torch.equal(weights[0][f"te.{k}"], v) for k, v in before.text_encoders[0].state_dict().items())
    for k, v in weights[0].items():
        torch.testing.assert_close(weights[1][k], v, rtol=1e-5, atol=1e-6, msg=k)
