"""ModelPatcher: weight patches go in with the stated formula and come out bit for bit; object patches; clones."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sumie.adapters.patcher import ModelPatcher, WeightPatch
from sumie.checkpoints.detect import UNET_PREFIX
from sumie.checkpoints.io import save_safetensors_atomic
from sumie.checkpoints.loader import build_module, load_models
from sumie.checkpoints.save import random_single_file
from sumie.configs import TINY
from sumie.errors import ConfigError
from sumie.models.packed import Conv2d
from sumie.models.unet import UNetModel

torch.set_num_threads(1)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KEY = "input_blocks.1.1.proj_in.weight"  # tiny SD1: a 1x1 conv [C, C, 1, 1]; LoRA deltas come as [C, C]
# Keys of every component of a loaded checkpoint, in the checkpoint's own layout under the component name.
VIEW_KEYS = {
    "sd1": ["unet.input_blocks.1.1.proj_in.weight", "unet.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            "unet.out.2.bias", "vae.decoder.conv_in.weight",
            "clip_l.text_model.encoder.layers.0.self_attn.q_proj.weight"],
    "sdxl": ["unet.input_blocks.3.1.proj_in.weight", "unet.label_emb.0.0.weight", "unet.out.2.bias",
             "vae.encoder.down.0.block.0.conv1.weight", "clip_l.text_model.final_layer_norm.weight",
             "clip_g.text_projection.weight"],
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tensors(root: nn.Module) -> dict[str, Tensor]:
    return {**dict(root.named_parameters()), **dict(root.named_buffers())}


def _digest(t: Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _digests(root: nn.Module) -> dict[str, str]:
    return {k: _digest(t) for k, t in _tensors(root).items()}


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mapped_from(t: Tensor, path: Path) -> bool:
    """True when the tensor's data lies in a memory mapping of ``path`` (Linux /proc/self/maps)."""
    ptr, name = t.data_ptr(), str(path.resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == name:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= ptr < end:
                return True
    return False


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random SD1 and SDXL checkpoints in the real layout, SD1 also stored in fp16."""
    root = tmp_path_factory.mktemp("patcher")
    out = {}
    for family in ("sd1", "sdxl"):
        sd = random_single_file(TINY[family], seed=3)
        out[family] = root / f"{family}.safetensors"
        save_safetensors_atomic(sd, out[family])
        if family == "sd1":
            out["sd1_fp16"] = root / "sd1_fp16.safetensors"
            save_safetensors_atomic({k: v.half() for k, v in sd.items()}, out["sd1_fp16"])
    return out


@pytest.fixture(scope="module")
def unet_sd() -> dict[str, Tensor]:
    sd = random_single_file(TINY["sd1"], seed=5)
    return {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}


def _unet(sd: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> UNetModel:
    """A tiny SD1 UNet in memory, with its own copy of the tensors."""
    return build_module(UNetModel, TINY["sd1"].unet, {k: v.clone() for k, v in sd.items()}, "test", "UNet",
                        dtype=dtype)  # type: ignore[return-value]


def _unet_inputs() -> tuple[Tensor, Tensor, Tensor]:
    g = _gen(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999.0, 10.0]), torch.randn(2, 5, 64, generator=g)


# ---------------------------------------------------------------- patch -> unpatch restores everything


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_patch_then_unpatch_restores_every_tensor_of_a_memory_mapped_checkpoint(files: dict, family: str) -> None:
    path = files[family]
    file_before = _file_digest(path)
    models = load_models(path)
    assert _mapped_from(models.unet.get_parameter("out.2.weight"), path)  # the weights really are the file's
    patcher = ModelPatcher.for_models(models)
    names = VIEW_KEYS[family]
    before, objects = _digests(patcher.root), _tensors(patcher.root)
    g = _gen(2)
    patcher.add_patches({k: torch.randn(patcher.weight_shapes[k], generator=g) for k in names}, strength=0.5)
    patcher.add_patches({names[0]: lambda w: w.flip(0)}, strength=0.3)
    patcher.patch()

    assert patcher.is_patched and patcher.patched_keys == set(names)
    during, live = _digests(patcher.root), _tensors(patcher.root)
    for k in before:
        if k in names:
            assert live[k] is not objects[k] and during[k] != before[k], k
        else:
            assert live[k] is objects[k], k  # untouched tensors are the very same objects: nothing copied
    # the component objects the rest of Sumie uses see the patched weights
    assert models.unet.get_parameter(names[0].removeprefix("unet.")) is live[names[0]]
    assert patcher.backup_bytes == sum(objects[k].numel() * objects[k].element_size() for k in names)

    patcher.unpatch()
    assert not patcher.is_patched and patcher.patched_keys == frozenset() and patcher.backup_bytes == 0
    assert _digests(patcher.root) == before
    after = _tensors(patcher.root)
    assert after.keys() == objects.keys() and all(after[k] is objects[k] for k in objects)
    assert _file_digest(path) == file_before


def test_view_keys_follow_the_checkpoint_layout(files: dict) -> None:
    patcher = ModelPatcher.for_models(load_models(files["sdxl"]))
    assert set(VIEW_KEYS["sdxl"]) <= patcher.weight_shapes.keys()
    assert {k.split(".")[0] for k in patcher.weight_shapes} == {"unet", "vae", "clip_l", "clip_g"}


# ---------------------------------------------------------------- the formula, per dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("strength", "strength_model"), [(1.0, 1.0), (0.7, 0.9), (-1.3, 1.0)])
def test_delta_patch_is_the_stated_formula(unet_sd: dict, dtype: torch.dtype, strength: float,
                                           strength_model: float) -> None:
    unet = _unet(unet_sd, dtype)
    w = unet.get_parameter(KEY)
    delta = torch.randn(w.shape[0], w.shape[1], generator=_gen(3))  # [C, C] for a [C, C, 1, 1] conv
    patcher = ModelPatcher(unet)
    assert patcher.add_patches({KEY: delta}, strength=strength, strength_model=strength_model) == {KEY}
    patcher.patch()
    got = unet.get_parameter(KEY)
    want = (w.float() * strength_model + strength * delta.reshape(w.shape).float()).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    assert not torch.equal(got, w)
    assert patcher.backup_bytes == w.numel() * w.element_size()
    patcher.unpatch()
    assert unet.get_parameter(KEY) is w


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_patches_on_one_key_add(unet_sd: dict, dtype: torch.dtype) -> None:
    unet = _unet(unet_sd, dtype)
    w = unet.get_parameter(KEY)
    d1 = torch.randn(w.shape, generator=_gen(4))
    d2 = torch.randn(w.shape, generator=_gen(5)).to(dtype)  # a delta in the model's dtype is used as fp32 too
    patcher = ModelPatcher(unet)
    patcher.add_patches({KEY: d1}, strength=0.8)
    patcher.add_patches({KEY: d2}, strength=-0.4)
    patcher.patch()
    want = (w.float() + 0.8 * d1 + -0.4 * d2.float()).to(dtype)
    assert torch.equal(unet.get_parameter(KEY), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("strength", "strength_model"), [(1.0, 1.0), (0.7, 0.9), (-1.3, 1.0)])
def test_adder_patch_is_the_stated_formula_in_place(unet_sd: dict, dtype: torch.dtype, strength: float,
                                                    strength_model: float) -> None:
    unet = _unet(unet_sd, dtype)
    w = unet.get_parameter(KEY)
    up = torch.randn(w.shape[0], 3, generator=_gen(6))
    down = torch.randn(3, w.shape[1], generator=_gen(7))
    calls: list[tuple[Tensor, float]] = []

    def add(x: Tensor, s: float) -> None:
        calls.append((x, s))
        x.view(x.shape[0], -1).addmm_(up, down, alpha=s)

    patcher = ModelPatcher(unet)
    patcher.add_patches({KEY: WeightPatch(add=add)}, strength=strength, strength_model=strength_model)
    patcher.patch()
    (x, s), = calls
    assert x.dtype == torch.float32 and x.shape == w.shape and s == strength
    want = w.float() * strength_model
    want.view(w.shape[0], -1).addmm_(up, down, alpha=strength)
    assert torch.equal(unet.get_parameter(KEY), want.to(dtype))
    # the same sum as a delta patch, up to fp32 rounding
    close = (w.float() * strength_model + strength * (up @ down).reshape(w.shape)).to(dtype)
    torch.testing.assert_close(unet.get_parameter(KEY).float(), close.float(), rtol=1e-2 if dtype != torch.float32
                               else 1e-5, atol=1e-2 if dtype != torch.float32 else 1e-5)
    patcher.unpatch()
    assert unet.get_parameter(KEY) is w


def test_weight_patch_takes_exactly_one_kind() -> None:
    with pytest.raises(ConfigError, match="exactly one of delta"):
        WeightPatch(delta=torch.zeros(1), add=lambda w, s: None)
    with pytest.raises(ConfigError, match="exactly one of delta"):
        WeightPatch()
    with pytest.raises(ConfigError, match="add must be callable"):
        WeightPatch(add=3)  # type: ignore[arg-type]


def _dora_like(w: Tensor) -> Tensor:
    """A non-delta patch: every output row rescaled to norm 2 (the shape of DoRA's magnitude step)."""
    return 2.0 * w / w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.ndim - 1)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("strength", "strength_model"), [(1.0, 1.0), (0.6, 0.8), (-0.5, 1.0)])
