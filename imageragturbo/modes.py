"""The pipeline's retrieval modes by name, importable without torch (the CLI's ``--help`` lists them).

- ``adapter``: the trained H-space adapter blends the k neighbours' H-features in;
- ``inject``: training-free slerp of the top-1 neighbour's H-feature;
- ``off``: no retrieval.

`imageragturbo.model.denoiser` re-exports this tuple.
"""

MODES: tuple[str, ...] = ("adapter", "inject", "off")
