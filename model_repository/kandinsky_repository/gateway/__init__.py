"""`kandinsky-gateway`: nginx + njs in front of Triton (routes, request checks, limits, tokens)."""
