"""The script that makes a machine a runner of this server: a cloud instance's user-data, what an SSH backend runs,
a Slurm job's or a container's command. `install_script(bootstrap)` returns it (POSIX sh, a few KB).

What it does, as root or as any user who may write its folders:
1. checks that `python3` is 3.11 or later (else says so, to stderr and the log, and exits 1);
2. fetches `SERVER/api/wheels` (backends/wheelhouse.py) with the runner's token, with Python's urllib (no curl);
3. reuses VENV when its dstack is the server's version (and, when this script installed it, from the same wheel):
   a Slurm cluster's venv on a shared filesystem is installed once; else downloads every wheel (each checked
   against the index's sha256), makes `python3 -m venv --without-pip VENV` and installs with pip run from its own
   wheel, `--no-index --find-links`, under a lock (nodes that share VENV install it one at a time);
4. starts `VENV/bin/dstack-runner start --token-file FILE ...` in the foreground (a Slurm job or a container
   lives as long as its command; an SSH backend detaches the script itself), its output in WORKDIR.log; a TERM
   or INT to the script is passed on to the runner, which stops its jobs and reports them;
5. once the runner exits (idle, removed, or refused), runs `on_idle` (e.g. `shutdown -h now` on a cloud instance
   whose shutdown terminates it: an instance that no runner serves is only a cost) and exits with the runner's
   status.

The token is in the script and in a file of mode 0600 (WORKDIR.token) that the runner removes once read: never in a
command line or an environment (ps, /proc/PID/environ), as the script's variables are not exported and the
downloader reads the file."""

from __future__ import annotations

import re
import shlex
from pathlib import PurePosixPath

from dstack.backends.base import Bootstrap

MIN_PYTHON = "3.11"  # what the runner needs
MAX_USER_DATA = 16 * 1024  # EC2's limit on user-data, before base64

# run by python3 with its program on stdin: argv is SERVER TOKEN_FILE VENV LOG (no token). Python 3.6 syntax, so
# that an old python3 reaches no further than the script's own version check.
_INSTALL = r'''
import fcntl, glob, hashlib, json, os, platform, re, shutil, subprocess, sys, tempfile, time, urllib.error, urllib.request
server, token_file, venv, log = sys.argv[1:5]


def say(message):
    line = "dstack bootstrap: " + message
    print(line, file=sys.stderr, flush=True)
    with open(log, "a") as f:
        f.write(time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + line + "\n")


def fail(message):
    say("error: " + message)
    sys.exit(1)


with open(token_file) as f:
    token = f.read().strip()


def get(path):
    url = server + "/api/wheels" + path
    request = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
    deadline = time.monotonic() + 300  # a machine that has just booted may not reach the server yet
    while True:
        try:
            return urllib.request.urlopen(request, timeout=60)
        except urllib.error.HTTPError as e:
            if e.code < 500:
                fail("GET %s: HTTP %d %s" % (url, e.code, e.read(300).decode(errors="replace")))
            error = "HTTP %d" % e.code
        except (urllib.error.URLError, OSError) as e:
            error = str(getattr(e, "reason", e))
        if time.monotonic() > deadline:
            fail("cannot reach the server at %s: %s" % (server, error))
        say("the server at %s does not answer (%s); trying again" % (server, error))
        time.sleep(3)


index = json.load(get(""))
mine = "cp%d%d" % sys.version_info[:2]
for entry in index:
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+\.whl", entry["file"]):
        fail("the server lists a wheel named %r" % entry["file"])
    _, abi, plat = entry["file"][:-4].split("-")[-3:]
    built_for = [a for a in abi.split(".") if re.fullmatch(r"cp3\d+", a)]
    if built_for and mine not in built_for:
        fail("the server's wheels are for CPython %s.%s (%s), this machine's %s is %d.%d: give it that Python "
             "(install_script's python=...)" % (built_for[0][2], built_for[0][3:], entry["file"], sys.executable,
                                                *sys.version_info[:2]))
    if plat != "any" and platform.machine() not in plat:
        fail("the server's wheels are for %s (%s), this machine is %s" % (plat, entry["file"], platform.machine()))
dstack = next(e for e in index if e["file"].startswith("dstack-"))
pip = next(e for e in index if e["file"].startswith("pip-"))
version = dstack["file"].split("-")[1]
marker = os.path.join(venv, "dstack-wheel")  # the wheel this script installed: "FILE SHA256"

os.makedirs(os.path.dirname(os.path.abspath(venv)), exist_ok=True)
with open(venv + ".lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    ours = open(marker).read().strip() if os.path.exists(marker) else None
    if (os.access(os.path.join(venv, "bin", "dstack-runner"), os.X_OK)
            and glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "dstack-%s.dist-info" % version))
            and ours in (None, "%s %s" % (dstack["file"], dstack["sha256"]))):
        say("%s has dstack %s already" % (venv, version))
        sys.exit(0)
    started = time.monotonic()
    wheels = tempfile.mkdtemp(prefix="dstack-wheels-")
    try:
        for entry in index:
            h = hashlib.sha256()
            with get("/" + entry["file"]) as response, open(os.path.join(wheels, entry["file"]), "wb") as out:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != entry["sha256"]:
                fail("%s from %s has sha256 %s, the server's index says %s: the download was altered or cut"
                     % (entry["file"], server, h.hexdigest(), entry["sha256"]))
        for argv in ([sys.executable, "-m", "venv", "--without-pip", "--clear", venv],
                     [os.path.join(venv, "bin", "python"), os.path.join(wheels, pip["file"], "pip"), "install",
                      "--no-index", "--find-links", wheels, "--no-cache-dir", "--disable-pip-version-check", "-q",
                      "dstack==" + version]):
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if p.returncode != 0:
                fail("%s exited %d: %s" % (" ".join(argv[:4]), p.returncode, p.stdout.decode(errors="replace")[-2000:]))
        with open(marker, "w") as f:
            f.write("%s %s\n" % (dstack["file"], dstack["sha256"]))
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
    say("installed dstack %s into %s in %.1fs" % (version, venv, time.monotonic() - started))
'''


