"""`aws`: a runner per EC2 instance, created on demand in the regions the backend is given.

What it creates, each tagged `dstack:server=<server id>` (so that `list()` finds it again after a restart):
- per region, one security group `dstack-<server id>`: all traffic from its own members (the runners of a
  multi-node run reach each other), nothing else inbound; outbound open (runners call the server);
- per runner, one instance (tagged `dstack:runner` and `Name` with the runner's name, its root volume too):
  `ami`, else the newest amd64 AMI of the image family whose python3 is the server's Python (IMAGE_FAMILIES:
  the runner installs from the server's wheels, binary ones for its Python version), IMDSv2 only, user-data that
  installs and starts the runner and shuts the machine down once the runner has exited after its idle timeout; with
  `InstanceInitiatedShutdownBehavior=terminate` that shutdown terminates the instance, so an idle runner costs
  nothing even with the server gone. Spot offers are one-time spot instances, terminated on interruption.

RunInstances is sent once (no SDK retries: botocore retries InsufficientInstanceCapacity, a 500, by default);
a capacity or quota refusal is a CapacityError, and the autoscaler tries the next offer. The offers and
their prices come from gpuhunt's catalogue (aws_catalog.py)."""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, SecretStr, model_validator

from dstack.backends.aws_catalog import OfferCache
from dstack.backends.base import (
    BackendError,
    Bootstrap,
    CapacityError,
    Gpus,
    Instance,
    MultiNode,
    Offer,
    Spot,
    validated_settings,
)
from dstack.core.base import Model

log = logging.getLogger("dstack.server")

SERVER_TAG, RUNNER_TAG = "dstack:server", "dstack:runner"
UBUNTU_OWNER = "099720109477"  # Canonical
DEBIAN_OWNER = "136693071363"  # Debian's official AWS account (its release images since Debian 10)


@dataclass(frozen=True)
class ImageFamily:
    """Public amd64 AMIs of one distribution release, all with the same system python3."""

    label: str  # "Debian 12 bookworm"
    owner: str  # the account that publishes them
    name_filter: str  # DescribeImages' `name` filter
    name: re.Pattern[str]  # what a name must match besides (the filter is AWS's, this check the backend's own)
    root_device: str  # where an image does not say its RootDeviceName


# the server's Python (major, minor) -> the images whose python3 is that version: the runner installs from the
# server's wheels, whose binary ones are for the server's Python (wheelhouse.py), and bootstrap refuses another.
# Ubuntu 22.04 (3.10) is older than dstack needs (3.11).
IMAGE_FAMILIES: dict[tuple[int, int], ImageFamily] = {
    (3, 11): ImageFamily("Debian 12 bookworm", DEBIAN_OWNER, "debian-12-amd64-*",
                         re.compile(r"^debian-12-amd64-\d{8}-\d+$"), "/dev/xvda"),
    (3, 12): ImageFamily("Ubuntu 24.04 noble", UBUNTU_OWNER,
                         "ubuntu/images/hvm-ssd*/ubuntu-noble-24.04-amd64-server-*",
                         re.compile(r"^ubuntu/images/hvm-ssd(-gp3)?/ubuntu-noble-24\.04-amd64-server-\d{8}(\.\d+)?$"),
                         "/dev/sda1"),
    (3, 13): ImageFamily("Debian 13 trixie", DEBIAN_OWNER, "debian-13-amd64-*",
                         re.compile(r"^debian-13-amd64-\d{8}-\d+$"), "/dev/xvda"),
}
ALIVE = ["pending", "running", "stopping", "stopped", "shutting-down"]
# RunInstances refusals that another offer (type, region, market) may not meet: try the next one
CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity", "SpotMaxPriceTooLow", "InstanceLimitExceeded", "VcpuLimitExceeded",
    "MaxSpotInstanceCountExceeded", "Unsupported", "UnfulfillableCapacity", "InsufficientCapacity"})
CREDENTIAL_CODES = frozenset({
    "AuthFailure", "InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException",
    "InvalidAccessKeyId", "ExpiredToken", "ExpiredTokenException", "IncompleteSignature"})
