"""An ONNX model behind a PyTorch call, to judge it against a PyTorch model on the same tensors.

Imports torch, so :mod:`bnfold.onnx` never imports it: it is for ``bnfold fold resnet50 -o r50.onnx`` (the file
read back by its path, as its user opens it) and ``bnfold verify`` of a PyTorch model against an ONNX file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from ..errors import InvalidInputError
from ..loading import first_line
from .verification import session


class OnnxRuntimeModule(torch.nn.Module):
    """An ONNX model (or file) run in onnxruntime, called like the module it was exported from.

    ``torch.onnx.export`` flattens the module's outputs; they are put back into the structure of ``outputs_like``
    (a tensor, a tuple, a dict ...) when given, so the file is judged with the same comparison as the module. A
    graph exported with a fixed batch size runs on a larger batch one slice at a time.
    """

    def __init__(self, model: Any, outputs_like: Any = None) -> None:
        super().__init__()
        self.session = session(model)
        self.input_names = [i.name for i in self.session.get_inputs()]
        first = self.session.get_inputs()[0].shape
        self.batch = first[0] if first and isinstance(first[0], int) else None
        self.structure = None if outputs_like is None else tree_flatten(outputs_like)[1]
        self.eval()

    def forward(self, *inputs: Any) -> Any:
        arrays = [leaf.detach().cpu().numpy() for leaf in tree_leaves(inputs) if isinstance(leaf, torch.Tensor)]
        if len(arrays) != len(self.input_names):
            raise InvalidInputError(f"the ONNX model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}),"
                                    f" not {len(arrays)}; compare two ONNX files, or call bnfold.onnx.verify with "
                                    "inputs by name")
        length = len(arrays[0]) if arrays[0].ndim else 1
        step = self.batch if self.batch and self.batch < length else length
        try:
            parts = [self.session.run(None, {name: a[i:i + step] for name, a in zip(self.input_names, arrays, strict=True)})
                     for i in range(0, length, step)]
        except Exception as error:  # onnxruntime's own errors: a shape or type the graph does not take
            shapes = [i.shape for i in self.session.get_inputs()]
            raise InvalidInputError(
                f"onnxruntime cannot run the ONNX model on inputs of shape {[list(a.shape) for a in arrays]} "
                f"({first_line(error)}); pass --input-shape with the shape it was exported with (its graph inputs: "
                f"{shapes})"
            ) from error
        results = [torch.cat([torch.from_numpy(p[k]) for p in parts]) for k in range(len(parts[0]))]
        if self.structure is not None and self.structure.num_leaves == len(results):
            return tree_unflatten(results, self.structure)
        return results[0] if len(results) == 1 else tuple(results)
