"""The `kandinsky` model over Triton's gRPC stream, from asyncio: limits, readiness, one stream per image.

Why not the client's `RemoteGenerator`: this package may import only `kandinsky_core` (tests/test_layout.py)
and it serves from an event loop, where tritonclient's asyncio client cancels a stream by cancelling the
task that reads it. What the two share lives in the core: the wire format (`wire.request_inputs`, the
outputs), the error classification (`errors.classify_exception`), the checks (`validation.check_request`)
and the server's limits (`ServerInfo`, read here from the `kandinsky` model's own config).

Cancellation: when the task reading a stream is cancelled (the HTTP client went away) or stops reading,
the gRPC call is cancelled, and Triton cancels the request: the server-side loop stops before its next
step (python_models/kandinsky_model.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
from kandinsky_core.errors import (
    KandinskyClientError,
    ModelNotReady,
    ServerUnavailable,
    classify,
    classify_exception,
)
from kandinsky_core.server_info import ServerInfo
from kandinsky_core.wire import FINAL_OUTPUT, MODEL_NAME

from ..settings import DEFAULTS

logger = logging.getLogger(__name__)

# A stream gets the server's generation time limit plus this long to deliver its final response; the
# `kandinsky` model stops a generation at its limit itself, this only bounds a server that went silent.
STREAM_MARGIN_S = 60.0
# Metadata calls (readiness, the model's config) answer at once or not at all.
METADATA_TIMEOUT_S = 10.0


def _grpc_failure(error: BaseException, url: str) -> KandinskyClientError:
    """tritonclient's InferenceServerException or grpc's AioRpcError, classified as the client does
    (`kandinsky_core.errors.classify`: statuses first, then the server's kinds; stream resets, 429s)."""
    classified = classify_exception(error, model=MODEL_NAME, url=url)
    return classified if classified is not None else classify(None, str(error), model=MODEL_NAME, url=url)


class KandinskyModel:
    """The server's `kandinsky` model at `url` (host:port of Triton's gRPC endpoint or the gateway's)."""

    def __init__(self, url: str, headers: Mapping[str, str] | None = None) -> None:
        self.url = url
        self.headers = dict(headers or {}) or None
        self._client: Any = None
        self._info: ServerInfo | None = None
        self._served: list[str] = []

    async def start(self) -> None:
        """Open the channel (in the serving event loop: gRPC's asyncio channels belong to one loop)."""
        import tritonclient.grpc.aio as grpcclient

        self._client = grpcclient.InferenceServerClient(self.url)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ready(self) -> bool:
        """Whether Triton answers and the `kandinsky` model is ready."""
        try:
            return bool(
                await self._client.is_model_ready(
                    MODEL_NAME, headers=self.headers, client_timeout=METADATA_TIMEOUT_S
                )
            )
        except Exception:  # noqa: BLE001 - refused, reset, timed out: not ready
            return False

    async def info(self) -> ServerInfo:
        """The served checkpoint's limits, from the `kandinsky` model's config (read once, then kept)."""
        if self._info is None:
            if not await self.ready():
                raise ModelNotReady(
                    f"the '{MODEL_NAME}' model at '{self.url}' (grpc) is not ready; retry later"
                )
            try:
                config = await self._client.get_model_config(
                    MODEL_NAME, headers=self.headers, as_json=True, client_timeout=METADATA_TIMEOUT_S
                )
            except Exception as error:  # noqa: BLE001 - classified below
                raise _grpc_failure(error, self.url) from error
            parameters = config["config"]["parameters"]
            self._served = json.loads(parameters["served_models"]["string_value"])
            self._info = ServerInfo.from_parameters(json.loads(parameters["server_info"]["string_value"]))
        return self._info

    @property
    def served_models(self) -> list[str]:
        """The repository's models (known after `info()`)."""
        return list(self._served)

    async def stream(self, inputs: Mapping[str, np.ndarray]) -> AsyncIterator[dict[str, np.ndarray]]:
        """The outputs of each response of one generation, the final one (with FINAL_OUTPUT) last.

        Raises the core's errors (InvalidRequest with the server's message, ServerBusy, ...). Leaving the
        iteration early (cancelled, closed) cancels the request on the server.
        """
        from tritonclient.grpc import InferInput
        from tritonclient.utils import np_to_triton_dtype

        tensors = []
        for name, array in inputs.items():
            tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        finished = asyncio.Event()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": MODEL_NAME, "inputs": tensors}
            await finished.wait()  # the request side stays open until the final response (or the cancel)

        responses = self._client.stream_infer(
            requests(),
            stream_timeout=DEFAULTS.max_generation_seconds + STREAM_MARGIN_S,
            headers=self.headers,
        )
        done = False
        try:
            async for result, error in responses:
                if error is not None:
                    raise _grpc_failure(error, self.url)
                names = [output.name for output in result.get_response().outputs]
                outputs = {name: result.as_numpy(name) for name in names}
                done = FINAL_OUTPUT in outputs
                yield outputs
                if done:
                    return
            raise ServerUnavailable(f"'{self.url}' closed the stream before the final response")
        except KandinskyClientError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - gRPC's own failures (refused, reset, deadline)
            raise _grpc_failure(error, self.url) from error
        finally:
            finished.set()
            if not done:
                responses.cancel()  # Triton cancels the request: the loop stops before its next step
                logger.info("generation stream cancelled before its final response")
