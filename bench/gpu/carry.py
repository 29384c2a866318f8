#!/usr/bin/env python3
"""The carry folder for a GPU machine that has PyTorch but no network (bench/gpu/README.md).

Standard library only (plus d2ct.installer / d2ct.bundle, which are too): it runs here with any
Python 3 to build the folder, and there with the machine's own python3 to plan the install.

Layout of a carry folder:
  manifest.json   target Python and platform, every file with its size and sha256, the wheel groups
  wheels/         always installed there (--target, no deps, no index): what the machine lacks
  fallback/       installed there only when the module is missing (believed present on the machine)
  data/           the OpenKBP patient hold-out set for the short real run (never committed)

Subcommands (python3 bench/gpu/carry.py CMD --help):
  fetch     download the wheels (no deps, --only-binary for the target; source-only packages are
            built here into pure-Python wheels) and check that every requirement is covered
  detectron2  build the patched Detectron2 (d2ct.installer) into a pure-Python wheel
  manifest  write manifest.json, print the size; fails when over --max-mib
  check     sizes and files against manifest.json, and the size limit (no writes)
  plan      on the target: does this Python fit the carry? prints the wheels to install
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from d2ct.installer import PINNED_REQUIREMENTS, _requirement_lines, sha256_of  # noqa: E402

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
DEFAULT_MAX_MIB = 60.0
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"

# (requirement name, module it provides). Versions come from requirements/pinned.txt when pinned
# there, else from EXTRA_PINS.
# Always installed: not on the GPU machine's image (KINDS.md, package list of 2026-11-17).
NEEDED = [
    ("pycocotools", "pycocotools"),
    ("fvcore", "fvcore"),
    ("iopath", "iopath"),
    ("yacs", "yacs"),
    ("omegaconf", "omegaconf"),
    ("hydra-core", "hydra"),
    ("antlr4-python3-runtime", "antlr4"),
    ("termcolor", "termcolor"),
    ("nibabel", "nibabel"),
    ("pydicom", "pydicom"),
]
# Installed only when missing: listed on the image, small, but a fresh image could lack one.
# setuptools: Detectron2 0.6's model_zoo imports pkg_resources, which setuptools >= 81 dropped.
FALLBACK = [
    ("pyyaml", "yaml"),
    ("tabulate", "tabulate"),
    ("tqdm", "tqdm"),
    ("cloudpickle", "cloudpickle"),
    ("portalocker", "portalocker"),
    ("packaging", "packaging"),
    ("typing-extensions", "typing_extensions"),
    ("psutil", "psutil"),
    ("setuptools", "pkg_resources"),
]
EXTRA_PINS = {
    "antlr4-python3-runtime": "4.9.3",  # omegaconf 2.3 wants 4.9.*
    "portalocker": "3.2.0",
    "packaging": "25.0",
    "typing-extensions": "4.15.0",
}
# On the machine, never carried (too large, or tied to its CUDA build): the install stops at once,
# naming the module, when one is missing. (module, distribution, minimum version or None)
PRESENT = [
    ("torch", "torch", "2.1"),
    ("torchvision", "torchvision", None),
    ("numpy", "numpy", "1.24"),
    ("PIL", "pillow", None),
    ("scipy", "scipy", None),
    ("matplotlib", "matplotlib", None),
    ("pandas", "pandas", None),
    ("cv2", "opencv-python-headless", None),
    ("sklearn", "scikit-learn", None),
    ("skimage", "scikit-image", None),
    ("tensorboard", "tensorboard", None),
]
# Distributions the machine has (KINDS.md list), used to check that carried wheels' requirements
# are all covered; canonical names.
DEVICE_HAS = {
    "torch", "torchvision", "numpy", "pillow", "scipy", "matplotlib", "pandas", "pyarrow", "opencv-python-headless",
    "scikit-learn", "scikit-image", "tensorboard", "tqdm", "tabulate", "cloudpickle", "pyyaml", "portalocker",
    "psutil", "packaging", "typing-extensions", "setuptools", "filelock", "fsspec", "jinja2", "sympy", "networkx",
    "importlib-metadata", "zipp", "requests", "six", "python-dateutil", "pyparsing", "cycler", "kiwisolver",
    "fonttools", "contourpy", "protobuf", "grpcio", "werkzeug", "markdown", "absl-py",
}


def _log(msg: str) -> None:
    print(f"[carry] {msg}", flush=True)


class CarryError(RuntimeError):
    pass


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_requirement(name: str, pins: dict[str, str] | None = None) -> str:
    """``name==version`` from requirements/pinned.txt, else EXTRA_PINS, else the bare name."""
    if pins is None:
        pins = {}
        for line in _requirement_lines(PINNED_REQUIREMENTS):
            m = re.match(r"^([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)", line)
            if m:
                pins[canonical(m.group(1))] = m.group(2)
    version = pins.get(canonical(name)) or EXTRA_PINS.get(name)
    return f"{name}=={version}" if version else name


def wheel_name(filename: str) -> str:
    """Canonical distribution name of a wheel file name."""
    return canonical(filename.split("-")[0])


# ----------------------------------------------------------------------------------------------
# here: building the folder
# ----------------------------------------------------------------------------------------------
def fetch(dest: Path, python_version: str, platform: str, build_python: str, group: list[tuple[str, str]]) -> list[Path]:
    """One wheel per requirement of ``group`` into ``dest``, no dependencies: a binary wheel for the
    target, or (source-only packages such as fvcore) a pure-Python wheel built here."""
    from d2ct.bundle import _run_pip, abi_tag, build_pure_wheel, expand_platforms

    dest.mkdir(parents=True, exist_ok=True)
    target = ["--python-version", python_version, "--implementation", "cp", "--abi", abi_tag(python_version),
              "--abi", "abi3", "--abi", "none"]
    for plat in expand_platforms([platform]):
        target += ["--platform", plat]
    got = []
    for name, _module in group:
        req = pinned_requirement(name)
        have = [p for p in dest.glob("*.whl") if wheel_name(p.name) == canonical(name)]
        if have:
            got.append(have[0])
            continue
        with tempfile.TemporaryDirectory(prefix="carry-") as tmp:
            code, out = _run_pip(build_python, ["download", "-q", "--no-deps", "--only-binary=:all:", *target,
                                                "-d", tmp, req])
            wheels = sorted(Path(tmp).glob("*.whl"))
            if code == 0 and len(wheels) == 1:
                shutil.move(str(wheels[0]), dest / wheels[0].name)
                got.append(dest / wheels[0].name)
                continue
            if "No matching distribution" not in out:
                raise CarryError(f"pip download {req} failed (exit {code})")
        _log(f"{req}: no wheel for the target, building a pure-Python wheel")
        got.append(build_pure_wheel(build_python, req, dest))
    return got


def wheel_requirements(wheel: Path) -> list[str]:
    """Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def uncovered_requirements(wheels: list[Path], python_version: str, also_present: set[str] = frozenset()) -> list[str]:
    """Requirements of ``wheels`` (for the target Python, extras left out) that are neither carried
    nor on the machine (DEVICE_HAS)."""
    try:
        from pip._vendor.packaging.requirements import Requirement
    except ImportError:  # pip without its vendored packaging: skip the marker evaluation
        Requirement = None
    carried = {wheel_name(w.name) for w in wheels} | {canonical(n) for n in also_present}
    env = {"python_version": python_version, "python_full_version": python_version + ".0", "extra": "",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}
    missing = []
    for w in wheels:
        for line in wheel_requirements(w):
            if Requirement is not None:
                req = Requirement(line)
                if req.marker is not None and not req.marker.evaluate(env):
                    continue
                name = canonical(req.name)
            else:
                if "extra ==" in line:
                    continue
                name = canonical(re.split(r"[\s<>=!~;\[(]", line, maxsplit=1)[0])
            if name not in carried and name not in DEVICE_HAS:
                missing.append(f"{wheel_name(w.name)} needs {line}")
    return missing


