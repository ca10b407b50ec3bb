"""ComfyUI graphs run by sumie.comfy: the example graph's image, events, cache, interruption, files, sampler math.

The graph is ComfyUI's ``script_examples/basic_api_example.py`` API prompt (CheckpointLoaderSimple, CLIPTextEncode
x2, EmptyLatentImage, KSampler euler/normal, VAEDecode, SaveImage), with the example's own kind of edits (text,
seed) and a small size / step count. Its image is compared with an independent computation in ComfyUI's
conventions: k-diffusion's ``sample_euler`` on ``CompVisDenoiser`` / ``CompVisVDenoiser`` (``quantize=True``:
ComfyUI's integer timesteps; sumie-tiny is v-prediction on a zero-terminal-SNR schedule, ComfyUI's ``zsnr``) with
the sigmas ComfyUI's ``normal`` scheduler gives (``get_sigmas(n)``), one CPU generator seeded with the seed for the
noise (``comfy.sample.prepare_noise``), the start ``noise * sqrt(1 + sigma0^2)``
(``ModelSamplingDiscrete.noise_scaling`` at sigma_max), CFG on the denoised x0, the VAE on ``latent / scale`` and
``np.clip(255 * clamp((x + 1) / 2), 0, 255).astype(uint8)`` (``SaveImage``), within the generation tolerance
(1/255 mean absolute difference). Event payloads follow ``execution.py`` / ``server.py``; the order of nodes
follows ``comfy_execution/graph.py`` (``ExecutionList.add_node`` / ``ux_friendly_pick_node``).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from reference_kdiffusion import load as load_kdiffusion
from safetensors.torch import save_file

from sumie.checkpoints.manager import ModelFolders, ModelManager
from sumie.checkpoints.save import random_single_file
from sumie.comfy import ComfyEnvironment, ComfyFolders, PromptExecutor, check_request, history_entry
from sumie.comfy import sampler as cs
from sumie.comfy.nodes.loaders import load_checkpoint
from sumie.configs import TINY
from sumie.pipelines.control import JobControl
from sumie.prompts.tokenizer import CLIPTokenizer
from sumie.sampling.noise import batch_noise

TOL = 1.0  # mean absolute difference in uint8 levels: the generation issue's parity tolerance
SIZE, STEPS, SEED, CFG = 64, 4, 5, 8.0
POSITIVE, NEGATIVE = "masterpiece best quality man", "bad hands"


def example_prompt(ckpt: str) -> dict[str, Any]:
    """basic_api_example.py's prompt_text (ids, inputs, links as there), at SIZE px and STEPS steps."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "cfg": CFG, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0], "negative": ["7", 0],
            "positive": ["6", 0], "sampler_name": "euler", "scheduler": "normal", "seed": SEED, "steps": STEPS}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": SIZE, "width": SIZE}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": POSITIVE}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": NEGATIVE}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


