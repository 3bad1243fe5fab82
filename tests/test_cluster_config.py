"""cluster.yaml cannot be launched here; check that it describes the cluster the README promises."""

from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_provider_is_aws_with_a_head_node(cluster: dict) -> None:
    assert cluster["provider"]["type"] == "aws"
    assert cluster["head_node_type"] in cluster["available_node_types"]


def test_node_types_and_resources(cluster: dict) -> None:
    node_types = cluster["available_node_types"]
    assert set(node_types) == {"head", "cpu_worker", "gpu_worker"}
    assert node_types["head"]["resources"]["CPU"] == 0, "the head runs the driver, not decode tasks"
    assert node_types["cpu_worker"]["resources"]["CPU"] > 0
    assert "GPU" not in node_types["cpu_worker"]["resources"]
    assert node_types["gpu_worker"]["resources"]["GPU"] >= 1
    assert node_types["gpu_worker"]["resources"]["CPU"] >= 4, "GPU nodes need CPUs to feed their GPU"
    for name in ("cpu_worker", "gpu_worker"):
        spec = node_types[name]
        assert 0 <= spec["min_workers"] <= spec["max_workers"], name
    total_max = sum(spec["max_workers"] for spec in node_types.values())
    assert cluster["max_workers"] >= node_types["gpu_worker"]["max_workers"]
    assert total_max >= cluster["max_workers"]


def test_every_node_has_the_s3_instance_profile(cluster: dict) -> None:
    for name, spec in cluster["available_node_types"].items():
        arn = spec["node_config"]["IamInstanceProfile"]["Arn"]
        assert arn.startswith("arn:aws:iam::") and ":instance-profile/" in arn, name


def test_setup_installs_the_project(cluster: dict) -> None:
    mounts = cluster["file_mounts"]
    (remote_path,) = [remote for remote, local in mounts.items() if local == "."]
    assert any("pip install" in command and remote_path in command for command in cluster["setup_commands"])
