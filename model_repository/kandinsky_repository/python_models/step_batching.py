"""Step-level (continuous) batching of the per-step networks across the generations of the `kandinsky` model.

With per-request dispatch every running generation sends its own BLS request per denoising step, and
the per-step model's dynamic batcher merges whatever happens to be queued when its instance frees up:
the steps that come back together are resubmitted a moment apart, the batcher fires on the first one,
and concurrent generations ping-pong (one generation per execution at concurrency 2). Here the
generation threads of one model instance share a `StepBatcher`: a generation's `infer` on a per-step
model (`called_per_step` in the registry: the prior and the UNets) submits its rows and blocks, and the
batcher sends one BLS request carrying the current step of every generation in that loop, then hands each
its own rows of the result. The generation core is unchanged: the batching sits under `infer`.

One *loop* per network and shape group: the key is the model and the per-row shape and dtype of every
input (same height/width and UNet variant; the prior separately). Each row keeps its own timestep (the
registry's `timestep` is per row), scheduler, guidance, seed and noise stay the generation's own, and
inputs shared by a generation's rows (the ControlNet hint) arrive already repeated per row, so the
concatenation is plain.

When a loop dispatches, in this order (`_Loop.ready`):
1. the waiting rows fill the model's batch (`max_batch_size`, or fewer where the memory budget's per-call
   limit of the CPU flavour allows fewer at the loop's size): a full batch goes at once;
2. a batch of this loop is running: wait for it, because its generations come back within a scheduler
   step and join (dispatching now is what makes per-request dispatch ping-pong);
3. every member of the loop is waiting: go;
4. some member is between two steps (its scheduler step, its progress response): wait for it at most
   max(`straggler_wait_s`, STRAGGLER_STEP_FRACTION of the loop's last call) after the loop became
   idle, then go without it (it joins again after the batch that left without it).
A generation is a *member* of a loop from its first step in it until it calls any other model (the
prior's post-processing, a preview decode, the decoder) or ends; a preview-decoding generation has left
and holds nobody. A batch takes the oldest submission first and fills up with later ones that fit,
so every submission is in the next batch at the latest once it is the oldest (no starvation); beyond the
batch limit the loop sends several batches. A new generation joins at its next step boundary; it never
waits for another to finish.

Deadlines, cancellation, errors:
- a submission whose generation's deadline has passed is left out of the batch at dispatch and gets the
  same `RequestTimeout` per-request dispatch gives; the batch's BLS timeout is the longest remaining of
  its members' (none is dropped for another's deadline);
- cancellation (`check`, the model's `is_cancelled()`, an IPC round trip) is checked once a step is
  submitted, while its batch forms or runs, instead of between two steps where it would hold the batch
  (the last step of a loop is still checked after it, in the model's step callback): a step withdrawn
  before it was sent leaves at once; rows already in a batch are computed and dropped; the others in
  the batch are not disturbed;
- a failed batched call re-runs each member alone, each from its own thread with its own deadline, so a
  per-request input error (e.g. one generation's non-finite latents) fails only that generation, with the
  message per-request dispatch gives it, and the others go on with exactly the rows they would have had.
  A single-member call's error is that member's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kandinsky_core.components import ComponentSpec, ModelSpec
from kandinsky_core.errors import RequestTimeout

logger = logging.getLogger("kandinsky_repository")

# The `kandinsky` model's config parameter, its values, and the default the repository generator writes.
STEP_BATCHING_PARAMETER = "step_batching"
PER_REQUEST = "off"  # each generation sends its own BLS request per step (Triton's batcher merges them)
STEP_BATCHING = "on"  # one BLS request per loop iteration, carrying every waiting generation's step
STEP_BATCHING_MODES = (PER_REQUEST, STEP_BATCHING)
# Per-request dispatch stays the default: on the timed H100 flavour step batching does not meet the
# throughput target (docs/benchmarks.md, "Step-level batching").
DEFAULT_STEP_BATCHING = PER_REQUEST

# How long a loop with nothing running waits for a member that is between two steps before it
# dispatches without it: STRAGGLER_WAIT_S, or STRAGGLER_STEP_FRACTION of the loop's last call when that
# is longer. A scheduler step takes well under a millisecond, but on a busy CPU (many generation threads
# sharing the GIL, other processes) a thread may wait milliseconds to run. A generation left behind waits
# for the batch that went without it (a whole call) before it joins again, so waiting up to half a call
# for it costs the others less than it saves; and it bounds what one slow generation costs the others.
STRAGGLER_WAIT_S = 0.005
STRAGGLER_STEP_FRACTION = 0.5

# (spec, inputs with the batch first, deadline on time.monotonic()) -> every output of the spec. Raises
# the generation's error (a KandinskyClientError, e.g. RequestTimeout when the deadline has passed).
Call = Callable[[ModelSpec, Mapping[str, np.ndarray], float], dict[str, np.ndarray]]
# (spec, one submission's inputs) -> the most rows one call of that loop may carry, when something other
# than the model's `max_batch_size` bounds it (the memory budget's per-call limit on the CPU flavour).
RowLimit = Callable[[ModelSpec, Mapping[str, np.ndarray]], int]

_PENDING, _RUNNING, _BETWEEN = "pending", "running", "between steps"


class Member:
    """One generation's place in the batcher: the loop it is in (None: none) and where it stands there."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: _Loop | None = None
        self.state = _BETWEEN