@pytest.fixture(scope="module")
def comfy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI-layout folder with a random-weight SD1.5-layout tiny checkpoint in models/checkpoints."""
    root = tmp_path_factory.mktemp("comfyui")
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "loras").mkdir(parents=True)
    save_file(random_single_file(TINY["sd1"], seed=0), str(root / "models" / "checkpoints" / "tiny_sd1.safetensors"))
    return root


@pytest.fixture(scope="module")
def shared_manager(comfy_root: Path) -> ModelManager:
    """One manager for the module (models load once)."""
    return ModelManager(ModelFolders(comfy_root))


@pytest.fixture
def env(tmp_path: Path, shared_manager: ModelManager) -> ComfyEnvironment:
    """Fresh output / input / temp folders over the shared manager."""
    return ComfyEnvironment(ComfyFolders.under(tmp_path), shared_manager)


@pytest.fixture(scope="module")
def tiny_manager() -> ModelManager:
    """A manager without folders: the embedded sumie-tiny is the checkpoint listed."""
    return ModelManager()


def run(env: ComfyEnvironment, prompt: dict[str, Any], executor: PromptExecutor | None = None,
        control: JobControl | None = None, prompt_id: str = "p1", extra_data: dict[str, Any] | None = None,
        progress_state: bool = False) -> tuple[Any, list[tuple[str, dict[str, Any]]]]:
    """Validate and execute; (result, events), ``progress_state`` events only when asked for (they have their own
    tests in test_comfy_partial_progress.py)."""
    check = check_request({"prompt": prompt}, env)
    assert check.ok, check.body
    events: list[tuple[str, dict[str, Any]]] = []
    executor = executor or PromptExecutor(env)

    def send(event: str, data: dict[str, Any]) -> None:
        if progress_state or event != "progress_state":
            events.append((event, copy.deepcopy(data)))

    result = executor.execute(check.prompt, prompt_id, check.outputs, extra_data=extra_data, send=send,
                              control=control)
    return result, events


def saved(env: ComfyEnvironment, result: Any, node: str = "9") -> list[Path]:
    """The files a SaveImage node reported."""
    return [env.folders.folder(i["type"]) / i["subfolder"] / i["filename"] for i in result.outputs[node]["images"]]


# ---------------------------------------------------------------- the independent computation


class _Inner(torch.nn.Module):
    """CompVis-style wrapper k-diffusion's denoisers expect: ``alphas_cumprod`` and ``apply_model``."""

    def __init__(self, unet: torch.nn.Module, zsnr: bool = False) -> None:
        super().__init__()
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1.0 - betas, dim=0)
        if zsnr:  # ComfyUI rescale_zero_terminal_snr_sigmas (Lin et al. 2023, Alg. 1), last alpha_bar clamped
            s = ac.sqrt()
            s = (s - s[-1]) * s[0] / (s[0] - s[-1])
            ac = s**2
            ac[-1] = 4.8973451890853435e-08
        self.alphas_cumprod = ac
        self.unet = unet

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, cond)


def _context(models: Any, text: str) -> torch.Tensor:
    """The prompt's single-chunk context straight from the text encoder (BOS, ids, EOS, padding; no weights)."""
    tok = CLIPTokenizer()
    cfg, te = models.config.text_encoders[0], models.text_encoders[0]
    ids = [tok.BOS, *tok.encode(text), tok.EOS]
    ids += [cfg.pad_id] * (77 - len(ids))
    with torch.no_grad():
        hidden, _ = te(torch.tensor([ids]), layer=cfg.layer, final_norm=cfg.final_norm, need_pooled=False)
    return hidden.float()


def comfy_reference(models: Any, latent_shape: tuple[int, ...], seed: int = SEED, start: str = "comfyui") -> np.ndarray:
    """The example graph's image computed with k-diffusion and ComfyUI's conventions -> uint8 [H, W, 3]."""
    k_sampling, k_external = load_kdiffusion()
    cls = k_external.CompVisVDenoiser if models.config.prediction == "v" else k_external.CompVisDenoiser
    den = cls(_Inner(models.unet, models.zero_terminal_snr), quantize=True).float()
    sigmas = den.get_sigmas(STEPS).float()
    cond, uncond = _context(models, POSITIVE), _context(models, NEGATIVE)

    b = latent_shape[0]

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        ctx = torch.cat([cond.expand(b, -1, -1), uncond.expand(b, -1, -1)])
        out = den(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=ctx)
        c, u = out.chunk(2)
        return u + (c - u) * CFG

    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed))
    s0 = float(sigmas[0])
    x = noise * (math.sqrt(1 + s0**2) if start == "comfyui" else s0)
    with torch.no_grad():
        x = k_sampling.sample_euler(model, x, sigmas, disable=True)
        vae = models.vae
        img = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).float()
    img = torch.clamp((img + 1.0) / 2.0, 0.0, 1.0).permute(0, 2, 3, 1).numpy()
    out = np.clip(255.0 * img, 0, 255).astype(np.uint8)
    return out[0] if b == 1 else out


def mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference in uint8 levels."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize("which", ["tiny_sd1", "sumie-tiny"])
def test_example_graph_matches_comfyui_conventions(which: str, tmp_path: Path, shared_manager: ModelManager,
                                                    tiny_manager: ModelManager) -> None:
    """basic_api_example.py's graph on Sumie = k-diffusion + ComfyUI's noise, start, schedule and truncation."""
    manager = shared_manager if which == "tiny_sd1" else tiny_manager
    env = ComfyEnvironment(ComfyFolders.under(tmp_path), manager)
    ckpt = "tiny_sd1.safetensors" if which == "tiny_sd1" else "sumie-tiny"
    result, _ = run(env, example_prompt(ckpt))
    assert result.success, result.error
    (path,) = saved(env, result)
    ours = np.asarray(Image.open(path).convert("RGB"))
    models = load_checkpoint(env, ckpt)[0].models
    f = models.vae.downscale
    shape = (1, models.config.unet.out_channels, SIZE // f, SIZE // f)
    ref = comfy_reference(models, shape)
    assert ours.shape == ref.shape == (SIZE, SIZE, 3)
    diff = mad(ours, ref)
    print(f"{which}: mean abs difference to the k-diffusion reference {diff:.4f}/255")
    assert diff < TOL
    # the comparison can fail: A1111's start scale (noise * sigma0) or another seed moves the image far more
    other = mad(ours, comfy_reference(models, shape, start="a1111"))
    print(f"{which}: vs A1111's start scale {other:.3f}/255")
    assert other > 2 * TOL or mad(ours, comfy_reference(models, shape, seed=SEED + 1)) > 2 * TOL


def test_example_graph_events(env: ComfyEnvironment) -> None:
    """A run's WebSocket messages: start, cached [], executing per node in ExecutionList order, progress per
    step, executed with the saved image, success, executing null."""
    result, events = run(env, example_prompt("tiny_sd1.safetensors"), prompt_id="abc")
    assert result.success
    kinds = [(e, d.get("node")) for e, d in events]
    assert kinds == [("execution_start", None), ("execution_cached", None),
                     ("executing", "4"), ("executing", "6"), ("executing", "7"), ("executing", "5"),
                     ("executing", "3"), *[("progress", "3")] * STEPS, ("executing", "8"), ("executing", "9"),
                     ("executed", "9"), ("execution_success", None), ("executing", None)]
    assert all(d["prompt_id"] == "abc" for _, d in events)
    assert events[1][1]["nodes"] == []
    progress = [d for e, d in events if e == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(i, STEPS, "3") for i in range(1, STEPS + 1)]
    executed = next(d for e, d in events if e == "executed")
    assert executed == {"node": "9", "display_node": "9", "prompt_id": "abc",
                        "output": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}}
    assert {"prompt_id", "timestamp"} <= set(events[0][1])
    assert events[3][1] == {"node": "6", "display_node": "6", "prompt_id": "abc"}