GONE_CODES = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
# EC2 is eventually consistent: an instance just created may be missing from describe and terminate answers
CONSISTENCY_GRACE = 60.0
ON_IDLE = "shutdown -h now"  # with shutdown behaviour `terminate`, the instance is gone


class AWSSettings(Model):
    """The keys of `dstack backends add aws`. Without keys, boto3 looks for credentials where the server runs
    (its environment, ~/.aws, an instance role)."""

    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    regions: list[str] = Field(default_factory=lambda: ["us-east-1"], min_length=1)
    endpoint_url: str | None = None  # an EC2-compatible API (tests: moto)
    catalog_dir: str | None = None  # a folder holding gpuhunt's aws.csv; else gpuhunt downloads it
    ami: str | None = None  # else the region's newest of IMAGE_FAMILIES[the server's Python]
    subnet_id: str | None = None  # else the region's default VPC
    instance_profile: str | None = None  # a name or an ARN
    disk_gb: int = Field(100, ge=8, le=16384)  # the root volume (gp3)

    model_config = {"extra": "forbid"}

    @model_validator(mode="after")
    def _consistent(self) -> AWSSettings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("give both access_key_id and secret_access_key, or neither (boto3 then finds "
                             "credentials where the server runs)")
        for key in ("ami", "subnet_id"):
            if getattr(self, key) and len(self.regions) > 1:
                raise ValueError(f"{key} names a resource of one region: give one region with it")
        return self