def test_function_patch_is_the_stated_formula(unet_sd: dict, dtype: torch.dtype, strength: float,
                                              strength_model: float) -> None:
    unet = _unet(unet_sd, dtype)
    w = unet.get_parameter(KEY)
    seen: list[Tensor] = []

    def fn(x: Tensor) -> Tensor:
        seen.append(x)
        return _dora_like(x)

    patcher = ModelPatcher(unet)
    patcher.add_patches({KEY: WeightPatch(fn=fn)}, strength=strength, strength_model=strength_model)
    patcher.patch()
    assert seen[0].dtype == torch.float32 and seen[0].shape == w.shape
    base = w.float() * strength_model
    want = _dora_like(base) if strength == 1.0 else base + strength * (_dora_like(base) - base)
    assert torch.equal(unet.get_parameter(KEY), want.to(dtype))


def test_fp16_file_loaded_as_fp16_stays_mapped_and_unchanged(files: dict) -> None:
    path = files["sd1_fp16"]
    file_before = _file_digest(path)
    models = load_models(path, dtype=torch.float16)
    key = "unet." + KEY
    patcher = ModelPatcher.for_models(models)
    w = patcher.root.get_parameter(key)
    assert w.dtype == torch.float16 and _mapped_from(w, path)
    before = _digests(patcher.root)
    delta = torch.randn(w.shape, generator=_gen(6))
    patcher.add_patches({key: delta}, strength=0.25, strength_model=1.5)
    with patcher.patched():
        assert torch.equal(patcher.root.get_parameter(key), (w.float() * 1.5 + 0.25 * delta).half())
    assert patcher.root.get_parameter(key) is w
    assert _digests(patcher.root) == before and _file_digest(path) == file_before


