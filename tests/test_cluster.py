"""cluster/: every definition parses, runs only CLI commands and flags that exist, and asks for
resources consistently."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from jobs.cli import build_parser
from jobs.config import load_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
DOCS = sorted(CLUSTER.rglob("*.yaml"))


def documents():
    for path in DOCS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def microemo_commands():
    for path, doc in documents():
        spec = doc.get("spec", {}) if isinstance(doc, dict) else {}
        for holder in (spec, spec.get("jobTemplate", {})):
            if isinstance(holder, dict) and "entrypoint" in holder:
                yield path, holder["entrypoint"]
        for cmd in doc.get("setup_commands", []) if isinstance(doc, dict) else []:
            for part in cmd.split("&&"):
                if part.strip().startswith("microemo"):
                    yield path, part.split(">")[0]


def containers(doc):
    """Every container spec in a RayCluster / RayJob / RayCronJob / CronJob, with its rayStartParams."""
    spec = doc.get("spec", {})
    spec = spec.get("jobTemplate", spec)
    cluster = spec.get("rayClusterSpec", spec)
    groups = []
    if "headGroupSpec" in cluster:
        groups.append(cluster["headGroupSpec"])
    groups += cluster.get("workerGroupSpecs", [])
    for g in groups:
        for c in g["template"]["spec"]["containers"]:
            yield g.get("rayStartParams", {}), c, g


def test_every_definition_parses():
    assert len(DOCS) >= 8
    kinds = {doc.get("kind") for _, doc in documents() if isinstance(doc, dict)}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ConfigMap"} <= kinds
    assert (CLUSTER / "image" / "Dockerfile").is_file()


def test_entrypoints_use_existing_commands_flags_and_config_keys():
    parser = build_parser()
    seen = set()
    for path, cmd in microemo_commands():
        argv = shlex.split(cmd)
        assert argv[0] == "microemo", f"{path.name}: {cmd}"
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{path.name}: `{cmd}` is not a valid microemo command line")
        seen.add(args.command)
        if args.command == "preprocess":  # key=value overrides must be real config keys
            from pipeline.run import PreprocessConfig

            load_config(PreprocessConfig, None, args.overrides)
    assert {"preprocess", "train", "retrain"} <= seen


def test_ray_jobs_clean_up_and_have_deadlines():
    for path, doc in documents():
        if doc.get("kind") == "RayJob" or doc.get("kind") == "RayCronJob":
            spec = doc["spec"].get("jobTemplate", doc["spec"])
            assert spec["shutdownAfterJobFinishes"] is True, path.name
            assert spec["activeDeadlineSeconds"] > 0, path.name


def test_resources_are_consistent_and_versions_match():
    import ray

    pins = dict(line.split("==") for line in (CLUSTER / "image" / "constraints-cuda.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["ray"] == ray.__version__
    checked = 0
    for path, doc in documents():
        if doc.get("kind") not in ("RayCluster", "RayJob", "RayCronJob"):
            continue
        spec = doc["spec"].get("jobTemplate", doc["spec"])
        assert spec.get("rayClusterSpec", spec)["rayVersion"] == ray.__version__, path.name
        for params, c, group in containers(doc):
            res = c["resources"]
            assert res["requests"] == res["limits"], f"{path.name}/{c['name']}: requests != limits"
            cpu = float(res["limits"]["cpu"])
            assert float(params.get("num-cpus", cpu)) <= cpu, f"{path.name}/{c['name']}: num-cpus > cpu limit"
            gpus = int(res["limits"].get("nvidia.com/gpu", 0))
            assert int(params.get("num-gpus", 0)) == gpus, f"{path.name}/{c['name']}: num-gpus != GPU limit"
            if "minReplicas" in group:
                assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], path.name
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", f"{path.name}: token auth"
            assert "valueFrom" in env["RAY_AUTH_TOKEN"], f"{path.name}: the token comes from a Secret"
            assert not any(k.startswith("AWS_SECRET") for k in env), f"{path.name}: no baked-in keys"
            checked += 1
    assert checked >= 10
