"""What the IDE providers (`lab`, `notebook`, `code`) share: a job that serves an IDE on its first port says where
it is once it answers."""

from __future__ import annotations


def secret(name: str) -> str:
    """A line of the job's script that makes a secret of the run's own (a token, a password) in the environment
    variable `name`: made in the job, never written in its spec (which the API shows), so only the job's log has it."""
    return f"{name}=\"$(python -c 'import secrets; print(secrets.token_hex(24))')\"; export {name}"


def announcer(secret: str, probe: str, ready: str) -> str:
    """A line of the job's script that, in the background beside the IDE, waits until `probe` answers (for at most
    a few minutes), then prints `ready`. Both are templates of `{port}` (the job's first port), `{host}` (the
    runner's, as the job knows it) and `{secret}`: the value of the environment variable named `secret`, read from
    the environment, not from the command line (`ps` shows command lines to every user). It runs `python`."""
    return f'''( python - "$PORT_0" "${{JOB_HOSTNAME:-}}" <<'DSTACK_ANNOUNCE_END' & )
import os, socket, sys, time, urllib.request
port, host = sys.argv[1:3]
secret = os.environ[{secret!r}]
for _ in range(600):
    try:
        urllib.request.urlopen({probe!r}.format(port=port, secret=secret), timeout=2)
        break
    except Exception:
        time.sleep(0.5)
host = host or socket.getfqdn()
print({ready!r}.format(host=host, port=port, secret=secret), flush=True)
DSTACK_ANNOUNCE_END'''
