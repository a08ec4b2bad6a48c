"""Thin Triton client for Kandinsky 2.2.

It runs the diffusion loops (schedulers, classifier-free guidance) on the client and calls one
Triton model per network evaluation. It depends on numpy, tritonclient and pillow only: no torch.
"""
