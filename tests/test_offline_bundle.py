"""Offline bundle (d2ct.bundle): manifest logic, install script, and (slow) a real build + offline install.

Fast tests need no download: they build bundles out of stand-in files. The slow test builds the real
bundle (about 3.3 GB: torch and the CUDA libraries are most of it), installs it into a fresh venv with
the index unreachable (and, where the kernel allows it, in a network namespace with no network at
all), and runs a smoke subset with the installed environment.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d2ct import bundle as B
from d2ct.installer import SDIST_FILENAME, SDIST_SHA256, sha256_of

ROOT = Path(__file__).resolve().parents[1]
CACHED_SDIST = ROOT / ".venv" / "src" / SDIST_FILENAME


def _fake_bundle(tmp: Path, sdist_bytes: bytes = b"not really a tarball") -> Path:
    out = tmp / "bundle"
    (out / "wheels").mkdir(parents=True)
    (out / "wheels" / "numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"numpy")
    (out / "wheels" / "tqdm-4.70.1-py3-none-any.whl").write_bytes(b"tqdm" * 100)
    (out / "wheels" / SDIST_FILENAME).write_bytes(sdist_bytes)
    (out / "d2ct" / "d2ct").mkdir(parents=True)
    (out / "d2ct" / "d2ct" / "__init__.py").write_text("x = 1\n")
    (out / "install.sh").write_text(B.install_script("3.11", "manylinux_2_28_x86_64"))
    return out


@pytest.fixture
def fake_sha(monkeypatch):
    """Pretend the pinned sdist hash is the stand-in's, so manifests of fake bundles can be built."""
    digest = __import__("hashlib").sha256(b"not really a tarball").hexdigest()
    monkeypatch.setattr(B, "SDIST_SHA256", digest)
    return digest


# ----------------------------------------------------------------------------------------------
# target tags and pip output parsing
# ----------------------------------------------------------------------------------------------
def test_expand_platforms_includes_older_manylinux_tags():
    tags = B.expand_platforms(["manylinux_2_28_x86_64"])
    assert tags[0] == "manylinux_2_28_x86_64"
    for tag in ("manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64",
                "manylinux1_x86_64", "manylinux_2_5_x86_64"):
        assert tag in tags
    assert "manylinux_2_29_x86_64" not in tags and len(tags) == len(set(tags))
    assert B.expand_platforms(["macosx_11_0_arm64"]) == ["macosx_11_0_arm64"]
    arm = B.expand_platforms(["manylinux_2_17_aarch64"])
    assert "manylinux2014_aarch64" in arm and "manylinux2010_aarch64" not in arm


def test_abi_and_requirement_names():
    assert B.abi_tag("3.12") == "cp312"
    assert B.requirement_name("fvcore==0.1.5.post20221221") == "fvcore"
    assert B.requirement_name("torch>=2.1 ; python_version>'3'") == "torch"
    assert B.canonical("antlr4_python3.Runtime") == "antlr4-python3-runtime"


def test_parse_missing_requirements():
    out = ("ERROR: Could not find a version that satisfies the requirement antlr4-python3-runtime==4.9.* "
           "(from omegaconf) (from versions: none)\n"
           "ERROR: No matching distribution found for antlr4-python3-runtime==4.9.*\n"
           "ERROR: No matching distribution found for antlr4-python3-runtime==4.9.*\n")
    assert B.parse_missing_requirements(out) == ["antlr4-python3-runtime==4.9.*"]
    assert B.parse_missing_requirements("Successfully downloaded torch") == []


