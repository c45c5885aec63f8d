"""What each trial reserves, checked against the live Ray cluster before Tune waits for it."""

from __future__ import annotations

import socket

from harness.grid import Resources


class ClusterUnreachable(RuntimeError):
    """--address names a Ray cluster this driver cannot join, or the cluster cannot hold one trial."""


def check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """A host:port address must accept a TCP connection before Ray is asked to join it:
    Ray itself retries an unreachable head for minutes before it says anything."""
    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as error:
        raise ConnectionError(f"nothing answers at {address} ({error})") from None


def resolve_resources(resources: Resources, cluster: dict, largest_node: dict | None = None) -> dict:
    """What each trial reserves. `largest_node`: the most CPUs and GPUs any one live node has
    (a trial runs on one node); a trial that asks for more could never start, and Tune would
    wait for it forever, so that is refused here."""
    gpus = resources.gpus_per_trial
    if gpus == "auto":
        gpus = 1 if cluster.get("GPU", 0) > 0 else 0
    largest = largest_node if largest_node is not None else cluster
    for name, wanted, key in (("cpus_per_trial", resources.cpus_per_trial, "CPU"), ("gpus_per_trial", gpus, "GPU")):
        if float(wanted) > largest.get(key, 0):
            raise ClusterUnreachable(
                f"resources.{name}: {wanted} is more than any node of this Ray cluster has ({largest.get(key, 0):g} "
                f"{key}s on the largest): no trial could start; lower it, or add a larger node"
            )
    return {"cpu": resources.cpus_per_trial, "gpu": float(gpus)}


def tune_keeps_checkpoints(nodes: list[dict]) -> bool:
    """Whether Tune should keep its own copy of each training checkpoint: only with more than
    one live node, where a retried trial may land on a node without the trial's folder."""
    return sum(1 for n in nodes if n.get("Alive")) > 1


def largest_node(nodes: list[dict]) -> dict:
    """The most CPUs and GPUs on one live node, from ray.nodes()."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    return {key: max((r.get(key, 0) for r in alive), default=0) for key in ("CPU", "GPU")}
