"""Triton model repository for Kandinsky 2.2: the generator, the python-backend models, the server."""