def test_preview_hook_and_batches(env: ComfyEnvironment) -> None:
    """``preview`` gets every step's prediction with the VAE before its progress event; a batch of 2 saves two
    files with consecutive counters and matches the reference with one noise draw for the whole batch."""
    prompt = example_prompt("tiny_sd1.safetensors")
    prompt["5"]["inputs"]["batch_size"] = 2
    check = check_request({"prompt": prompt}, env)
    seen: list[tuple[str, tuple[int, ...]]] = []
    events: list[str] = []

    def preview(node: str, x0: torch.Tensor, vae: Any) -> None:
        seen.append((node, tuple(x0.shape)))
        events.append("preview")
        assert vae.downscale >= 1

    result = PromptExecutor(env).execute(check.prompt, "b", check.outputs, preview=preview,
                                         send=lambda e, d: events.append(e))
    assert result.success
    assert len(seen) == STEPS and all(n == "3" and s[0] == 2 for n, s in seen)
    steps = [e for e in events if e in ("preview", "progress")]
    assert steps == ["preview", "progress"] * STEPS
    assert [i["filename"] for i in result.outputs["9"]["images"]] == ["ComfyUI_00001_.png", "ComfyUI_00002_.png"]
    ours = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in saved(env, result)])
    models = load_checkpoint(env, "tiny_sd1.safetensors")[0].models
    f = models.vae.downscale
    ref = comfy_reference(models, (2, 4, SIZE // f, SIZE // f))  # one generator for the whole batch
    assert mad(ours, ref) < TOL and mad(ours[0], ours[1]) > 2 * TOL


def test_requeue_with_one_changed_input_reruns_only_what_depends_on_it(env: ComfyEnvironment) -> None:
    """ComfyUI's cache: a new seed re-runs KSampler and what follows; the loader, encoders and latent are
    reported in execution_cached. The same graph again runs nothing and re-sends the saved image."""
    executor = PromptExecutor(env)
    prompt = example_prompt("tiny_sd1.safetensors")
    first, _ = run(env, prompt, executor)
    prompt["3"]["inputs"]["seed"] = SEED + 1
    second, events = run(env, prompt, executor, prompt_id="p2")
    assert second.cached == ["4", "5", "6", "7"]
    assert next(d for e, d in events if e == "execution_cached")["nodes"] == ["4", "5", "6", "7"]
    assert [d["node"] for e, d in events if e == "executing"] == ["3", "8", "9", None]
    assert second.executed == ["3", "8", "9"]
    a, b = (np.asarray(Image.open(p)) for p in (saved(env, first)[0], saved(env, second)[0]))
    assert saved(env, second)[0].name == "ComfyUI_00002_.png"
    assert mad(a, b) > 0  # the changed seed reached the image
    third, events = run(env, prompt, executor, prompt_id="p3")
    assert third.executed == [] and sorted(third.cached) == ["3", "4", "5", "6", "7", "8", "9"]
    assert [e for e, _ in events] == ["execution_start", "execution_cached", "executed", "execution_success",
                                      "executing"]
    assert third.outputs == second.outputs
    prompt["6"]["inputs"]["text"] = "another prompt"
    fourth, _ = run(env, prompt, executor, prompt_id="p4")
    assert fourth.executed == ["6", "3", "8", "9"] and fourth.cached == ["4", "5", "7"]


def test_interrupted_run(env: ComfyEnvironment) -> None:
    """An interrupt during sampling stops at the next step: execution_interrupted names the node and what ran;
    nothing is saved; the history entry says error, not completed."""
    control = JobControl()
    events: list[tuple[str, dict[str, Any]]] = []

    def send(event: str, data: dict[str, Any]) -> None:
        events.append((event, data))
        if event == "progress" and data["value"] == 2:
            control.interrupt()

    prompt = example_prompt("tiny_sd1.safetensors")
    check = check_request({"prompt": prompt}, env)
    result = PromptExecutor(env).execute(check.prompt, "int", check.outputs, send=send, control=control)
    assert not result.success and result.interrupted
    kinds = [e for e, _ in events]
    assert kinds[-2:] == ["execution_interrupted", "executing"]
    assert kinds.count("progress") == 2 and "executed" not in kinds and "execution_success" not in kinds
    data = events[-2][1]
    assert data["node_id"] == "3" and data["node_type"] == "KSampler" and data["prompt_id"] == "int"
    assert data["executed"] == ["4", "6", "7", "5"]
    assert not any(env.folders.folder("output").glob("*.png"))
    entry = history_entry(1, "int", check.prompt, {}, check.outputs, result)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached",
                                                           "execution_interrupted"]
    # interrupted before it starts: the first node is not run
    control = JobControl()
    control.interrupt()
    result, events = run(env, prompt, control=control)
    assert result.executed == [] and events[-2][0] == "execution_interrupted" and events[-2][1]["node_id"] == "4"


def test_history_entry_and_png_metadata(env: ComfyEnvironment) -> None:
    """The history entry's shape (PromptQueue.task_done) and SaveImage's PNG chunks: prompt and workflow."""
    prompt = example_prompt("tiny_sd1.safetensors")
    prompt["9"]["inputs"]["filename_prefix"] = "runs/cat"
    workflow = {"nodes": [{"id": 9, "type": "SaveImage"}], "links": []}
    result, _ = run(env, prompt, extra_data={"extra_pnginfo": {"workflow": workflow}}, prompt_id="h1")
    (path,) = saved(env, result)
    assert path == env.folders.folder("output") / "runs" / "cat_00001_.png"
    assert result.outputs["9"]["images"][0]["subfolder"] == "runs"
    text = Image.open(path).text  # type: ignore[attr-defined]
    assert json.loads(text["prompt"]) == prompt and json.loads(text["workflow"]) == workflow
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    entry = history_entry(7, "h1", prompt, {"client_id": "c"}, ["9"], result)
    assert entry["prompt"] == [7, "h1", prompt, {"client_id": "c"}, ["9"]]
    assert entry["outputs"] == {"9": {"images": [{"filename": "cat_00001_.png", "subfolder": "runs",
                                                  "type": "output"}]}}
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached",
                                                           "execution_success"]
    assert entry["meta"]["9"] == {"node_id": "9", "display_node": "9", "parent_node": None, "real_node_id": "9"}