def build_detectron2_wheel(dest: Path, build_python: str, sdist: Path | None = None) -> Path:
    """The pb1-detectron2 sdist, patched by d2ct.installer, built into a pure-Python wheel."""
    from d2ct.bundle import locate_detectron2_sdist
    from d2ct.installer import prepare_detectron2_source

    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("detectron2-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="carry-d2-") as tmp:
        sdist = locate_detectron2_sdist(sdist, build_python, Path(tmp) / "sdist")
        src = prepare_detectron2_source(sdist, Path(tmp) / "src")
        # setup.py imports torch and (setuptools < 81) pkg_resources: the build Python needs both.
        proc = subprocess.run([build_python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                               "-w", str(Path(tmp) / "out"), str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise CarryError(f"building the Detectron2 wheel with {build_python} failed (it needs torch and "
                             f"setuptools<81, e.g. the project's .venv/bin/python):\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        built = sorted((Path(tmp) / "out").glob("*.whl"))
        if len(built) != 1 or not built[0].name.endswith("-none-any.whl"):
            raise CarryError(f"expected one pure-Python Detectron2 wheel, got {[b.name for b in built]}")
        target = dest / built[0].name
        shutil.move(str(built[0]), target)
    return target


def dir_files(carry: Path) -> list[Path]:
    return sorted(p for p in carry.rglob("*") if p.is_file() and p.name != MANIFEST)


def build_manifest(carry: Path, *, python_version: str, platform: str, max_mib: float, extra: dict | None = None) -> dict:
    files = []
    for p in dir_files(carry):
        rel = p.relative_to(carry).as_posix()
        files.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_of(p)})
    modules = dict(NEEDED + FALLBACK)
    groups = {}
    for sub in ("wheels", "fallback"):
        groups[sub] = {}
        for p in sorted((carry / sub).glob("*.whl")):
            name = wheel_name(p.name)
            mod = next((m for n, m in modules.items() if canonical(n) == name), name.replace("-", "_"))
            groups[sub][p.name] = mod
    total = sum(f["size"] for f in files)
    return {"format": MANIFEST_FORMAT, "python_version": python_version, "platform": platform,
            "max_mib": max_mib, "total_bytes": total, "total_mib": round(total / 2**20, 2),
            "wheels": groups["wheels"], "fallback": groups["fallback"],
            "present_required": [m for m, _, _ in PRESENT], **(extra or {}), "files": files}


def check(carry: Path, max_mib: float | None = None, hashes: bool = False) -> list[str]:
    """Problems with ``carry``: manifest missing, files missing / resized / unlisted, over the size."""
    path = carry / MANIFEST
    if not path.is_file():
        return [f"{path}: no manifest (run bench/gpu/prepare_carry.sh)"]
    manifest = json.loads(path.read_text())
    problems = []
    listed = {f["path"]: f for f in manifest.get("files", [])}
    for rel, f in listed.items():
        p = carry / rel
        if not p.is_file():
            problems.append(f"missing: {rel}")
        elif p.stat().st_size != f["size"]:
            problems.append(f"size differs: {rel}")
        elif hashes and sha256_of(p) != f["sha256"]:
            problems.append(f"sha256 differs: {rel}")
    for p in dir_files(carry):
        rel = p.relative_to(carry).as_posix()
        if rel not in listed:
            problems.append(f"not in the manifest: {rel}")
    limit = max_mib if max_mib is not None else manifest.get("max_mib", DEFAULT_MAX_MIB)
    total = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    if total > limit * 2**20:
        problems.append(f"{carry}: {total / 2**20:.1f} MiB, over the {limit:g} MiB limit")
    return problems


# ----------------------------------------------------------------------------------------------
# there: does this Python fit, and what to install
# ----------------------------------------------------------------------------------------------
def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def plan(carry: Path) -> tuple[list[str], list[str], dict]:
    """(problems, wheel paths to install, facts) for this Python and ``carry``."""
    from importlib import metadata

    problems: list[str] = []
    path = carry / MANIFEST
    if not path.is_file():
        return [f"{path}: no manifest; build the carry with bench/gpu/prepare_carry.sh"], [], {}
    manifest = json.loads(path.read_text())
    have = "%d.%d" % sys.version_info[:2]
    facts = {"python": sys.version.split()[0], "python_executable": sys.executable,
             "carry_python": manifest["python_version"]}
    if have != manifest["python_version"]:
        problems.append(f"the carry holds wheels for Python {manifest['python_version']} but {sys.executable} is "
                        f"Python {have}: rebuild it with bench/gpu/prepare_carry.sh --python-version {have}")
    for module, dist, minimum in PRESENT:
        if importlib.util.find_spec(module) is None:
            problems.append(f"{module} ({dist}) is not installed here and is not carried (too large or tied to "
                            "the machine's CUDA build)")
            continue
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "?"
        facts[dist] = version
        if minimum and version != "?" and _version_tuple(version) < _version_tuple(minimum):
            problems.append(f"{dist} {version} is older than the {minimum} d2ct needs")
    todo = [str(carry / "wheels" / w) for w in manifest["wheels"]]
    for w, module in manifest["fallback"].items():
        if module == "pkg_resources":
            # importable is not enough: setuptools >= 81 removed it; ask in a child to keep this process clean
            ok = subprocess.run([sys.executable, "-c", "import pkg_resources"], capture_output=True).returncode == 0
        else:
            ok = importlib.util.find_spec(module) is not None
        if not ok:
            todo.append(str(carry / "fallback" / w))
    facts["fallback_installed"] = [Path(t).name for t in todo if "/fallback/" in t]
    return problems, todo, facts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download / build the wheels into CARRY/wheels and CARRY/fallback")
    f.add_argument("carry", type=Path)
    f.add_argument("--python-version", default="3.12")
    f.add_argument("--platform", default=DEFAULT_PLATFORM)
    f.add_argument("--build-python", default=sys.executable, help="Python whose pip downloads and builds")
    d = sub.add_parser("detectron2", help="patched Detectron2 wheel into CARRY/wheels")
    d.add_argument("carry", type=Path)
    d.add_argument("--build-python", required=True, help="a Python with torch and setuptools<81 (.venv/bin/python)")
    d.add_argument("--sdist", type=Path, default=None)
    m = sub.add_parser("manifest", help="write CARRY/manifest.json and print the size")
    m.add_argument("carry", type=Path)
    m.add_argument("--python-version", default="3.12")
    m.add_argument("--platform", default=DEFAULT_PLATFORM)
    m.add_argument("--max-mib", type=float, default=DEFAULT_MAX_MIB)
    m.add_argument("--note", action="append", default=[], metavar="KEY=VALUE")
    c = sub.add_parser("check", help="files and size against manifest.json")
    c.add_argument("carry", type=Path)
    c.add_argument("--max-mib", type=float, default=None)
    c.add_argument("--hashes", action="store_true")
    pl = sub.add_parser("plan", help="on the target: fit check, then the wheels to install (one per line)")
    pl.add_argument("carry", type=Path)
    pl.add_argument("--facts", type=Path, help="also write what was found here as JSON")
    args = p.parse_args(argv)
    try:
        if args.cmd == "fetch":
            needed = fetch(args.carry / "wheels", args.python_version, args.platform, args.build_python, NEEDED)
            fallback = fetch(args.carry / "fallback", args.python_version, args.platform, args.build_python, FALLBACK)
            missing = uncovered_requirements(needed + fallback, args.python_version, also_present={"detectron2"})
            if missing:
                raise CarryError("requirements neither carried nor on the GPU machine:\n  " + "\n  ".join(missing))
        elif args.cmd == "detectron2":
            print(build_detectron2_wheel(args.carry / "wheels", args.build_python, args.sdist))
        elif args.cmd == "manifest":
            notes = dict(n.split("=", 1) for n in args.note)
            manifest = build_manifest(args.carry, python_version=args.python_version, platform=args.platform,
                                      max_mib=args.max_mib, extra={"notes": notes} if notes else None)
            tmp = args.carry / (MANIFEST + ".tmp")
            tmp.write_text(json.dumps(manifest, indent=1) + "\n")
            os.replace(tmp, args.carry / MANIFEST)
            print(f"carry {args.carry}: {len(manifest['files'])} files, {manifest['total_mib']:.2f} MiB "
                  f"(limit {args.max_mib:g} MiB), for Python {args.python_version} {args.platform}")
            problems = check(args.carry, args.max_mib)
            if problems:
                raise CarryError("; ".join(problems))
        elif args.cmd == "check":
            problems = check(args.carry, args.max_mib, hashes=args.hashes)
            if problems:
                raise CarryError("; ".join(problems))
            total = sum(p.stat().st_size for p in args.carry.rglob("*") if p.is_file())
            print(f"carry {args.carry}: OK, {total / 2**20:.2f} MiB")
        elif args.cmd == "plan":
            problems, todo, facts = plan(args.carry)
            if args.facts:
                args.facts.write_text(json.dumps({"problems": problems, "install": todo, **facts}, indent=1) + "\n")
            if problems:
                raise CarryError("this machine does not fit the carry:\n  " + "\n  ".join(problems))
            print("\n".join(todo))
    except CarryError as e:
        print(f"[carry] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
