"""What the `aws` backend offers: EC2 instance types with their hourly prices, on-demand and spot, from gpuhunt's
catalogue (`aws.csv`, one row per instance type, region and market).

The catalogue is read once and kept in memory, so that `offers()` makes no network call after its first:
- from a folder (`catalog_dir`, or `GPUHUNT_CATALOG_DIR` in the server's environment) holding `aws.csv`, as
  gpuhunt publishes it: the way to run offline, and to pin the prices a server sees;
- else downloaded by gpuhunt from its published catalogue (`GPUHUNT_CATALOG_URL` overrides where from).

Only x86 instance types with no GPU or NVIDIA GPUs are offered (what the runner's AMI and wheels run on), and
only rows without gpuhunt's compatibility flags."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from dstack.backends.base import BackendError, Offer
from dstack.core.resources import Gpu, RunnerResources

RETRY_AFTER = 60.0  # a catalogue that could not be loaded is not tried again before this (seconds)
_ENV_LOCK = threading.Lock()  # GPUHUNT_CATALOG_DIR is the process's: one catalogue read at a time sets it


def load_items(catalog_dir: str | None) -> list[Any]:
    """Every row of gpuhunt's aws catalogue (`gpuhunt.CatalogItem`s), from `catalog_dir` when given."""
    import gpuhunt  # ~80 ms: only when a backend first needs its offers

    catalog = gpuhunt.Catalog(balance_resources=False, auto_reload=False)
    # provider="aws" always: a query that names none reads (or downloads) every provider's file
    query = {"provider": "aws", "allowed_flags": ()}
    if catalog_dir is not None:
        path = os.path.join(catalog_dir, "aws.csv")
        if not os.path.isfile(path):
            raise BackendError(f"the catalogue folder {catalog_dir} has no aws.csv (gpuhunt's format)")
        with _ENV_LOCK:
            before = os.environ.get("GPUHUNT_CATALOG_DIR")
            os.environ["GPUHUNT_CATALOG_DIR"] = catalog_dir  # read by gpuhunt at query time
            try:
                return catalog.query(**query)
            finally:
                if before is None:
                    os.environ.pop("GPUHUNT_CATALOG_DIR", None)
                else:
                    os.environ["GPUHUNT_CATALOG_DIR"] = before
    if not os.environ.get("GPUHUNT_CATALOG_DIR"):
        try:
            catalog.load()
        except Exception as e:
            raise BackendError(f"cannot download gpuhunt's instance catalogue ({e}); give the backend a "
                               f"catalog_dir holding aws.csv to run without it") from None
    return catalog.query(**query)


def to_offers(backend: str, items: Iterable[Any], regions: list[str]) -> list[Offer]:
    """The rows of `regions` that a runner can use, as offers, the cheapest first."""
    wanted = set(regions)
    offers = []
    for item in items:
        if item.location not in wanted or getattr(item.cpu_arch, "value", "x86") != "x86":
            continue
        if item.gpu_count and getattr(item.gpu_vendor, "value", "nvidia") != "nvidia":
            continue
        gpus = [Gpu(name=item.gpu_name or "GPU", memory_mib=int((item.gpu_memory or 0) * 1024))
                for _ in range(item.gpu_count)]
        resources = RunnerResources(cpus=item.cpu, memory_mib=int(item.memory * 1024), gpus=gpus,
                                    interruptible=item.spot)
        offers.append(Offer(backend=backend, resources=resources, price=item.price,
                            instance_type=item.instance_name, region=item.location, spot=item.spot))
    offers.sort(key=lambda o: (o.price, o.instance_type, o.region, o.spot))
    return offers


class OfferCache:
    """The offers of one backend, loaded on first use (thread-safe); a failed load is said again without a new
    try for `RETRY_AFTER` seconds."""

    def __init__(self, backend: str, regions: list[str], catalog_dir: str | None):
        self.backend, self.regions, self.catalog_dir = backend, regions, catalog_dir
        self._offers: list[Offer] | None = None
        self._failed: tuple[float, BackendError] | None = None
        self._lock = threading.Lock()

    def get(self) -> list[Offer]:
        offers = self._offers
        if offers is not None:
            return list(offers)
        with self._lock:
            if self._offers is None:
                if self._failed is not None and time.monotonic() - self._failed[0] < RETRY_AFTER:
                    raise self._failed[1]
                try:
                    self._offers = to_offers(self.backend, load_items(self.catalog_dir), self.regions)
                except BackendError as e:
                    self._failed = (time.monotonic(), e)
                    raise
                except Exception as e:  # a malformed file, an unreadable folder
                    self._failed = (time.monotonic(), BackendError(f"cannot read gpuhunt's aws catalogue: {e}"))
                    raise self._failed[1] from None
            return list(self._offers)

    def find(self, instance_type: str, region: str, spot: bool) -> Offer | None:
        """The offer an instance was created from, when the catalogue is at hand (None otherwise)."""
        try:
            offers = self.get()
        except BackendError:
            return None
        return next((o for o in offers if (o.instance_type, o.region, o.spot) == (instance_type, region, spot)),
                    None)
