"""Offline bundle: everything needed to install d2ct on an air-gapped machine, in one folder.

Standard library only, like the installer. Usage (on a machine with index access)::

    python -m d2ct.bundle --out d2ct-bundle                      # this Python, manylinux_2_28 x86-64
    python -m d2ct.bundle --out d2ct-bundle-py312 --python-version 3.12 --platform manylinux_2_28_x86_64

then copy the folder to the offline machine and run ``bash d2ct-bundle/install.sh [VENV]`` with a
``python3`` of the bundle's version. The folder holds:

- ``wheels/``: a wheel for every package of requirements/pinned.txt and their dependencies, for the
  chosen Python version and platform (``pip download --only-binary=:all:``; packages published as
  source only, such as fvcore, are built here into pure-Python wheels), and the Detectron2 source
  package ``pb1-detectron2-0.6.tar.gz`` (sha256 verified; the installer patches it at install time
  exactly as it does online);
- ``d2ct/``: d2ct's source tree (package, tools, configs, tests, docs); it becomes the project folder;
- ``install.sh``: runs ``python3 -m d2ct.installer --find-links wheels`` from ``d2ct/``, which installs
  with ``pip --no-index`` only;
- ``manifest.json``: every file with its size and sha256, the target, the source commit;
  ``python -m d2ct.bundle --verify DIR`` (and install.sh) check it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from d2ct import __version__
from d2ct.installer import (
    PINNED_REQUIREMENTS,
    PROJECT_ROOT,
    SDIST_FILENAME,
    SDIST_SHA256,
    InstallError,
    _requirement_lines,
    fetch_detectron2_sdist,
    sha256_of,
)

MANIFEST = "manifest.json"
WHEELS_DIR = "wheels"
SOURCE_DIR = "d2ct"
INSTALL_SCRIPT = "install.sh"
MANIFEST_FORMAT = 1

DEFAULT_PLATFORM = "manylinux_2_28_x86_64"
# Requirements known to be published as source only, built here into pure-Python wheels before the
# download: name -> requirement when it is not in pinned.txt (antlr4: omegaconf 2.3 wants 4.9.*).
# Others found during the download are handled the same way, one pip round each.
KNOWN_SOURCE_ONLY = {"fvcore": None, "antlr4-python3-runtime": "antlr4-python3-runtime==4.9.3"}

# Never copied into the bundle's source tree, whatever git says.
SOURCE_EXCLUDE_PARTS = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "output", "outputs",
                        "build", "runs", "work_dirs", ".cache", ".device", ".whl"}
SOURCE_EXCLUDE_SUFFIXES = (".egg-info", ".pyc", ".lock")

_NO_MATCH = re.compile(r"No matching distribution found for ([^\s]+)")


def _log(msg: str) -> None:
    print(f"[d2ct bundle] {msg}", flush=True)


class BundleError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# target platform
# ----------------------------------------------------------------------------------------------
def expand_platforms(platforms: list[str]) -> list[str]:
    """pip's --platform takes exact tags; a machine with glibc 2.N also runs older manylinux wheels.

    ``manylinux_2_28_x86_64`` becomes manylinux_2_28 .. manylinux_2_17 plus the legacy aliases
    manylinux2014/2010/1 (PEP 600), most specific first; other tags are kept as they are.
    """
    out: list[str] = []
    for plat in platforms:
        m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", plat)
        if not m:
            out.append(plat)
            continue
        glibc, arch = int(m.group(1)), m.group(2)
        for minor in range(glibc, 4, -1):
            out.append(f"manylinux_2_{minor}_{arch}")
            if minor == 17:
                out.append(f"manylinux2014_{arch}")
            elif minor == 12 and arch in ("x86_64", "i686"):
                out.append(f"manylinux2010_{arch}")
            elif minor == 5 and arch in ("x86_64", "i686"):
                out.append(f"manylinux1_{arch}")
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def abi_tag(python_version: str) -> str:
    major, minor = python_version.split(".")[:2]
    return f"cp{major}{minor}"


def parse_missing_requirements(pip_output: str) -> list[str]:
    """Requirements pip could not find as wheels for the target ("No matching distribution found for X")."""
    return list(dict.fromkeys(m.group(1).strip("'\"") for m in _NO_MATCH.finditer(pip_output)))


def requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ----------------------------------------------------------------------------------------------
# pip steps
# ----------------------------------------------------------------------------------------------
def _run_pip(python: str, args: list[str], env: dict | None = None) -> tuple[int, str]:
    """Run ``python -m pip ARGS``, echoing its output; return (exit code, output)."""
    cmd = [python, "-m", "pip", *args]
    _log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if not line.startswith(("  Using cached", "  File was already downloaded")):
            sys.stdout.write(line)
    sys.stdout.flush()
    return proc.wait(), "".join(lines)


def build_pure_wheel(python: str, requirement: str, dest: Path) -> Path:
    """Build ``requirement`` (a source-only package) into a wheel; it must be pure Python."""
    with tempfile.TemporaryDirectory(prefix="d2ct-wheel-") as tmp:
        code, out = _run_pip(python, ["wheel", "--no-deps", "--disable-pip-version-check", "-w", tmp, requirement])
        if code != 0:
            raise BundleError(f"could not build a wheel of {requirement}:\n{out[-2000:]}")
        built = sorted(Path(tmp).glob("*.whl"))
        if len(built) != 1:
            raise BundleError(f"building {requirement} gave {len(built)} wheels, expected 1")
        wheel = built[0]
        if not wheel.name.endswith("-none-any.whl"):
            raise BundleError(
                f"{requirement} has no wheel for the target platform and builds to {wheel.name}, which is "
                "not pure Python: build this bundle on a machine of the target platform (same Python)."
            )
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / wheel.name
        shutil.move(str(wheel), target)
        return target


def download_wheels(python: str, requirements: list[str], dest: Path, *, python_version: str,
                    platforms: list[str], max_rounds: int = 6, prebuild: dict[str, str | None] = KNOWN_SOURCE_ONLY) -> list[str]:
    """``pip download`` wheels of ``requirements`` and their dependencies for the target into ``dest``.

    Returns the requirements that had to be built here from source (pure-Python wheels).
    """
    dest.mkdir(parents=True, exist_ok=True)
    built: list[str] = []
    pinned = {canonical(requirement_name(r)): r for r in requirements}
    for name, fallback in prebuild.items():
        req = pinned.get(canonical(name), fallback)
        if req and not any(canonical(p.name.split("-")[0]) == canonical(name) for p in dest.glob("*.whl")):
            _log(f"{req}: published as source only, building a pure-Python wheel")
            build_pure_wheel(python, req, dest)
            built.append(req)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(requirements) + "\n")
        req_file = f.name
    try:
        target = ["--python-version", python_version, "--implementation", "cp", "--abi", abi_tag(python_version)]
        for plat in expand_platforms(platforms):
            target += ["--platform", plat]
        for _round in range(max_rounds):
            code, out = _run_pip(python, ["download", "--disable-pip-version-check", "--only-binary=:all:",
                                          *target, "--find-links", str(dest), "-d", str(dest), "-r", req_file])
            if code == 0:
                return built
            missing = [m for m in parse_missing_requirements(out) if m not in built]
            if not missing:
                raise BundleError(f"pip download failed (exit {code}); see its output above")
            for req in missing:
                _log(f"{req}: no wheel for the target, building a pure-Python wheel")
                build_pure_wheel(python, req, dest)
                built.append(req)
        raise BundleError(f"pip download still failing after {max_rounds} rounds")
    finally:
        os.unlink(req_file)


def locate_detectron2_sdist(explicit: Path | None, python: str, workdir: Path) -> Path:
    """The pb1-detectron2 sdist: ``explicit``, the installer's cache in a venv, or ``pip download``."""
    candidates = [explicit] if explicit else []
    for venv in (os.environ.get("D2CT_VENV"), PROJECT_ROOT / ".venv"):
        if venv:
            candidates.append(Path(venv) / "src" / SDIST_FILENAME)
    for path in candidates:
        if path and path.is_file():
            return path
    if explicit:
        raise BundleError(f"{explicit}: not found")
    _log(f"downloading {SDIST_FILENAME} (pip prepares its metadata with setup.py, which imports torch)")
    try:
        return fetch_detectron2_sdist(Path(python), workdir)
    except InstallError as e:
        raise BundleError(
            f"{e}. Run this command with a Python that has torch installed (e.g. .venv/bin/python), "
            f"or pass --detectron2-sdist PATH to a downloaded {SDIST_FILENAME}"
        ) from e