def test_save_image_stays_in_the_output_folder(env: ComfyEnvironment) -> None:
    """A prefix leading out of the output folder is an execution error; nothing is written outside."""
    prompt = example_prompt("tiny_sd1.safetensors")
    prompt["9"]["inputs"]["filename_prefix"] = "../../escape"
    result, events = run(env, prompt)
    assert not result.success and result.error["node_id"] == "9"
    assert "outside the output folder" in result.error["exception_message"]
    assert {"exception_type", "traceback", "current_inputs", "current_outputs", "executed"} <= set(result.error)
    assert events[-2][0] == "execution_error" and events[-1] == ("executing", {"node": None, "prompt_id": "p1"})
    assert not list(env.folders.folder("output").parent.parent.glob("escape*"))


def test_sampler_custom_advanced_equals_ksampler(env: ComfyEnvironment) -> None:
    """RandomNoise + CFGGuider + KSamplerSelect + BasicScheduler through SamplerCustomAdvanced is KSampler."""
    base = example_prompt("tiny_sd1.safetensors")
    custom = {k: v for k, v in copy.deepcopy(base).items() if k != "3"}
    custom.update({
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "11": {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                     "cfg": CFG}},
        "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "13": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "normal", "steps": STEPS,
                                                          "denoise": 1.0}},
        "3": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["11", 0],
                                                                "sampler": ["12", 0], "sigmas": ["13", 0],
                                                                "latent_image": ["5", 0]}},
    })
    a, _ = run(env, base)
    b, _ = run(env, custom)
    assert a.success and b.success, (a.error, b.error)
    ia, ib = (np.asarray(Image.open(saved(env, r)[0])) for r in (a, b))
    assert np.array_equal(ia, ib)


def test_ksampler_advanced_two_stages_equal_one_run(env: ComfyEnvironment) -> None:
    """KSamplerAdvanced steps 0-2 with leftover noise, then 2-end without added noise = one KSampler run
    (``KSampler.sample`` slicing; the second stage starts below sigma_max, so from the latent itself)."""
    base = example_prompt("tiny_sd1.safetensors")
    staged = copy.deepcopy(base)
    common = {"model": ["4", 0], "noise_seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": "euler",
              "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0]}
    staged["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "enable", "latent_image": ["5", 0], "start_at_step": 0, "end_at_step": 2,
        "return_with_leftover_noise": "enable"}}
    staged["10"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "disable", "latent_image": ["3", 0], "start_at_step": 2, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}}
    staged["8"]["inputs"]["samples"] = ["10", 0]
    a, _ = run(env, base)
    b, _ = run(env, staged)
    assert b.success, b.error
    ia, ib = (np.asarray(Image.open(saved(env, r)[0])).astype(int) for r in (a, b))
    assert np.abs(ia - ib).max() <= 1  # the same steps; the latent is unscaled and rescaled in between


