"""`kandinsky-repository`: writes a Triton model repository from an export bundle, in one of its flavours."""
