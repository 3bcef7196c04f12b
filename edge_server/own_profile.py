"""The edge server's own profile of the run's model.

The planner predicts the server's part of a round from a profile. The reference device's
would make the edge PC look as slow as a board, and every split cut's server time wrong by
the ratio of their speeds. So when ``--auto`` plans without ``--server-profile``, the
server measures itself at start -- briefly: the
pooled batch sizes it steps on, a few repeats, no ONNX -- on the threads it trains with, and
keeps the result in the cache (per model fingerprint, host, threads and batch sizes), so a
second run on the same PC starts at once.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path

import torch

from toolkit.devices import cache_tag
from toolkit.errors import ProfileError
from toolkit.models import LayeredModel
from toolkit.profile_format import Profile, load_profile, save_profile

log = logging.getLogger("cpsl.server")

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cpsl-edge" / "server-profiles"
REPEATS, WARMUP = 4, 1


def pooled_batch_sizes(batch_size: int, max_cluster: int) -> list[int]:
    """What the server steps on: one device's batch, and a cluster's pooled batch (4 at least)."""
    return sorted({batch_size, batch_size * max(4, max_cluster)})


def own_profile(
    model: LayeredModel, batch_sizes: list[int], cache: Path | None = None, device: torch.device | None = None
) -> tuple[Profile, str]:
    """(the server's profile of ``model`` on ``device`` (default the CPU), where it came from:
    "cached FILE" or "measured ..."); ``cache``: the folder (default CACHE)."""
    cache = cache or CACHE
    device = device or torch.device("cpu")
    cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    host = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in platform.node()) or "host"
    sizes = "-".join(str(b) for b in batch_sizes)
    where = cache_tag(device, threads)
    path = cache / f"{model.name}-{model.fingerprint()}-{host}-{where}-b{sizes}.json"
    if path.is_file():
        try:
            return load_profile(path, model.fingerprint()), f"cached {path}"
        except ProfileError as exc:  # a damaged cache entry is measured again, not trusted
            log.warning("server profile cache %s unusable (%s): measuring again", path, exc)
    from toolkit.profiler.runner import ProfileRequest, run_profile

    started = time.monotonic()
    log.info("profiling the server's side of %s at batches %s on %s", model.name, sizes, where)
    request = ProfileRequest(
        model=model,
        batch_sizes=batch_sizes,
        repeats=REPEATS,
        warmup=WARMUP,
        passes=1,
        threads=threads,
        device_id="edge-server",
        device=device,
    )
    rng = torch.get_rng_state()
    try:
        profile = run_profile(request)
    finally:  # the profiler seeds torch: the run's own random draws go on as if it had not run
        torch.set_rng_state(rng)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        save_profile(profile, path)
    except OSError as exc:  # a read-only home costs the next run a profile, not this one
        log.warning("cannot cache the server profile in %s: %s", cache, exc)
    on = f"CUDA device {device.index or 0}" if cuda else f"{threads} threads"
    return profile, f"measured here ({time.monotonic() - started:.1f} s, {on})"