def test_ksampler_sigma_handling(shared_manager: ModelManager, tmp_path: Path) -> None:
    """KSampler.set_steps / sample: ``normal`` = get_sigmas(n); denoise < 1 keeps the last steps + 1 of
    int(steps / denoise); dpm_2 drops the penultimate of steps + 1; end / start steps slice; 0 denoise is empty."""
    env = ComfyEnvironment(ComfyFolders.under(tmp_path), shared_manager)
    model = load_checkpoint(env, "tiny_sd1.safetensors")[0]
    ds = cs.discretization(model)
    _, k_external = load_kdiffusion()
    ref = k_external.CompVisDenoiser(_Inner(torch.nn.Identity()), quantize=True).float()
    torch.testing.assert_close(cs.ksampler_sigmas(ds, "euler", "normal", 10), ref.get_sigmas(10).float(),
                               rtol=2e-5, atol=0)
    full8 = cs.ksampler_sigmas(ds, "euler", "normal", 8)
    assert torch.equal(cs.ksampler_sigmas(ds, "euler", "normal", 4, denoise=0.5), full8[-5:])
    assert torch.equal(cs.ksampler_sigmas(ds, "euler", "normal", 3, denoise=0.45), cs.ksampler_sigmas(
        ds, "euler", "normal", 6)[-4:])
    assert cs.ksampler_sigmas(ds, "euler", "normal", 4, denoise=0.0).numel() == 0
    k5 = cs.ksampler_sigmas(ds, "euler", "karras", 5)
    d4 = cs.ksampler_sigmas(ds, "dpm_2", "karras", 4)
    assert torch.equal(d4, torch.cat([k5[:-2], k5[-1:]])) and len(d4) == 5
    s = cs.advanced_sigmas(full8, 2, 5, force_full_denoise=True)
    assert torch.equal(s[:-1], full8[2:5]) and s[-1] == 0
    assert torch.equal(cs.advanced_sigmas(full8, 2, 5, force_full_denoise=False), full8[2:6])
    assert cs.advanced_sigmas(full8, 8, 10000, force_full_denoise=True) is None


def test_batch_noise_is_comfyui_prepare_noise() -> None:
    """One generator for the whole batch; batch_index picks the draws of those positions."""
    shape = (3, 4, 8, 8)
    whole = batch_noise(shape, 42)
    assert torch.equal(whole, torch.randn(shape, generator=torch.Generator().manual_seed(42)))
    picked = batch_noise((2, 4, 8, 8), 42, [2, 0])
    assert torch.equal(picked[0], whole[2]) and torch.equal(picked[1], whole[0])
    assert not torch.equal(whole[1], torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(43))[0])


def test_a_broken_branch_outside_the_outputs_does_not_stop_the_run(env: ComfyEnvironment) -> None:
    """Validation keeps the good output; the broken branch's LoadImage (missing file) is neither run nor able to
    fail the prompt (ComfyUI treats a failing IS_CHANGED as NaN: never cached, never an error by itself)."""
    prompt = example_prompt("tiny_sd1.safetensors")
    prompt["20"] = {"class_type": "LoadImage", "inputs": {"image": "missing.png"}}
    prompt["21"] = {"class_type": "PreviewImage", "inputs": {"images": ["20", 0]}}
    check = check_request({"prompt": prompt}, env)
    assert check.ok and check.outputs == ["9"] and list(check.node_errors) == ["20"]
    result = PromptExecutor(env).execute(check.prompt, "x", check.outputs)
    assert result.success and "20" not in result.executed and list(result.outputs) == ["9"]