# ---------------------------------------------------------------- the patched model computes with the patched weights


def test_patched_unet_equals_a_unet_edited_by_hand(unet_sd: dict) -> None:
    """Same weights bit for bit and the same computation, so the outputs are compared exactly (torch.equal).

    Both UNets hold freshly allocated in-memory tensors (no memory-mapped weights), so the CPU kernels take the
    same paths; a different computation would need a tolerance, this one does not.
    """
    keys = [KEY, "middle_block.0.in_layers.2.weight", "output_blocks.2.1.transformer_blocks.0.attn1.to_q.weight",
            "time_embed.0.bias"]
    patched, edited = _unet(unet_sd), _unet(unet_sd)
    g = _gen(7)
    deltas = {k: torch.randn(unet_sd[k].shape, generator=g) * 0.05 for k in keys}
    patcher = ModelPatcher(patched)
    patcher.add_patches(deltas, strength=0.9, strength_model=0.95)
    sd = edited.state_dict()
    edited.load_state_dict({**sd, **{k: sd[k].float() * 0.95 + 0.9 * deltas[k] for k in keys}})
    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        plain = patched(x, t, ctx)
        patcher.patch()
        for k in keys:
            assert torch.equal(patched.get_parameter(k), edited.get_parameter(k))
        out = patched(x, t, ctx)
        assert torch.equal(out, edited(x, t, ctx))
        assert (out - plain).abs().max() > 1e-4  # the patch changes the output
        patcher.unpatch()
        assert torch.equal(patched(x, t, ctx), plain)


