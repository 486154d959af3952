"""The files in cluster_configs/ are valid and fit shardckpt (fast; starts no Ray).

Launcher YAMLs (aws, gcp, manual): validated against the cluster schema that ships inside
the installed ray wheel (``ray/autoscaler/ray-schema.json``), first as written, then the way
``ray up`` does before it contacts a cloud (``prepare_config`` merges the provider defaults,
``validate_config`` checks the result). Then shardckpt's needs: a head and a GPU worker node
type, shardckpt installed on every node, the shared checkpoint directory mounted everywhere.

KubeRay manifests: a table of (path, predicate) per kind, so a failure names the field.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: PLC2701 - Ray's own config validator

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "cluster_configs"
KUBERAY = CONFIGS / "kuberay"
SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
CHECKPOINT_DIR = "/mnt/checkpoints"

CLOUD_CONFIGS = ["aws.yaml", "gcp.yaml"]
LAUNCHER_CONFIGS = CLOUD_CONFIGS + ["manual.yaml"]


def _load(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


@functools.cache
def _schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return json.load(f)


@pytest.fixture
def schema() -> dict:
    return _schema()


# ----------------------------------------------------------------------------------------
# launcher configs: schema
# ----------------------------------------------------------------------------------------
def schema_errors(config: Any, schema: dict) -> list[str]:
    """Every violation of the ray cluster schema, as 'at <path>: <message>'."""
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_cls(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    out = []
    for e in errors:
        where = "/".join(str(p) for p in e.absolute_path) or "<top level>"
        out.append(f"at {where}: {e.message}")
    return out


def check_launcher_config(name: str, config: Any, schema: dict) -> dict:
    """Validate ``config`` (read from ``name``) as `ray up` would; return the prepared config.
    Fails the test with the file name and the schema errors."""
    __tracebackhide__ = True
    errors = schema_errors(config, schema)
    if errors:
        pytest.fail(f"cluster_configs/{name} does not match the cluster schema of ray {ray.__version__} "
                    f"({SCHEMA_PATH}):\n  " + "\n  ".join(errors), pytrace=False)
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "<top level>"
        pytest.fail(f"cluster_configs/{name}, merged with ray {ray.__version__}'s provider defaults as "
                    f"`ray up` does, does not match {SCHEMA_PATH}:\n  at {where}: {e.message}", pytrace=False)
    except Exception as e:  # noqa: BLE001 - ray's own checks (ValueError, ClickException, ...)
        pytest.fail(f"cluster_configs/{name} is rejected by ray {ray.__version__}'s "
                    f"prepare_config/validate_config: {type(e).__name__}: {e}", pytrace=False)
    return prepared


@functools.cache
def _prepared(name: str) -> dict:
    return check_launcher_config(name, _load(CONFIGS / name), _schema())


def prepared(name: str) -> dict:
    """``name`` as `ray up` sees it after prepare_config (validated; a fresh copy)."""
    __tracebackhide__ = True
    return copy.deepcopy(_prepared(name))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_validates_against_ray_schema(name, schema):
    check_launcher_config(name, _load(CONFIGS / name), schema)


def test_schema_check_names_file_and_error(schema):
    """The check is not vacuous: a broken config fails with the file and the field named."""
    bad = _load(CONFIGS / "aws.yaml")
    bad["available_node_types"]["ray.worker.gpu"]["resources"]["GPU"] = "one"
    bad["no_such_option"] = 1
    with pytest.raises(pytest.fail.Exception) as info:
        check_launcher_config("aws.yaml", bad, schema)
    msg = str(info.value)
    assert "cluster_configs/aws.yaml" in msg
    assert "available_node_types/ray.worker.gpu/resources/GPU" in msg
    assert "no_such_option" in msg


# ----------------------------------------------------------------------------------------
# launcher configs: what shardckpt needs
# ----------------------------------------------------------------------------------------
def _all_commands(cfg: dict) -> list[str]:
    """Commands that run on every node: host initialization, then the setup that
    prepare_config merged into the head and worker lists."""
    return cfg.get("initialization_commands", []) + cfg["head_setup_commands"] + cfg["worker_setup_commands"]


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_cloud_config_has_head_and_gpu_worker_node_types(name):
    cfg = prepared(name)
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types, f"{name}: head_node_type {head!r} is not in available_node_types"
    assert types[head]["max_workers"] == 0, f"{name}: the head node type must not scale"
    gpu_workers = {t: v for t, v in types.items() if t != head and v["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, f"{name}: no worker node type advertises GPU resources ({sorted(types)})"
    for t, v in gpu_workers.items():
        assert v["max_workers"] >= 1, f"{name}: GPU worker type {t} has max_workers {v['max_workers']}"
        assert v["resources"].get("CPU", 0) >= 1, f"{name}: GPU worker type {t} advertises no CPUs"
    assert 1 <= cfg["max_workers"] <= 64, f"{name}: max_workers {cfg['max_workers']} is not sensible"
    assert 1 <= cfg["idle_timeout_minutes"] <= 120, f"{name}: idle_timeout_minutes {cfg['idle_timeout_minutes']}"
    worker_cmds = " ".join(cfg["worker_setup_commands"])
    assert "jax[cuda12]" in worker_cmds, f"{name}: GPU workers do not install jax[cuda12]"


def test_manual_config_lists_head_and_worker_hosts():
    raw = _load(CONFIGS / "manual.yaml")
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"], "manual.yaml: provider.head_ip is empty"
    workers = raw["provider"]["worker_ips"]
    assert workers and all(workers), "manual.yaml: provider.worker_ips is empty"
    assert "available_node_types" not in raw, "manual.yaml: the local provider rejects available_node_types"
    (node_type,) = prepared("manual.yaml")["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(workers), \
        "manual.yaml: every listed worker host should join (max_workers = len(worker_ips))"
    assert any("jax[cuda12]" in c for c in prepared("manual.yaml")["worker_setup_commands"]), \
        "manual.yaml: hosts with GPUs do not install jax[cuda12]"


_INSTALL = re.compile(r"\bpip install\b(?P<args>.*)")


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_setup_commands_install_shardckpt_on_every_node(name):
    cfg = prepared(name)
    for role in ("head_setup_commands", "worker_setup_commands"):
        installs = [m.group("args") for c in cfg[role] if (m := _INSTALL.search(c)) and "shardckpt" in m.group("args")]
        assert installs, f"{name}: {role} (setup_commands merged in) never pip-installs shardckpt"
        for args in installs:
            for token in args.split():
                token = re.split(r"[\[\"']", token)[0]      # the path, without extras ("[train,s3]")
                if token.startswith(("~", "/", ".")) and "shardckpt" in token:
                    # installed from a path: file_mounts must ship the repository there
                    assert token in cfg["file_mounts"], \
                        f"{name}: installs shardckpt from {token}, which file_mounts does not provide"
                    local = ROOT / cfg["file_mounts"][token]   # `ray up` runs from the repo root
                    assert (local / "pyproject.toml").is_file() and (local / "shardckpt").is_dir(), \
                        f"{name}: file_mounts[{token!r}] = {cfg['file_mounts'][token]!r} is not the repository root"


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_shared_checkpoint_storage_is_mounted_on_every_node(name):
    cfg = prepared(name)
    commands = _all_commands(cfg)
    mentions = [c for c in commands if CHECKPOINT_DIR in c and "mount" in c]
    assert mentions, f"{name}: no node command mounts or checks the shared storage at {CHECKPOINT_DIR}"
    # setup fails on a node that does not see the shared storage
    for role in ("head_setup_commands", "worker_setup_commands"):
        assert any(f"mountpoint -q {CHECKPOINT_DIR}" in c for c in cfg[role]), \
            f"{name}: {role} do not refuse to go on without {CHECKPOINT_DIR} mounted"
    if name in CLOUD_CONFIGS:
        assert any(re.search(rf"\bmount\b.*\s{re.escape(CHECKPOINT_DIR)}$", c.strip())
                   for c in cfg["initialization_commands"]), \
            f"{name}: initialization_commands do not mount the shared file system at {CHECKPOINT_DIR}"
    docker = cfg.get("docker") or {}
    if docker.get("image") or docker.get("head_image") or docker.get("worker_image"):
        bind = f"-v {CHECKPOINT_DIR}:{CHECKPOINT_DIR}"
        for role in ("head_run_options", "worker_run_options"):
            options = docker.get("run_options", []) + docker.get(role, [])
            assert bind in options, f"{name}: docker {role} (with run_options) lack {bind!r}: " \
                                    "the containers would not see the shared storage"


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_start_commands_form_one_cluster(name):
    cfg = prepared(name)
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert re.search(r"ray start\s+--head\b.*--port=6379", head), f"{name}: head_start_ray_commands: {head!r}"
    assert "--address=$RAY_HEAD_IP:6379" in worker, f"{name}: worker_start_ray_commands: {worker!r}"


# ----------------------------------------------------------------------------------------
# KubeRay manifests: required fields as (path, predicate) tables
# ----------------------------------------------------------------------------------------
_TOKEN = re.compile(r'\[\*\]|\[\d+\]|\["[^"]+"\]|[^.\[\]]+')


def resolve(doc: Any, path: str) -> list[tuple[str, Any]]:
    """All (concrete path, value) pairs that ``path`` names: dotted keys, ``[i]`` an index,
    ``[*]`` every element of a non-empty list, ``["a.b/c"]`` a key with dots. Raises
    KeyError naming the first concrete path that is missing."""
    found = [("", doc)]
    for tok in _TOKEN.findall(path):
        nxt = []
        for where, value in found:
            if tok == "[*]":
                if not isinstance(value, list) or not value:
                    raise KeyError(f"{where or '<root>'} (a non-empty list)")
                nxt += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
            elif tok.startswith("[") and tok[1:-1].isdigit():
                i = int(tok[1:-1])
                if not isinstance(value, list) or i >= len(value):
                    raise KeyError(f"{where}{tok}")
                nxt.append((f"{where}{tok}", value[i]))
            else:
                key = tok[2:-2] if tok.startswith('["') else tok
                shown = f'{where}["{key}"]' if tok.startswith('["') else (f"{where}.{key}" if where else key)
                if not isinstance(value, dict) or key not in value:
                    raise KeyError(shown)
                nxt.append((shown, value[key]))
        found = nxt
    return found


def _pred(description: str, fn: Callable[[Any], bool]) -> Callable[[Any], bool]:
    fn.description = description
    return fn


def equals(expected):
    return _pred(f"== {expected!r}", lambda v: v == expected)


non_empty_str = _pred("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
a_dict = _pred("a mapping", lambda v: isinstance(v, dict))
non_empty_list = _pred("a non-empty list", lambda v: isinstance(v, list) and bool(v))
count = _pred("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
positive = _pred("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
gpus = _pred("a GPU count >= 1", lambda v: str(v).isdigit() and int(v) >= 1)
rwx = _pred("a list containing ReadWriteMany", lambda v: isinstance(v, list) and "ReadWriteMany" in v)
uses_checkpoint_dir = _pred(f"a command using the shared volume {CHECKPOINT_DIR}",
                            lambda v: isinstance(v, str) and CHECKPOINT_DIR in v)


def mounts_claim(claim: str):
    """The pod spec has a volume from PVC ``claim`` and its Ray container (the first)
    mounts it at CHECKPOINT_DIR."""
    def check(pod: Any) -> bool:
        names = {v.get("name") for v in pod.get("volumes", [])
                 if (v.get("persistentVolumeClaim") or {}).get("claimName") == claim}
        mounts = pod.get("containers", [{}])[0].get("volumeMounts", [])
        return any(m.get("name") in names and m.get("mountPath") == CHECKPOINT_DIR for m in mounts)
    return _pred(f"a pod spec mounting PVC {claim!r} at {CHECKPOINT_DIR} in its Ray container", check)


PVC_NAME = _load(KUBERAY / "pvc.yaml")["metadata"]["name"]

PVC_FIELDS = [
    ("apiVersion", equals("v1")),
    ("kind", equals("PersistentVolumeClaim")),
    ("metadata.name", non_empty_str),
    ("spec.accessModes", rwx),
    ("spec.storageClassName", non_empty_str),
    ("spec.resources.requests.storage", non_empty_str),
]

# a RayCluster spec, at the top of RayCluster.spec and of RayJob.spec.rayClusterSpec
CLUSTER_SPEC_FIELDS = [
    ("headGroupSpec.rayStartParams", a_dict),
    ("headGroupSpec.template.spec.containers", non_empty_list),
    ("headGroupSpec.template.spec.containers[*].name", non_empty_str),
    ("headGroupSpec.template.spec.containers[*].image", non_empty_str),
    ("headGroupSpec.template.spec", mounts_claim(PVC_NAME)),
    ("workerGroupSpecs", non_empty_list),
    ("workerGroupSpecs[*].groupName", non_empty_str),
    ("workerGroupSpecs[*].replicas", count),
    ("workerGroupSpecs[*].minReplicas", count),
    ("workerGroupSpecs[*].maxReplicas", positive),
    ("workerGroupSpecs[*].rayStartParams", a_dict),
    ("workerGroupSpecs[*].template.spec.containers", non_empty_list),
    ("workerGroupSpecs[*].template.spec.containers[*].name", non_empty_str),
    ("workerGroupSpecs[*].template.spec.containers[*].image", non_empty_str),
    ("workerGroupSpecs[*].template.spec", mounts_claim(PVC_NAME)),
    ('workerGroupSpecs[0].template.spec.containers[0].resources.limits["nvidia.com/gpu"]', gpus),
]

RAYCLUSTER_FIELDS = [
    ("apiVersion", equals("ray.io/v1")),
    ("kind", equals("RayCluster")),
    ("metadata.name", non_empty_str),
] + [("spec." + p, f) for p, f in CLUSTER_SPEC_FIELDS]

RAYJOB_FIELDS = [
    ("apiVersion", equals("ray.io/v1")),
    ("kind", equals("RayJob")),
    ("metadata.name", non_empty_str),
    ("spec.entrypoint", non_empty_str),
    ("spec.entrypoint", uses_checkpoint_dir),
    ("spec.rayClusterSpec", a_dict),
] + [("spec.rayClusterSpec." + p, f) for p, f in CLUSTER_SPEC_FIELDS]


def field_problems(doc: Any, table: list) -> list[str]:
    problems = []
    for path, pred in table:
        try:
            hits = resolve(doc, path)
        except KeyError as e:
            problems.append(f"missing {e.args[0]} (required by {path}: {pred.description})")
            continue
        for where, value in hits:
            if not pred(value):
                problems.append(f"{where} = {value!r:.80}: expected {pred.description}")
    return problems


MANIFESTS = [("pvc.yaml", PVC_FIELDS), ("raycluster.yaml", RAYCLUSTER_FIELDS), ("rayjob.yaml", RAYJOB_FIELDS)]


@pytest.mark.parametrize("name,table", MANIFESTS, ids=[m[0] for m in MANIFESTS])
def test_kuberay_manifest_has_required_fields(name, table):
    docs = list(yaml.safe_load_all((KUBERAY / name).read_text()))
    assert len(docs) == 1, f"kuberay/{name}: expected one document, found {len(docs)}"
    problems = field_problems(docs[0], table)
    assert not problems, f"cluster_configs/kuberay/{name}:\n  " + "\n  ".join(problems)


def test_field_table_names_what_is_missing():
    """The checker is not vacuous: removed or wrong fields are reported by path."""
    doc = _load(KUBERAY / "raycluster.yaml")
    del doc["spec"]["workerGroupSpecs"][0]["groupName"]
    del doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] = "/tmp/x"
    text = "\n".join(field_problems(doc, RAYCLUSTER_FIELDS))
    assert "missing spec.workerGroupSpecs[0].groupName" in text
    assert 'missing spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits["nvidia.com/gpu"]' in text
    assert "spec.headGroupSpec.template.spec = " in text and CHECKPOINT_DIR in text


def test_rayjob_uses_the_raycluster_spec():
    cluster = _load(KUBERAY / "raycluster.yaml")["spec"]
    job = _load(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"]
    assert job == cluster, ("kuberay/rayjob.yaml spec.rayClusterSpec differs from kuberay/raycluster.yaml spec: "
                            "keep the two in sync (same images, groups and shared volume)")


def test_kuberay_pods_share_one_image_and_ray_version():
    spec = _load(KUBERAY / "raycluster.yaml")["spec"]
    images = {img for _, img in resolve(spec, "headGroupSpec.template.spec.containers[*].image")}
    images |= {img for _, img in resolve(spec, "workerGroupSpecs[*].template.spec.containers[*].image")}
    assert len(images) == 1, f"kuberay/raycluster.yaml: head and workers use different images {sorted(images)}"
    (image,) = images
    tagged = re.search(r"(?:rayproject/ray:|ray)(\d+\.\d+\.\d+)", image)   # a Ray version in the tag
    if tagged:
        assert tagged.group(1) == str(spec["rayVersion"]), \
            f"kuberay/raycluster.yaml: rayVersion {spec['rayVersion']} but the image {image} has Ray {tagged.group(1)}"


def test_readme_lists_every_config():
    readme = (CONFIGS / "README.md").read_text()
    for path in sorted(CONFIGS.rglob("*.yaml")):
        rel = path.relative_to(CONFIGS).as_posix()
        assert rel in readme, f"cluster_configs/README.md does not describe {rel}"
