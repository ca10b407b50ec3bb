"""ModelPatcher: one owner for a loaded model and the changes made to it.

The idea is ComfyUI's ``ModelPatcher`` (its semantics, none of its code): changes are described first, ``patch()``
puts them into the model and ``unpatch()`` takes them out again, bit for bit. LoRA, checkpoint merges and later
adapters all go through it.

- A weight patch is a delta tensor, an in-place adder of a delta computed on demand (LoRA factors: no full-size
  delta is stored or built beside the weight) or a function of the fp32 weight (:func:`patched_weight` has the math). A
  patched weight is one new tensor per touched key, registered in place of the original tensor object; the backup
  is that original object itself, so nothing untouched is copied and a memory-mapped file is never written.
- An object patch replaces an attribute or submodule at a dotted path, e.g. a module by a wrapper module that
  holds and calls the original (:meth:`ModelPatcher.wrap_module`); ``forward`` methods are never replaced.
- One patcher at a time has a module patched: ``patch()`` first undoes any other patcher's changes in its model (a
  record on every touched module says whose they are), so clones can hold different patch sets for different
  requests and take turns. A patcher is not thread-safe: one job patches and runs the model at a time.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sumie.errors import ConfigError

if TYPE_CHECKING:
    from sumie.checkpoints.loader import StableDiffusionModels

PatchFn = Callable[[Tensor], Tensor]
AddFn = Callable[[Tensor, float], None]
_RECORD = "_sumie_patch_record"  # key in a touched module's __dict__: the _Applied that changed it
_MISSING = object()


@dataclass(frozen=True, eq=False)
class WeightPatch:
    """A change to one weight: ``delta`` (added; as many elements as the weight, reshaped to it), ``add`` or ``fn``.

    ``add(w, s)`` adds ``s`` times its delta to the fp32 weight ``w`` in place (a private copy on the weight's
    device), e.g. ``w.view(rows, -1).addmm_(up, down, alpha=s * scale)`` for a LoRA: the same sum as a delta
    without a full-size delta tensor. ``fn(w)`` gets that copy and returns the new weight, same shape, without
    changing its argument in place: for LoRA formats that are not a sum (e.g. DoRA's norm).
    """

    delta: Tensor | None = None
    fn: PatchFn | None = None
    add: AddFn | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.delta, self.fn, self.add)) != 1:
            raise ConfigError("a WeightPatch takes exactly one of delta (a tensor), add (an in-place adder) or fn (a "
                              "function of the weight)")
        if self.add is not None and not callable(self.add):
            raise ConfigError(f"a WeightPatch add must be callable, got {type(self.add).__name__}")
        if self.delta is not None and not (isinstance(self.delta, Tensor) and self.delta.is_floating_point()):
            raise ConfigError(f"a WeightPatch delta must be a floating-point tensor, got {_describe(self.delta)}")
        if self.fn is not None and not callable(self.fn):
            raise ConfigError(f"a WeightPatch fn must be callable, got {type(self.fn).__name__}")


@dataclass(frozen=True, eq=False)
class PatchEntry:
    """One weight patch as added: the patch and the two strengths it was added with."""

    patch: WeightPatch
    strength: float = 1.0
    strength_model: float = 1.0


def patched_weight(weight: Tensor, entries: Sequence[PatchEntry], key: str = "weight") -> Tensor:
    """The weight after ``entries`` in order, computed in fp32 on the weight's device, returned in its dtype.

    Per entry: ``w = w * strength_model`` (skipped at 1.0), then a delta gives ``w + strength * delta``, an adder
    ``add(w, strength)`` the same in place, and a function ``w + strength * (fn(w) - w)`` (exactly ``fn(w)`` at
    strength 1.0). ``weight`` is never written.
    """
    w = weight.detach().to(torch.float32, copy=True)
    for e in entries:
        if e.strength_model != 1.0:
            w = w * e.strength_model
        if e.patch.delta is not None:
            w = w + e.strength * e.patch.delta.detach().to(device=w.device, dtype=torch.float32).reshape(w.shape)
            continue
        if e.patch.add is not None:
            e.patch.add(w, e.strength)
            continue
        out = e.patch.fn(w)  # type: ignore[misc]
        if not isinstance(out, Tensor) or out.shape != w.shape:
            raise ConfigError(f"the patch function for {key!r} returned {_describe(out)}; the weight has shape "
                              f"{tuple(w.shape)}")
        out = out.to(device=w.device, dtype=torch.float32)
        w = out if e.strength == 1.0 else w + e.strength * (out - w)
    return w.to(weight.dtype)


def _describe(x: object) -> str:
    """'a float16 tensor of shape (3, 4)' or the type name, for error messages."""
    if isinstance(x, Tensor):
        return f"a {str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _strength(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@contextmanager
def _plain_tensors() -> Iterator[None]:
    """No autograd graph and no inference tensors, whatever mode the caller runs in."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _install(module: nn.Module, attr: str, tensor: Tensor, is_param: bool, requires_grad: bool) -> None:
    """Register ``tensor`` as the module's parameter/buffer ``attr`` (the old tensor object is not written)."""
    if is_param:
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=requires_grad)
        module._parameters[attr] = tensor
    else:
        module._buffers[attr] = tensor


