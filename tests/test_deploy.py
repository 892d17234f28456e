"""Deployment files (Dockerfile, deploy/k8s, deploy/compose.yaml) checked against the code they run.

No Docker engine or cluster here, so: the Dockerfile's entrypoint script, environment and
health check are run outside a container against a real server; the kustomize overlays are
rendered with the real `kubectl kustomize` and every manifest validated offline against the
Kubernetes schemas; the probes, ports and ConfigMap are checked against the app and the config
loader; the compose commands against the CLI's own flags.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from clients.local import free_port
from service.config import load_settings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
CONFIG = K8S / "base" / "config.yaml"
OVERLAYS = ("gpu", "cpu")
# Oldest Kubernetes the manifests target, and a recent one.
K8S_VERSIONS = ("1.30.0", "1.34.0")
KUBECTL = shutil.which("kubectl")
BIN = Path(sys.executable).parent


# -- Dockerfile --------------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def instructions(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def entrypoint_script() -> list[str]:
    (raw,) = instructions("ENTRYPOINT")
    return list(json.loads(raw))  # exec form: no shell wrapping of its own, signals reach logand


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions("ENV"):
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def healthcheck_command() -> str:
    (raw,) = instructions("HEALTHCHECK")
    return raw.split(" CMD ", 1)[1].strip()


def test_dockerfile_shape() -> None:
    words = [w for w, _ in dockerfile()]
    assert instructions("ARG")[0] == "TARGET=gpu"
    froms = instructions("FROM")
    assert any("AS base-gpu" in f for f in froms) and any("AS base-cpu" in f for f in froms)
    assert froms[-1] == "base-${TARGET} AS runtime"
    # The dependency layer comes before the source, so editing code reuses the installed deps.
    copies = instructions("COPY")
    assert copies.index("pyproject.toml README.md ./") < copies.index("service service")
    # A non-root user from USER onwards, through to the entrypoint.
    user = instructions("USER")[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert words.index("USER") < words.index("ENTRYPOINT")
    env = image_env()
    assert env["LOGAND_HOST"] == "0.0.0.0"
    assert instructions("EXPOSE") == [env["LOGAND_PORT"]]
    assert "/health" in healthcheck_command()
    script = entrypoint_script()
    assert script[:2] == ["/bin/sh", "-c"] and "exec logand serve" in script[2]


def test_dockerignore_keeps_secrets_and_bulk_out() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", "models", "deploy/k8s/base/api-key.txt"} <= ignored
    for copied in ("service", "trainer", "clients", "pyproject.toml", "README.md"):
        assert copied not in ignored


@pytest.fixture(scope="module")
def container_like_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The image's entrypoint script, run outside a container with the Kubernetes ConfigMap's
    config, the image's environment and the key file the Secret mounts (only the bind address is
    loopback here; the config itself says 0.0.0.0, so LOGAND_HOST must win)."""
    tmp = tmp_path_factory.mktemp("container")
    (tmp / "etc").mkdir()
    shutil.copy(CONFIG, tmp / "etc" / "config.yaml")
    key_file = tmp / "api-key"
    key_file.write_text("k-deploy-123\n")
    port = free_port()
    script = entrypoint_script()
    script[2] = script[2].replace("/etc/logand/config.yaml", str(tmp / "etc" / "config.yaml"))
    env = {**os.environ, **image_env(), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "LOGAND_HOST": "127.0.0.1", "LOGAND_PORT": str(port), "LOGAND_API_KEY_FILE": str(key_file),
           "LOGAND__ENGINE__THREADS": "1", "HF_HOME": str(tmp / "hf")}
    env.pop("LOGAND_API_KEY", None)
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(script, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        import time

        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp / "server.log").read_text()
            time.sleep(0.3)
        yield {"url": url, "port": port, "env": env, "key": "k-deploy-123", "log": tmp / "server.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_entrypoint_serves_the_configmap_config_with_the_images_environment(
        container_like_server: dict[str, Any]) -> None:
    s = container_like_server
    auth = {"Authorization": f"Bearer {s['key']}"}
    assert f"Uvicorn running on http://127.0.0.1:{s['port']}" in s["log"].read_text()
    # The key from LOGAND_API_KEY_FILE is enforced; /health and /metrics stay open for probes.
    assert httpx.get(s["url"] + "/v1/models").status_code == 401
    assert httpx.get(s["url"] + "/metrics").status_code == 200
    ready = httpx.get(s["url"] + "/ready", headers=auth)
    assert ready.status_code == 200 and ready.json()["models"] == ["helpful", "harmless"]
    r = httpx.post(s["url"] + "/v1/score", headers=auth, timeout=60, json={"items": [
        {"prompt": "\n\nHuman: How do I bake bread?\n\nAssistant:", "response": "Knead, proof, bake."}]})
    assert r.status_code == 200, r.text
    assert set(r.json()["results"][0]["utilities"]) == {"helpful", "harmless"}


