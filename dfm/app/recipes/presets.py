"""Diffusion presets shared by recipes.

Flow-matching presets follow Esser et al. ("Scaling Rectified Flow Transformers", 2024): pretraining
draws ``u`` logit-normal (std 1.5) with 20 % uniform samples mixed in and shifts by 2.5 towards
noise; finetuning draws ``u`` uniformly with shift 3.0.
"""

from __future__ import annotations

from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching

FLOW_PRETRAIN = FlowMatching(density="logit_normal", logit_std=1.5, shift=2.5, mix_uniform=0.2)
"""Flow matching for pretraining: logit-normal(0, 1.5), 20 % uniform, shift 2.5."""
FLOW_FINETUNE = FlowMatching(density="uniform", shift=3.0)
"""Flow matching for finetuning: uniform, shift 3.0."""
EDM_DEFAULT = EDM()
"""EDM with the paper's defaults: ``P_mean = -1.2``, ``P_std = 1.2``, ``sigma_data = 0.5``."""