@dataclass(eq=False)
class _WeightSlot:
    """One replaced tensor: where it lives, the original object, and the patched tensor's device/dtype."""

    key: str
    module: nn.Module
    attr: str
    is_param: bool
    original: Tensor
    device: torch.device
    dtype: torch.dtype


@dataclass(eq=False)
class _Applied:
    """What one ``patch()`` changed; every touched module points to it, so any patcher can find and undo it."""

    owner: ModelPatcher
    root: nn.Module
    weights: dict[str, tuple[PatchEntry, ...]]
    objects: dict[str, object]
    weight_slots: list[_WeightSlot] = field(default_factory=list)
    object_slots: list[tuple[nn.Module, str, object]] = field(default_factory=list)
    marked: list[nn.Module] = field(default_factory=list)
    active: bool = True

    def same(self, root: nn.Module, weights: Mapping[str, tuple[PatchEntry, ...]],
             objects: Mapping[str, object]) -> bool:
        """True when this is exactly that patch set (the same entry and object identities) on that root."""
        if root is not self.root or weights.keys() != self.weights.keys() or objects.keys() != self.objects.keys():
            return False
        if any(objects[p] is not o for p, o in self.objects.items()):
            return False
        return all(len(weights[k]) == len(v) and all(a is b for a, b in zip(weights[k], v, strict=True))
                   for k, v in self.weights.items())

    def mark(self, module: nn.Module) -> None:
        if module.__dict__.get(_RECORD) is not self:
            module.__dict__[_RECORD] = self
            self.marked.append(module)

    def original_object(self, parent: nn.Module, attr: str) -> object:
        for p, a, original in self.object_slots:
            if p is parent and a == attr:
                return original
        return _MISSING

    def restore(self) -> None:
        """Put back every original object and tensor (objects first, newest first) and drop the marks."""
        for parent, attr, original in reversed(self.object_slots):
            setattr(parent, attr, original)
        for s in reversed(self.weight_slots):
            live = (s.module._parameters if s.is_param else s.module._buffers).get(s.attr)
            original = s.original
            if live is not None and (live.device != s.device or live.dtype != s.dtype):
                original = original.detach().to(device=live.device, dtype=live.dtype)  # moved (.to) while patched
            _install(s.module, s.attr, original, s.is_param, s.original.requires_grad)
        for m in self.marked:
            if m.__dict__.get(_RECORD) is self:
                del m.__dict__[_RECORD]
        self.marked.clear()
        self.active = False


def _records_in(root: nn.Module) -> list[_Applied]:
    """The active patch records on any module under ``root`` (each once)."""
    found: dict[int, _Applied] = {}
    for m in root.modules():
        rec = m.__dict__.get(_RECORD)
        if rec is not None and rec.active:
            found.setdefault(id(rec), rec)
    return list(found.values())


