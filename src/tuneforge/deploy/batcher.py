"""Micro-batching for `tuneforge serve`: one worker answers waiting requests from shared model calls.

A request is encoded **alone, before it joins a batch** (:meth:`Batcher.encode`), so an input
the task cannot encode is that request's own 422 and never reaches other people's requests. A
batch that still fails (the model raised) is answered **member by member**: each request runs
alone, so only the one that fails alone gets an error and the rest get their predictions.

Encoded fixed-shape inputs (images: ``(1, C, H, W)`` pixels) are kept and concatenated into the
batch. Variable-length inputs (texts) are encoded again together: padding them to one length is
the task's business (its tokenizer's pad id and side), and a fast tokenizer's second pass costs
tens of microseconds against milliseconds of model time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from ..errors import TuneforgeError

log = logging.getLogger("tuneforge.serve")

# What an encoder raises for an input it cannot take (a tokenizer's TypeError on a lone
# surrogate, PIL's ValueError, our own TuneforgeError): the request's fault, a 422.
INPUT_ERRORS = (TuneforgeError, TypeError, ValueError, UnicodeError)


class BadInput(Exception):
    """A request's inputs cannot be encoded; ``str(err)`` says why (answered with a 422)."""


@dataclass
class Pending:
    inputs: list
    encoded: dict
    adapter: str = "default"
    future: asyncio.Future | None = field(default=None, repr=False)


class Batcher:
    """Collects encoded requests and answers them from shared model calls (one worker thread
    at a time touches the model, so switching LoRA adapters per batch is safe)."""

    def __init__(self, predictor, cfg, metrics, *, fixed_shape: bool):
        self.predictor, self.cfg, self.metrics, self.fixed_shape = predictor, cfg, metrics, fixed_shape
        self.queue: asyncio.Queue = asyncio.Queue()
        self.lock = asyncio.Lock()  # batching off: one model call at a time, one request each
        # One tokenizer serves the handlers' encodes and the worker's: a fast tokenizer may
        # refuse to be used from two threads at once ("Already borrowed").
        self.encode_lock = threading.Lock()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        if self.cfg.batching:
            self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            await self.queue.join()  # in-flight requests finish first
            self.task.cancel()

    def encode(self, inputs: list) -> dict:
        """One request's inputs alone -> the model's batch; BadInput names what the task refused."""
        try:
            with self.encode_lock:
                return self.predictor.task.encode_inputs(inputs)
        except INPUT_ERRORS as err:
            raise BadInput(f"the model cannot take these inputs: {type(err).__name__}: {err}") from err

    async def submit(self, inputs: list, adapter: str = "default") -> torch.Tensor:
        """Encode (in a thread: image transforms take milliseconds), then batch; -> (N, C) probabilities."""
        request = Pending(inputs, await asyncio.to_thread(self.encode, inputs), adapter)
        if not self.cfg.batching:
            async with self.lock:
                self.metrics["batch"].observe(len(inputs))
                return await asyncio.to_thread(self._infer, [request])
        request.future = asyncio.get_running_loop().create_future()
        await self.queue.put(request)
        return await request.future

    def _infer(self, group: list[Pending]) -> torch.Tensor:
        p = self.predictor
        if self.cfg.adapters:
            p.model.set_adapter(group[0].adapter)
        with torch.inference_mode():
            if len(group) == 1:
                batch = group[0].encoded
            elif self.fixed_shape:
                batch = {k: torch.cat([r.encoded[k] for r in group]) for k in group[0].encoded}
            else:
                with self.encode_lock:
                    batch = p.task.encode_inputs([x for r in group for x in r.inputs])
            logits = p.model(**{k: v.to(p.device) for k, v in batch.items()})  # (B, C)
            return p.task.probabilities(logits).cpu()

    async def _run(self) -> None:
        while True:
            first = await self.queue.get()
            group, size = [first], len(first.inputs)
            deadline = time.perf_counter() + self.cfg.max_wait_ms / 1000
            while size < self.cfg.max_batch_size:
                timeout = deadline - time.perf_counter()
                try:
                    item = self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                # a full batch, or another adapter: answer what we have; this one starts the next batch
                if size + len(item.inputs) > self.cfg.max_batch_size or item.adapter != group[0].adapter:
                    await self._answer(group)
                    group, size = [item], len(item.inputs)
                    deadline = time.perf_counter() + self.cfg.max_wait_ms / 1000
                    continue
                group.append(item)
                size += len(item.inputs)
            await self._answer(group)

    async def _answer(self, group: list[Pending]) -> None:
        try:
            await self._call(group)
        except Exception as err:
            if len(group) == 1:
                _settle(group[0], error=err)
            else:
                # one member may be the cause: each runs alone, and only a failure alone is an error
                log.warning("a batch of %d requests failed (%s: %s); answering each alone",
                            len(group), type(err).__name__, err)
                for request in group:
                    try:
                        await self._call([request])
                    except Exception as alone:
                        _settle(request, error=alone)
        finally:
            for _ in group:
                self.queue.task_done()

    async def _call(self, group: list[Pending]) -> None:
        self.metrics["batch"].observe(sum(len(r.inputs) for r in group))
        probs = await asyncio.to_thread(self._infer, group)
        start = 0
        for request in group:
            _settle(request, result=probs[start:start + len(request.inputs)])
            start += len(request.inputs)


def _settle(request: Pending, result=None, error: BaseException | None = None) -> None:
    if request.future is None or request.future.done():  # the client went away
        return
    if error is not None:
        request.future.set_exception(error)
    else:
        request.future.set_result(result)