@dataclass(eq=False)
class _Submission:
    """One generation's rows of one step, and what its thread is woken for."""

    member: Member
    rows: int
    inputs: Mapping[str, np.ndarray]
    deadline: float
    submitted: float
    wake: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    outputs: dict[str, np.ndarray] | None = None
    error: BaseException | None = None
    alone: bool = False  # its batch failed: run it alone (its own error, if it has one)
    lead: list[_Submission] | None = None  # a batch this submission's thread is to send


class _Loop:
    """The generations stepping one network at one shape group, and their waiting submissions."""

    def __init__(self, spec: ModelSpec, key: tuple, max_rows: int) -> None:
        self.spec = spec
        self.key = key
        self.max_rows = max_rows
        self.pending: list[_Submission] = []  # oldest first
        self.members: set[Member] = set()
        self.running = 0  # batches sent and not back yet
        self.idle_since = 0.0  # when the last batch came back
        self.call_s = 0.0  # how long the last call took

    def describe(self) -> str:
        return f"{self.spec.name} {[shape for _, _, shape in self.key[1]]}"

    def wait_until(self, straggler_wait_s: float) -> float:
        """When waiting submissions stop waiting for members between two steps."""
        wait = max(straggler_wait_s, STRAGGLER_STEP_FRACTION * self.call_s)
        return max(self.pending[0].submitted, self.idle_since) + wait

    def ready(self, now: float, straggler_wait_s: float) -> list[list[_Submission]]:
        """The batches to send now (taken out of `pending`), by the rules of the module docstring."""
        batches = []
        while self.pending:
            if sum(s.rows for s in self.pending) < self.max_rows:
                if self.running:
                    break  # the running batch's generations come back to join this one
                between = any(m.state == _BETWEEN for m in self.members)
                if between and now < self.wait_until(straggler_wait_s):
                    break
            batches.append(self._take())
            self.running += 1
        return batches

    def _take(self) -> list[_Submission]:
        """The oldest submission, then every later one that still fits, up to the batch limit."""
        batch, rows, rest = [], 0, []
        for submission in self.pending:
            if not batch or rows + submission.rows <= self.max_rows:
                batch.append(submission)
                rows += submission.rows
                submission.member.state = _RUNNING
            else:
                rest.append(submission)
        self.pending = rest
        return batch


