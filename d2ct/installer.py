"""Build d2ct's virtual environment from PyPI alone, Detectron2 included.

Standard library only: this module runs before anything else is installed
(``python3 -m d2ct.installer``; the Makefile's ``setup`` target calls it).

Detectron2 is not on PyPI under its own name. The PyPI source package
``pb1-detectron2==0.6`` holds upstream v0.6's Python files unchanged; we fetch it with
pip (so a user's mirror configuration applies), check its sha256, and patch the few
places where v0.6 breaks with today's NumPy, Pillow, Python and setuptools. It carries
no C++/CUDA sources, so the compiled ops are replaced by a stand-in module that raises
a clear error when called; Mask R-CNN with axis-aligned boxes never calls them
(ROIAlign and NMS come from torchvision).

A Detectron2 that is already importable in the environment (for example an upstream
CUDA build on a GPU host) is kept.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = PROJECT_ROOT / ".venv"
PINNED_REQUIREMENTS = PROJECT_ROOT / "requirements" / "pinned.txt"

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_FILENAME = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

# Text patches: (path inside the source tree, old text, new text, expected number of hits).
TEXT_PATCHES = [
    # Pillow >= 10 removed Image.LINEAR (it was an alias of BILINEAR).
    ("detectron2/data/transforms/transform.py", "interp=Image.LINEAR", "interp=Image.BILINEAR", 1),
    # Python 3.11: random.sample() no longer accepts a set.
    (
        "detectron2/data/common.py",
        "self._rng.sample(self._fallback_candidates, k=1)",
        "self._rng.sample(sorted(self._fallback_candidates), k=1)",
        1,
    ),
    # No C++/CUDA sources in the sdist: build a pure-Python package.
    ("setup.py", "ext_modules=get_extensions(),", "ext_modules=[],", 1),
    ('setup.py', 'cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},', "", 1),
    # The sdist ships upstream's tools/ as a top-level package: it would shadow d2ct's tools/.
    (
        "setup.py",
        'find_packages(exclude=("configs", "tests*"))',
        'find_packages(exclude=("configs", "tests*", "tools", "tools.*"))',
        1,
    ),
]

# NumPy 2 removed the aliases np.int, np.float, np.bool, np.str, np.object.
# The lookahead keeps np.int64, np.float32, np.bool_ and friends untouched.
NUMPY_ALIAS = re.compile(r"\bnp\.(int|float|bool|str|object)\b(?![\w])")

COMPILED_OPS_STANDIN = '''"""Stand-in for detectron2's compiled extension (written by d2ct.installer).

This Detectron2 was installed from the PyPI source package pb1-detectron2==0.6, which
has no C++/CUDA sources. Mask R-CNN with axis-aligned boxes does not need them: ROIAlign
and NMS come from torchvision. Rotated boxes, deformable convolution and the fast COCO
evaluator do; calling one of them raises the error below.
"""

_HOW_TO_FIX = (
    "detectron2 was installed without compiled ops (d2ct's PyPI route), so '{name}' is "
    "unavailable. Use axis-aligned boxes, COCOEvaluator(..., use_fast_impl=False), or "
    "install upstream Detectron2 with compiled ops: "
    "pip install 'git+https://github.com/facebookresearch/detectron2.git' (see d2ct's README)."
)

has_compiled_ops = False


def has_cuda():
    return False


def get_compiler_version():
    return "none (d2ct PyPI route: no compiled ops)"


def get_cuda_version():
    return "none (d2ct PyPI route: no compiled ops)"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(_HOW_TO_FIX.format(name=name))
'''


class InstallError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"[d2ct setup] {msg}", flush=True)


def _run(cmd: list[str], **kwargs) -> None:
    _log("$ " + " ".join(str(c) for c in cmd))
    result = subprocess.run([str(c) for c in cmd], **kwargs)
    if result.returncode != 0:
        raise InstallError(f"command failed with exit code {result.returncode}: {' '.join(map(str, cmd))}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sdist(path: Path) -> None:
    actual = sha256_of(path)
    if actual != SDIST_SHA256:
        raise InstallError(
            f"{path}: sha256 {actual} does not match the expected {SDIST_SHA256} for "
            f"{SDIST_NAME}=={SDIST_VERSION}; refusing to install an unknown Detectron2."
        )


def fetch_detectron2_sdist(python: Path, dest: Path) -> Path:
    """Download the sdist with the environment's pip (mirrors and proxies apply)."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / SDIST_FILENAME
    if not target.exists():
        # --no-build-isolation: pip prepares metadata by running setup.py, which imports torch.
        _run([python, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
              "--no-binary", ":all:", f"{SDIST_NAME}=={SDIST_VERSION}", "-d", dest])
    if not target.exists():
        raise InstallError(f"pip download did not produce {target}")
    verify_sdist(target)
    return target