# ----------------------------------------------------------------------------------------------
# source tree
# ----------------------------------------------------------------------------------------------
def _excluded(rel: Path) -> bool:
    return any(part in SOURCE_EXCLUDE_PARTS or part.endswith(SOURCE_EXCLUDE_SUFFIXES) for part in rel.parts)


def source_files(root: Path = PROJECT_ROOT) -> list[Path]:
    """The project's files (relative paths): git's tracked and untracked-not-ignored files, else a walk."""
    rels: list[Path] = []
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode()
        rels = [Path(p) for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = Path(dirpath).relative_to(root)
            dirnames[:] = [d for d in dirnames if not _excluded(rel_dir / d)]
            rels += [rel_dir / f for f in filenames]
    files = sorted({r for r in rels if not _excluded(r) and (root / r).is_file() and not (root / r).is_symlink()})
    if Path("d2ct/installer.py") not in files or Path("requirements/pinned.txt") not in files:
        raise BundleError(f"{root} does not look like d2ct's source tree")
    return files


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, check=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, check=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _resolve(root: Path, ref: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", ref], capture_output=True, check=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def copy_source(root: Path, dest: Path, git_ref: str | None = None) -> int:
    """Copy the project's files into ``dest``: the working tree, or the tree of commit ``git_ref``."""
    if git_ref:
        import io
        import tarfile

        try:
            data = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", git_ref],
                                  capture_output=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise BundleError(f"git archive {git_ref} failed in {root}: {getattr(e, 'stderr', b'').decode()[-500:]}") from e
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and not _excluded(Path(m.name))]
            try:
                tar.extractall(dest, members=members, filter="data")
            except TypeError:  # Python without tarfile extraction filters
                tar.extractall(dest, members=members)
        return len(members)
    files = source_files(root)
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    return len(files)


# ----------------------------------------------------------------------------------------------
# manifest
# ----------------------------------------------------------------------------------------------
def file_kind(rel: str) -> str:
    if rel == f"{WHEELS_DIR}/{SDIST_FILENAME}":
        return "detectron2-sdist"
    if rel.startswith(f"{WHEELS_DIR}/"):
        return "wheel" if rel.endswith(".whl") else "other"
    if rel.startswith(f"{SOURCE_DIR}/"):
        return "source"
    return "bundle"


def build_manifest(bundle: Path, *, target: dict, extra: dict | None = None) -> dict:
    """Describe every file of ``bundle`` (except the manifest): relative path, kind, size, sha256.

    Raises BundleError when the Detectron2 sdist is missing or its sha256 is not the pinned one.
    """
    files = []
    for path in sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(bundle).as_posix()
        files.append({"path": rel, "kind": file_kind(rel), "size": path.stat().st_size, "sha256": sha256_of(path)})
    sdist = [f for f in files if f["kind"] == "detectron2-sdist"]
    if not sdist:
        raise BundleError(f"{bundle}: {WHEELS_DIR}/{SDIST_FILENAME} is missing")
    if sdist[0]["sha256"] != SDIST_SHA256:
        raise BundleError(f"{sdist[0]['path']}: sha256 {sdist[0]['sha256']} is not the pinned {SDIST_SHA256}")
    kinds: dict[str, int] = {}
    for f in files:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    return {
        "format": MANIFEST_FORMAT,
        "d2ct_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "built_on": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "target": target,
        "detectron2_sdist": {"file": sdist[0]["path"], "sha256": SDIST_SHA256},
        "counts": kinds,
        "total_bytes": sum(f["size"] for f in files),
        **(extra or {}),
        "files": files,
    }


def write_manifest(bundle: Path, manifest: dict) -> Path:
    path = bundle / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def verify_bundle(bundle: Path, *, hashes: bool = True) -> list[str]:
    """Problems with ``bundle`` against its manifest (missing, resized or altered files, extra wheels,
    a wrong Detectron2 sdist); an empty list when it is intact."""
    path = bundle / MANIFEST
    if not path.is_file():
        return [f"{path}: no manifest"]
    manifest = json.loads(path.read_text())
    problems = []
    listed = set()
    for f in manifest.get("files", []):
        rel = f["path"]
        listed.add(rel)
        p = bundle / rel
        if not p.is_file():
            problems.append(f"missing: {rel}")
        elif p.stat().st_size != f["size"]:
            problems.append(f"size differs: {rel}")
        elif hashes and sha256_of(p) != f["sha256"]:
            problems.append(f"sha256 differs: {rel}")
    wheels = bundle / WHEELS_DIR
    if wheels.is_dir():
        for p in sorted(wheels.iterdir()):
            rel = p.relative_to(bundle).as_posix()
            if p.is_file() and rel not in listed:
                problems.append(f"not in the manifest: {rel}")
    sdist = bundle / WHEELS_DIR / SDIST_FILENAME
    if sdist.is_file() and hashes and sha256_of(sdist) != SDIST_SHA256:
        problems.append(f"{WHEELS_DIR}/{SDIST_FILENAME}: sha256 is not the pinned {SDIST_SHA256}")
    return problems


# ----------------------------------------------------------------------------------------------
# install script
# ----------------------------------------------------------------------------------------------
INSTALL_SH = r'''#!/usr/bin/env bash
# Install d2ct from this offline bundle: no index, no network (pip --no-index --find-links wheels/).
#   bash install.sh [VENV]          VENV defaults to <bundle>/d2ct/.venv
# Environment: PYTHON (default python3; must be Python @PYTHON_VERSION@), D2CT_SKIP_VERIFY=1 skips the
# sha256 check of the bundle's files (a few seconds per GB).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${1:-$here/@SOURCE_DIR@/.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "install.sh: $PYTHON not found; set PYTHON=/path/to/python@PYTHON_VERSION@" >&2
    exit 1
fi
have="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$have" != "@PYTHON_VERSION@" ]; then
    echo "install.sh: this bundle holds wheels for Python @PYTHON_VERSION@ (@PLATFORM@); $PYTHON is Python $have." >&2
    echo "Set PYTHON=/path/to/python@PYTHON_VERSION@, or build a bundle with --python-version $have." >&2
    exit 1
fi

# Only this folder: no index, no find-links or constraints from the machine's pip configuration.
# PIP_FIND_LINKS also reaches the pip that setuptools' `setup.py develop` starts by itself for the
# editable install of d2ct (it needs setuptools and wheel from here for its build environment).
export PIP_NO_INDEX=1
export PIP_CONFIG_FILE=/dev/null
export PIP_FIND_LINKS="$here/@WHEELS_DIR@"
unset PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_REQUIRE_VIRTUALENV

cd "$here/@SOURCE_DIR@"
if [ "${D2CT_SKIP_VERIFY:-0}" != "1" ]; then
    "$PYTHON" -m d2ct.bundle --verify "$here"
fi
"$PYTHON" -m d2ct.installer --venv "$VENV" --find-links "$here/@WHEELS_DIR@"
echo "d2ct installed: $VENV (project folder $here/@SOURCE_DIR@)"
echo "try: cd $here/@SOURCE_DIR@ && $VENV/bin/python tools/train_net.py --help"
'''


def install_script(python_version: str, platform_tag: str) -> str:
    text = INSTALL_SH
    for key, value in {"PYTHON_VERSION": python_version, "PLATFORM": platform_tag, "SOURCE_DIR": SOURCE_DIR,
                       "WHEELS_DIR": WHEELS_DIR}.items():
        text = text.replace(f"@{key}@", value)
    return text


# ----------------------------------------------------------------------------------------------
# the bundle
# ----------------------------------------------------------------------------------------------
def build_bundle(out: Path, *, python_version: str, platforms: list[str], pip_python: str = sys.executable,
                 detectron2_sdist: Path | None = None, requirements: Path = PINNED_REQUIREMENTS,
                 source_root: Path = PROJECT_ROOT, git_ref: str | None = None) -> dict:
    start = time.time()
    out = out.resolve()
    wheels = out / WHEELS_DIR
    wheels.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an interrupted bundle has no manifest

    sdist = locate_detectron2_sdist(detectron2_sdist, pip_python, out / ".download")
    from d2ct.installer import verify_sdist

    try:
        verify_sdist(sdist)
    except InstallError as e:
        raise BundleError(str(e)) from e
    if sdist.resolve() != (wheels / SDIST_FILENAME).resolve():
        shutil.copy2(sdist, wheels / SDIST_FILENAME)
    shutil.rmtree(out / ".download", ignore_errors=True)
    _log(f"{SDIST_FILENAME}: sha256 verified")

    reqs = _requirement_lines(requirements)
    built = download_wheels(pip_python, reqs, wheels, python_version=python_version, platforms=platforms)

    src = out / SOURCE_DIR
    if src.exists():
        shutil.rmtree(src)
    n = copy_source(source_root, src, git_ref)
    _log(f"copied d2ct's source tree ({n} files, {git_ref or 'working tree'})")

    script = out / INSTALL_SCRIPT
    script.write_text(install_script(python_version, platforms[0]))
    script.chmod(0o755)
    target = {"python_version": python_version, "abi": abi_tag(python_version), "platforms": platforms,
              "platform_tags": expand_platforms(platforms)}
    manifest = build_manifest(out, target=target, extra={
        "source_commit": _resolve(source_root, git_ref) if git_ref else git_commit(source_root),
        "requirements": reqs,
        "built_from_source": built,
        "build_seconds": round(time.time() - start, 1),
    })
    write_manifest(out, manifest)
    _log(f"bundle ready: {out} ({manifest['total_bytes'] / 1e9:.2f} GB, {manifest['counts'].get('wheel', 0)} wheels, "
         f"{time.time() - start:.0f} s); install offline with: bash {out / INSTALL_SCRIPT}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    p = argparse.ArgumentParser(prog="python -m d2ct.bundle", description=__doc__.split("\n\n")[0],
                                epilog="Install on the offline machine: bash DIR/install.sh [VENV]")
    p.add_argument("--out", type=Path, help="bundle folder to create or update")
    p.add_argument("--python-version", default=here, help=f"target Python, X.Y (default {here}: this one)")
    p.add_argument("--platform", action="append", dest="platforms", metavar="TAG",
                   help=f"target wheel platform tag, repeatable (default {DEFAULT_PLATFORM}; "
                        "manylinux_2_N includes older manylinux tags)")
    p.add_argument("--pip-python", default=sys.executable,
                   help="Python whose pip downloads (default: this one; it needs torch only to fetch the "
                        "Detectron2 sdist when no cached copy exists)")
    p.add_argument("--detectron2-sdist", type=Path, help=f"a downloaded {SDIST_FILENAME} to use (sha256 checked)")
    p.add_argument("--git-ref", metavar="REF",
                   help="bundle the source tree of this commit (e.g. HEAD) instead of the working tree "
                        "(tracked files plus untracked, not ignored ones)")
    p.add_argument("--verify", type=Path, metavar="DIR", help="check an existing bundle against its manifest and exit")
    args = p.parse_args(argv)
    try:
        if args.verify:
            problems = verify_bundle(args.verify)
            for problem in problems:
                print(f"[d2ct bundle] {problem}", file=sys.stderr)
            if problems:
                print(f"[d2ct bundle] {args.verify}: {len(problems)} problem(s)", file=sys.stderr)
                return 1
            _log(f"{args.verify}: every file matches the manifest")
            return 0
        if not args.out:
            p.error("--out DIR is required (or --verify DIR)")
        if not re.fullmatch(r"3\.\d+", args.python_version):
            p.error(f"--python-version must look like 3.11, got {args.python_version!r}")
        build_bundle(args.out, python_version=args.python_version, platforms=args.platforms or [DEFAULT_PLATFORM],
                     pip_python=args.pip_python, detectron2_sdist=args.detectron2_sdist, git_ref=args.git_ref)
    except (BundleError, InstallError) as e:
        print(f"[d2ct bundle] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
