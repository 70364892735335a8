"""The cluster configs in cluster/: the Ray cluster launcher YAML for AWS V100s, the KubeRay manifests, the
Dockerfile. Static checks only (no cloud, no network, no Ray started): each config against the schema or
the code that consumes it, and against pyproject.toml's pins."""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "aws-v100.yaml"
KUBERAY = CLUSTER / "kuberay"
DOCKERFILE = CLUSTER / "Dockerfile"
IMAGE_REPOSITORY = "ghcr.io/nota-batch/nota-batch"
CUDA_INDEX = "https://download.pytorch.org/whl/cu126"  # CUDA 12.6: still built for sm_70 (V100)

# EC2 instance types: vCPUs and V100s (AWS's published specs).
VCPUS = {"m5.2xlarge": 8, "p3.2xlarge": 8, "p3.8xlarge": 32, "p3.16xlarge": 64}
V100S = {"p3.2xlarge": 1, "p3.8xlarge": 4, "p3.16xlarge": 8}
# Environment variables that carry storage credentials or endpoints: they must come from a Secret.
CREDENTIAL_ENV = re.compile(r"^AWS_")
ACCESS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


# ---------------------------------------------------------------- helpers


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(name: str) -> str:
    """The exact version pyproject.toml pins `name` to (`name[extras]==X`)."""
    for dependency in pyproject()["project"]["dependencies"]:
        requirement = Requirement(dependency)
        if requirement.name == name:
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", dependency
            return specifier.version
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def project_image() -> str:
    return f"{IMAGE_REPOSITORY}:{pyproject()['project']['version']}"


def launcher() -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER.read_text())


def manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                document["_file"] = path.name
                documents.append(document)
    return documents


def one(kind: str) -> dict[str, Any]:
    (found,) = [document for document in manifests() if document["kind"] == kind]
    return found


def ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec: the RayCluster's own and the one a RayJob brings."""
    specs = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for d in manifests() if d["kind"] == "RayCluster"]
    specs += [(f"RayJob {d['metadata']['name']}", d["spec"]["rayClusterSpec"])
              for d in manifests() if d["kind"] == "RayJob" and "rayClusterSpec" in d["spec"]]
    return specs


def containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container (and init container) anywhere below `node`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from containers(value)


def gpu_limit(container: dict[str, Any]) -> int | None:
    resources = container.get("resources", {})
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    if "nvidia.com/gpu" in requests:
        assert requests["nvidia.com/gpu"] == limits.get("nvidia.com/gpu"), "GPU requests must equal limits"
    return int(limits["nvidia.com/gpu"]) if "nvidia.com/gpu" in limits else None


def entry_module(argv: list[str]) -> tuple[str, list[str]]:
    """`python -m MODULE ARGS...` or `nota-batch COMMAND ARGS...` -> (MODULE, ARGS)."""
    from jobs.cli import COMMANDS

    if argv[:1] == ["nota-batch"]:
        assert argv[1] in COMMANDS, f"no nota-batch command {argv[1]}"
        argv = ["python", "-m", COMMANDS[argv[1]][0], *argv[2:]]
    assert argv[:2] == ["python", "-m"], f"expected `python -m MODULE ...` or `nota-batch COMMAND ...`, got {argv[:3]}"
    module = argv[2]
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    return module, argv[3:]


def parse_entrypoint(module: str, args: list[str]) -> argparse.Namespace:
    """The arguments as the module's own command line parses them (argparse exits 2 on an error, which
    fails the test)."""
    return importlib.import_module(module).parse_args(args)


# ---------------------------------------------------------------- the cluster launcher (AWS)


def test_launcher_validates_against_ray_schema():
    config = launcher()
    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as file:
        jsonschema.validate(config, json.load(file))
    # What `ray up` does before it talks to AWS: fill in the provider's defaults and validate again
    # (head_node_type among the node types, global max_workers >= the sum of min_workers, ...).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_launcher_node_types_match_their_instances():
    config = launcher()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["GPU"] == 0, "the head must offer no GPU, so that no model actor lands there"
    assert head["node_config"]["InstanceType"] not in V100S
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}
    for name, spec in types.items():
        instance = spec["node_config"]["InstanceType"]
        assert spec["resources"]["CPU"] == VCPUS[instance], f"{name}: CPU must be {instance}'s vCPUs"
        if name in workers:
            assert spec["resources"].get("GPU", 0) == V100S.get(instance, 0), f"{name}: GPU must be {instance}'s V100s"
    assert sorted(spec["resources"]["GPU"] for spec in workers.values() if spec["resources"].get("GPU")) == [1, 4, 8]


