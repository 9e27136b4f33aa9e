"""The router deployment: predicts every expert's loss on a prompt, batching concurrent prompts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ray import serve

from serve_app.batch import DeviceHealth, isolated
from serve_app.config import ROUTER_BATCHING, Batching
from serve_app.loaders import load_router
from serve_app.protocol import Failure

if TYPE_CHECKING:
    from serve_app.router import Router


@serve.deployment(ray_actor_options={"num_cpus": 0})
class RouterDeployment(DeviceHealth):
    """Holds the encoder and head; asks Ray for the resources the library gives it."""

    def __init__(
        self,
        encoder: str,
        checkpoint: str,
        load: Callable[..., Router] = load_router,
        revision: str | None = None,
        threads: int | None = None,
    ):
        import torch  # here, in the replica: the driver that binds the graph needs none

        # Every torch call of the replica runs on this one thread. OpenMP gives each thread that
        # starts parallel work a pool of its own, and once the pools' threads outnumber the
        # cores, libgomp stops spinning between ops: encoding from a second thread measured
        # 1.6x slower on 2 cores (docs/benchmarks.md, Route latency).
        self.torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-torch")
        kwargs = {"revision": revision} if revision else {}

        def start() -> Router:
            if threads is not None:  # else Ray's OMP_NUM_THREADS: the whole CPUs reserved, >= 1
                torch.set_num_threads(threads)
            return load(encoder=encoder, checkpoint=checkpoint, **kwargs)

        self.router = self.torch.submit(start).result()
        self.threads = self.torch.submit(torch.get_num_threads).result()
        self.batching: dict = {}
        self.batches = 0  # batches run, and prompts in them: their ratio is the mean batch size
        self.prompts = 0
        self.model_s = 0.0  # time spent in the router's model (encoder, head), on its thread
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

        def run(_: tuple, group: list[str]) -> list[dict[str, float]]:
            start = time.perf_counter()
            try:
                return self.router.predict(group)
            finally:
                self.model_s += time.perf_counter() - start

        # The torch thread keeps the replica's event loop free (health checks, queueing the
        # next batch).
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.torch, isolated, prompts, lambda _: (), run, self._noticed
        )

    async def ready(self) -> bool:
        """Whether this replica can route (for the ingress's /healthz)."""
        return self.fault is None

    async def stats(self) -> dict:
        """Batches and prompts served by this replica, the time its model took (model_s), its
        batching settings and torch's CPU threads."""
        return {
            "batches": self.batches,
            "prompts": self.prompts,
            "model_s": self.model_s,
            "batching": self.batching,
            "threads": self.threads,
        }
