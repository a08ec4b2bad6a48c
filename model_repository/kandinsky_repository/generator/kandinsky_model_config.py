"""The config of the `kandinsky` generation model, built from the client's wire table (`kandinsky_core.wire`).

Its inputs are the request fields (all optional: the request's defaults fill the gaps), its outputs the
final and progress response tensors; it is decoupled (progress responses, then one final response) and
not batched (one request is one generation; the per-step models batch across generations). Its
`server_info` parameter repeats the INFO_MODELS' config parameters (`unet`, `prior`, ...), so the model and the
client read the checkpoint's limits through the same `ServerInfo.from_parameters`.
"""

from __future__ import annotations

import json

from kandinsky_core.server_info import INFO_MODELS
from kandinsky_core.wire import MODEL_NAME, input_specs, output_specs
from tritonclient.grpc import model_config_pb2 as mc

ENTRY_POINT = "kandinsky_model:KandinskyGeneration"


def decoded_parameters(config: mc.ModelConfig) -> dict[str, object]:
    """A config's parameters as the client reads them (JSON-decoded where they hold JSON)."""
    parameters: dict[str, object] = {}
    for key, value in config.parameters.items():
        try:
            parameters[key] = json.loads(value.string_value)
        except json.JSONDecodeError:
            parameters[key] = value.string_value
    return parameters


def generation_config(configs: dict[str, mc.ModelConfig], embed_dim: int) -> mc.ModelConfig:
    """The model's config; `configs` holds the generated configs of the repository's models by name."""
    config = mc.ModelConfig(name=MODEL_NAME, max_batch_size=0)
    config.model_transaction_policy.decoupled = True
    for name, data_type, dims in input_specs():
        config.input.add(name=name, data_type=mc.DataType.Value(data_type), dims=dims, optional=True)
    for name, data_type, dims in output_specs(embed_dim):
        config.output.add(name=name, data_type=mc.DataType.Value(data_type), dims=dims)
    server_info = {
        name: decoded_parameters(configs[name]) if name in configs else None for name in INFO_MODELS
    }
    config.parameters["server_info"].string_value = json.dumps(server_info)
    config.parameters["served_models"].string_value = json.dumps(sorted(configs))
    return config
