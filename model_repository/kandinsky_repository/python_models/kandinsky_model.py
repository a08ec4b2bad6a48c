"""The `kandinsky` model: one request, one generation, the denoising loops next to the models.

A decoupled python-backend model that runs the client's own generation core (`kandinsky_client.
generation.Generator`) with a BLS transport: every network evaluation is a `pb_utils.InferenceRequest`
to the same Triton models the client would call, so they go through the per-step models' dynamic
batcher and concurrent generations share UNet and prior executions. With `step_batching` on, the
generations' steps go through a `StepBatcher` instead (`step_batching.py`): one BLS request per loop
iteration carries the current step of every generation in that loop. The request is checked with the
client's own validation, so a bad field gets the same message on both paths.

Per request: optional progress responses (one per denoising step, with `progress`; `preview_every` adds
a decoded preview), then one final response with the images as base64 PNG. A request is refused at once
("server busy") when `max_concurrent_generations` are running and `max_queued_generations` wait; a
waiting or running request that is cancelled (gRPC stream cancellation, HTTP client gone) or past its
time limit stops before its next step, so no orphaned work stays queued.

Parameters (config.pbtxt, written by the repository generator):
  server_info                 JSON {"unet": {...}, "prior": {...}, "unet_inpaint": {...} | null, ...}:
                              those models' config parameters (see kandinsky_core.server_info)
  max_concurrent_generations  generations running at once (threads)
  max_queued_generations      generations waiting for a thread before new ones are refused
  max_generation_seconds      time limit of a generation (a request may ask for less with timeout_s)
  served_models               JSON list of the repository's models (a mode whose models are absent is
                              refused by name, without asking Triton on every request)
  memory_budget_bytes         host memory the running generations' network calls may take at once
  memory_models               JSON {network model: its memory fit and limit} (cpu flavour; see
                              kandinsky_core.memory): a generation whose largest call exceeds its model's
                              limit is refused (invalid argument, naming it); one whose estimated peak
                              does not fit beside the running ones waits, in arrival order
  step_batching               "off": per-request dispatch (each generation's step is its own BLS
                              request); "on": step-level batching (see step_batching.py)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from kandinsky_core.components import ModelSpec, model_inputs
from kandinsky_core.errors import (
    Cancelled,
    InvalidRequest,
    KandinskyClientError,
    ModelNotReady,
    RequestTimeout,
    ServerBusy,
    error_from_message,
    error_message,
)
from kandinsky_core.generation import DECODER_STAGE, Generator
from kandinsky_core.memory import GenerationBudget, ModelMemory, format_gib, request_peak
from kandinsky_core.server_info import ServerInfo
from kandinsky_core.validation import plan_request
from kandinsky_core.wire import ResponseOptions, final_outputs, png_base64, request_from_inputs

from .step_batching import StepBatcher, step_batcher

logger = logging.getLogger("kandinsky_repository")

WAIT_LOG_S = 0.5  # a generation that waited longer than this for memory is logged


class BlsCall:
    """One BLS request from inside Triton: `(spec, inputs, deadline) -> outputs`, bounded by the deadline.

    Outputs are asked for in CPU memory. Without `preferred_memory` a BLS response keeps each output
    where the callee produced it (python_backend's `ResponseAlloc`): a TensorRT model, an ONNX Runtime
    model on a GPU instance, or an ensemble ending in one, answers in GPU memory, and `as_numpy()` on
    such a tensor raises. The loop's numpy arithmetic needs host memory, and the copy is the one the
    client loop pays too (Triton copies GPU outputs to the host to send them).
    """

    def __init__(self, pb_utils: Any) -> None:
        self.pb_utils = pb_utils
        self.cpu_memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)

    def __call__(
        self, spec: ModelSpec, inputs: Mapping[str, np.ndarray], deadline: float
    ) -> dict[str, np.ndarray]:
        """`inputs` as the served model takes them (`model_inputs`); `deadline` on time.monotonic()."""
        pb = self.pb_utils
        remaining_us = int((deadline - time.monotonic()) * 1e6)
        if remaining_us <= 0:
            raise RequestTimeout(f"the generation's time limit passed before '{spec.name}'")
        request = pb.InferenceRequest(
            model_name=spec.name,
            inputs=[pb.Tensor(name, value) for name, value in inputs.items()],
            requested_output_names=[t.name for t in spec.outputs],
            timeout=remaining_us,  # the callee's queue drops it when the generation's time is up
            preferred_memory=self.cpu_memory,
        )
        response = request.exec()
        if response.has_error():
            raise error_from_message(spec.name, response.error().message())
        return {
            t.name: _host_array(spec.name, pb.get_output_tensor_by_name(response, t.name))
            for t in spec.outputs
        }


class BlsTransport:
    """`infer(spec, inputs)` of one generation inside Triton: a BLS request per call, bounded by the
    generation's deadline; with a `StepBatcher`, the per-step models' calls (`called_per_step`) go through
    it and share one BLS request with the same step of the other generations in their loop.

    `check()` raises when the generation should stop (cancelled); with a batcher a step runs it while
    its batch forms or runs. `close()` when the generation ends (its loops stop waiting for it).
    """

    def __init__(
        self,
        call: BlsCall,
        deadline: float,
        batcher: StepBatcher | None = None,
        name: str = "",
        check: Callable[[], None] | None = None,
    ) -> None:
        self.call = call
        self.deadline = deadline
        self.batcher = batcher
        self.member = batcher.member(name) if batcher is not None else None
        self.check = check

    @property
    def batched(self) -> bool:
        """Whether the per-step models' calls go through the step batcher."""
        return self.batcher is not None

    def infer(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = model_inputs(spec, inputs)
        if self.batcher is None or self.member is None:
            return self.call(spec, arrays, self.deadline)
        if getattr(spec, "called_per_step", False):
            return self.batcher.infer(self.member, spec, arrays, self.deadline, self.check)
        self.batcher.leave(self.member)  # another model: its step loop does not wait for it meanwhile
        return self.call(spec, arrays, self.deadline)

    def close(self) -> None:
        if self.batcher is not None and self.member is not None:
            self.batcher.leave(self.member)


def _host_array(model: str, tensor: Any) -> np.ndarray:
    """A BLS output as numpy; a tensor left in GPU memory despite the CPU preference is a clear error."""
    if not tensor.is_cpu():
        raise RuntimeError(
            f"'{model}' returned '{tensor.name()}' in GPU memory although CPU memory was asked for "
            "(preferred_memory needs Triton 23.04 or later)"
        )
    return tensor.as_numpy()


# The Triton error code each client error kind is answered with.
def _error_code(pb_utils: Any, error: Exception) -> int:
    codes = pb_utils.TritonError
    if isinstance(error, InvalidRequest):
        return codes.INVALID_ARG
    if isinstance(error, Cancelled):
        return codes.CANCELLED
    if isinstance(error, ServerBusy | RequestTimeout | ModelNotReady):
        return codes.UNAVAILABLE
    return codes.INTERNAL


class KandinskyGeneration:
    """TritonPythonModel of the `kandinsky` model (decoupled)."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.info = ServerInfo.from_parameters(json.loads(parameters["server_info"]))
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.max_running = int(parameters["max_concurrent_generations"])
        self.capacity = self.max_running + int(parameters["max_queued_generations"])
        self.max_seconds = float(parameters["max_generation_seconds"])
        self.served_models = set(json.loads(parameters["served_models"]))
        self.pool = ThreadPoolExecutor(self.max_running, thread_name_prefix="generation")
        self.call = BlsCall(pb_utils)
        self.step_batcher = step_batcher(parameters, self.call)  # None: per-request dispatch
        self.lock = threading.Lock()
        self.admitted = 0  # running + waiting for a thread
        # The memory budget running generations share, and each network model's part (cpu flavour; none
        # on the GPU flavours, whose networks reserve their device memory at load).
        self.memory = GenerationBudget(int(parameters.get("memory_budget_bytes", "0")))
        self.memory_models = {
            name: memory
            for name, values in json.loads(parameters.get("memory_models", "{}")).items()
            if (memory := ModelMemory.from_parameters(values)) is not None
        }
        self.held = threading.local()  # the bytes this generation thread holds of the budget
        self.zero_image_embeds: np.ndarray | None = None

    def execute(self, requests: list[Any]) -> None:
        """Admit or refuse each request at once; admitted ones run on the thread pool."""
        for request in requests:
            sender = request.get_response_sender()
            arrived = time.monotonic()
            with self.lock:
                admitted = self.admitted < self.capacity
                self.admitted += admitted
            if not admitted:
                busy = ServerBusy(
                    f"{self.max_running} generations are running and {self.capacity - self.max_running} "
                    "are waiting; retry later"
                )
                self._send_error(sender, busy)
                continue
            self.pool.submit(self._serve, request, sender, arrived)
        return None

    def _serve(self, request: Any, sender: Any, arrived: float) -> None:
        try:
            self._generate(request, sender, arrived)
        except KandinskyClientError as error:
            self._send_error(sender, error)
        except Exception as error:  # noqa: BLE001 - one failed generation must not take the model down
            logger.exception("generation failed")
            self._send_error(sender, RuntimeError(f"internal error: {error}"))
        finally:
            self.memory.release(getattr(self.held, "bytes", 0))
            self.held.bytes = 0
            with self.lock:
                self.admitted -= 1

    def _generate(self, request: Any, sender: Any, arrived: float) -> None:
        pb = self.pb
        inputs = {}
        for name in self.input_names:
            tensor = pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        generation_request, options = request_from_inputs(inputs, json.loads(request.parameters() or "{}"))
        deadline = arrived + self._time_limit(request, options)
        self._stop_if_abandoned(request, deadline)  # it may have waited for a thread
        plan = plan_request(generation_request, self.info)  # checked, with the schedulers its loops run
        checked = plan.request
        self._hold_memory(request, checked, deadline)  # before the transport joins any step loop
        transport = BlsTransport(
            self.call,
            deadline,
            self.step_batcher,
            threading.current_thread().name,
            check=lambda: self._stop_if_abandoned(request, deadline),
        )
        generator = Generator(transport, self.info, self.zero_image_embeds)
        missing = [m for m in generator.required_models(checked.mode) if m not in self.served_models]
        if missing:
            raise ModelNotReady(
                f"mode {checked.mode} needs model(s) {missing}, which this server does not have"
            )
        loop_steps, total = plan.loop_steps, plan.total_steps
        done = 0

        def step_end(stage: str, step: int, timestep: int, latents: np.ndarray) -> None:
            nonlocal done
            done += 1
            # Step batching: the next step checks cancellation (an IPC round trip) while its batch forms
            # (BlsTransport), not here, where it would hold the batch; the last step of a loop checks here.
            self._stop_if_abandoned(
                request, deadline, cancellation=not (transport.batched and step + 1 < loop_steps[stage])
            )
            if options.progress:
                outputs = {
                    "stage": np.array([stage.encode()], dtype=np.object_),
                    "step": np.array([step + 1], np.int64),
                    "num_steps": np.array([loop_steps[stage]], np.int64),
                    "timestep": np.array([timestep], np.int64),
                    "done": np.array([done], np.int64),
                    "total": np.array([total], np.int64),
                }
                if (
                    options.preview_every
                    and stage == DECODER_STAGE
                    and (step + 1) % options.preview_every == 0
                ):
                    decode = generator.movq(checked.mode).decode_image
                    rgb = transport.infer(decode, {"latents": latents})["image_rgb"]
                    outputs["preview"] = np.array([png_base64(_image(x)) for x in rgb], dtype=np.object_)
                sender.send(pb.InferenceResponse([pb.Tensor(k, v) for k, v in outputs.items()]))

        try:
            result = generator.generate(plan, None, step_end)
        finally:
            transport.close()  # its step loops stop counting on it (an error, a cancel, or done)
        self.zero_image_embeds = generator._zero_image_embeds
        outputs = final_outputs(result, checked.seed, options.return_image_embeds)
        final = pb.InferenceResponse([pb.Tensor(k, v) for k, v in outputs.items()])
        sender.send(final, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _hold_memory(self, request: Any, checked: Any, deadline: float) -> None:
        """Refuse a generation whose largest network call can never fit its model's share of the memory
        budget (InvalidRequest naming the limit), else wait, in arrival order, until its estimated peak fits
        beside the running generations' (released in `_serve`). It waits on its generation thread: with
        `max_concurrent_generations` threads waiting, later requests queue, then are refused as busy."""
        models = Generator(None, self.info).required_models(checked.mode)  # the mode's served models only
        peak = request_peak(checked, models, self.memory_models)
        waited = self.memory.acquire(peak, lambda: self._stop_if_abandoned(request, deadline))
        self.held.bytes = peak
        if waited > WAIT_LOG_S:
            logger.info("a generation waited %.1f s for %s of the memory budget", waited, format_gib(peak))

    def _time_limit(self, request: Any, options: ResponseOptions) -> float:
        """The server's limit, lowered by the request's own (timeout_s, or Triton's request timeout)."""
        limits = [self.max_seconds]
        if options.timeout_s:
            if not 0 < options.timeout_s < float("inf"):
                raise InvalidRequest("timeout_s", f"is {options.timeout_s}; it must be > 0 seconds")
            limits.append(options.timeout_s)
        if request.timeout():
            limits.append(request.timeout() / 1e6)
        return min(limits)

    @staticmethod
    def _stop_if_abandoned(request: Any, deadline: float, cancellation: bool = True) -> None:
        if cancellation and request.is_cancelled():
            raise Cancelled("the client cancelled the generation")
        if time.monotonic() > deadline:
            raise RequestTimeout("the generation's time limit passed; it was stopped")

    def _send_error(self, sender: Any, error: Exception) -> None:
        pb = self.pb
        message = error_message(error) if isinstance(error, KandinskyClientError) else str(error)
        logger.info("generation refused: %s", message)
        response = pb.InferenceResponse(error=pb.TritonError(message, _error_code(pb, error)))
        sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _image(rgb: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(rgb)