def test_works_in_inference_mode_and_keeps_requires_grad(unet_sd: dict) -> None:
    unet = _unet(unet_sd)  # frozen: requires_grad=False
    w = unet.get_parameter(KEY)
    patcher = ModelPatcher(unet)
    patcher.add_patches({KEY: torch.ones(w.shape)})
    x, t, ctx = _unet_inputs()
    with torch.inference_mode():
        patcher.patch()
        out_inference = unet(x, t, ctx)
    got = unet.get_parameter(KEY)
    assert not got.is_inference() and not got.requires_grad and isinstance(got, nn.Parameter)
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx), out_inference)
        patcher.unpatch()
    assert unet.get_parameter(KEY) is w
    trainable = nn.Linear(3, 2)
    p = ModelPatcher(trainable)
    p.add_patches({"weight": torch.ones(2, 3)})
    p.patch()
    assert trainable.weight.requires_grad and trainable.weight.grad_fn is None  # a leaf, no graph to the delta


def test_model_moved_while_patched_gets_its_originals_moved_the_same_way(unet_sd: dict) -> None:
    unet = _unet(unet_sd)
    w = unet.get_parameter(KEY)
    patcher = ModelPatcher(unet)
    patcher.add_patches({KEY: torch.ones(w.shape)})
    patcher.patch()
    unet.to(torch.bfloat16)
    patcher.unpatch()
    restored = unet.get_parameter(KEY)
    assert restored.dtype == torch.bfloat16 and torch.equal(restored, w.to(torch.bfloat16))


def test_backup_bytes_is_exactly_the_touched_tensors(unet_sd: dict) -> None:
    unet = _unet(unet_sd, torch.float16)
    keys = [KEY, "out.2.bias", "time_embed.2.weight"]
    patcher = ModelPatcher(unet)
    patcher.add_patches({k: torch.zeros(unet_sd[k].shape) for k in keys})
    patcher.add_patches({KEY: torch.zeros(unet_sd[KEY].shape)})  # a second patch on a key adds no backup
    assert patcher.backup_bytes == 0
    patcher.patch()
    assert patcher.backup_bytes == 2 * sum(unet_sd[k].numel() for k in keys)  # fp16: 2 bytes each
    assert patcher.patched_keys == set(keys)


# ---------------------------------------------------------------- object patches


class Scaled(nn.Module):
    """Wrapper module: the original's output times ``factor``."""

    def __init__(self, inner: nn.Module, factor: float) -> None:
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, *args: Tensor) -> Tensor:
        """Same inputs as the wrapped module; output scaled."""
        return self.inner(*args) * self.factor


def test_wrapped_linear_gives_the_hand_computed_output() -> None:
    g = _gen(8)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).requires_grad_(False)
    first = net[0]
    x = torch.randn(5, 4, generator=g)
    patcher = ModelPatcher(net)
    wrapper = patcher.wrap_module("0", lambda m: Scaled(m, 2.0))
    assert wrapper.inner is first and net[0] is first  # described, not applied yet
    with patcher.patched():
        assert net[0] is wrapper
        want = F.linear(torch.relu(F.linear(x, first.weight, first.bias) * 2.0), net[2].weight, net[2].bias)
        assert torch.equal(net(x), want)
    assert net[0] is first and list(net._modules) == ["0", "1", "2"]
    assert torch.equal(net(x), F.linear(torch.relu(first(x)), net[2].weight, net[2].bias))


def test_wrappers_stack_and_weight_patches_reach_the_wrapped_module(unet_sd: dict) -> None:
    unet = _unet(unet_sd)
    x, t, ctx = _unet_inputs()
    last = unet.out[2]
    with torch.no_grad():
        plain = unet(x, t, ctx)
        patcher = ModelPatcher(unet)
        patcher.wrap_module("out.2", lambda m: Scaled(m, 2.0))
        patcher.wrap_module("out.2", lambda m: Scaled(m, 1.5))  # wraps the first wrapper
        with patcher.patched():
            assert unet.out[2].inner.inner is last
            assert torch.equal(unet(x, t, ctx), plain * 2.0 * 1.5)  # the output conv is the last op
        assert unet.out[2] is last and torch.equal(unet(x, t, ctx), plain)
        bias0 = last.bias
        bias = torch.randn(bias0.shape, generator=_gen(9))
        both = ModelPatcher(unet)
        both.wrap_module("out.2", lambda m: Scaled(m, 2.0))
        both.add_patches({"out.2.bias": bias})  # key as in the checkpoint, not through the wrapper
        with both.patched():
            assert unet.out[2].inner is last and last.bias is not bias0
            want = (F.conv2d(unet.out[1](unet.out[0](_features(unet, x, t, ctx))), last.weight, bias0 + bias,
                             padding=1) * 2.0)
            assert torch.equal(unet(x, t, ctx), want)
        assert unet.out[2] is last and last.bias is bias0 and torch.equal(unet(x, t, ctx), plain)


