"""Backends are plug-ins: a package registers a backend class under the entry-point group `dstack.backends`,
and the server finds it there. The built-in ones (`local`) register the same way, in dstack's own
pyproject.toml, as a third-party package would in its own:

    [project.entry-points."dstack.backends"]
    mycloud = "mycloud_dstack:MyCloudBackend"
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

GROUP = "dstack.backends"


class BackendNotInstalled(LookupError):
    pass


def installed() -> dict[str, EntryPoint]:
    """The backends that installed packages register, by name (the first registration of a name wins)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return found


def backend_class(name: str) -> type:
    """The class of backend `name`, loaded from the package that registers it."""
    ep = installed().get(name)
    if ep is None:
        names = ", ".join(sorted(installed())) or "none"
        raise BackendNotInstalled(f"no backend '{name}' is installed (installed: {names}); a backend is a package "
                                  f"that registers its class under the entry-point group '{GROUP}'")
    return ep.load()