def test_launcher_worker_limits_and_idle_timeout():
    config = launcher()
    workers = [spec for name, spec in config["available_node_types"].items() if name != config["head_node_type"]]
    for spec in workers:
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= config["max_workers"]
    assert config["max_workers"] >= sum(spec["min_workers"] for spec in workers)
    assert config["idle_timeout_minutes"] > 0
    # jobs.infer counts the cluster's GPUs when it starts and runs CPU actors when there are none.
    assert any(spec["min_workers"] >= 1 and spec["resources"].get("GPU") for spec in workers), (
        "keep at least one GPU worker up: a job started on a GPU-less cluster runs its model on CPU"
    )


def test_launcher_installs_the_pinned_versions():
    config = launcher()
    assert config["docker"]["image"].startswith(f"rayproject/ray:{pinned('ray')}-"), "Ray on the nodes = the ray pin"
    project_dirs = [remote for remote, local in config["file_mounts"].items() if local in (".", "./")]
    assert project_dirs, "the project (the directory `ray up` runs in) must be mounted on the nodes"
    commands = " ; ".join(config["setup_commands"])
    torch_at = commands.find(f"pip install --no-cache-dir torch=={pinned('torch')} --index-url {CUDA_INDEX}")
    project_at = commands.find(f"pip install --no-cache-dir -e {project_dirs[0]}")
    assert 0 <= torch_at < project_at, "install the CUDA torch build first, then the mounted project"


# ---------------------------------------------------------------- KubeRay manifests


def test_manifest_kinds():
    kinds = sorted((d["_file"], d["apiVersion"], d["kind"]) for d in manifests())
    assert kinds == [
        ("raycluster.yaml", "ray.io/v1", "RayCluster"),
        ("rayjob.yaml", "ray.io/v1", "RayJob"),
        ("rayjob.yaml", "v1", "ConfigMap"),
        ("rescore-cronjob.yaml", "batch/v1", "CronJob"),
    ]
    job = one("RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and "rayClusterSpec" in job


@pytest.mark.parametrize("name, spec", [pytest.param(name, spec, id=name) for name, spec in ray_cluster_specs()])
def test_ray_cluster_spec(name: str, spec: dict[str, Any]):
    assert spec["rayVersion"] == pinned("ray"), name
    assert spec["enableInTreeAutoscaling"] is True, name
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0", f"{name}: the head must not advertise GPUs"
    assert all(gpu_limit(container) is None for container in containers(head)), f"{name}: the head requests a GPU"
    gpu_groups = [group for group in spec["workerGroupSpecs"]
                  if any(gpu_limit(container) for container in containers(group))]
    assert gpu_groups, f"{name}: no GPU worker group"
    for group in gpu_groups:
        (container,) = containers(group["template"])
        gpus = gpu_limit(container)
        assert int(group.get("rayStartParams", {}).get("num-gpus", gpus)) == gpus == 1, (
            f"{name}/{group['groupName']}: one V100 per pod, as many GPUs advertised to Ray as the pod gets"
        )
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert group["minReplicas"] >= 1, f"{name}: a job started without a GPU runs its model on CPU"
        pod = group["template"]["spec"]
        assert "v100" in json.dumps([pod.get("nodeSelector"), pod.get("affinity")]).lower(), "V100 nodes only"
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), "tolerate GPU taints"


def test_one_image_everywhere_matching_the_pins():
    images = {container["image"] for document in manifests() for container in containers(document)}
    assert images == {project_image()}, "every container runs the project image, tagged with the project version"
    dockerfile = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<major>\d)(?P<minor>\d+)(-\S+)?", base)
    assert match, base
    assert match["ray"] == pinned("ray"), "the image's Ray must be the Ray pyproject.toml pins"
    python = f"{match['major']}.{match['minor']}"
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(python), f"Python {python}"
    assert f"torch=={pinned('torch')} --index-url {CUDA_INDEX}" in dockerfile
    assert dockerfile.index("torch==") < dockerfile.index("pip install --no-cache-dir .")
    # The documented build produces the image the manifests name.
    for path in (DOCKERFILE, CLUSTER / "README.md"):
        assert f"-f cluster/Dockerfile -t {project_image()} ." in path.read_text(), path.name


