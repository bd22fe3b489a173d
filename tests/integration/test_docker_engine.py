"""The test infrastructure itself: the real Docker Engine and the locally built busybox image."""

from __future__ import annotations

import os


def test_busybox_image_runs_a_shell_with_host_networking(docker_client, busybox_image):
    out = docker_client.containers.run(
        busybox_image, ["sh", "-c", "echo hi"], network_mode="host", remove=True
    )
    assert out == b"hi\n"


def test_busybox_image_was_built_locally_not_pulled(docker_client, busybox_image):
    image = docker_client.images.get(busybox_image)
    assert image.attrs["RepoDigests"] == []  # a pulled image records the registry's digest


def test_each_test_gets_its_own_dstack_home(dstack_home):
    assert os.environ["DSTACK_HOME"] == str(dstack_home)
    assert dstack_home.is_dir()
    assert list(dstack_home.iterdir()) == []
