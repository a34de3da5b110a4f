"""The experts vLLM's routers chose, kept from TRL's vLLM generation for routing replay.

vLLM returns the routed experts of every token when the engine is started with
``enable_return_routed_experts=True`` (``LLM(...)``; ``vllm serve --enable-return-routed-experts``), from
vLLM 0.14 on; the layouts are those of :mod:`rlvr.rollouts.engine_routing`. TRL 1.16 builds the engine and
drops the field. This module is the thin layer between them:

* :func:`routed_experts_returned`: while ``GRPOTrainer.__init__`` runs, TRL's colocated ``LLM(...)`` is built
  with the flag. In server mode the server is started by the user: ``trl vllm-serve --model ...
  --enable-return-routed-experts`` (TRL passes unknown flags through to ``vllm serve``; vLLM >= 0.22 returns
  the experts over HTTP).
* :class:`VLLMRoutedExperts`: wraps one ``VLLMGeneration``: keeps what ``llm.generate`` (colocate) or the
  server's ``/v1/completions`` response (server) returned, and hands this process's rows to the trainer
  after each ``generate`` call (``take_routing``), sliced exactly as TRL slices the completions.

Nothing here has run against vLLM, which needs CUDA; it is tested on CPU with stand-ins of vLLM's
``RequestOutput`` and of the server's JSON, and with the copy engine, whose routing goes through the
same layout function.
"""

from __future__ import annotations

import contextlib
import functools

from rlvr.rollouts.engine_routing import EngineRouting


@contextlib.contextmanager
def routed_experts_returned(enabled: bool):
    """Build TRL's colocated vLLM engine with ``enable_return_routed_experts=True`` while this is active."""
    if not enabled:
        yield
        return
    from trl.generation import vllm_generation

    original = getattr(vllm_generation, "LLM", None)
    if original is None:  # vLLM is not installed: TRL raises its own ImportError
        yield
        return
    vllm_generation.LLM = functools.partial(original, enable_return_routed_experts=True)
    try:
        yield
    finally:
        vllm_generation.LLM = original


def _request_routings(request_outputs) -> list[EngineRouting]:
    """vLLM ``RequestOutput``s -> one :class:`EngineRouting` per completion, in TRL's order (request-major).
    0.21+ puts the prompt's experts on the request (``prompt_routed_experts``)."""
    routings = []
    for request in request_outputs:
        prompt = getattr(request, "prompt_routed_experts", None)
        for completion in request.outputs:
            routings.append(EngineRouting(getattr(completion, "routed_experts", None), prompt))
    return routings


def _response_routings(response: dict) -> list[EngineRouting]:
    """An OpenAI-style ``/v1/completions`` response (vLLM >= 0.22) -> one :class:`EngineRouting` per choice."""
    return [
        EngineRouting(choice.get("routed_experts"), choice.get("prompt_routed_experts"))
        for choice in response.get("choices", [])
    ]


class VLLMRoutedExperts:
    """Keeps the routed experts of a TRL ``VLLMGeneration`` (``generation``) for the rows of this process.

    Args:
        generation: TRL's ``VLLMGeneration`` (colocate or server mode).
        process_index, num_processes: this process among the trainer's.
        broadcast: ``broadcast(list, from_process)`` (:meth:`rlvr.utils.collectives.Collectives.broadcast_objects`):
            in server mode the main process alone talks to the server.
    """

    def __init__(self, generation, process_index: int, num_processes: int, broadcast):
        self.generation = generation
        self.process_index, self.num_processes, self.broadcast = process_index, num_processes, broadcast
        self._captured: list[EngineRouting] | None = None
        self._routing: list[EngineRouting] | None = None
        if generation.mode == "colocate":
            llm = generation.llm
            llm.generate = self._capture(llm.generate, _request_routings)
        elif getattr(generation, "vllm_client", None) is not None:  # the main process in server mode
            client = generation.vllm_client
            client._post = self._capture(client._post, _response_routings)
        generation.generate = self._after(generation.generate)

    def _capture(self, call, read):
        @functools.wraps(call)
        def capturing(*args, **kwargs):
            result = call(*args, **kwargs)
            self._captured = read(result)
            return result

        return capturing

    def _after(self, generate):
        @functools.wraps(generate)
        def generate_and_keep(prompts, *args, **kwargs):
            self._captured = None
            result = generate(prompts, *args, **kwargs)
            self._routing = self._this_process(self._captured, len(prompts))
            return result

        return generate_and_keep

    def _this_process(self, captured: list[EngineRouting] | None, rows: int) -> list[EngineRouting] | None:
        """This process's rows of what vLLM returned, as TRL slices its completions."""
        generation = self.generation
        if generation.mode == "server":
            shared = [captured]
            if self.num_processes > 1:
                self.broadcast(shared, 0)
            captured = shared[0]
            first = self.process_index * rows
        elif getattr(generation, "tensor_parallel_size", 1) > 1:  # every rank of a TP group generated the group's rows
            import torch.distributed

            first = torch.distributed.get_rank(group=generation.tp_group) * rows
        else:
            first = 0
        if captured is None:
            return None
        mine = captured[first : first + rows]
        if len(mine) != rows or any(routing.routed_experts is None for routing in mine):
            return None  # the engine returned no routed experts (started without the flag, or vLLM < 0.14)
        return mine

    def take_routing(self) -> list[EngineRouting] | None:
        """The routed experts of this process's rows from the last ``generate`` call (None: none returned)."""
        routing, self._routing = self._routing, None
        return routing
