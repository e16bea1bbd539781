"""Turn what a user names on the command line into a model: an architecture name or a model file.

A MODEL argument is one of:

* a torchvision or timm architecture name (``resnet50``, ``timm:efficientnet_b0``): random weights, or the
  state_dict of ``--weights FILE`` (``.pt`` / ``.pth`` / ``.safetensors``);
* a checkpoint holding a state_dict (a plain one, or a dict with ``state_dict`` / ``model`` inside), with
  ``--arch NAME``;
* a whole pickled ``nn.Module`` (``torch.save(model)``), only with ``--trust-pickle``: unpickling runs code from
  the file, so by default files are read with ``torch.load(weights_only=True)``, which refuses it;
* a TorchScript archive (``torch.jit.save``), a torch.export program (``.pt2``) or an ONNX file.

A file is read as :func:`bnfold.fold` reads a path (:func:`bnfold.api.read_file`) and carries the backend of
its kind (:mod:`bnfold.formats`). Every problem is an :class:`~bnfold.errors.InvalidInputError` naming the file
and the fix. PyTorch is imported only to build or read a PyTorch model: an ONNX file is loaded without it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import loading
from ...api import read_file
from ...errors import InvalidInputError, TrainingModeError
from ...formats import Backend, backend_for

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)


@dataclass
class LoadedModel:
    """A model ready to fold, and what is needed to write it back in the same form.

    Attributes:
        module: the model (an ``nn.Module``, a ``torch.jit.ScriptModule``, a ``torch.export.ExportedProgram``, or an
            ONNX file's path).
        backend: what folds, plans, writes and runs it (:mod:`bnfold.formats`).
        format: the format ``bnfold fold`` writes it in by default (that of its file; a state_dict for an
            architecture name).
        source: the file it was read from (``None`` for an architecture name).
        arch: the architecture name, when known (needed to rebuild a state_dict's model).
        input_shape: the shape of one example input (the architecture's default, or ``--input-shape``).
        notes: things the user should know about the loading (e.g. the weights were random).
        seed: the seed of the random weights of an architecture name (``None`` for weights read from a file).
    """

    module: Any
    backend: Backend
    format: str
    source: Path | None
    arch: str | None
    input_shape: tuple[int, ...] | None
    notes: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def runnable(self) -> Any:
        """Something to call on inputs (the module itself; a fresh ``.module()`` of an exported program...)."""
        return self.backend.runnable(self.module)

    @property
    def label(self) -> str:
        if self.source is not None:
            return str(self.source)
        return f"{self.arch} (random weights, seed {self.seed})" if self.seed is not None else str(self.arch)

    def example_inputs(self, seed: int = 0) -> torch.Tensor:
        """An input of :attr:`input_shape`: the photographs bnfold ships for ``N x 3 x H x W`` (scaled and normalised
        as vision models expect, :mod:`bnfold.examples`), else seeded random values (standard normal).

        A shape whose tensor cannot fit in memory is bad input (``InvalidInputError``), not a crash: it is refused
        before allocating when it needs more than half the machine's memory (the model's activations need more
        still), and an allocation that fails anyway is reported the same way.
        """
        import torch

        from ...examples import is_image_like, photo_batch

        shape = self.input_shape or DEFAULT_INPUT_SHAPE
        text = ",".join(str(d) for d in shape)
        needed = math.prod(shape) * torch.empty((), dtype=torch.float32).element_size()
        try:  # bytes of physical memory, where the platform says
            memory: int | None = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            memory = None
        if memory is not None and needed > memory // 2:
            raise InvalidInputError(
                f"an example input of shape {text} needs {needed / 1e9:.1f} GB, more than half of this machine's "
                f"memory ({memory / 1e9:.1f} GB); pass a smaller --input-shape (one batch, e.g. 1,3,224,224)"
            )
        try:
            if is_image_like(shape):  # real photographs: random noise saturates trained models (bnfold.examples)
                return torch.from_numpy(photo_batch(shape))
            return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        except (RuntimeError, MemoryError) as error:
            raise InvalidInputError(
                f"cannot allocate an example input of shape {text} ({loading.first_line(error)}); pass a smaller --input-shape"
            ) from error


# ------------------------------------------------------------------------------------------------- files


def _state_dict_of(loaded: Any) -> dict[str, torch.Tensor] | None:
    """The state_dict inside a loaded checkpoint: a plain one, or under a usual key of a training checkpoint."""
    import torch

    if isinstance(loaded, Mapping):
        if loaded and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
            return dict(loaded)
        for key in ("state_dict", "model_state_dict", "model", "module", "net", "ema"):
            inner = loaded.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
    return None


def load_state_dict_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str) -> None:
    """``model.load_state_dict(state)`` with an error that says which keys or shapes do not match."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    found = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape))
    parts = [f"{label}: {', '.join(keys[:4])}" + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
             for label, keys in found if keys]
    if parts:
        raise InvalidInputError(
            f"{source} does not match architecture {arch!r} ({'; '.join(parts)}); check --arch, or that the file is "
            "the state_dict of that model"
        )
    model.load_state_dict(state)


MODEL_SUFFIXES = (".pt", ".pth", ".onnx", ".safetensors", ".ts", ".pt2", ".bin", ".ckpt")


def names_a_file(spec: str) -> bool:
    """Whether MODEL names a file (it exists, or has a model file's extension) rather than an architecture."""
    path = Path(spec)
    return path.exists() or path.suffix.lower() in MODEL_SUFFIXES


def load_model(
    spec: str,
    *,
    arch: str | None = None,
    weights: str | None = None,
    trust_pickle: bool = False,
    switch_to_eval: bool = False,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    state_dict_arch: str | None = None,
) -> LoadedModel:
    """Load MODEL as the CLI names it (see the module docstring); raises ``InvalidInputError`` on bad input.

    ``seed`` seeds the random weights of an architecture name (the same name and seed, the same model, in every
    command). ``state_dict_arch`` is the architecture of MODEL if it turns out to hold a state_dict, and is
    ignored otherwise (``bnfold verify``, where ``--arch`` or an architecture name applies to whichever of its two
    models is a state_dict); ``arch``, by contrast, is refused for anything but a state_dict.
    """
    path = Path(spec)
    if not names_a_file(spec):
        from ..architectures import build_arch

        if arch is not None:
            raise InvalidInputError(
                f"--arch does not apply here: {spec} is already an architecture name (--arch names the architecture "
                "of a state_dict FILE); drop --arch, and pass trained weights with --weights FILE"
            )
        random = seed if weights is None else None  # the seed of random weights; trained ones replace them
        model, default_shape = build_arch(spec, seed=random)
        loaded = LoadedModel(model, _backend(model), "state_dict", None, spec, input_shape or default_shape,
                             seed=random)
        if weights is None:
            loaded.notes.append(
                f"{spec}: random weights drawn from --seed {seed} (the same model for every command with this name and "
                "seed; pass --weights FILE for trained ones)"
            )
            return loaded
        file = Path(weights)
        state = _state_dict_of(read_file(file, trust_pickle)[0])
        if state is None:
            raise InvalidInputError(f"--weights {file} does not hold a state_dict of tensors")
        load_state_dict_into(model, state, weights, spec)
        return loaded
    if weights is not None:
        raise InvalidInputError(
            f"--weights does not apply here: {path} is a model file, which carries its own weights (--weights gives "
            "the state_dict of an architecture NAME, as in: bnfold fold resnet50 --weights FILE); drop --weights, "
            "or pass the state_dict file as MODEL with --arch NAME"
        )

    def refuse_arch(carrier: Backend) -> None:
        raise InvalidInputError(
            f"--arch does not apply here: {path} is {carrier.article} file, which carries its model (--arch names the "
            "architecture of a file that holds only a state_dict); drop --arch"
        )

    content, backend, kind = read_file(path, trust_pickle, refuse_arch if arch is not None else None)
    if backend is not None:
        if arch is not None:
            raise InvalidInputError(
                f"--arch does not apply here: {path} holds a whole model (--arch names the architecture of a file "
                "that holds only a state_dict); drop --arch"
            )
        if getattr(content, "training", False):
            if not switch_to_eval:
                raise TrainingModeError(
                    f"{path} was saved in training mode (its batch norms would use batch statistics, so "
                    "there is nothing fixed to fold); pass --eval to switch it to eval mode"
                )
            content.eval()
        return LoadedModel(content, backend, backend.format, path, None,
                           backend.input_shape(content, input_shape, str(path)))
    state = _state_dict_of(content)
    if state is None:
        raise InvalidInputError(
            f"{path} holds a {type(content).__name__}, neither a model nor a state_dict of tensors; save "
            "model.state_dict() or the model itself"
        )
    return _from_state_dict(state, path, _STATE_DICT_FORMATS[kind], arch or state_dict_arch, input_shape)


_STATE_DICT_FORMATS = {loading.SAFETENSORS: "safetensors", loading.TORCH_FILE: "state_dict"}


def _from_state_dict(
    state: dict[str, torch.Tensor], path: Path, fmt: str, arch: str | None, input_shape: tuple[int, ...] | None
) -> LoadedModel:
    from ..architectures import build_arch

    if arch is None:
        raise InvalidInputError(
            f"{path} holds a state_dict (weights without the model's code): if the model is a torchvision or timm "
            f"architecture, pass --arch NAME; for a model of your own, {_OWN_MODEL}"
        )
    try:
        model, default_shape = build_arch(arch)
    except InvalidInputError as error:
        raise InvalidInputError(f"--arch {error}; if {path} is the state_dict of a model of your own, {_OWN_MODEL}") from error
    try:
        load_state_dict_into(model, state, str(path), arch)
    except InvalidInputError:
        folded = _folded_structure(model)
        if folded is None or set(folded.state_dict()) != set(state):
            raise
        load_state_dict_into(folded, state, str(path), arch)
        loaded = LoadedModel(folded, _backend(folded), fmt, path, arch, input_shape or default_shape)
        loaded.notes.append(f"{path} holds an already folded {arch} (bnfold's folded layout)")
        return loaded
    return LoadedModel(model.eval(), _backend(model), fmt, path, arch, input_shape or default_shape)


def _backend(model: nn.Module) -> Backend:
    backend = backend_for(model)
    assert backend is not None  # an nn.Module
    return backend


_OWN_MODEL = ("save the whole model (torch.save(model)) and pass that file with --trust-pickle, or fold it in Python: "
              "bnfold.fold(model) after model.load_state_dict(...)")


def _folded_structure(model: nn.Module) -> nn.Module | None:
    """The module tree bnfold makes of ``model`` (norms gone, biases added), to read a folded state_dict into."""
    from ...engine import fold

    try:
        return fold(model, verify=False)
    except Exception:  # an architecture bnfold cannot trace: the file cannot be a bnfold-folded state_dict of it
        return None