def _features(unet: UNetModel, x: Tensor, t: Tensor, ctx: Tensor) -> Tensor:
    """The UNet's activations just before ``out`` (captured with a forward hook, which is removed again)."""
    got: list[Tensor] = []
    handle = unet.out.register_forward_hook(lambda _m, args, _out: got.append(args[0]))
    try:
        unet(x, t, ctx)
    finally:
        handle.remove()
    return got[0]


def test_plain_attribute_patch_is_restored() -> None:
    class Act(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kind = "relu"

        def forward(self, x: Tensor) -> Tensor:
            return torch.relu(x) if self.kind == "relu" else torch.tanh(x)

    net = nn.Sequential(Act())
    patcher = ModelPatcher(net)
    patcher.add_object_patch("0.kind", "tanh")
    x = torch.randn(6, generator=_gen(10))
    with patcher.patched():
        assert torch.equal(net(x), torch.tanh(x))
    assert net[0].kind == "relu" and torch.equal(net(x), torch.relu(x))


# ---------------------------------------------------------------- clones, re-patching, ownership


def test_repatching_the_same_set_is_a_no_op_and_a_new_set_replaces_it(unet_sd: dict) -> None:
    unet = _unet(unet_sd)
    w = unet.get_parameter(KEY)
    d1, d2 = torch.randn(w.shape, generator=_gen(11)), torch.randn(w.shape, generator=_gen(12))
    patcher = ModelPatcher(unet)
    patcher.add_patches({KEY: d1})
    patcher.patch()
    first = unet.get_parameter(KEY)
    patcher.patch()
    assert unet.get_parameter(KEY) is first  # not recomputed
    patcher.add_patches({KEY: d2}, strength=0.5)
    patcher.patch()  # unpatch, then patch from the original
    assert torch.equal(unet.get_parameter(KEY), w + d1 + 0.5 * d2)
    patcher.clear_patches()
    patcher.patch()  # the empty set: the model is restored
    assert unet.get_parameter(KEY) is w and not patcher.is_patched


def test_clones_take_turns_and_keep_their_own_lists(unet_sd: dict) -> None:
    unet = _unet(unet_sd)
    w, b = unet.get_parameter(KEY), unet.get_parameter("out.2.bias")
    d1, d2 = torch.randn(w.shape, generator=_gen(13)), torch.randn(b.shape, generator=_gen(14))
    base = ModelPatcher(unet)
    base.add_patches({KEY: d1})
    other = base.clone()
    other.add_patches({"out.2.bias": d2})
    other.wrap_module("out.2", lambda m: Scaled(m, 3.0))
    assert base.weight_patches.keys() == {KEY} and base.object_patches == {}
    assert other.weight_patches.keys() == {KEY, "out.2.bias"} and other.root is base.root

    base.patch()
    other.patch()  # undoes base's patch first
    assert not base.is_patched and other.is_patched and other.patched_keys == {KEY, "out.2.bias"}
    assert torch.equal(unet.get_parameter(KEY), w + d1) and isinstance(unet.out[2], Scaled)
    base.patch()  # and back: other's wrapper and bias patch are gone
    assert not other.is_patched and unet.get_parameter("out.2.bias") is b and unet.out[2].__class__ is Conv2d
    assert torch.equal(unet.get_parameter(KEY), w + d1)
    other.unpatch()  # not its patch any more: nothing happens
    assert base.is_patched
    twin = base.clone()  # the same patch set: patch() adopts the applied patch without recomputing
    patched_w = unet.get_parameter(KEY)
    twin.patch()
    assert twin.is_patched and not base.is_patched and unet.get_parameter(KEY) is patched_w
    twin.unpatch()
    assert unet.get_parameter(KEY) is w and unet.get_parameter("out.2.bias") is b


def test_a_patcher_over_the_whole_checkpoint_undoes_one_over_a_component(files: dict) -> None:
    models = load_models(files["sd1"])
    w = models.unet.get_parameter(KEY)
    unet_only = ModelPatcher(models.unet)
    unet_only.add_patches({KEY: torch.ones(w.shape)})
    unet_only.patch()
    everything = ModelPatcher.for_models(models)
    everything.add_patches({"vae.decoder.conv_in.bias": torch.ones(models.vae.decoder.conv_in.bias.shape)})
    everything.patch()
    assert not unet_only.is_patched and models.unet.get_parameter(KEY) is w and everything.is_patched


# ---------------------------------------------------------------- errors


def test_bad_patches_are_clear_errors_and_add_nothing(unet_sd: dict) -> None:
    unet = _unet(unet_sd)
    patcher = ModelPatcher(unet)
    shape = tuple(unet_sd[KEY].shape)
    typo = KEY.replace("proj_in", "proj_inn")
    with pytest.raises(ConfigError, match=rf"unknown weight key '{typo}'.*did you mean '{KEY}'"):
        patcher.add_patches({KEY: torch.zeros(shape), typo: torch.zeros(shape)})
    with pytest.raises(ConfigError, match=re.escape(f"'{KEY}' is a float32 tensor of shape (3, 3) (9 elements); "
                                                    f"the weight has shape {shape}")):
        patcher.add_patches({KEY: torch.zeros(3, 3)})
    with pytest.raises(ConfigError, match="exactly one of delta"):
        WeightPatch()
    with pytest.raises(ConfigError, match="give a delta tensor, a function"):
        patcher.add_patches({KEY: 3.0})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="strength must be a finite number"):
        patcher.add_patches({KEY: torch.zeros(shape)}, strength=float("nan"))
    assert patcher.weight_patches == {}  # all or nothing


