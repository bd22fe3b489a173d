"""`code`: VS Code in the browser in a job (the 2022 provider; here code-server, from the npm registry), protected
by a password of the run's own, its URL printed once it answers.

The job installs code-server `version` once per home: into `~/.cache/dstack/code-server/<version>` (INSTALL_ROOT),
skipped when its `bin/code-server` is there; that folder is one of the job's `cache:` folders, so a runner keeps
it between the workflow's runs (a root runner gives each job a home of its own, gone with it). npm builds its native modules, which needs Node.js (the
major version code-server was made for: 20 for 4.100.x), npm, a C++ compiler, make, pkg-config, libkrb5-dev and
ripgrep (the job names what is missing before it starts). ripgrep's npm package would download its binary from
GitHub: the job gives it the machine's `rg` instead, through the download cache it looks in first.

Like `lab`, the job makes a virtual environment of its own (with `python<python>`), installs the workflow's
`requirements` there and puts it first on PATH, so that VS Code's terminal has them. code-server serves the job's
working folder on the job's first port (`PORT_0`) on every address. Its password (`PASSWORD`, which code-server
reads and removes from its environment) is made by the job, never written in its spec (which the API shows) nor on a
command line. code-server takes no password in a URL: the job prints `VS Code is ready: http://<host>:<port>/` and,
on the next line, the password, once the server answers. `dstack stop` ends it."""

from __future__ import annotations

import re
import shlex
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from dstack.core.models import JobSpec
from dstack.providers.base import CommandsProvider, CommandsSpec, relative_path
from dstack.providers.ide import announcer, secret
from dstack.providers.python import _without_commands, python_command, python_version, venv_lines

DEFAULT_VERSION = "4.100.3"  # the newest code-server for Node.js 20 (4.102 and later need Node.js 22)
INSTALL_ROOT = "~/.cache/dstack/code-server"  # a folder of the job's home, one per version: a `cache:` may keep it
BUILD_NEEDS = "npm make c++ pkg-config rg"  # commands the install runs; libkrb5-dev is checked with pkg-config
DEBIAN_PACKAGES = "nodejs npm g++ make pkg-config libkrb5-dev ripgrep python3-venv"

# what the job lacks, said before anything is installed (`$cs_*` are set by the job's first line)
_CHECK = r'''cs_missing=""
for cs_tool in node "$cs_python"; do command -v "$cs_tool" > /dev/null || cs_missing="$cs_missing $cs_tool"; done
if [ ! -x "$cs_dir/bin/code-server" ]; then
  for cs_tool in $cs_build_needs; do command -v "$cs_tool" > /dev/null || cs_missing="$cs_missing $cs_tool"; done
  if command -v pkg-config > /dev/null && ! pkg-config --exists krb5-gssapi; then cs_missing="$cs_missing libkrb5-dev"; fi
fi
if [ -n "$cs_missing" ]; then
  echo "code-server $cs_version cannot be installed and run $cs_where: it lacks$cs_missing. It needs Node.js (20 for code-server 4.100) with npm, a C++ compiler, make, pkg-config, libkrb5-dev, ripgrep and $cs_python (Debian, Ubuntu: apt-get install $cs_packages)" >&2
  exit 127
fi'''

# the asset name @vscode/ripgrep's own postinstall asks its download.js for (its version, this machine's target)
_RG_ASSET = r'''mkdir -p "$TMPDIR/rg-probe/lib" && tar -xzf "$TMPDIR"/vscode-ripgrep-*.tgz -C "$TMPDIR/rg-probe" --strip-components=1 package/lib/postinstall.js package/package.json
echo 'module.exports = async o => console.log(["ripgrep", o.version, o.target].join("-") + ".tar.gz")' > "$TMPDIR/rg-probe/lib/download.js"
cs_asset=$(cd "$TMPDIR/rg-probe" && node lib/postinstall.js)'''