class AWSBackend(Spot, Gpus, MultiNode):
    settings_model: ClassVar[type] = AWSSettings
    secrets: ClassVar[tuple[str, ...]] = ("access_key_id", "secret_access_key")
    max_runners = 1_000_000  # no count of its own: its limits (`dstack limits set`) bound it

    def __init__(self, name: str, settings: dict[str, Any], *, server_id: str, home: Path) -> None:
        self.settings = validated_settings(AWSSettings, name, settings)
        if not server_id:
            raise BackendError("the aws backend needs the server's id to tag what it creates")
        self.name, self.server_id, self.home = name, server_id, Path(home)
        s = self.settings
        self._secrets = [v for v in (s.access_key_id, s.secret_access_key) if v is not None]  # SecretStr
        self._offers = OfferCache(name, s.regions, s.catalog_dir)
        self._lock = threading.Lock()
        self._session: Any = None
        self._clients: dict[tuple[str, str, int], Any] = {}
        self._images: dict[str, tuple[str, str]] = {}  # region -> (AMI id, root device)
        self._groups: dict[str, str] = {}  # region -> security group id
        self._created: dict[str, tuple[str, Instance, float]] = {}  # id -> (region, instance, monotonic)
        self._where: dict[str, str] = {}  # instance id -> region, as learnt from create and list
        # the Python whose wheels the runners install (wheelhouse.py): the default image's python3 must be it
        # (tests set another to see the image chosen for it)
        self.python: tuple[int, int] = (sys.version_info[0], sys.version_info[1])
        # botocore's debug log shows the access key id (Authorization) and user-data (the runner's token)
        botocore_log = logging.getLogger("botocore")
        if botocore_log.level == logging.NOTSET:
            botocore_log.setLevel(logging.INFO)

    def __repr__(self) -> str:
        return f"AWSBackend(name={self.name!r}, server_id={self.server_id!r}, regions={self.settings.regions!r})"

    # --- the backend interface

    def offers(self) -> list[Offer]:
        """gpuhunt's rows of the backend's regions, on-demand and spot, the cheapest first (read once)."""
        return self._offers.get()

    def test(self) -> str:
        region = self.settings.regions[0]
        try:
            regions = self._client(region).describe_regions()["Regions"]
            account = self._client(region, "sts").get_caller_identity()["Account"]
        except Exception as e:
            raise self._error(e, region, "checking the credentials") from None
        known = {r["RegionName"] for r in regions}
        missing = [r for r in self.settings.regions if r not in known]
        if missing:
            raise BackendError(f"account {account} cannot use the region{'s' if len(missing) > 1 else ''} "
                               f"{', '.join(missing)} (it can use {', '.join(sorted(known))})")
        python = _dotted(self.python)
        if self.settings.ami:
            image = f"{self.settings.ami} (its python3 must be {python}, as the server's)"
        else:
            family = self._family()
            image = f"the newest {family.label} AMI of owner {family.owner} (python3 {python}, as the server's)"
        return f"account {account}, regions {', '.join(self.settings.regions)}, image: {image}"

    def create(self, offer: Offer, bootstrap: Bootstrap) -> Instance:
        region = offer.region or self.settings.regions[0]
        if bootstrap.server_id and bootstrap.server_id != self.server_id:
            raise BackendError(f"a runner of server {bootstrap.server_id} asked of the backend of {self.server_id}")
        user_data = self._user_data(bootstrap)
        try:
            image, root_device = self._image(region)
            group = self._security_group(region)
        except BackendError:
            raise
        except Exception as e:
            raise self._error(e, region, f"preparing {region}") from None
        tags = [{"Key": SERVER_TAG, "Value": self.server_id}, {"Key": RUNNER_TAG, "Value": bootstrap.runner_name},
                {"Key": "Name", "Value": bootstrap.runner_name}]
        params: dict[str, Any] = {
            "ImageId": image, "InstanceType": offer.instance_type, "MinCount": 1, "MaxCount": 1,
            "UserData": user_data, "SecurityGroupIds": [group], "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
            "BlockDeviceMappings": [{"DeviceName": root_device, "Ebs": {
                "VolumeSize": self.settings.disk_gb, "VolumeType": "gp3", "DeleteOnTermination": True}}],
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}, {"ResourceType": "volume", "Tags": tags}],
            # the same request sent again (the autoscaler's retry of this runner) makes no second instance
            "ClientToken": hashlib.sha256(f"{self.server_id}/{bootstrap.runner_name}/{region}/{offer.instance_type}/"
                                          f"{offer.spot}".encode()).hexdigest()[:64],
        }
        if self.settings.subnet_id:
            params["SubnetId"] = self.settings.subnet_id
        if profile := self.settings.instance_profile:
            params["IamInstanceProfile"] = {"Arn": profile} if profile.startswith("arn:") else {"Name": profile}
        if offer.spot:
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
        try:
            answer = self._client(region, attempts=1).run_instances(**params)
        except Exception as e:
            raise self._error(e, region, f"starting {offer.instance_type} in {region}") from None
        instance_id = answer["Instances"][0]["InstanceId"]
        inst = Instance(id=instance_id, runner_name=bootstrap.runner_name, started_at=time.monotonic(), offer=offer)
        with self._lock:
            self._where[instance_id] = region
            self._created[instance_id] = (region, inst, time.monotonic())
        log.info("aws: instance %s (%s) for runner %s", instance_id, offer.describe(), bootstrap.runner_name)
        return inst

    def terminate(self, instance_id: str) -> bool:
        with self._lock:
            known = self._where.get(instance_id)
            created = self._created.get(instance_id)
        regions = [known] if known else self.settings.regions
        for region in regions:
            try:
                answer = self._client(region).terminate_instances(InstanceIds=[instance_id])
            except Exception as e:
                if _code(e) in GONE_CODES:
                    continue
                err = self._error(e, region, f"terminating {instance_id}")
                if _code(e) is None:  # the API was not reached: ask again later
                    log.warning("aws: %s", err)
                    return False
                raise err from None
            state = answer["TerminatingInstances"][0]["CurrentState"]["Name"]
            with self._lock:
                self._created.pop(instance_id, None)
            return state in ("shutting-down", "terminated")
        # in no region: gone, unless it was created a moment ago and EC2 does not know it yet
        return created is None or time.monotonic() - created[2] > CONSISTENCY_GRACE

    def list(self) -> list[Instance]:
        found: list[Instance] = []
        for region in self.settings.regions:
            try:
                for raw in self._describe(region, [{"Name": "instance-state-name", "Values": ALIVE}]):
                    found.append(self._instance(raw, region))
            except Exception as e:
                raise self._error(e, region, f"listing the instances in {region}") from None
        seen = {i.id for i in found}
        with self._lock:
            for iid, (_, inst, at) in list(self._created.items()):
                if iid in seen or time.monotonic() - at > CONSISTENCY_GRACE:
                    self._created.pop(iid, None)
                else:
                    found.append(inst)  # created a moment ago: not listed by EC2 yet
        return found

    def release_jobs(self, job_ids: list[str]) -> None:
        """Nothing: a job runs on its runner's instance, which goes with the runner."""

    def describe_failure(self, runner_name: str) -> str:
        for region in self.settings.regions:
            try:
                raws = self._describe(region, [{"Name": f"tag:{RUNNER_TAG}", "Values": [runner_name]}])
            except Exception as e:
                return f"EC2 could not be asked ({self._error(e, region, 'describing')})"
            for raw in raws:
                reason = (raw.get("StateReason") or {}).get("Message")
                return (f"instance {raw['InstanceId']} in {region} is {raw['State']['Name']}"
                        f"{f' ({reason})' if reason else ''}; its boot log: aws ec2 get-console-output --region "
                        f"{region} --instance-id {raw['InstanceId']}")
        return f"no instance tagged {RUNNER_TAG}={runner_name} in {', '.join(self.settings.regions)}"

    # --- EC2

    def _client(self, region: str, service: str = "ec2", attempts: int = 3) -> Any:
        """A client per (service, region, attempts), made once: boto3 clients are thread-safe, making them is not."""
        key = (service, region, attempts)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                import boto3
                from botocore.config import Config

                if self._session is None:
                    keys = {k: v.get_secret_value() for k, v in
                            zip(("aws_access_key_id", "aws_secret_access_key"), self._secrets, strict=False)}
                    self._session = boto3.session.Session(**keys)
                config = Config(connect_timeout=5, read_timeout=30,
                                retries={"mode": "standard", "total_max_attempts": attempts})
                client = self._session.client(service, region_name=region, endpoint_url=self.settings.endpoint_url,
                                              config=config)
                self._clients[key] = client
            return client

    def _describe(self, region: str, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The instances of `region` that carry this server's tag and match `filters`."""
        pages = self._client(region).get_paginator("describe_instances").paginate(
            Filters=[{"Name": f"tag:{SERVER_TAG}", "Values": [self.server_id]}, *filters])
        return [raw for page in pages for reservation in page["Reservations"] for raw in reservation["Instances"]]

    def _instance(self, raw: dict[str, Any], region: str) -> Instance:
        tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
        spot = raw.get("InstanceLifecycle") == "spot"
        age = (datetime.now(UTC) - raw["LaunchTime"]).total_seconds() if raw.get("LaunchTime") else 0.0
        with self._lock:
            self._where[raw["InstanceId"]] = region
        return Instance(id=raw["InstanceId"], runner_name=tags.get(RUNNER_TAG) or tags.get("Name") or "",
                        started_at=time.monotonic() - max(0.0, age),
                        offer=self._offers.find(raw.get("InstanceType", ""), region, spot))

    def _family(self) -> ImageFamily:
        """The default images' family: the one whose python3 is the server's Python, else a BackendError."""
        family = IMAGE_FAMILIES.get(self.python)
        if family is None:
            python = _dotted(self.python)
            known = ", ".join(f"{f.label}: {_dotted(v)}" for v, f in IMAGE_FAMILIES.items())
            raise BackendError(f"the server runs Python {python}, and no default image has that python3 ({known}; "
                               f"the runners install the server's wheels, built for its Python): give the backend "
                               f"an `ami` whose python3 is {python}")
        return family

    def _image(self, region: str) -> tuple[str, str]:
        """The AMI of `region` and its root device: the given one, else the newest amd64 image of the family whose
        python3 is the server's Python."""
        if region in self._images:
            return self._images[region]
        ec2 = self._client(region)
        if self.settings.ami:
            images = ec2.describe_images(ImageIds=[self.settings.ami])["Images"]
            if not images:
                raise BackendError(f"the AMI {self.settings.ami} is not in {region}")
            root_device = "/dev/sda1"
        else:
            family = self._family()
            images = ec2.describe_images(Owners=[family.owner], Filters=[
                {"Name": "name", "Values": [family.name_filter]}, {"Name": "state", "Values": ["available"]},
                {"Name": "architecture", "Values": ["x86_64"]}])["Images"]
            images = [i for i in images if family.name.match(i.get("Name") or "")
                      and i.get("OwnerId", family.owner) == family.owner
                      and i.get("Architecture", "x86_64") == "x86_64" and i.get("State", "available") == "available"]
            if not images:
                raise BackendError(f"no {family.label} AMI ({family.name_filter}, owner {family.owner}) in {region}: "
                                   f"give the backend an `ami` whose python3 is {_dotted(self.python)}")
            root_device = family.root_device
        image = max(images, key=lambda i: (i.get("CreationDate") or "", i.get("Name") or ""))  # the newest
        self._images[region] = (image["ImageId"], image.get("RootDeviceName") or root_device)
        return self._images[region]

    def _security_group(self, region: str) -> str:
        """This server's group in `region` (found by its tag, else created): all traffic from its members."""
        if region in self._groups:
            return self._groups[region]
        ec2 = self._client(region)
        vpc = self._vpc(ec2, region)
        by_vpc = {"Name": "vpc-id", "Values": [vpc]}
        found = ec2.describe_security_groups(Filters=[
            {"Name": f"tag:{SERVER_TAG}", "Values": [self.server_id]}, by_vpc])["SecurityGroups"]
        if found:
            group = found[0]["GroupId"]
        else:
            name = f"dstack-{self.server_id}"
            try:
                group = ec2.create_security_group(
                    GroupName=name, VpcId=vpc,
                    Description=f"dstack runners of server {self.server_id}: all traffic between them",
                    TagSpecifications=[{"ResourceType": "security-group", "Tags": [
                        {"Key": SERVER_TAG, "Value": self.server_id}, {"Key": "Name", "Value": name}]}])["GroupId"]
            except Exception as e:
                if _code(e) != "InvalidGroup.Duplicate":
                    raise
                group = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]}, by_vpc])[
                    "SecurityGroups"][0]["GroupId"]
        try:  # once per process: a server stopped between creating the group and this would have left it closed
            ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[
                {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]}])
        except Exception as e:
            if _code(e) != "InvalidPermission.Duplicate":
                raise
        self._groups[region] = group
        return group

    def _vpc(self, ec2: Any, region: str) -> str:
        if self.settings.subnet_id:
            return ec2.describe_subnets(SubnetIds=[self.settings.subnet_id])["Subnets"][0]["VpcId"]
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise BackendError(f"{region} has no default VPC: give the backend a subnet_id")
        return vpcs[0]["VpcId"]

    def _user_data(self, bootstrap: Bootstrap) -> str:
        from dstack.backends.bootstrap import install_script

        try:  # its own checks: EC2's 16 KB, a token it can write
            return install_script(bootstrap, on_idle=ON_IDLE, backend=self.name)
        except ValueError as e:
            raise BackendError(f"the runner's user-data: {e}") from None

    def _error(self, e: Exception, region: str, doing: str) -> BackendError:
        """`e` (botocore's) as the error users see: a CapacityError for a refusal another offer may not meet,
        and never a secret."""
        code = _code(e)
        if code is None:
            from botocore.exceptions import ConnectionError, NoCredentialsError

            if isinstance(e, NoCredentialsError):
                return BackendError("no AWS credentials: give the backend access_key_id and secret_access_key")
            if isinstance(e, ConnectionError):
                url = self._client(region).meta.endpoint_url
                return BackendError(self._scrub(f"cannot reach the EC2 API at {url}: {e}"))
            return BackendError(self._scrub(f"{doing}: {type(e).__name__}: {e}"))
        message = self._scrub(getattr(e, "response", {}).get("Error", {}).get("Message") or "")
        if code in CAPACITY_CODES:
            return CapacityError(f"{code}: {message}")
        if code in CREDENTIAL_CODES:
            return BackendError(f"AWS refused the backend's credentials ({code}: {message}); check access_key_id "
                                f"and secret_access_key")
        return BackendError(f"{doing}: {code}: {message}")

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret.get_secret_value(), "***")
        return text


def _code(e: Exception) -> str | None:
    """The AWS error code of a botocore ClientError; None for anything else (the API was not reached)."""
    response = getattr(e, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))