def test_download_builds_source_only_packages_and_retries(tmp_path, monkeypatch):
    """pip download fails on a source-only dependency: it is built as a pure wheel and pip runs again."""
    calls, built = [], []

    def fake_pip(python, args, env=None):
        calls.append(args)
        if len(calls) == 1:
            return 1, "ERROR: No matching distribution found for foo==1.0\n"
        return 0, "Successfully downloaded\n"

    def fake_build(python, req, dest):
        built.append(req)
        (dest / "foo-1.0-py3-none-any.whl").write_bytes(b"foo")
        return dest / "foo-1.0-py3-none-any.whl"

    monkeypatch.setattr(B, "_run_pip", fake_pip)
    monkeypatch.setattr(B, "build_pure_wheel", fake_build)
    got = B.download_wheels("python", ["bar==2"], tmp_path / "w", python_version="3.12",
                            platforms=["manylinux_2_28_x86_64"], prebuild={})
    assert got == ["foo==1.0"] and built == ["foo==1.0"]
    assert len(calls) == 2
    args = calls[0]
    assert "--only-binary=:all:" in args and args[args.index("--abi") + 1] == "cp312"
    assert args[args.index("--python-version") + 1] == "3.12"
    assert "manylinux2014_x86_64" in args and str(tmp_path / "w") in args


def test_download_gives_up_on_other_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "_run_pip", lambda *a, **k: (1, "ERROR: HTTP error 503\n"))
    with pytest.raises(B.BundleError, match="pip download failed"):
        B.download_wheels("python", ["x"], tmp_path, python_version="3.11", platforms=["linux_x86_64"], prebuild={})


def test_prebuild_of_pinned_source_only_package(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(B, "_run_pip", lambda *a, **k: (0, ""))
    monkeypatch.setattr(B, "build_pure_wheel", lambda python, req, dest: built.append(req))
    B.download_wheels("python", ["fvcore==0.1.5.post20221221", "numpy==2"], tmp_path, python_version="3.11",
                      platforms=["manylinux_2_28_x86_64"])
    assert "fvcore==0.1.5.post20221221" in built and "antlr4-python3-runtime==4.9.3" in built


# ----------------------------------------------------------------------------------------------
# manifest and verification
# ----------------------------------------------------------------------------------------------
def test_manifest_lists_every_file_with_kind_size_and_hash(tmp_path, fake_sha):
    out = _fake_bundle(tmp_path)
    m = B.build_manifest(out, target={"python_version": "3.11"})
    by_path = {f["path"]: f for f in m["files"]}
    assert set(by_path) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert by_path[f"wheels/{SDIST_FILENAME}"]["kind"] == "detectron2-sdist"
    assert by_path["wheels/tqdm-4.70.1-py3-none-any.whl"]["kind"] == "wheel"
    assert by_path["wheels/tqdm-4.70.1-py3-none-any.whl"]["size"] == 400
    assert by_path["d2ct/d2ct/__init__.py"]["kind"] == "source"
    assert by_path["install.sh"]["kind"] == "bundle"
    assert by_path["d2ct/d2ct/__init__.py"]["sha256"] == sha256_of(out / "d2ct/d2ct/__init__.py")
    assert m["counts"] == {"wheel": 2, "detectron2-sdist": 1, "source": 1, "bundle": 1}
    assert m["total_bytes"] == sum(f["size"] for f in m["files"])
    assert m["detectron2_sdist"]["sha256"] == fake_sha
    B.write_manifest(out, m)
    assert B.verify_bundle(out) == []
    assert "manifest.json" not in {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}


def test_manifest_refuses_a_wrong_or_missing_sdist(tmp_path):
    out = _fake_bundle(tmp_path)  # the stand-in sdist does not have the pinned sha256
    with pytest.raises(B.BundleError, match="sha256 .* is not the pinned " + SDIST_SHA256):
        B.build_manifest(out, target={})
    (out / "wheels" / SDIST_FILENAME).unlink()
    with pytest.raises(B.BundleError, match="is missing"):
        B.build_manifest(out, target={})


@pytest.mark.skipif(not CACHED_SDIST.exists(), reason=f"no cached {SDIST_FILENAME} in .venv/src (installer cache)")
def test_manifest_accepts_the_real_sdist(tmp_path):
    out = _fake_bundle(tmp_path)
    shutil.copy2(CACHED_SDIST, out / "wheels" / SDIST_FILENAME)
    m = B.build_manifest(out, target={})
    assert m["detectron2_sdist"]["sha256"] == SDIST_SHA256


def test_verify_detects_altered_missing_and_extra_files(tmp_path, fake_sha):
    out = _fake_bundle(tmp_path)
    B.write_manifest(out, B.build_manifest(out, target={}))
    assert B.verify_bundle(out) == []
    (out / "wheels" / "tqdm-4.70.1-py3-none-any.whl").write_bytes(b"tqdX" * 100)  # same size, other bytes
    (out / "d2ct" / "d2ct" / "__init__.py").unlink()
    (out / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"!")
    problems = B.verify_bundle(out)
    assert "sha256 differs: wheels/tqdm-4.70.1-py3-none-any.whl" in problems
    assert "missing: d2ct/d2ct/__init__.py" in problems
    assert "not in the manifest: wheels/evil-1.0-py3-none-any.whl" in problems
    assert B.main(["--verify", str(out)]) == 1
    assert B.verify_bundle(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere' / 'manifest.json'}: no manifest"]


def test_source_files_are_the_project_without_environments():
    files = {p.as_posix() for p in B.source_files(ROOT)}
    for needed in ("d2ct/installer.py", "d2ct/bundle.py", "requirements/pinned.txt", "setup.py",
                   "tools/train_net.py", "configs/demo/radiologist_r50.yaml"):
        assert needed in files
    assert not any(f.startswith((".venv/", ".git/", "output/")) or "__pycache__" in f or ".egg-info" in f
                   for f in files)


def test_bundle_command_needs_out_or_verify(capsys):
    with pytest.raises(SystemExit) as e:
        B.main([])
    assert e.value.code == 2
    assert "--out DIR is required" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# install.sh (with a stand-in python3: what it runs, with which environment)
# ----------------------------------------------------------------------------------------------
def _stub_python(tmp: Path, version: str) -> Path:
    log = tmp / "calls.log"
    stub = tmp / "python3"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = "-c" ]; then echo "{version}"; exit 0; fi\n'
        f'echo "$PWD|$*|PIP_NO_INDEX=${{PIP_NO_INDEX:-}}|PIP_FIND_LINKS=${{PIP_FIND_LINKS:-}}|'
        f'PIP_EXTRA_INDEX_URL=${{PIP_EXTRA_INDEX_URL:-}}|PIP_CONFIG_FILE=${{PIP_CONFIG_FILE:-}}" >> {log}\n'
    )
    stub.chmod(0o755)
    return stub