_INSTALL = r'''if [ ! -x "$cs_dir/bin/code-server" ]; then
  echo "Installing code-server $cs_version into $cs_dir (once; npm builds its native modules: a few minutes)"
  cs_stage="$cs_dir.partial.$$"
  rm -rf "$cs_stage" && mkdir -p "$cs_stage/tmp"
  trap 'rm -rf "$cs_stage"' EXIT
  (
    cd "$cs_stage"
    export TMPDIR="$cs_stage/tmp" npm_config_unsafe_perm=true npm_config_build_from_source=true npm_config_yes=true npm_config_loglevel=error npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false npm_config_progress=false
    cs_node=$(dirname "$(dirname "$(command -v node)")")
    if [ -f "$cs_node/include/node/node.h" ]; then export npm_config_nodedir="$cs_node"; fi  # no header download
    echo '{"private": true}' > package.json  # the project npm installs into (no --prefix: it moves npm's global config)
    npm install --ignore-scripts "code-server@$cs_version"
    node -e 'const want = String(require(process.argv[1]).engines.node || ""), have = process.versions.node;
      if (/^\d+$/.test(want) && have.split(".")[0] !== want) {
        console.error(`code-server ${process.argv[2]} needs Node.js ${want}; this machine has ${have}: install Node.js ${want}, or give the workflow the version of a code-server made for Node.js ${have.split(".")[0]}`);
        process.exit(1);
      }' ./node_modules/code-server/package.json "$cs_version"
    cs_rg=$(node -p 'const fs = require("fs"), d = "./node_modules/code-server/lib/vscode/";
      const lock = ["npm-shrinkwrap.json", "package-lock.json"].find(f => fs.existsSync(d + f));
      ((lock && require(d + lock).packages["node_modules/@vscode/ripgrep"]) || {}).version || ""')
    if [ -n "$cs_rg" ]; then
      (cd "$TMPDIR" && npm pack -q "@vscode/ripgrep@$cs_rg" > /dev/null)
      @RG_ASSET@
      mkdir -p "$TMPDIR/vscode-ripgrep-cache-$cs_rg" "$TMPDIR/rg"
      cp "$(command -v rg)" "$TMPDIR/rg/rg"
      tar -czf "$TMPDIR/vscode-ripgrep-cache-$cs_rg/$cs_asset" -C "$TMPDIR/rg" rg
    fi
    npm rebuild
  )
  rm -rf "$cs_stage/tmp" && mkdir -p "$cs_stage/bin" && ln -s ../node_modules/.bin/code-server "$cs_stage/bin/"
  if [ -x "$cs_dir/bin/code-server" ]; then rm -rf "$cs_stage"; else rm -rf "$cs_dir" && mv "$cs_stage" "$cs_dir"; fi
  trap - EXIT
fi'''.replace("@RG_ASSET@", _RG_ASSET.replace("\n", "\n      "))


class CodeSpec(CommandsSpec):
    """VS Code in the browser (code-server `version`), with the workflow's `requirements` and `python` version,
    `before_run`/`setup`, `environment`, `artifacts` and `resources`."""

    model_config = ConfigDict(json_schema_extra=_without_commands)

    version: str = Field(DEFAULT_VERSION, description="The code-server version, from the npm registry (2022: the "
                                                      "openvscode-server version); its Node.js major version must "
                                                      "be the runner's.")
    python: str | None = Field(None, description="The Python version of the job's venv, e.g. 3.11; default: "
                                                 "python3.")
    requirements: str | None = Field(None, description="A pip requirements file, installed into the job's venv.")
    image: str | None = Field(None, description="Run in this image (it needs Python and what code-server needs) "
                                                "instead of on the runner's host.")

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        text = "" if v is None else str(v).strip()
        if not re.fullmatch(r"\d+\.\d+\.\d+", text):
            raise ValueError(f"'{text}' is not a code-server version: write all of it, quoted, e.g. "
                             f"\"{DEFAULT_VERSION}\"")
        return text

    @field_validator("python", mode="before")
    @classmethod
    def _python(cls, v: Any) -> Any:
        return python_version(v)

    @field_validator("requirements", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        return None if v is None else relative_path(str(v), "requirements")

    @model_validator(mode="after")
    def _ide_commands(self) -> CodeSpec:
        if self.commands:
            raise ValueError("the code provider runs the IDE: commands to run first go in `before_run`")
        return self


class CodeProvider(CommandsProvider):
    """`code`: VS Code in the browser (code-server) in a job."""

    name = "code"
    Spec = CodeSpec

    def create_jobs(self, spec: Any, env: dict[str, str]) -> list[JobSpec]:
        python = python_command(spec.python)
        host = "\"on this runner's host ($(hostname 2> /dev/null || echo ?))\""  # a missing hostname: no exit
        where = shlex.quote(f"in the image {spec.image}") if spec.image else host
        root = INSTALL_ROOT.replace("~", "$HOME", 1)
        lines = [f'cs_version={spec.version}; cs_dir="{root}/$cs_version"; cs_python={python}; '
                 f'cs_where={where}; cs_build_needs="{BUILD_NEEDS}"; cs_packages="{DEBIAN_PACKAGES}"',
                 _CHECK,
                 _INSTALL,
                 *venv_lines(python, spec.requirements),  # first on PATH: the terminal's python
                 secret("PASSWORD"),
                 announcer("PASSWORD", "http://127.0.0.1:{port}/healthz",
                           "\nVS Code is ready: http://{host}:{port}/\nVS Code password: {secret}\n"),
                 'exec "$cs_dir/bin/code-server" --bind-addr "0.0.0.0:$PORT_0" --auth password '
                 '--disable-telemetry --disable-update-check "$PWD"']
        # the install is kept on the runner between the workflow's runs: the next one starts in seconds
        cache = [*spec.cache, *([INSTALL_ROOT] if INSTALL_ROOT not in spec.cache else [])]
        return super().create_jobs(spec.model_copy(update={"commands": lines, "ports": max(spec.ports, 1),
                                                           "cache": cache}), env)