def test_credentials_come_only_from_secrets():
    assert not [d for d in manifests() if d["kind"] == "Secret"], "no Secret is committed; create it with kubectl"
    for document in manifests():
        for container in containers(document):
            where = f"{document['_file']}: container {container['name']}"
            from_secret = set()
            for variable in container.get("env", []):
                if CREDENTIAL_ENV.match(variable["name"]):
                    assert "value" not in variable, f"{where}: {variable['name']} has a literal value"
                    reference = variable["valueFrom"]["secretKeyRef"]
                    assert reference["name"] and reference["key"], where
                    from_secret.add(variable["name"])
            for source in container.get("envFrom", []):
                assert "secretRef" in source, f"{where}: envFrom other than a Secret"
                from_secret.add("*")
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= from_secret or "*" in from_secret, (
                f"{where}: gets no storage credentials"
            )
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            assert not ACCESS_KEY_ID.search(path.read_text(errors="replace")), f"{path}: an AWS access key id"


# ---------------------------------------------------------------- entrypoints, parsed by the modules themselves


def test_rayjob_entrypoint_parses(tmp_path):
    job = one("RayJob")["spec"]
    module, args = entry_module(shlex.split(job["entrypoint"]))
    assert module == "jobs.infer"
    # --config names the ConfigMap's run.yaml where the head (the driver) mounts it.
    config = args[args.index("--config") + 1]
    (head,) = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    (mount,) = [m for m in head["volumeMounts"] if config.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    run_options = one("ConfigMap")
    assert volume["configMap"]["name"] == run_options["metadata"]["name"]
    (tmp_path / "run.yaml").write_text(run_options["data"][config.rsplit("/", 1)[1]])
    args[args.index("--config") + 1] = str(tmp_path / "run.yaml")
    parsed = parse_entrypoint(module, args)
    assert parsed.accelerator == "gpu", "GPU nodes may join after the job starts: the actors must ask for GPUs"
    assert parsed.manifest.startswith("s3://") and parsed.output.startswith("s3://"), "object storage in and out"
    assert parsed.checkpoint and parsed.checkpoint.startswith("s3://")
    assert not parsed.no_score, "jobs.infer scores the corpus at the end unless --no-score"
    # The --set overrides are valid config keys, and every part of the model gets real weights.
    from nota_model.build import random_parts
    from nota_model.config import load_config

    config = load_config(parsed.model, parsed.overrides)
    assert random_parts(config, parsed.checkpoint) == (), "parts with random weights: the text would be meaningless"
    # The starting pool is there when the job is submitted; the pool can grow as far as the group can.
    (group,) = job["rayClusterSpec"]["workerGroupSpecs"]
    gpus_per_pod = int(group["rayStartParams"]["num-gpus"])
    assert 1 <= parsed.pool_size <= group["replicas"] * gpus_per_pod
    assert parsed.pool_size <= parsed.max_pool_size <= group["maxReplicas"] * gpus_per_pod


def test_rescore_cronjob_command_parses():
    cronjob = one("CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    module, args = entry_module(container.get("command", []) + container.get("args", []))
    assert module == "jobs.rescore"
    parsed = parse_entrypoint(module, args)
    runs, output = parsed.runs, parsed.output
    assert len(runs) >= 2 and all(url.startswith("s3://") for url in runs.values()), runs
    assert output.startswith("s3://")
    assert gpu_limit(container) is None, "re-scoring reads Parquet only: no GPU"


def test_sizing_flags_exist():
    """The flags the README's sizing guide is about are jobs.infer's."""
    from jobs.infer import parse_args

    readme = (CLUSTER / "README.md").read_text()
    for flag in ("--batch-size", "--pool-size", "--max-pool-size", "--cpus-per-actor"):
        assert flag in readme
        parsed = parse_args(["--manifest", "m", "--model", "tiny", "--output", "o", flag, "2"])
        assert getattr(parsed, flag[2:].replace("-", "_")) == 2
