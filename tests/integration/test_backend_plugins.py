"""Backends are plug-ins found through the entry-point group `dstack.backends` (backends/registry.py): the
built-in `local` is registered there by dstack's own package metadata, and a third-party package registers its
own the same way (here: a package installed as pip would leave it, a module and its .dist-info folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dstack.backends.local import LocalBackend
from dstack.backends.registry import BackendNotInstalled, backend_class, installed


def test_the_local_backend_is_found_through_its_entry_point():
    assert installed()["local"].value == "dstack.backends.local:LocalBackend"
    assert backend_class("local") is LocalBackend


def test_a_backend_that_no_package_registers_is_refused_naming_those_that_are():
    with pytest.raises(BackendNotInstalled, match=r"no backend 'mycloud' is installed \(installed: .*local.*\); a "
                                                  r"backend is a package that registers its class under the "
                                                  r"entry-point group 'dstack.backends'"):
        backend_class("mycloud")


def test_a_third_party_package_registers_a_backend_as_dstack_does(tmp_path):
    (tmp_path / "mycloud_dstack.py").write_text("class MyCloudBackend:\n    name = 'mycloud'\n")
    info = tmp_path / "mycloud_dstack-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mycloud-dstack\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[dstack.backends]\nmycloud = mycloud_dstack:MyCloudBackend\n")
    script = ("import json; from dstack.backends.registry import installed, backend_class; "
              "print(json.dumps([sorted(installed()), backend_class('mycloud').__module__, "
              "backend_class('local').__name__]))")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"})
    assert r.returncode == 0, r.stderr
    names, module, local = json.loads(r.stdout)
    assert {"local", "mycloud"} <= set(names) and module == "mycloud_dstack" and local == "LocalBackend"


def test_an_offer_says_what_is_provisioned_and_local_offers_this_machine_free(tmp_path):
    from dstack.backends.base import Offer
    from dstack.core.resources import RunnerResources

    res = RunnerResources(cpus=4, memory_mib=16384)
    assert Offer("aws", res, 0.45, "g5.xlarge", "us-east-1", spot=True).describe() == \
        "aws g5.xlarge, us-east-1, spot, $0.45/h"
    (offer,) = LocalBackend(tmp_path / "runners").offers()
    assert offer.backend == "local" and offer.price == 0 and offer.resources.cpus >= 1
    assert offer.describe() == "local"  # free: no price said
    assert LocalBackend(tmp_path / "none", max_runners=0).offers() == []
