"""The `aws` backend against moto's EC2 API on loopback, boto3 talking to it over HTTP as it talks to AWS.

What moto does not do, the test's own proxy in front of it does: answer chosen RunInstances calls with AWS's own
XML error bodies (capacity and quota refusals: InsufficientInstanceCapacity is a 500 that botocore would retry),
and list Debian's and Canonical's AMIs (moto has none of those the backend chooses from: Debian 12 and 13, Ubuntu
24.04). The catalogue is a gpuhunt folder the
test writes; the spot notice is read from a tiny IMDS of the test's own."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from dstack.backends import aws
from dstack.backends.aws import AWSBackend
from dstack.backends.base import BackendError, Bootstrap, CapacityError, Gpus, MultiNode, Spot
from dstack.backends.bootstrap import install_script

ACCESS_KEY = "AKIAQXTESTONLY7KEYID"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYTESTONLYKEY"
HEADER = "instance_name,location,price,cpu,memory,gpu_count,gpu_name,gpu_memory,spot,disk_size,gpu_vendor,flags," \
         "cpu_arch,provider_data"
ROWS = [
    "g5.xlarge,us-east-1,1.006,4,16.0,1,A10G,24.0,False,,nvidia,,x86,{}",
    "g5.xlarge,us-east-1,0.4539,4,16.0,1,A10G,24.0,True,,nvidia,,x86,{}",
    "t3.medium,us-east-1,0.0416,2,4.0,0,,,False,,,,x86,{}",
    "t3.medium,us-east-1,0.0125,2,4.0,0,,,True,,,,x86,{}",
    "g5.xlarge,eu-west-1,1.123,4,16.0,1,A10G,24.0,False,,nvidia,,x86,{}",
    "g5.xlarge,eu-west-1,0.5011,4,16.0,1,A10G,24.0,True,,nvidia,,x86,{}",
    "t3.medium,eu-west-1,0.0456,2,4.0,0,,,False,,,,x86,{}",
    "t3.medium,eu-west-1,0.0137,2,4.0,0,,,True,,,,x86,{}",
    "t4g.medium,us-east-1,0.0336,2,4.0,0,,,False,,,,arm,{}",  # arm: not offered
    "g6.xlarge,us-east-1,0.805,4,16.0,1,L4,24.0,False,,nvidia,new-format,x86,{}",  # flagged: not offered
    "t3.medium,ap-south-1,0.0448,2,4.0,0,,,False,,,,x86,{}",  # a region not configured
]
ERRORS = {  # code -> (HTTP status, AWS's message)
    "InsufficientInstanceCapacity": (500, "We currently do not have sufficient g5.xlarge capacity in the "
                                          "Availability Zone you requested (us-east-1a). Our system will be working "
                                          "on provisioning additional capacity."),
    "VcpuLimitExceeded": (400, "You have requested more vCPU capacity than your current vCPU limit of 32 allows "
                               "for the instance bucket that the specified instance type belongs to."),
    "InvalidParameterCombination": (400, "The attribute instanceInitiatedShutdownBehavior can only be used for "
                                         "elastic images."),
    "AuthFailure": (401, "AWS was not able to validate the provided access credentials"),
    "SignatureDoesNotMatch": (403, f"The request signature we calculated does not match the signature you provided. "
                                   f"Credential={ACCESS_KEY}/20260101/us-east-1/ec2/aws4_request"),
}
DEBIAN, UBUNTU = "136693071363", "099720109477"  # the owners: Debian's official account, Canonical
IMAGES = {  # owner -> what its DescribeImages answers with, older first: (id, name, creation date, root device)
    UBUNTU: [
        ("ami-0a1b2c3d4e5f60001", "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-20240301", "2024-03-01",
         "/dev/sda1"),
        ("ami-0a1b2c3d4e5f60002", "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20250115", "2025-01-15",
         "/dev/sda1"),
        ("ami-0a1b2c3d4e5f60003", "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-20250301", "2025-03-01",
         "/dev/sda1"),
        ("ami-0a1b2c3d4e5f60004", "ubuntu/images/hvm-ssd/ubuntu-noble-24.04-arm64-server-20250401", "2025-04-01",
         "/dev/sda1"),
    ],
    DEBIAN: [
        ("ami-0d1e2b3i4a5n60001", "debian-12-amd64-20240717-1811", "2024-07-17", "/dev/xvda"),
        ("ami-0d1e2b3i4a5n60002", "debian-11-amd64-20250210-2020", "2025-02-10", "/dev/xvda"),
        ("ami-0d1e2b3i4a5n60003", "debian-12-amd64-20250316-2053", "2025-03-16", "/dev/xvda"),
        ("ami-0d1e2b3i4a5n60004", "debian-12-arm64-20250401-2070", "2025-04-01", "/dev/xvda"),
        ("ami-0d1e2b3i4a5n60005", "debian-12-backports-amd64-20250402-2071", "2025-04-02", "/dev/xvda"),
        ("ami-0d1e2b3i4a5n60006", "debian-13-amd64-20251006-2257", "2025-10-06", "/dev/xvda"),
        ("ami-0d1e2b3i4a5n60007", "debian-13-arm64-20251106-2290", "2025-11-06", "/dev/xvda"),
    ],
}
# the server's Python -> the image the backend chooses by default: the newest amd64 one whose python3 is that
NEWEST = {
    (3, 11): ("ami-0d1e2b3i4a5n60003", DEBIAN, "/dev/xvda"),  # Debian 12: not 11, arm64, backports or 13
    (3, 12): ("ami-0a1b2c3d4e5f60002", UBUNTU, "/dev/sda1"),  # Ubuntu 24.04: not 22.04 (3.10), nor arm64
    (3, 13): ("ami-0d1e2b3i4a5n60006", DEBIAN, "/dev/xvda"),  # Debian 13
}
PYTHON = (sys.version_info[0], sys.version_info[1])
DEFAULT_IMAGE = NEWEST[PYTHON][0] if PYTHON in NEWEST else None  # the one for the Python running the tests


class Proxy(ThreadingHTTPServer):
    """Forwards to moto; answers the errors planned for an action (`plan["RunInstances"] = [code, ...]`) and
    DescribeImages of Debian's and Canonical's AMIs (IMAGES: all of the owner's, the name and architecture
    filters not applied, so that the backend's own check of them is seen; none for an owner in `hidden`); keeps
    every call's form (`calls`)."""

    daemon_threads = True
    hidden: frozenset[str] = frozenset()

    def __init__(self, moto: tuple[str, int]):
        self.moto, self.plan, self.calls = moto, {}, []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    def count(self, action: str) -> int:
        return sum(1 for form in self.calls if form.get("Action") == action)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        server: Proxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode()).items()}
        server.calls.append(form)
        action = form.get("Action", "")
        if server.plan.get(action):
            code = server.plan[action].pop(0)
            status, message = ERRORS[code]
            return self._answer(status, f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message>"
                                        f"</Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>")
        owner = form.get("Owner.1")
        if action == "DescribeImages" and owner in IMAGES:
            items = "".join(f"<item><imageId>{i}</imageId><imageState>available</imageState><imageOwnerId>{owner}"
                            f"</imageOwnerId><creationDate>{d}T00:00:00.000Z</creationDate><architecture>"
                            f"{'arm64' if 'arm64' in n else 'x86_64'}</architecture><imageType>machine</imageType>"
                            f"<name>{n}</name><rootDeviceType>ebs</rootDeviceType><rootDeviceName>{root}"
                            f"</rootDeviceName></item>"
                            for i, n, d, root in ([] if owner in server.hidden else IMAGES[owner]))
            return self._answer(200, f'<DescribeImagesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
                                     f"<requestId>{uuid.uuid4()}</requestId><imagesSet>{items}</imagesSet>"
                                     f"</DescribeImagesResponse>")
        c = http.client.HTTPConnection(*server.moto, timeout=30)
        c.request("POST", self.path, body, {k: v for k, v in self.headers.items() if k.lower() != "host"})
        r = c.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        c.close()

    def _answer(self, status: int, xml: str) -> None:
        data = f'<?xml version="1.0" encoding="UTF-8"?>\n{xml}'.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/xml;charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def moto_ec2():
    """moto's server on loopback, for this module: (host, port)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield server.get_host_and_port()
    server.stop()


@pytest.fixture(scope="module")
def proxy(moto_ec2):
    server = Proxy(moto_ec2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def ec2_url(proxy) -> str:
    proxy.plan.clear()
    proxy.calls.clear()
    proxy.hidden = frozenset()
    return f"http://127.0.0.1:{proxy.server_address[1]}"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpuhunt")
    (folder / "aws.csv").write_text("\n".join([HEADER, *ROWS]) + "\n")
    return folder


def make(url: str, catalog: Path, tmp_path: Path, server_id: str | None = None, **settings) -> AWSBackend:
    settings = {"access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY, "endpoint_url": url,
                "catalog_dir": str(catalog), **settings}
    return AWSBackend("aws", settings, server_id=server_id or uuid.uuid4().hex[:12], home=tmp_path)


def bootstrap(backend: AWSBackend, name: str | None = None) -> Bootstrap:
    return Bootstrap(server_url="http://10.0.0.2:3000", token="runner-token-" + uuid.uuid4().hex,
                     runner_name=name or f"runner-{uuid.uuid4().hex[:6]}", idle_timeout=300,
                     server_id=backend.server_id)


def ec2(url: str, region: str = "us-east-1"):
    return boto3.client("ec2", region_name=region, endpoint_url=url, aws_access_key_id="x",
                        aws_secret_access_key="x")


def offer_of(backend: AWSBackend, instance_type: str, spot: bool, region: str = "us-east-1"):
    return next(o for o in backend.offers() if (o.instance_type, o.spot, o.region) == (instance_type, spot, region))


def test_it_says_what_it_can_do_by_its_types():
    assert issubclass(AWSBackend, Spot) and issubclass(AWSBackend, Gpus) and issubclass(AWSBackend, MultiNode)
    assert AWSBackend.secrets == ("access_key_id", "secret_access_key")


def test_offers_are_the_catalogue_rows_of_its_regions_cheapest_first(ec2_url, catalog, tmp_path, proxy):
    backend = make(ec2_url, catalog, tmp_path, regions=["us-east-1", "eu-west-1"])
    offers = backend.offers()
    assert [(o.instance_type, o.region, o.spot, o.price) for o in offers] == [
        ("t3.medium", "us-east-1", True, 0.0125), ("t3.medium", "eu-west-1", True, 0.0137),
        ("t3.medium", "us-east-1", False, 0.0416), ("t3.medium", "eu-west-1", False, 0.0456),
        ("g5.xlarge", "us-east-1", True, 0.4539), ("g5.xlarge", "eu-west-1", True, 0.5011),
        ("g5.xlarge", "us-east-1", False, 1.006), ("g5.xlarge", "eu-west-1", False, 1.123)]
    g5 = offers[4]
    assert g5.backend == "aws" and g5.describe() == "aws g5.xlarge, us-east-1, spot, $0.45/h"
    assert g5.resources.cpus == 4 and g5.resources.memory_mib == 16384 and g5.resources.interruptible
    assert [(g.name, g.memory_mib) for g in g5.resources.gpus] == [("A10G", 24576)]
    assert offers[0].resources.gpus == [] and not offers[2].resources.interruptible
    assert proxy.calls == []  # the catalogue is no EC2 call
    only = make(ec2_url, catalog, tmp_path, regions=["eu-west-1"]).offers()
    assert {o.region for o in only} == {"eu-west-1"} and len(only) == 4


def test_offers_are_read_once_and_kept_in_memory(ec2_url, tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    rows = [f"m{i}.large,us-east-1,{0.05 + i / 1000:.4f},2,8.0,0,,,{spot},,,,x86,{{}}"
            for i in range(1500) for spot in ("False", "True")]
    (folder / "aws.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    backend = make(ec2_url, folder, tmp_path)
    assert len(backend.offers()) == 3000
    (folder / "aws.csv").unlink()  # read once: no file needed any more
    started = time.perf_counter()
    for _ in range(10):
        offers = backend.offers()
    assert (time.perf_counter() - started) / 10 < 0.005 and len(offers) == 3000
    offers.clear()  # a copy: the caller cannot change the backend's
    assert len(backend.offers()) == 3000
    import os

    assert "GPUHUNT_CATALOG_DIR" not in os.environ  # set only while gpuhunt read the folder


def test_a_catalogue_folder_without_aws_csv_is_said_clearly(ec2_url, tmp_path):
    backend = make(ec2_url, tmp_path, tmp_path)
    with pytest.raises(BackendError, match=f"the catalogue folder {tmp_path} has no aws.csv"):
        backend.offers()


def test_create_tags_everything_and_sets_user_data_shutdown_and_imdsv2(ec2_url, catalog, tmp_path, proxy):
    backend = make(ec2_url, catalog, tmp_path)
    boot = bootstrap(backend)
    inst = backend.create(offer_of(backend, "t3.medium", spot=False), boot)
    assert inst.id.startswith("i-") and inst.runner_name == boot.runner_name and inst.offer.instance_type == "t3.medium"
    client = ec2(ec2_url)
    raw = client.describe_instances(InstanceIds=[inst.id])["Reservations"][0]["Instances"][0]
    tags = {t["Key"]: t["Value"] for t in raw["Tags"]}
    assert tags == {"dstack:server": backend.server_id, "dstack:runner": boot.runner_name, "Name": boot.runner_name}
    assert raw["InstanceType"] == "t3.medium" and raw["ImageId"] == DEFAULT_IMAGE
    assert "InstanceLifecycle" not in raw
    assert raw["MetadataOptions"]["HttpTokens"] == "required"
    user_data = client.describe_instance_attribute(InstanceId=inst.id, Attribute="userData")["UserData"]["Value"]
    script = base64.b64decode(user_data).decode()
    assert script == install_script(boot, on_idle="shutdown -h now", backend="aws")  # the runner, then the shutdown
    assert boot.runner_name in script and "'shutdown -h now'" in script
    behaviour = client.describe_instance_attribute(InstanceId=inst.id, Attribute="instanceInitiatedShutdownBehavior")
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    volumes = client.describe_volumes(Filters=[{"Name": "tag:dstack:runner", "Values": [boot.runner_name]}])["Volumes"]
    assert len(volumes) == 1 and {"Key": "dstack:server", "Value": backend.server_id} in volumes[0]["Tags"]
    # its security group: this server's, open only to its own members
    (group,) = client.describe_security_groups(GroupIds=[g["GroupId"] for g in raw["SecurityGroups"]])["SecurityGroups"]
    assert {"Key": "dstack:server", "Value": backend.server_id} in group["Tags"]
    assert [(p["IpProtocol"], p.get("IpRanges"), [u["GroupId"] for u in p["UserIdGroupPairs"]])
            for p in group["IpPermissions"]] == [("-1", [], [group["GroupId"]])]
    (run,) = [form for form in proxy.calls if form.get("Action") == "RunInstances"]
    assert run["BlockDeviceMapping.1.Ebs.VolumeSize"] == "100" and run["ClientToken"]
    # a second runner, and one after a server restart, use the same group
    second = backend.create(offer_of(backend, "t3.medium", spot=False), bootstrap(backend))
    third = make(ec2_url, catalog, tmp_path, server_id=backend.server_id).create(
        offer_of(backend, "t3.medium", spot=False), bootstrap(backend))
    groups = {g["GroupId"] for r in client.describe_instances(InstanceIds=[second.id, third.id])["Reservations"]
              for i in r["Instances"] for g in i["SecurityGroups"]}
    assert groups == {group["GroupId"]}
    assert proxy.count("CreateSecurityGroup") == 1


def test_a_spot_offer_is_a_one_time_spot_instance_terminated_on_interruption(ec2_url, catalog, tmp_path, proxy):
    backend = make(ec2_url, catalog, tmp_path)
    inst = backend.create(offer_of(backend, "g5.xlarge", spot=True), bootstrap(backend))
    raw = ec2(ec2_url).describe_instances(InstanceIds=[inst.id])["Reservations"][0]["Instances"][0]
    assert raw["InstanceLifecycle"] == "spot" and raw["InstanceType"] == "g5.xlarge"
    run = [form for form in proxy.calls if form.get("Action") == "RunInstances"][-1]
    assert run["InstanceMarketOptions.MarketType"] == "spot"
    assert run["InstanceMarketOptions.SpotOptions.SpotInstanceType"] == "one-time"
    assert run["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"] == "terminate"
    (listed,) = backend.list()
    assert listed.offer.spot and listed.offer.price == 0.4539


def test_an_offer_in_another_region_is_created_there(ec2_url, catalog, tmp_path):
    backend = make(ec2_url, catalog, tmp_path, regions=["us-east-1", "eu-west-1"])
    inst = backend.create(offer_of(backend, "t3.medium", spot=False, region="eu-west-1"), bootstrap(backend))
    assert ec2(ec2_url, "eu-west-1").describe_instances(InstanceIds=[inst.id])["Reservations"]
    assert [(i.id, i.offer.region) for i in backend.list()] == [(inst.id, "eu-west-1")]
    assert backend.terminate(inst.id) is True


@pytest.mark.parametrize("code", ["InsufficientInstanceCapacity", "VcpuLimitExceeded"])
def test_a_capacity_refusal_is_a_capacity_error_with_aws_reason_sent_once(ec2_url, catalog, tmp_path, proxy, code):
    backend = make(ec2_url, catalog, tmp_path)
    proxy.plan["RunInstances"] = [code]
    with pytest.raises(CapacityError) as e:
        backend.create(offer_of(backend, "g5.xlarge", spot=False), bootstrap(backend))
    assert str(e.value) == f"{code}: {ERRORS[code][1]}"
    assert proxy.count("RunInstances") == 1  # not retried by botocore (a 500 would be, twice, by default)
    assert backend.list() == []
    # the next try is made, and succeeds
    assert backend.create(offer_of(backend, "g5.xlarge", spot=False), bootstrap(backend)).id.startswith("i-")


def test_another_refusal_is_a_backend_error_not_a_capacity_one(ec2_url, catalog, tmp_path, proxy):
    backend = make(ec2_url, catalog, tmp_path)
    proxy.plan["RunInstances"] = ["InvalidParameterCombination"]
    with pytest.raises(BackendError) as e:
        backend.create(offer_of(backend, "t3.medium", spot=False), bootstrap(backend))
    assert not isinstance(e.value, CapacityError)
    assert str(e.value) == ("starting t3.medium in us-east-1: InvalidParameterCombination: "
                            + ERRORS["InvalidParameterCombination"][1])


def test_a_given_ami_is_used_and_one_that_is_not_there_is_said(ec2_url, catalog, tmp_path):
    ami = ec2(ec2_url).describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    backend = make(ec2_url, catalog, tmp_path, ami=ami)
    inst = backend.create(offer_of(backend, "t3.medium", spot=False), bootstrap(backend))
    assert ec2(ec2_url).describe_instances(InstanceIds=[inst.id])["Reservations"][0]["Instances"][0]["ImageId"] == ami
    missing = make(ec2_url, catalog, tmp_path, ami="ami-00000000000000000")
    with pytest.raises(BackendError, match="ami-00000000000000000"):
        missing.create(offer_of(missing, "t3.medium", spot=False), bootstrap(missing))
    with pytest.raises(BackendError, match="ami names a resource of one region: give one region with it"):
        make(ec2_url, catalog, tmp_path, ami=ami, regions=["us-east-1", "eu-west-1"])


def test_the_default_image_is_the_newest_whose_python3_is_the_servers(ec2_url, catalog, tmp_path, proxy):
    """The runner installs from the server's wheels, built for its Python: tests on 3.11 get Debian 12's."""
    backend = make(ec2_url, catalog, tmp_path)
    assert backend.python == PYTHON
    inst = backend.create(offer_of(backend, "t3.medium", spot=False), bootstrap(backend))
    raw = ec2(ec2_url).describe_instances(InstanceIds=[inst.id])["Reservations"][0]["Instances"][0]
    image, owner, root = NEWEST[PYTHON]
    assert raw["ImageId"] == image == DEFAULT_IMAGE
    (asked,) = [form for form in proxy.calls if form.get("Action") == "DescribeImages"]
    assert asked["Owner.1"] == owner
    run = [form for form in proxy.calls if form.get("Action") == "RunInstances"][-1]
    assert run["BlockDeviceMapping.1.DeviceName"] == root  # the image's own root device
    if PYTHON == (3, 11):
        assert (owner, asked["Filter.1.Value.1"], root) == (DEBIAN, "debian-12-amd64-*", "/dev/xvda")


@pytest.mark.parametrize("python", sorted(NEWEST), ids=lambda v: f"py{v[0]}.{v[1]}")
def test_each_python_gets_the_image_whose_python3_it_is(ec2_url, catalog, tmp_path, proxy, python):
    backend = make(ec2_url, catalog, tmp_path)
    backend.python = python
    image, owner, root = NEWEST[python]
    family = aws.IMAGE_FAMILIES[python]
    assert backend.test() == (f"account 123456789012, regions us-east-1, image: the newest {family.label} AMI of "
                              f"owner {owner} (python3 {python[0]}.{python[1]}, as the server's)")
    backend.create(offer_of(backend, "t3.medium", spot=False), bootstrap(backend))
    (asked,) = [form for form in proxy.calls if form.get("Action") == "DescribeImages"]
    run = [form for form in proxy.calls if form.get("Action") == "RunInstances"][-1]
    assert (asked["Owner.1"], run["ImageId"], run["BlockDeviceMapping.1.DeviceName"]) == (owner, image, root)


@pytest.mark.parametrize("python", [(3, 10), (3, 14)], ids=lambda v: f"py{v[0]}.{v[1]}")
def test_a_python_without_a_matching_image_is_said_at_test_and_create(ec2_url, catalog, tmp_path, proxy, python):
    backend = make(ec2_url, catalog, tmp_path)
    backend.python = python
    said = f"the server runs Python {python[0]}.{python[1]}, and no default image has that python3"
    ask = f"give the backend an `ami` whose python3 is {python[0]}.{python[1]}$"
    with pytest.raises(BackendError, match=f"^{said} .*: {ask}") as e:
        backend.test()
    assert "Debian 12 bookworm: 3.11, Ubuntu 24.04 noble: 3.12" in str(e.value)
    with pytest.raises(BackendError, match=ask):
        backend.create(offer_of(backend, "t3.medium", spot=False), bootstrap(backend))
    assert proxy.count("RunInstances") == 0 and proxy.count("DescribeImages") == 0
    # an `ami` of the user's is used as it is, whatever the server's Python
    ami = ec2(ec2_url).describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    given = make(ec2_url, catalog, tmp_path, ami=ami)
    given.python = python
    assert given.test().endswith(f"image: {ami} (its python3 must be {python[0]}.{python[1]}, as the server's)")
    inst = given.create(offer_of(given, "t3.medium", spot=False), bootstrap(given))
    assert ec2(ec2_url).describe_instances(InstanceIds=[inst.id])["Reservations"][0]["Instances"][0]["ImageId"] == ami


def test_a_region_without_the_family_s_images_is_said(ec2_url, catalog, tmp_path, proxy):
    proxy.hidden = frozenset({DEBIAN})
    backend = make(ec2_url, catalog, tmp_path)
    backend.python = (3, 11)
    with pytest.raises(BackendError) as e:
        backend.create(offer_of(backend, "t3.medium", spot=False), bootstrap(backend))
    assert str(e.value) == ("no Debian 12 bookworm AMI (debian-12-amd64-*, owner 136693071363) in us-east-1: give the "
                            "backend an `ami` whose python3 is 3.11")
    assert proxy.count("RunInstances") == 0


def test_terminate_is_idempotent_and_says_when_the_instance_is_going(ec2_url, catalog, tmp_path):
    backend = make(ec2_url, catalog, tmp_path)
    boot = bootstrap(backend)
    inst = backend.create(offer_of(backend, "t3.medium", spot=False), boot)
    assert backend.terminate(inst.id) is True
    assert backend.terminate(inst.id) is True
    assert backend.list() == []
    state = ec2(ec2_url).describe_instances(InstanceIds=[inst.id])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] in ("shutting-down", "terminated")
    # after a restart, by id alone (its region unknown to the new object), and an id that never was
    again = make(ec2_url, catalog, tmp_path, server_id=backend.server_id, regions=["eu-west-1", "us-east-1"])
    assert again.terminate(inst.id) is True
    assert again.terminate("i-0123456789abcdef0") is True
    assert f"instance {inst.id} in us-east-1 is terminated" in again.describe_failure(boot.runner_name)
    assert again.describe_failure("never-was") == "no instance tagged dstack:runner=never-was in eu-west-1, us-east-1"


def test_list_finds_this_servers_instances_by_tags_also_after_a_restart(ec2_url, catalog, tmp_path):
    backend = make(ec2_url, catalog, tmp_path, regions=["us-east-1", "eu-west-1"])
    before = time.monotonic()
    a = backend.create(offer_of(backend, "t3.medium", spot=False), bootstrap(backend, "runner-a"))
    b = backend.create(offer_of(backend, "g5.xlarge", spot=True, region="eu-west-1"), bootstrap(backend, "runner-b"))
    other = make(ec2_url, catalog, tmp_path)  # another server, on the same account
    theirs = other.create(offer_of(other, "t3.medium", spot=False), bootstrap(other))
    restarted = make(ec2_url, catalog, tmp_path, server_id=backend.server_id, regions=["us-east-1", "eu-west-1"])
    for listing in (backend.list(), restarted.list()):
        got = sorted(listing, key=lambda i: i.runner_name)
        assert [(i.id, i.runner_name) for i in got] == [(a.id, "runner-a"), (b.id, "runner-b")]
        assert [i.offer.describe() for i in got] == ["aws t3.medium, us-east-1, $0.04/h",
                                                     "aws g5.xlarge, eu-west-1, spot, $0.50/h"]
        assert all(before - 5 <= i.started_at <= time.monotonic() for i in got)
    assert [i.id for i in other.list()] == [theirs.id]
    assert restarted.terminate(a.id) and restarted.terminate(b.id)
    assert restarted.list() == [] and backend.list() == []
    other.terminate(theirs.id)


def test_test_names_the_account_regions_and_image(ec2_url, catalog, tmp_path):
    image = (f"image: the newest {aws.IMAGE_FAMILIES[PYTHON].label} AMI of owner {NEWEST[PYTHON][1]} "
             f"(python3 {PYTHON[0]}.{PYTHON[1]}, as the server's)")
    assert make(ec2_url, catalog, tmp_path).test() == f"account 123456789012, regions us-east-1, {image}"
    two = make(ec2_url, catalog, tmp_path, regions=["us-east-1", "eu-west-1"])
    assert two.test() == f"account 123456789012, regions us-east-1, eu-west-1, {image}"
    if PYTHON == (3, 11):
        assert image == "image: the newest Debian 12 bookworm AMI of owner 136693071363 (python3 3.11, as the server's)"
    with pytest.raises(BackendError, match=r"account 123456789012 cannot use the region mars-north-1 \(it can use "):
        make(ec2_url, catalog, tmp_path, regions=["us-east-1", "mars-north-1"]).test()


def test_test_fails_clearly_when_the_api_is_unreachable_or_refuses_the_keys(ec2_url, catalog, tmp_path, proxy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises(BackendError, match=f"^cannot reach the EC2 API at {closed}"):
        make(closed, catalog, tmp_path).test()
    assert time.monotonic() - started < 15
    proxy.plan["DescribeRegions"] = ["AuthFailure"]
    with pytest.raises(BackendError) as e:
        make(ec2_url, catalog, tmp_path).test()
    assert str(e.value) == (f"AWS refused the backend's credentials (AuthFailure: {ERRORS['AuthFailure'][1]}); "
                            f"check access_key_id and secret_access_key")


def test_no_secret_in_its_repr_logs_or_errors(ec2_url, catalog, tmp_path, proxy, caplog):
    caplog.set_level(logging.DEBUG)
    texts = []
    backend = make(ec2_url, catalog, tmp_path)
    texts += [repr(backend), str(backend), repr(backend.settings), repr(vars(backend.settings)), repr(vars(backend))]
    backend.test()
    inst = backend.create(offer_of(backend, "t3.medium", spot=False), bootstrap(backend))
    backend.list()
    backend.terminate(inst.id)
    proxy.plan["RunInstances"] = ["InsufficientInstanceCapacity", "AuthFailure", "SignatureDoesNotMatch"]
    for _ in range(3):
        with pytest.raises(BackendError) as e:
            backend.create(offer_of(backend, "t3.medium", spot=False), bootstrap(backend))
        texts.append(str(e.value))
    assert "Credential=***/20260101" in texts[-1]  # AWS's message, the key id taken out
    with pytest.raises(BackendError) as e:
        make("http://127.0.0.1:1", catalog, tmp_path).test()
    texts.append(str(e.value))
    for bad in ({"regions": "us-east-1"}, {"access_key_id": 123}, {"secret_access_key": None},
                {"unknown": SECRET_KEY}):
        with pytest.raises(BackendError) as e:
            make(ec2_url, catalog, tmp_path, **bad)
        texts.append(str(e.value))
    assert "the settings of backend 'aws' are not valid: access_key_id: " in texts[-3]
    texts += [r.getMessage() for r in caplog.records]
    assert any("aws: instance" in t for t in texts)  # the log was captured
    for text in texts:
        assert ACCESS_KEY not in text and SECRET_KEY not in text, text


def test_the_spot_notice_is_read_from_imds_with_a_session_token(monkeypatch):
    from dstack.runner.spot import instance_action

    notice: dict = {}
    seen: list[tuple[str, str, str | None]] = []

    class Imds(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_PUT(self):
            seen.append(("PUT", self.path, self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")))
            self._send(200, b"token-1" if self.path == "/latest/api/token" else b"")

        def do_GET(self):
            seen.append(("GET", self.path, self.headers.get("X-aws-ec2-metadata-token")))
            if self.headers.get("X-aws-ec2-metadata-token") != "token-1":
                return self._send(401, b"")
            if self.path == "/latest/meta-data/spot/instance-action" and notice:
                return self._send(200, json.dumps(notice).encode())
            self._send(404, b"<?xml ...>Not Found")

        def _send(self, status, body):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    imds = ThreadingHTTPServer(("127.0.0.1", 0), Imds)
    threading.Thread(target=imds.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("DSTACK_IMDS_URL", f"http://127.0.0.1:{imds.server_address[1]}")
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")  # IMDS is never asked through a proxy
        assert instance_action() is None  # nothing scheduled: 404
        assert seen[:2] == [("PUT", "/latest/api/token", "21600"),
                            ("GET", "/latest/meta-data/spot/instance-action", "token-1")]
        notice.update({"action": "terminate", "time": "2026-12-04T20:14:00Z"})
        assert instance_action() == {"action": "terminate", "time": "2026-12-04T20:14:00Z"}
        assert [s[0] for s in seen].count("PUT") == 1  # the token is kept
    finally:
        imds.shutdown()
        imds.server_close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("DSTACK_IMDS_URL", f"http://127.0.0.1:{s.getsockname()[1]}")
    with pytest.raises(OSError):
        instance_action(timeout=0.5)  # not on EC2