class StepBatcher:
    """The loops of one `kandinsky` model instance, shared by its generation threads.

    No thread of its own: the thread whose submission (or departure, or timer) makes a batch ready
    sends it when it is in that batch, else the batch's oldest submission's thread is woken to send it.
    """

    def __init__(
        self,
        call: Call,
        straggler_wait_s: float = STRAGGLER_WAIT_S,
        clock: Callable[[], float] = time.monotonic,
        row_limit: RowLimit | None = None,
    ) -> None:
        self.call = call
        self.row_limit = row_limit
        self.straggler_wait_s = straggler_wait_s
        self.clock = clock
        self._lock = threading.Lock()
        self._loops: dict[tuple, _Loop] = {}

    # -- what a generation calls ------------------------------------------------------------------------

    def member(self, name: str) -> Member:
        """A new generation's membership (in no loop until its first step)."""
        return Member(name)

    def leave(self, member: Member) -> None:
        """The generation calls something else or has ended: its loop stops waiting for it."""
        with self._lock:
            loop = member.loop
            if loop is None:
                return
            self._detach(member)
            batches = loop.ready(self.clock(), self.straggler_wait_s)
            self._assign(batches, None)

    def infer(
        self,
        member: Member,
        spec: ModelSpec,
        inputs: Mapping[str, np.ndarray],
        deadline: float,
        check: Callable[[], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """One step of `member` on `spec` (inputs as the served model takes them), sent with the steps of
        every other generation in the same loop; returns this generation's rows of every output.

        `check()` raises when the generation should stop (cancelled). It runs once the step is submitted,
        while the batch forms or runs, not between two steps, where it would hold the batch (the
        `kandinsky` model's check is an IPC round trip to Triton). A step withdrawn before it was sent
        raises at once; one already in a batch raises when that batch is back (its rows dropped).
        """
        key = (spec.name, tuple((name, value.dtype.str, value.shape[1:]) for name, value in inputs.items()))
        now = self.clock()
        submission = _Submission(member, len(next(iter(inputs.values()))), inputs, deadline, now)
        with self._lock:
            loop = self._loops.get(key)
            if loop is None:
                loop = self._loops[key] = _Loop(spec, key, self._max_rows(spec, inputs))
                logger.debug("step batching: new loop %s", loop.describe())
            if member.loop is not loop:
                self._detach(member)
                member.loop = loop
                loop.members.add(member)
            member.state = _PENDING
            loop.pending.append(submission)
            own = self._assign(loop.ready(now, self.straggler_wait_s), submission)
        if own is not None:
            self._send(loop, own, submission)
        stop = None
        if check is not None:
            try:
                check()
            except Exception as error:  # noqa: BLE001 - raised below, once its batch no longer needs it
                stop = error
                if self._withdraw(loop, submission):
                    raise
        outputs = self._await(loop, submission)
        if stop is not None:
            raise stop
        return outputs

    # -- inside ----------------------------------------------------------------------------------------

    def _max_rows(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> int:
        """The rows a call of this loop may carry: the model's batch limit, or less where `row_limit` says
        (never below one submission: a generation's own step is what per-request dispatch sends too)."""
        rows = spec.max_batch_size
        if self.row_limit is not None:
            rows = min(rows, self.row_limit(spec, inputs))
        return max(rows, len(next(iter(inputs.values()))))

    def _withdraw(self, loop: _Loop, submission: _Submission) -> bool:
        """Take a submission back if no batch holds it yet (its generation stops); True if it was."""
        with self._lock:
            if submission not in loop.pending:
                return False
            loop.pending.remove(submission)
            self._detach(submission.member)
            self._assign(loop.ready(self.clock(), self.straggler_wait_s), None)
            return True

    def _detach(self, member: Member) -> None:
        loop = member.loop
        if loop is not None:
            loop.members.discard(member)
            member.loop = None
            self._forget_if_idle(loop)
        member.state = _BETWEEN

    def _forget_if_idle(self, loop: _Loop) -> None:
        """Drop a loop nobody is in (a shape group may not come back). Called with the lock held."""
        if not loop.members and not loop.pending and not loop.running and self._loops.get(loop.key) is loop:
            del self._loops[loop.key]

    def _assign(self, batches: list[list[_Submission]], mine: _Submission | None) -> list[_Submission] | None:
        """Hand each batch to a thread that sends it: the caller's for the batch holding `mine` (returned),
        else the batch's oldest submission's. Called with the lock held."""
        own = None
        for batch in batches:
            if mine is not None and mine in batch:
                own = batch
            else:
                batch[0].lead = batch
                batch[0].wake.set()
        return own

    def _await(self, loop: _Loop, submission: _Submission) -> dict[str, np.ndarray]:
        """Wait for this submission's rows, sending the batches this thread is handed meanwhile."""
        try:
            while True:
                with self._lock:
                    submission.wake.clear()
                    lead, submission.lead = submission.lead, None
                    if lead is None and submission.finished:
                        break
                    timeout = None
                    if lead is None and submission in loop.pending and not loop.running:
                        timeout = max(0.0, loop.wait_until(self.straggler_wait_s) - self.clock())
                if lead is not None:
                    self._send(loop, lead, submission)
                    continue
                if submission.wake.wait(timeout):
                    continue
                with self._lock:  # the wait for members between two steps is over
                    own = self._assign(loop.ready(self.clock(), self.straggler_wait_s), submission)
                if own is not None:
                    self._send(loop, own, submission)
        except BaseException:
            self._withdraw(loop, submission)
            raise
        if submission.alone:
            logger.info("step batching: %s re-run alone after its batch failed", submission.member.name)
            return self.call(loop.spec, submission.inputs, submission.deadline)
        if submission.error is not None:
            raise submission.error
        if submission.outputs is None:  # a finished submission has outputs, an error, or runs alone
            raise RuntimeError(f"step batching: {submission.member.name}'s step finished without a result")
        return submission.outputs

    def _send(self, loop: _Loop, batch: list[_Submission], mine: _Submission) -> None:
        """One BLS request for `batch` (less its members past their deadline), its rows handed back."""
        spec = loop.spec
        now = self.clock()
        live = []
        for submission in batch:
            if submission.deadline <= now:
                submission.error = RequestTimeout(f"the generation's time limit passed before '{spec.name}'")
            else:
                live.append(submission)
        try:
            if live:
                self._run(spec, live)
        finally:
            with self._lock:
                loop.running -= 1
                loop.idle_since = self.clock()
                loop.call_s = loop.idle_since - now
                for submission in batch:
                    if submission.outputs is None and submission.error is None:
                        submission.alone = True  # the sender stopped before the batch came back
                    submission.finished = True
                    if submission.member.loop is loop:
                        submission.member.state = _BETWEEN
                    if submission is not mine:
                        submission.wake.set()
                self._assign(loop.ready(loop.idle_since, self.straggler_wait_s), None)
                if loop.pending and not loop.running:
                    loop.pending[0].wake.set()  # the oldest times the wait for members between steps
                self._forget_if_idle(loop)

    def _run(self, spec: ModelSpec, live: list[_Submission]) -> None:
        """Send the live members' rows as one request and split the outputs by their row counts."""
        rows = sum(s.rows for s in live)
        if len(live) == 1:
            inputs = live[0].inputs
        else:
            inputs = {name: np.concatenate([s.inputs[name] for s in live]) for name in live[0].inputs}
        deadline = max(s.deadline for s in live)
        logger.debug("step batching: %s, %d generations, %d rows", spec.name, len(live), rows)
        try:
            outputs = self.call(spec, inputs, deadline)
            wrong = {name: len(value) for name, value in outputs.items() if len(value) != rows}
            if wrong:
                raise RuntimeError(f"'{spec.name}' answered {wrong} rows for a batch of {rows}")
        except Exception as error:  # noqa: BLE001 - handed to the generations it belongs to
            if len(live) == 1:
                live[0].error = error
                return
            logger.warning(
                "step batching: a batch of %d generations on '%s' failed (%s); each is re-run alone",
                len(live),
                spec.name,
                error,
            )
            for submission in live:
                submission.alone = True
            return
        start = 0
        for submission in live:
            submission.outputs = {
                name: value[start : start + submission.rows] for name, value in outputs.items()
            }
            start += submission.rows


def step_batcher(parameters: Mapping[str, str], call: Call) -> StepBatcher | None:
    """The `kandinsky` model's batcher as its `step_batching` parameter says (None: per-request dispatch).

    Where the per-step models' config parameters (repeated in `server_info`) carry a memory budget, a
    loop's calls stay within each model's per-call limit (`memory_row_limit`): a merged call over it
    would be refused whole and re-run member by member.
    """
    mode = parameters.get(STEP_BATCHING_PARAMETER, DEFAULT_STEP_BATCHING)
    if mode not in STEP_BATCHING_MODES:
        raise ValueError(f"parameter '{STEP_BATCHING_PARAMETER}' is '{mode}'; one of {STEP_BATCHING_MODES}")
    logger.info("kandinsky: %s", "step batching" if mode == STEP_BATCHING else "per-request dispatch")
    if mode != STEP_BATCHING:
        return None
    server_info = json.loads(parameters.get("server_info") or "{}")
    return StepBatcher(call, row_limit=memory_row_limit(server_info))


def memory_row_limit(server_info: Mapping[str, Any]) -> RowLimit | None:
    """The rows per call each per-step model's memory limit allows at a loop's shapes; None without a
    memory budget. `server_info`: the decoded config parameters of the INFO_MODELS (`unet`, `prior`, ...)."""
    limits = {name: p for name, p in server_info.items() if p and p.get("memory_fit")}
    if not limits:
        return None
    from kandinsky_core.components import ModelDims
    from kandinsky_core.memory import ModelMemory, call_size

    dims = ModelDims.from_dict(server_info["unet"]["kandinsky_dims"])
    memories = {name: ModelMemory.from_parameters(p) for name, p in limits.items()}

    def row_limit(spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> int:
        memory = memories.get(spec.name)
        if memory is None or not isinstance(spec, ComponentSpec):
            return spec.max_batch_size
        _, height, width = call_size(spec, {name: value.shape for name, value in inputs.items()}, dims)
        return max(memory.rows_per_call(spec.max_batch_size, height, width), 1)

    return row_limit


__all__ = [
    "DEFAULT_STEP_BATCHING",
    "PER_REQUEST",
    "STEP_BATCHING",
    "STEP_BATCHING_MODES",
    "STEP_BATCHING_PARAMETER",
    "STRAGGLER_WAIT_S",
    "Member",
    "StepBatcher",
    "step_batcher",
]