def test_healthcheck_and_probe_commands_run_against_the_server(container_like_server: dict[str, Any]) -> None:
    """The Dockerfile HEALTHCHECK and the Deployment's readiness exec probe, run verbatim."""
    s = container_like_server
    health = subprocess.run(["/bin/sh", "-c", healthcheck_command()], env=s["env"], timeout=30)
    assert health.returncode == 0
    probe = deployment(render("cpu"))["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
    assert subprocess.run(probe, env=s["env"], timeout=30, capture_output=True).returncode == 0
    wrong = Path(s["env"]["LOGAND_API_KEY_FILE"]).with_name("wrong-key")
    wrong.write_text("nope\n")
    failed = subprocess.run(probe, env={**s["env"], "LOGAND_API_KEY_FILE": str(wrong)}, timeout=30,
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "401" in failed.stderr


# -- Kubernetes --------------------------------------------------------------------------------

def configmap_settings() -> Any:
    return load_settings(CONFIG, env={})


def test_configmap_config_is_accepted_by_the_service() -> None:
    settings = configmap_settings()
    assert [m.name for m in settings.models] == ["helpful", "harmless"]
    assert settings.server.port == 8000


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(overlay: str) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of an overlay, on a copy of deploy/k8s with a throwaway key file."""
    if KUBECTL is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed: cannot render the overlays")
    if overlay not in _rendered:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "k8s"
            shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("api-key.txt"))
            (tree / "base" / "api-key.txt").write_text("k-render-only\n")
            out = subprocess.run([KUBECTL, "kustomize", str(tree / "overlays" / overlay)],
                                 capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        _rendered[overlay] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return _rendered[overlay]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(docs, "Deployment")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_kind_and_validates_against_the_schemas(overlay: str) -> None:
    import kubernetes_validate

    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ConfigMap", "Secret", "Service", "Deployment", "PodDisruptionBudget",
                            "HorizontalPodAutoscaler"])
    for version in K8S_VERSIONS:
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{overlay}: {doc['kind']} invalid for Kubernetes {version}: "
                                     f"{exc.message} at {'.'.join(map(str, exc.path))}") from exc


def test_render_without_a_key_file_fails_naming_it(tmp_path: Path) -> None:
    if KUBECTL is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("api-key.txt"))
    out = subprocess.run([KUBECTL, "kustomize", str(tmp_path / "k8s" / "overlays" / "cpu")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "api-key.txt" in out.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_agree_with_the_app_and_each_other(overlay: str, container_like_server: dict[str, Any]) -> None:
    docs = render(overlay)
    dep, svc, cm = deployment(docs), by_kind(docs, "Service"), by_kind(docs, "ConfigMap")
    secret, pdb, hpa = by_kind(docs, "Secret"), by_kind(docs, "PodDisruptionBudget"), by_kind(docs, "HorizontalPodAutoscaler")
    pod = dep["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    port = int(env["LOGAND_PORT"])
    settings = configmap_settings()

    # Probes and the scraper hit paths the server (started from this config) answers 200 on,
    # without the key where Kubernetes cannot send one; ports line up from container to Service.
    server = container_like_server
    probes = {name: container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["livenessProbe"]["httpGet"]["path"] == probes["startupProbe"]["httpGet"]["path"] == "/health"
    assert "/ready'" in probes["readinessProbe"]["exec"]["command"][-1]
    for name in ("startupProbe", "livenessProbe"):
        assert probes[name]["httpGet"]["port"] == container["ports"][0]["name"]
        assert httpx.get(server["url"] + probes[name]["httpGet"]["path"]).status_code == 200
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model loading
    (cport,) = container["ports"]
    assert cport["containerPort"] == port == settings.server.port
    assert svc["spec"]["ports"][0]["targetPort"] in (cport["name"], port)
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and int(notes["prometheus.io/port"]) == port
    scraped = httpx.get(server["url"] + notes["prometheus.io/path"])
    assert scraped.status_code == 200 and "logand_ready 1.0" in scraped.text

    # The ConfigMap key is the file the image's entrypoint reads; the Secret is the key file.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_vol = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[config_vol]["configMap"]["name"] == cm["metadata"]["name"]
    (key,) = cm["data"]
    assert f"{mounts[config_vol]}/{key}" == "/etc/logand/config.yaml"
    assert "/etc/logand/config.yaml" in entrypoint_script()[2]
    assert yaml.safe_load(cm["data"][key]) == yaml.safe_load(CONFIG.read_text())
    secret_vol = next(n for n, v in volumes.items() if "secret" in v)
    assert volumes[secret_vol]["secret"]["secretName"] == secret["metadata"]["name"]
    (secret_key,) = secret["data"]
    assert env["LOGAND_API_KEY_FILE"] == f"{mounts[secret_vol]}/{secret_key}"
    assert "LOGAND_API_KEY" not in env  # never in plain env

    # Graceful termination outlasts the longest batch (uvicorn waits batch_timeout_s + 5 s).
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = getattr(settings.server, "drain_timeout_s", 0.0)  # the draining SIGTERM's budget
    assert grace > pause + max(drain, settings.engine.batch_timeout_s + 5)
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == int(instructions("USER")[-1].split(":")[0])

    limits = container["resources"]["limits"]
    requests = container["resources"]["requests"]
    if overlay == "gpu":
        assert limits["nvidia.com/gpu"] == "1" and env["LOGAND_DEVICE"] == "cuda"
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "logand:latest"
    else:
        assert "nvidia.com/gpu" not in limits and env["LOGAND_DEVICE"] == "cpu"
        assert container["image"] == "logand:cpu"
        assert int(env["LOGAND__ENGINE__THREADS"]) == int(requests["cpu"]) == int(limits["cpu"])


# -- compose -----------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())


def cli_flags(*subcommand: str) -> set[str]:
    out = subprocess.run([str(BIN / "logand"), *subcommand, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))


def test_compose_profiles_pair_a_service_and_a_trainer_that_waits_for_it() -> None:
    services = compose()["services"]
    ppo_flags = cli_flags("ppo")
    for profile in ("cpu", "gpu"):
        reward, ppo = services[f"reward-{profile}"], services[f"ppo-{profile}"]
        assert reward["profiles"] == [profile] and ppo["profiles"] == [profile]
        assert reward["image"] == ppo["image"] == ("logand:cpu" if profile == "cpu" else "logand:latest")
        assert reward["build"]["args"]["TARGET"] == profile and reward["build"]["context"] == ".."
        # The service: the ConfigMap's config where the entrypoint reads it; /ready as health.
        assert "./k8s/base/config.yaml:/etc/logand/config.yaml:ro" in reward["volumes"]
        assert "/ready" in reward["healthcheck"]["test"][-1]
        assert reward["ports"] == ["127.0.0.1:8000:8000"]
        assert reward["stop_grace_period"] == "150s"
        # The trainer: starts when the service is healthy, talks to it by its compose name.
        assert ppo["depends_on"] == {f"reward-{profile}": {"condition": "service_healthy"}}
        assert ppo["entrypoint"] == ["logand"] and ppo["command"][0] == "ppo"
        args = ppo["command"][1:]
        used = {a for a in args if isinstance(a, str) and a.startswith("--")}
        assert used <= ppo_flags, used - ppo_flags
        assert args[args.index("--service") + 1] == f"http://reward-{profile}:8000"
        assert args[args.index("--device") + 1] == ("cpu" if profile == "cpu" else "cuda")
        assert set(args[args.index("--models") + 1: args.index("--method")]) <= {m.name for m in configmap_settings().models}
        if profile == "gpu":
            for svc in (reward, ppo):
                (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
                assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        # The compose file's relative paths exist where they point (data is configurable).
        assert (REPO / "deploy" / "k8s" / "base" / "config.yaml").is_file()
    assert "ppo-runs" in compose()["volumes"]


def test_compose_healthcheck_runs_against_the_server(container_like_server: dict[str, Any]) -> None:
    """The compose healthcheck command, verbatim, against a server on the port it names."""
    s = container_like_server
    test = compose()["services"]["reward-cpu"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    command = [a.replace("127.0.0.1:8000", f"127.0.0.1:{s['port']}") for a in test[1:]]
    ok = subprocess.run(command, env={**s["env"], "LOGAND_API_KEY": s["key"]}, timeout=30)
    assert ok.returncode == 0
    bad = subprocess.run(command, env={**s["env"], "LOGAND_API_KEY": "wrong"}, timeout=30, capture_output=True)
    assert bad.returncode != 0