def test_bad_object_patches_are_clear_errors(files: dict) -> None:
    patcher = ModelPatcher.for_models(load_models(files["sd1"]))
    cases = {
        "unet.input_blocks.99": "no attribute '99'",
        "unet.out.2.forward": "forward methods are not replaced",
        "unet.out.2.weight": "is a weight; change weights with add_patches",
        "vae": "would replace a whole network",
        "unet..out": "malformed",
    }
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            patcher.add_object_patch(path, nn.Identity())
    with pytest.raises(ConfigError, match="can only be replaced by a module"):
        patcher.add_object_patch("unet.out.2", "not a module")
    with pytest.raises(ConfigError, match="not a module"):
        patcher.wrap_module("unet.out.2", lambda m: "oops")  # type: ignore[arg-type,return-value]
    assert patcher.object_patches == {}


def test_a_failing_patch_leaves_the_model_unpatched(unet_sd: dict) -> None:
    unet = _unet(unet_sd)
    before = _tensors(unet)
    patcher = ModelPatcher(unet)
    patcher.add_patches({"out.2.bias": torch.ones(unet_sd["out.2.bias"].shape)})
    patcher.add_patches({KEY: lambda w: w[:1]})  # wrong shape: found only when applied
    with pytest.raises(ConfigError, match=rf"function for '{KEY}' returned .* the weight has shape"):
        patcher.patch()
    assert not patcher.is_patched
    after = _tensors(unet)
    assert all(after[k] is before[k] for k in before)


def test_tied_integer_and_already_wrapped_models_are_refused() -> None:
    shared = nn.Linear(2, 2)
    tied = nn.Sequential(shared, shared)  # one tensor under two keys: patching one key would untie them
    with pytest.raises(ConfigError, match="'1.weight' is the same tensor as '0.weight' \\(tied weights\\)"):
        ModelPatcher(tied).add_patches({"1.weight": torch.zeros(2, 2)})
    counted = nn.Module()
    counted.register_buffer("steps", torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="'steps' is not a floating-point tensor"):
        ModelPatcher(counted).add_patches({"steps": torch.ones(3)})
    net = nn.Sequential(nn.Linear(2, 2))
    first = ModelPatcher(net)
    first.wrap_module("0", lambda m: Scaled(m, 2.0))
    first.patch()
    with pytest.raises(ConfigError, match="object patches applied: unpatch it first, or clone"):
        ModelPatcher(net)
    first.unpatch()
    assert ModelPatcher(net).weight_shapes.keys() == {"0.weight", "0.bias"}
