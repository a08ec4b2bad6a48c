"""Python-backend models. Each generated `model.py` imports one `TritonPythonModel` from here.

The logic lives in plain functions of numpy arrays (testable without a server); `base.BatchingModel`
is the only code that touches Triton's `triton_python_backend_utils`.
"""
