"""`sweep prefetch --each-node`: the prefetch (sweep.plan.prefetch) run once on every node of a Ray
cluster, each node filling its own caches."""
from __future__ import annotations

import socket
from collections.abc import Callable

from sweep.execution.ray_runtime import RayTarget, start_ray, stop_ray, worker_env
from sweep.plan.prefetch.items import PrefetchPlan
from sweep.plan.prefetch.results import NodeResult
from sweep.plan.prefetch.run import ray_identity, run_prefetch
from sweep.study.env import quiet_libraries


def _node_task(plan: PrefetchPlan, dry_run: bool) -> dict:
    """What runs on each node (a Ray task pinned there)."""
    quiet_libraries()
    try:
        return run_prefetch(plan, dry_run=dry_run).as_dict()
    except Exception as err:  # noqa: BLE001 - reported as this node's failure
        node = NodeResult(host=socket.gethostname(), dry_run=dry_run, error=f"{type(err).__name__}: {err}")
        ray_identity(node)
        return node.as_dict()


def prefetch_each_node(plan: PrefetchPlan, address: str, dry_run: bool = False,
                       on_node: Callable[[NodeResult], None] | None = None) -> list[NodeResult]:
    """Runs the prefetch on every alive node of the Ray cluster at `address`, one task pinned to each
    (NodeAffinitySchedulingStrategy, soft=False), with the driver's HF_*, SWEEP_* and TRANSFORMERS_*
    variables. Returns one NodeResult per node, in the order they finished."""
    import ray  # deferred: loading Ray costs about a second
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    start_ray(RayTarget(address))
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        task = ray.remote(_node_task)
        env = {"env_vars": worker_env()}
        pending = {}
        for node in nodes:
            # num_cpus=0: runs on every node, a head that offers no CPUs to trials included
            strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
            ref = task.options(num_cpus=0, max_retries=0, runtime_env=env, scheduling_strategy=strategy).remote(
                plan, dry_run)
            pending[ref] = node
        results = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            node = pending.pop(done[0])
            try:
                result = NodeResult.from_dict(ray.get(done[0]))
            except Exception as err:  # noqa: BLE001 - the node died, the task could not start there
                result = NodeResult(host=node.get("NodeManagerHostname") or node.get("NodeManagerAddress") or "?",
                                    node_id=node["NodeID"], address=node.get("NodeManagerAddress"), dry_run=dry_run,
                                    error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
            results.append(result)
            if on_node is not None:
                on_node(result)
        return results
    finally:
        stop_ray()