def patch_detectron2_source(src: Path) -> list[str]:
    """Apply d2ct's compatibility patches to an unpacked pb1-detectron2 0.6 tree, in place."""
    changed: list[str] = []
    for rel, old, new, expected in TEXT_PATCHES:
        path = src / rel
        text = path.read_text()
        hits = text.count(old)
        if hits != expected:
            raise InstallError(f"patch for {rel}: expected {expected} occurrence(s) of {old!r}, found {hits}")
        path.write_text(text.replace(old, new))
        changed.append(rel)
    for path in sorted(list((src / "detectron2").rglob("*.py")) + list((src / "projects").rglob("*.py"))):
        text = path.read_text()
        new_text = NUMPY_ALIAS.sub(lambda m: m.group(1), text)
        if new_text != text:
            path.write_text(new_text)
            changed.append(str(path.relative_to(src)))
    (src / "detectron2" / "_C.py").write_text(COMPILED_OPS_STANDIN)
    changed.append("detectron2/_C.py")
    # setup.py packages the model-zoo configs from a top-level configs/ (upstream's layout);
    # the sdist has them under detectron2/model_zoo/configs instead.
    zoo_configs = src / "detectron2" / "model_zoo" / "configs"
    if zoo_configs.is_dir() and not zoo_configs.is_symlink() and not (src / "configs").exists():
        shutil.move(str(zoo_configs), str(src / "configs"))
        changed.append("configs/")
    return changed


def prepare_detectron2_source(sdist: Path, workdir: Path) -> Path:
    """Verify, unpack and patch the sdist; return the source tree ready for pip install."""
    verify_sdist(sdist)
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / f"{SDIST_NAME}-{SDIST_VERSION}"
    if src.exists():
        shutil.rmtree(src)
    with tarfile.open(sdist) as tar:
        try:
            tar.extractall(workdir, filter="data")
        except TypeError:  # Python without tarfile extraction filters
            tar.extractall(workdir)
    patch_detectron2_source(src)
    return src


# A fresh environment takes about 6.7 GB on x86-64 (the CUDA build of torch is 5.5 GB); pip fails
# halfway with "No space left on device" otherwise, leaving a broken venv behind.
REQUIRED_FREE_GB = 7.0


def check_free_space(venv_dir: Path, required_gb: float = REQUIRED_FREE_GB) -> None:
    """Refuse to start an install that cannot finish; name the folder and the numbers."""
    probe = venv_dir if venv_dir.exists() else venv_dir.parent
    free_gb = shutil.disk_usage(probe).free / 1e9
    have_gb = _dir_size_gb(venv_dir) if venv_dir.exists() else 0.0
    if free_gb + have_gb < required_gb:
        raise InstallError(
            f"not enough disk space for the environment in {venv_dir}: {free_gb:.1f} GB free, about "
            f"{required_gb:.0f} GB needed (PyTorch's CUDA build alone is 5.5 GB). Free some space, or point "
            f"VENV= (make) / --venv at a disk with room.")


def venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def _env_fingerprint() -> str:
    digest = hashlib.sha256()
    for path in (PINNED_REQUIREMENTS, Path(__file__), PROJECT_ROOT / "setup.py"):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _requirement_lines(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _importable(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


def _dir_size_gb(path: Path) -> float:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total / 1e9


def ensure_environment(venv_dir: Path = DEFAULT_VENV, force: bool = False, find_links: Path | None = None) -> Path:
    """Create or update the virtual environment; return its python. Idempotent and locked."""
    venv_dir = venv_dir.resolve()
    stamp = venv_dir / ".d2ct-env"
    fingerprint = _env_fingerprint()
    if not force and stamp.exists() and stamp.read_text().split()[0] == fingerprint:
        return venv_python(venv_dir)

    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(str(venv_dir) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two `make` targets started at once wait for one install
        if not force and stamp.exists() and stamp.read_text().split()[0] == fingerprint:
            return venv_python(venv_dir)
        start = time.time()
        check_free_space(venv_dir)
        python = venv_python(venv_dir)
        if not python.exists():
            _log(f"creating virtual environment {venv_dir}")
            venv.EnvBuilder(with_pip=True).create(venv_dir)
        offline = ["--no-index", "--find-links", str(find_links)] if find_links else []
        pip = [python, "-m", "pip", "install", "--disable-pip-version-check", *offline]
        requirements = _requirement_lines(PINNED_REQUIREMENTS)
        torch_first = [r for r in requirements if re.match(r"^(torch|torchvision|setuptools|wheel)\b", r)]
        _log("installing PyTorch (the largest download: a CUDA build of about 5.5 GB on x86-64)")
        _run([*pip, *torch_first])
        _log("installing the pinned dependencies")
        _run([*pip, "-r", PINNED_REQUIREMENTS])

        if _importable(python, "detectron2"):
            _log("an importable Detectron2 is already installed: keeping it")
        else:
            cache = venv_dir / "src"
            if find_links:
                sdist = Path(find_links) / SDIST_FILENAME
                if not sdist.exists():
                    raise InstallError(f"offline install: {sdist} is missing from the bundle")
            else:
                sdist = fetch_detectron2_sdist(python, cache)
            _log(f"preparing {sdist.name} (sha256 verified) with d2ct's compatibility patches")
            src = prepare_detectron2_source(sdist, cache)
            _run([*pip, "--no-build-isolation", "--no-deps", src])
        _log("installing d2ct itself (editable)")
        _run([*pip, "--no-build-isolation", "--no-deps", "-e", PROJECT_ROOT])
        _run([python, "-c", "import detectron2, d2ct, pycocotools, torch, monai; "
              "from detectron2 import model_zoo; "
              "model_zoo.get_config_file('COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml'); "
              "print('detectron2', detectron2.__version__, 'torch', torch.__version__, "
              "'cuda available:', torch.cuda.is_available())"])
        minutes = (time.time() - start) / 60
        size = _dir_size_gb(venv_dir)
        stamp.write_text(f"{fingerprint}\ninstalled in {minutes:.1f} min, {size:.1f} GB\n")
        _log(f"environment ready in {minutes:.1f} min, {size:.1f} GB on disk: {venv_dir}")
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m d2ct.installer",
        description="Build d2ct's virtual environment (PyTorch, patched Detectron2 from PyPI, d2ct).",
    )
    parser.add_argument("--venv", type=Path, default=Path(os.environ.get("D2CT_VENV", DEFAULT_VENV)),
                        help="virtual environment folder (default: .venv in the project, or $D2CT_VENV)")
    parser.add_argument("--force", action="store_true", help="reinstall even if the environment is up to date")
    parser.add_argument("--find-links", type=Path, default=None,
                        help="install offline from this folder of wheels and the Detectron2 sdist (no index)")
    parser.add_argument("--prepare-detectron2", type=Path, metavar="SDIST",
                        help="only verify, unpack and patch this pb1-detectron2 sdist into --workdir, then exit")
    parser.add_argument("--workdir", type=Path, default=Path("build"), help="with --prepare-detectron2")
    args = parser.parse_args(argv)
    try:
        if args.prepare_detectron2:
            print(prepare_detectron2_source(args.prepare_detectron2, args.workdir))
            return 0
        ensure_environment(args.venv, force=args.force, find_links=args.find_links)
    except InstallError as e:
        print(f"[d2ct setup] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