def _child(parent: object, name: str, path: str) -> object:
    """``parent.name`` as the unpatched model has it (seeing through object patches that are applied)."""
    if isinstance(parent, nn.Module):
        rec = parent.__dict__.get(_RECORD)
        if rec is not None:
            original = rec.original_object(parent, name)
            if original is not _MISSING:
                return original
    try:
        return getattr(parent, name)
    except AttributeError:
        raise ConfigError(f"{path!r}: there is no attribute {name!r} at that point of the model") from None


class ModelPatcher:
    """Owns one model (``root``) and the changes described for it; weight keys are the root's tensor names.

    Keys are ``root.named_parameters()`` / ``named_buffers()`` names at construction (the checkpoint layout, e.g.
    ``input_blocks.1.1.proj_in.weight``); build patchers on an unpatched model, or ``clone()`` an existing one.
    """

    def __init__(self, root: nn.Module) -> None:
        if not isinstance(root, nn.Module):
            raise ConfigError(f"ModelPatcher needs an nn.Module, got {type(root).__name__}")
        if any(rec.object_slots for rec in _records_in(root)):
            raise ConfigError("this model has object patches applied: unpatch it first, or clone the patcher "
                              "that patched it")
        self.root = root
        self._shapes: dict[str, torch.Size] = {}
        self._tied: dict[str, str] = {}
        self._floating: set[str] = set()
        first: dict[int, str] = {}
        for key, t in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
            self._shapes[key] = t.shape
            if t.is_floating_point():
                self._floating.add(key)
            other = first.setdefault(id(t), key)
            if other != key:
                self._tied[key] = other
                self._tied.setdefault(other, key)
        self._components: frozenset[str] = frozenset()
        self._weight_patches: dict[str, list[PatchEntry]] = {}
        self._object_patches: dict[str, object] = {}
        self._applied: _Applied | None = None

    @classmethod
    def for_models(cls, models: StableDiffusionModels) -> ModelPatcher:
        """One patcher over every network of a checkpoint: keys ``unet.*``, ``vae.*``, ``clip_l.text_model.*`` ...

        The root is an ``nn.ModuleDict`` view of ``models.modules()`` (nothing copied). It holds the networks the
        models object holds now: after replacing one (e.g. another VAE), build a new patcher.
        """
        patcher = cls(nn.ModuleDict(models.modules()))
        patcher._components = frozenset(models.modules())
        return patcher

    # ------------------------------------------------------------------ describing changes

    @property
    def weight_shapes(self) -> Mapping[str, torch.Size]:
        """Every weight key the patcher knows, with its shape (read-only)."""
        return MappingProxyType(self._shapes)

    @property
    def weight_patches(self) -> dict[str, tuple[PatchEntry, ...]]:
        """The described weight patches per key, in the order they apply (a copy)."""
        return {k: tuple(v) for k, v in self._weight_patches.items()}

    @property
    def object_patches(self) -> dict[str, object]:
        """The described object patches, path -> replacement (a copy)."""
        return dict(self._object_patches)

    def add_patches(self, patches: Mapping[str, WeightPatch | Tensor | PatchFn], strength: float = 1.0,
                    strength_model: float = 1.0) -> set[str]:
        """Add one patch per key (after any already there); returns the keys added. All or nothing on an error.

        A value is a delta tensor, a function ``fn(w_fp32) -> w_fp32`` or a :class:`WeightPatch`.
        """
        s, sm = _strength("strength", strength), _strength("strength_model", strength_model)
        entries = {key: PatchEntry(self._check_patch(key, p), s, sm) for key, p in patches.items()}
        for key, entry in entries.items():
            self._weight_patches.setdefault(key, []).append(entry)
        return set(entries)

    def _check_patch(self, key: str, patch: WeightPatch | Tensor | PatchFn) -> WeightPatch:
        if key not in self._shapes:
            near = difflib.get_close_matches(key, self._shapes, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"keys look like {next(iter(self._shapes), '')!r}"
            raise ConfigError(f"unknown weight key {key!r}: not a parameter or buffer of the model; {hint}")
        if key in self._tied:
            raise ConfigError(f"weight {key!r} is the same tensor as {self._tied[key]!r} (tied weights), which the "
                              "patcher does not patch")
        if key not in self._floating:
            raise ConfigError(f"weight {key!r} is not a floating-point tensor and cannot be patched")
        if isinstance(patch, Tensor):
            patch = WeightPatch(delta=patch)
        elif not isinstance(patch, WeightPatch):
            if not callable(patch):
                raise ConfigError(f"the patch for {key!r} is {_describe(patch)}; give a delta tensor, a function of "
                                  "the weight or a WeightPatch")
            patch = WeightPatch(fn=patch)
        shape = self._shapes[key]
        if patch.delta is not None and patch.delta.numel() != shape.numel():
            raise ConfigError(f"the patch for {key!r} is {_describe(patch.delta)} ({patch.delta.numel()} elements); "
                              f"the weight has shape {tuple(shape)} ({shape.numel()} elements)")
        return patch

    def add_object_patch(self, path: str, obj: object) -> None:
        """Replace the attribute or submodule at dotted ``path`` by ``obj`` while patched (a later one replaces it)."""
        parent, attr = self._parent(path)
        current = _child(parent, attr, path)
        if isinstance(current, nn.Module) != isinstance(obj, nn.Module):
            raise ConfigError(f"object patch {path!r}: {_describe(current)} can only be replaced by "
                              f"{'a module' if isinstance(current, nn.Module) else 'a non-module value'}, "
                              f"got {_describe(obj)}")
        self._object_patches[path] = obj

    def wrap_module(self, path: str, factory: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Object-patch the module at ``path`` with ``factory(original)``, a module that holds and calls it.

        Wrapping a path this patcher already wraps stacks: the factory gets the earlier wrapper. Returns the wrapper.
        """
        current = self._object_patches.get(path, _MISSING)
        if current is _MISSING:
            parent, attr = self._parent(path)
            current = _child(parent, attr, path)
        if not isinstance(current, nn.Module):
            raise ConfigError(f"wrap_module {path!r}: that is {_describe(current)}, not a module")
        wrapper = factory(current)
        if not isinstance(wrapper, nn.Module):
            raise ConfigError(f"wrap_module {path!r}: the factory returned {_describe(wrapper)}, not a module")
        self.add_object_patch(path, wrapper)
        return wrapper

    def _parent(self, path: str) -> tuple[nn.Module, str]:
        """The module holding an object-patch target and the attribute name, after checking the path."""
        names = path.split(".") if isinstance(path, str) else []
        if not names or "" in names:
            raise ConfigError(f"object patch path {path!r} is malformed; give a dotted path like 'unet.out.2'")
        if names[-1] == "forward":
            raise ConfigError(f"object patch {path!r}: forward methods are not replaced; wrap the module instead "
                              "(wrap_module)")
        if path in self._shapes:
            raise ConfigError(f"object patch {path!r} is a weight; change weights with add_patches")
        if path in self._components:
            raise ConfigError(f"object patch {path!r} would replace a whole network in this view only; wrap a "
                              f"submodule, or set models.{path} and build a new patcher")
        parent: object = self.root
        for name in names[:-1]:
            parent = _child(parent, name, path)
        if not isinstance(parent, nn.Module):
            raise ConfigError(f"object patch {path!r}: {'.'.join(names[:-1])!r} is {_describe(parent)}, "
                              "not a module")
        return parent, names[-1]

    def clear_patches(self) -> None:
        """Forget every described patch (the model is untouched until the next patch() or unpatch())."""
        self._weight_patches.clear()
        self._object_patches.clear()

    def clone(self) -> ModelPatcher:
        """A patcher on the same model with its own copy of the patch lists (patches themselves are shared)."""
        other = copy.copy(self)
        other._weight_patches = {k: list(v) for k, v in self._weight_patches.items()}
        other._object_patches = dict(self._object_patches)
        other._applied = None
        return other

    # ------------------------------------------------------------------ applying them

    def patch(self) -> None:
        """Put the described patches into the model; a no-op when it already has exactly this set.

        Another patcher's changes in this model are undone first (it is then no longer patched). On an error
        the model is left unpatched.
        """
        weights = {k: tuple(v) for k, v in self._weight_patches.items() if v}
        objects = dict(self._object_patches)
        with _plain_tensors():
            records = _records_in(self.root)
            if len(records) == 1 and records[0].same(self.root, weights, objects):
                records[0].owner, self._applied = self, records[0]
                return
            while records:
                for rec in records:
                    rec.restore()
                records = _records_in(self.root)  # changes hidden under a restored wrapper, if any
            self._applied = None
            if not weights and not objects:
                return
            rec = _Applied(owner=self, root=self.root, weights=weights, objects=objects)
            try:
                self._apply(rec)
            except BaseException:
                rec.restore()
                raise
            self._applied = rec

    def _apply(self, rec: _Applied) -> None:
        """Weights first (on the unwrapped modules), then objects, every target resolved before any is replaced."""
        for key, entries in rec.weights.items():
            module, attr, is_param = self._weight_slot(key)
            original = (module._parameters if is_param else module._buffers)[attr]
            new = patched_weight(original, entries, key)  # type: ignore[arg-type]
            rec.mark(module)
            rec.weight_slots.append(_WeightSlot(key, module, attr, is_param, original, new.device, new.dtype))
            _install(module, attr, new, is_param, original.requires_grad)  # type: ignore[union-attr]
        targets = []
        for path, obj in rec.objects.items():
            parent, attr = self._parent(path)
            targets.append((parent, attr, obj, _child(parent, attr, path)))
        for parent, attr, obj, original in targets:
            rec.mark(parent)
            rec.object_slots.append((parent, attr, original))
            setattr(parent, attr, obj)

    def _weight_slot(self, key: str) -> tuple[nn.Module, str, bool]:
        prefix, _, attr = key.rpartition(".")
        module: object = self.root
        for name in prefix.split(".") if prefix else []:
            module = _child(module, name, key)
        if isinstance(module, nn.Module):
            if module._parameters.get(attr) is not None:
                return module, attr, True
            if module._buffers.get(attr) is not None:
                return module, attr, False
        raise ConfigError(f"weight {key!r} is no longer in the model; was a module replaced after the patcher "
                          "was built? Build a new patcher")

    def unpatch(self) -> None:
        """Restore every tensor and object this patcher replaced (the original objects: bit for bit)."""
        if self.is_patched:
            with _plain_tensors():
                self._applied.restore()  # type: ignore[union-attr]
        self._applied = None

    @contextmanager
    def patched(self) -> Iterator[ModelPatcher]:
        """``with patcher.patched(): ...`` runs the block with the patches in and unpatches on the way out."""
        self.patch()
        try:
            yield self
        finally:
            self.unpatch()

    # ------------------------------------------------------------------ introspection

    @property
    def is_patched(self) -> bool:
        """True while this patcher's changes are in the model."""
        return self._applied is not None and self._applied.active and self._applied.owner is self

    @property
    def patched_keys(self) -> frozenset[str]:
        """The weight keys whose tensors this patcher has replaced right now."""
        return frozenset(s.key for s in self._applied.weight_slots) if self.is_patched else frozenset()  # type: ignore

    @property
    def backup_bytes(self) -> int:
        """Bytes of the original tensors held as backups (exactly the touched ones; 0 when not patched)."""
        if not self.is_patched:
            return 0
        return sum(s.original.numel() * s.original.element_size() for s in self._applied.weight_slots)  # type: ignore

    def __repr__(self) -> str:
        return (f"ModelPatcher({type(self.root).__name__}, {len(self._weight_patches)} weight key(s) and "
                f"{len(self._object_patches)} object patch(es), patched={self.is_patched})")
