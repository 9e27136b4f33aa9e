"""The router deployment: predicts every expert's loss on a prompt, batching concurrent prompts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ray import serve

from serve_app.batch import DeviceHealth, isolated
from serve_app.config import ROUTER_BATCHING, Batching
from serve_app.protocol import Failure
from serve_app.router import LearnedRouter, Router


@serve.deployment(ray_actor_options={"num_cpus": 0})
class RouterDeployment(DeviceHealth):
    """Holds the encoder and head; asks Ray for the resources the library gives it."""

    def __init__(
        self,
        encoder: str,
        checkpoint: str,
        load: Callable[..., Router] = LearnedRouter,
        revision: str | None = None,
    ):
        kwargs = {"revision": revision} if revision else {}
        self.router = load(encoder=encoder, checkpoint=checkpoint, **kwargs)
        self.batching: dict = {}
        self.batches = 0  # batches run, and prompts in them: their ratio is the mean batch size
        self.prompts = 0
        self.fault: str | None = None  # set when the device broke: check_health reports it

    def reconfigure(self, config: dict) -> None:
        """Apply `user_config`: the batch size and wait, changeable without a restart."""
        batching = Batching.model_validate(config)
        self.batching = batching.model_dump()
        self.predict.set_max_batch_size(batching.max_batch_size)
        self.predict.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    @serve.batch(**ROUTER_BATCHING.model_dump())
    async def predict(self, prompts: list[str]) -> list[dict[str, float] | Failure]:
        """Predicted loss (bits per byte) of every expert, one mapping per prompt; a prompt
        that fails gets a Failure and the others their predictions."""
        self.batches += 1
        self.prompts += len(prompts)
        run = lambda _, group: self.router.predict(group)  # noqa: E731
        # A thread keeps the replica's event loop free (health checks, queueing the next batch).
        return await asyncio.to_thread(isolated, prompts, lambda _: (), run, self._noticed)

    async def ready(self) -> bool:
        """Whether this replica can route (for the ingress's /healthz)."""
        return self.fault is None

    async def stats(self) -> dict:
        """Batches and prompts served by this replica, and its batching settings."""
        return {"batches": self.batches, "prompts": self.prompts, "batching": self.batching}
