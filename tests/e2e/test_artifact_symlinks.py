"""Artifacts that hold chains of symlinks, end to end: saved by a real job, mounted into a dependent one."""

from __future__ import annotations

import json

from tests.e2e.conftest import last_run


def test_a_chain_of_library_links_is_saved_and_read_through_by_a_dependent_job(dstack, project):
    root = project("""\
    workflows:
      - name: libs
        commands:
          - mkdir -p out/lib && echo 'the library' > out/lib/libfoo.so.1.2
          - ln -s libfoo.so.1.2 out/lib/libfoo.so.1 && ln -s libfoo.so.1 out/lib/libfoo.so
        artifacts: [out]
      - name: use
        dependencies: [libs]
        commands:
          - readlink out/lib/libfoo.so out/lib/libfoo.so.1
          - cat out/lib/libfoo.so
    """)
    r = dstack("run", "libs", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    run = last_run(dstack, root)
    assert run["status"] == "DONE"
    entries = json.loads(dstack("artifacts", "list", run["run_name"], "--files", "--json", cwd=root,
                                check=True).stdout)[0]["entries"]
    assert {e["path"]: e.get("target") for e in entries if e["kind"] == "symlink"} == {
        "lib/libfoo.so": "libfoo.so.1", "lib/libfoo.so.1": "libfoo.so.1.2"}
    r = dstack("run", "use", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "libfoo.so.1\nlibfoo.so.1.2\nthe library\n" in r.stdout.replace("\r\n", "\n")
