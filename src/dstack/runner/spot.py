"""The spot interruption notice of an EC2 instance, read from its instance metadata service (IMDSv2: a session
token first, then the path with it). AWS posts it about two minutes before it stops or terminates a spot
instance, best effort, and advises reading it every 5 seconds.

Standard library only, so that a runner can read it without boto3."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request

log = logging.getLogger(__name__)
TOKEN_TTL = 21600  # seconds, IMDS's most
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP(S)_PROXY
_tokens: dict[str, tuple[str, float]] = {}  # base URL -> (token, when to get a new one)
_lock = threading.Lock()


def instance_action(base_url: str = "http://169.254.169.254", timeout: float = 1.0) -> dict | None:
    """The scheduled action, e.g. `{"action": "terminate", "time": "2026-12-04T20:14:00Z"}` (action:
    `terminate`, `stop` or `hibernate`); None while none is scheduled. `DSTACK_IMDS_URL` replaces `base_url`.
    OSError when IMDS cannot be asked (not on EC2, or blocked): the caller decides whether to ask again."""
    base = (os.environ.get("DSTACK_IMDS_URL") or base_url).rstrip("/")
    for fresh in (False, True):
        token = _token(base, timeout, fresh)
        req = urllib.request.Request(f"{base}/latest/meta-data/spot/instance-action",
                                     headers={"X-aws-ec2-metadata-token": token})
        try:
            with _opener.open(req, timeout=timeout) as r:
                body = r.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None  # nothing scheduled
            if e.code == 401 and not fresh:
                continue  # the token expired (IMDS restarted, a clock jump): one more with a new one
            raise OSError(f"IMDS answered {e.code} for spot/instance-action") from None
        try:
            notice = json.loads(body)
        except ValueError:
            raise OSError(f"IMDS's spot/instance-action is no JSON: {body[:100]!r}") from None
        return notice if isinstance(notice, dict) else None
    return None


def _token(base: str, timeout: float, fresh: bool) -> str:
    now = time.monotonic()
    with _lock:
        cached = _tokens.get(base)
        if cached and not fresh and now < cached[1]:
            return cached[0]
    req = urllib.request.Request(f"{base}/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)})
    try:
        with _opener.open(req, timeout=timeout) as r:
            token = r.read().decode().strip()
    except urllib.error.HTTPError as e:
        raise OSError(f"IMDS refused a token ({e.code})") from None
    with _lock:
        _tokens[base] = (token, now + TOKEN_TTL - 60)
    return token


def watch(busy, stopping: threading.Event, report, failures: tuple, every: float = 5.0) -> None:
    """Read the notice every `every` s while `busy()`; on one, `report(action, time)` (again after a second while
    it raises one of `failures`, until `stopping`), once. A metadata service that does not answer, five times in
    a row, is not asked again."""
    missed = 0
    while not stopping.wait(every):
        if not busy():
            continue
        try:
            notice = instance_action()
        except OSError as e:
            missed += 1
            if missed == 5:
                log.warning("the spot interruption notice cannot be read (%s): not watched any more", e)
                return
            continue
        missed = 0
        if notice is None:
            continue
        log.warning("this spot machine is being taken back: %s", notice)
        while not stopping.is_set():
            try:
                report(str(notice.get("action", "terminate")), notice.get("time"))
                return
            except failures as e:
                log.warning("could not tell the server of the interruption (%s); trying again", e)
                stopping.wait(1.0)
