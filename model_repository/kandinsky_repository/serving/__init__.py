"""`kandinsky-serve` and what runs beside Triton: the process, its supervisor, deep health, the engine cache."""
