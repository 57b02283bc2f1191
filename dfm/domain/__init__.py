"""The pure core of dfm: diffusion math, specs, networks and packing.

Imports torch (tensors, nn), math and attrs only; never torch.distributed, engines, I/O or logging
(DESIGN.md rule 1). Randomness is always injected (rule 2).
"""
