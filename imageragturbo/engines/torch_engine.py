"""The reference engine: a graph's torch module behind the Engine interface."""

from __future__ import annotations

import numpy as np
import torch

from imageragturbo.engines.graphs import TorchGraph
from imageragturbo.engines.protocol import check_input_names


class TorchEngine:
    """Runs a :class:`TorchGraph` eagerly on the module's device; numpy in, numpy out.

    This is what the compiled engines are checked against (parity tests), and what
    ``--engine torch`` means for a single graph.
    """

    kind = "torch"

    def __init__(self, graph: TorchGraph):
        self.graph = graph
        self.name = graph.spec.name
        self.input_names = graph.spec.input_names
        self.output_names = graph.spec.output_names
        self.device = next(graph.module.parameters()).device

    @torch.inference_mode()
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_input_names(self.name, self.input_names, inputs)
        args = [torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device) for name in self.input_names]
        outputs = self.graph.module(*args)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return {name: out.float().cpu().numpy() for name, out in zip(self.output_names, outputs)}