def install_script(bootstrap: Bootstrap, *, venv: str = "/opt/dstack", workdir: str = "/var/lib/dstack-runner/runner",
                   on_idle: str | None = None, python: str = "python3", backend: str | None = None,
                   wheel: str | None = None, self_removing: bool = False) -> str:
    """The sh script that installs dstack from `bootstrap.server_url`'s wheels and runs the runner until it exits,
    then `on_idle` (a shell command; None: nothing). `backend`: the backend that made the machine, as the runner
    reports it. `wheel`: "FILE SHA256" of the server's dstack wheel (`wheelhouse.dstack_wheel`): a VENV that this
    script installed from it is used at once, with no Python started and nothing asked of the server (an SSH
    host's or a cluster's venv, installed by an earlier start). `self_removing`: the script is run from a file,
    which it removes as soon as sh has it open (it holds the token)."""
    if not re.fullmatch(r"[\x21-\x7e]+", bootstrap.token) or bootstrap.token == "DSTACK_TOKEN_END":
        raise ValueError("a runner's token is printable ASCII without spaces")
    q = shlex.quote
    wd = PurePosixPath(workdir)
    start = ["start", "--server", bootstrap.server_url, "--token-file", '"$TOKEN_FILE"', "--name",
             bootstrap.runner_name, "--idle-timeout", f"{bootstrap.idle_timeout:g}", "--workdir", workdir,
             *(["--backend", backend] if backend else []), *(["--interruptible"] if bootstrap.interruptible else []),
             *(x for k, v in sorted(bootstrap.labels.items()) for x in ("--labels", f"{k}={v}"))]
    idle = (f'say "the runner exited ($rc); running: "{q(on_idle)}\nsh -c {q(on_idle)} >> "$LOG" 2>&1\n'
            if on_idle else 'say "the runner exited ($rc)"\n')
    script = f"""#!/bin/sh
# A dstack runner: installs dstack from its server's wheels and runs it (dstack/backends/bootstrap.py)
set -u
{'rm -f -- "$0"' + chr(10) if self_removing else ""}SERVER={q(bootstrap.server_url)}
VENV={q(venv)}
PYTHON={q(python)}
LOG={q(f"{wd}.log")}
TOKEN_FILE={q(f"{wd}.token")}
umask 022
mkdir -p {q(str(wd.parent))} || exit 1
(umask 077 && : >> "$LOG") || exit 1
say() {{ printf 'dstack bootstrap: %s\\n' "$*" >&2; printf '%s dstack bootstrap: %s\\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >> "$LOG"; }}
fail() {{ rm -f "$TOKEN_FILE"; say "error: $*"; exit 1; }}
rm -f "$TOKEN_FILE"
(umask 077 && cat > "$TOKEN_FILE") <<'DSTACK_TOKEN_END' || fail "cannot write $TOKEN_FILE"
{bootstrap.token}
DSTACK_TOKEN_END
if [ -x "$VENV/bin/dstack-runner" ] && [ "$(cat "$VENV/dstack-wheel" 2> /dev/null)" = {q(wheel or "-")} ]; then
  : # installed from the server's wheel by an earlier start
else
command -v "$PYTHON" > /dev/null 2>&1 || fail "no $PYTHON on this machine: the runner needs Python 3.11 or later"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2> /dev/null \\
  || fail "$PYTHON is $("$PYTHON" -V 2>&1): the runner needs Python 3.11 or later"
"$PYTHON" - "$SERVER" "$TOKEN_FILE" "$VENV" "$LOG" <<'DSTACK_INSTALL_END' || fail "dstack was not installed into $VENV"
{_INSTALL.strip()}
DSTACK_INSTALL_END
fi
say "starting runner "{q(bootstrap.runner_name)}" (log: $LOG)"
pid=""
trap '[ -n "$pid" ] && kill -TERM "$pid" 2> /dev/null' TERM INT HUP
"$VENV/bin/dstack-runner" {" ".join(a if a == '"$TOKEN_FILE"' else q(a) for a in start)} >> "$LOG" 2>&1 &
pid=$!
rc=0
wait "$pid" || rc=$?
while kill -0 "$pid" 2> /dev/null; do rc=0; wait "$pid" || rc=$?; done
rm -f "$TOKEN_FILE"
{idle}exit "$rc"
"""
    if len(script.encode()) > MAX_USER_DATA:
        raise ValueError(f"the bootstrap script is {len(script.encode())} bytes, more than user-data's {MAX_USER_DATA}")
    return script
