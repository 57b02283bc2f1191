"""dfm: video and image diffusion models (WAN 2.1 with flow matching, DiT with EDM) from one CPU process to clusters."""

__version__ = "0.1.0"