def test_install_script_runs_the_offline_installer(tmp_path):
    out = _fake_bundle(tmp_path)
    stub = _stub_python(tmp_path, "3.11")
    env = {**os.environ, "PYTHON": str(stub), "PIP_FIND_LINKS": "/somewhere/else",
           "PIP_EXTRA_INDEX_URL": "https://example.invalid/simple"}
    res = subprocess.run(["bash", str(out / "install.sh"), "myvenv"], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 2
    verify, install = (c.split("|") for c in calls)
    assert verify[1] == f"-m d2ct.bundle --verify {out}"
    assert install[0] == str(out / "d2ct")  # run from the bundle's source tree
    assert install[1] == f"-m d2ct.installer --venv {tmp_path / 'myvenv'} --find-links {out / 'wheels'}"
    assert install[2] == "PIP_NO_INDEX=1"
    assert install[3] == f"PIP_FIND_LINKS={out / 'wheels'}"  # the machine's find-links replaced
    assert install[4] == "PIP_EXTRA_INDEX_URL="
    assert install[5] == "PIP_CONFIG_FILE=/dev/null"


def test_install_script_refuses_another_python_version(tmp_path):
    out = _fake_bundle(tmp_path)
    stub = _stub_python(tmp_path, "3.12")
    res = subprocess.run(["bash", str(out / "install.sh")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": str(stub)})
    assert res.returncode == 1
    assert "wheels for Python 3.11" in res.stderr and "Python 3.12" in res.stderr
    assert not (tmp_path / "calls.log").exists()


def test_install_script_has_no_placeholders():
    text = B.install_script("3.12", "manylinux_2_28_x86_64")
    assert "@" not in text.replace("$@", "")
    assert '"$PYTHON" -m d2ct.installer --venv "$VENV" --find-links "$here/wheels"' in text


# ----------------------------------------------------------------------------------------------
# the real thing (slow): build, install with no index and no network, smoke-test
# ----------------------------------------------------------------------------------------------
SMOKE = r'''
import torch, detectron2
from detectron2.modeling import build_model
from d2ct.config import setup_cfg
cfg = setup_cfg("configs/demo/radiologist_r50.yaml", ["MODEL.DEVICE", "cpu"])
torch.manual_seed(0)
model = build_model(cfg).eval()
img = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8).float()
with torch.no_grad():
    out = model([{"image": img, "height": 256, "width": 256}])
inst = out[0]["instances"]
assert inst.pred_masks.shape[1:] == (256, 256) or len(inst) == 0
print("SMOKE_OK", detectron2.__version__, torch.__version__, len(inst))
'''


def _no_network_prefix() -> list[str]:
    """`unshare -n` (a network namespace with no interface up) when this user may create one."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


@pytest.mark.slow
def test_bundle_builds_and_installs_offline(tmp_path_factory):
    work = tmp_path_factory.mktemp("offline")
    out, venv = work / "bundle", work / "venv"
    start = time.time()
    res = subprocess.run([sys.executable, "-m", "d2ct.bundle", "--out", str(out), "--python-version",
                          f"{sys.version_info.major}.{sys.version_info.minor}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    build_s = time.time() - start
    manifest = json.loads((out / "manifest.json").read_text())
    names = {Path(f["path"]).name for f in manifest["files"]}
    assert SDIST_FILENAME in names and any(n.startswith("torch-") for n in names)
    assert any(n.startswith("fvcore-") and n.endswith("-none-any.whl") for n in names)
    assert B.verify_bundle(out) == []

    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple")  # unreachable, and unused
    offline = _no_network_prefix()
    start = time.time()
    res = subprocess.run([*offline, "bash", str(out / "install.sh"), str(venv)], capture_output=True, text=True,
                         env=env, timeout=1800)
    install_s = time.time() - start
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "127.0.0.1:9" not in res.stdout  # pip never looked at the index

    python = venv / "bin" / "python"
    smoke = subprocess.run([*offline, str(python), "-c", SMOKE], cwd=out / "d2ct", capture_output=True, text=True,
                           env=env, timeout=600)
    assert smoke.returncode == 0 and "SMOKE_OK" in smoke.stdout, smoke.stderr[-3000:]
    tests = subprocess.run([*offline, str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/test_coco.py", "tests/test_metrics.py"], cwd=out / "d2ct", capture_output=True,
                           text=True, env=env, timeout=900)
    assert tests.returncode == 0, tests.stdout[-3000:]
    print(f"\nbundle {manifest['total_bytes'] / 1e9:.2f} GB ({manifest['counts'].get('wheel')} wheels) built in "
          f"{build_s:.0f} s; offline install {install_s:.0f} s ({'in a network namespace without network' if offline else 'index unreachable, network up'})")


def test_installer_refuses_to_start_without_the_disk_space_it_needs(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from d2ct import installer

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10e9, 9.7e9, 0.3e9))
    with pytest.raises(installer.InstallError, match=r"0\.3 GB free, about 7 GB needed") as err:
        installer.ensure_environment(tmp_path / "venv")
    assert str(tmp_path / "venv") in str(err.value)
    assert not (tmp_path / "venv").exists()  # refused before anything was created
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100e9, 10e9, 90e9))
    installer.check_free_space(tmp_path / "venv")  # enough room: no error
