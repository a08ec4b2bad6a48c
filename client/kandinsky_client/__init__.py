"""Thin Triton client for Kandinsky 2.2: `KandinskyClient` (pipeline.py) and the `kandinsky-client` CLI.

It runs the diffusion loops here (the core's generation code over gRPC/HTTP, one Triton request per
network evaluation) or asks the server to run them (one request per generation). It depends on the core,
numpy, pillow and tritonclient only: no torch.
"""
