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


SHARED = "/mnt/shared"  # where training runs live: a filesystem every node shares
RUNS_CLAIM = "microemo-runs"


def documents():
    """Every YAML document, plus Kubernetes manifests embedded in a ConfigMap (a RayJob template)."""
    for path in DOCS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            yield path, doc
            if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        inner = yaml.safe_load(text)
                        if isinstance(inner, dict) and "kind" in inner:
                            yield path, inner


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


def pod_groups(doc):
    """(group name, pod spec) of the head and every worker group of a RayCluster / RayJob / RayCronJob."""
    spec = doc.get("spec", {})
    spec = spec.get("jobTemplate", spec)
    cluster = spec.get("rayClusterSpec", spec)
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for g in cluster.get("workerGroupSpecs", []):
        yield g["groupName"], g["template"]["spec"]


def entrypoint_argv(doc):
    spec = doc.get("spec", {})
    spec = spec.get("jobTemplate", spec)
    return shlex.split(spec["entrypoint"]) if "entrypoint" in spec else []


def test_training_runs_live_on_the_shared_volume():
    """`microemo train` writes run directories through the local filesystem from every rank: --out,
    --init and the retrain work_dir must be on /mnt/shared, mounted from the RWX PVC in every pod
    of the clusters that train."""
    parser = build_parser()
    pvcs = {doc["metadata"]["name"]: doc for _, doc in documents() if doc.get("kind") == "PersistentVolumeClaim"}
    assert RUNS_CLAIM in pvcs, "cluster/kuberay needs the shared PersistentVolumeClaim"
    assert pvcs[RUNS_CLAIM]["spec"]["accessModes"] == ["ReadWriteMany"]
    trainers = 0
    for path, doc in documents():
        if doc.get("kind") not in ("RayCluster", "RayJob", "RayCronJob"):
            continue
        argv = entrypoint_argv(doc)
        command = parser.parse_args(argv[1:]).command if argv else None
        must_mount = doc["kind"] == "RayCluster" or command in ("train", "retrain")
        for group, pod in pod_groups(doc):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            mounted = False
            for c in pod["containers"]:
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes, f"{path.name}/{group}: volumeMount {m['name']} has no volume"
                    if m["mountPath"] == SHARED:
                        claim = volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName")
                        assert claim == RUNS_CLAIM, f"{path.name}/{group}: {SHARED} is not PVC {RUNS_CLAIM}"
                        mounted = True
            if must_mount:
                assert mounted, f"{path.name}/{group}: trains or drives training but does not mount {SHARED}"
        if command == "train":
            args = parser.parse_args(argv[1:])
            for flag in ("out", "init"):
                value = getattr(args, flag)
                if value is not None:
                    assert value.startswith(SHARED + "/"), f"{path.name}: --{flag} {value} is not under {SHARED}"
            from jobs.train import TrainConfig

            cfg = load_config(TrainConfig, None, args.overrides)
            gpus = sum(int(g.get("replicas", 0)) * int(g.get("rayStartParams", {}).get("num-gpus", 0))
                       for g in (doc["spec"].get("rayClusterSpec") or {}).get("workerGroupSpecs", []))
            if gpus:
                assert args.use_gpu and args.num_workers == gpus, \
                    f"{path.name}: one rank per GPU ({gpus} GPUs) needs --use-gpu --num-workers {gpus}"
            assert cfg.preset != "tiny" or not gpus, f"{path.name}: a GPU job training the tiny preset"
            trainers += 1
    assert trainers >= 2

    retrain = next(doc for _, doc in documents()
                   if doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == "microemo-retrain")
    assert yaml.safe_load(retrain["data"]["retrain.yaml"])["work_dir"].startswith(SHARED + "/")


def test_vm_launcher_mounts_the_shared_filesystem_everywhere():
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    init = " ".join(cfg["initialization_commands"])  # on every node, before the container starts
    assert "mount -t nfs" in init and SHARED in init
    assert f"--volume {SHARED}:{SHARED}" in cfg["docker"]["run_options"]
    for name, node in cfg["available_node_types"].items():  # a node type may override both
        if "initialization_commands" in node:
            assert SHARED in " ".join(node["initialization_commands"]), name
        if "docker" in node:
            opts = node["docker"].get("worker_run_options", []) + node["docker"].get("head_run_options", [])
            assert any(SHARED in o for o in opts), name
