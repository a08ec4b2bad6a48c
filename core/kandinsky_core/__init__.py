"""The torch-free core of Kandinsky 2.2 serving, shared by the client, the exporter and the server.

The component registry (`components`), the one request type (`request`) and its checks (`validation`),
the mode table (`modes`), the generation core that runs every mode against one `infer` interface
(`generation`), the numpy
schedulers, seeded noise, image handling, the `kandinsky` model's wire format, what a server tells its
clients (`server_info`), errors, TensorRT engine profiles, the export bundle's layout, the numeric
pre/post-processing, the GPU cost model of the timed flavour, the memory budget's fits (`memory`) and
ONNX Runtime's CPU session settings (`onnx_cpu`). numpy and pillow only.
"""
