"""The network class of each model spec (WAN 2.1 or DiT): the one place runtimes look it up."""

from __future__ import annotations

from torch import nn

from dfm.domain.networks.dit import DiT
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.specs import DiTSpec, ModelSpec, WanSpec

NETWORKS: dict[type, type[nn.Module]] = {WanSpec: WanTransformer, DiTSpec: DiT}
"""The network class of each spec type."""


def network_class(spec: ModelSpec) -> type[nn.Module]:
    """The network class that implements ``spec``.

    Raises:
        ValueError: For a spec of another architecture.
    """
    network = NETWORKS.get(type(spec))
    if network is None:
        raise ValueError(f"unknown model spec {type(spec).__name__}; expected WanSpec (arch 'wan') or DiTSpec ('dit')")
    return network
