"""The commands: each tool's main lives in a d2ct module, declared as a console script in setup.py,
runnable as `python -m <module>`, with tools/<name>.py a thin shim of it; and an installed
(non-editable) d2ct runs the pipeline from any folder (slow)."""
from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .conftest import ROOT, TINY_OPTS, default_sigint

SETUP = ROOT / "setup.py"
TOOLS_DIR = ROOT / "tools"


def console_scripts() -> dict[str, str]:
    """script name -> module, as setup.py declares them (every one ends in ``:main``)."""
    scripts = {}
    for name, target in re.findall(r'"(d2ct-[a-z0-9-]+) = ([\w.:]+)"', SETUP.read_text()):
        module, _, func = target.partition(":")
        assert func == "main", f"{name}: {target} (the tools' entry is main)"
        scripts[name] = module
    return scripts


def shim_module(path: Path) -> str:
    """The module a tools/ shim takes main from; the shim must be nothing more than that."""
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{path}: no docstring (docker/entrypoint.sh lists its first line)"
    # docstring, import sys, from <module> import main, if __name__ == "__main__": sys.exit(main())
    assert len(tree.body) == 4, f"{path}: not a thin shim"
    imports = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert len(imports) == 1 and [a.name for a in imports[0].names] == ["main"], f"{path}: not a thin shim"
    return imports[0].module


def test_every_tool_is_a_shim_of_a_console_script():
    scripts = console_scripts()
    tools = {p.stem: shim_module(p) for p in sorted(TOOLS_DIR.glob("*.py"))}
    assert len(tools) == 11 and sorted(tools.values()) == sorted(scripts.values())
    assert {"d2ct-train", "d2ct-pseudolabel", "d2ct-predict", "d2ct-evaluate", "d2ct-pipeline"} <= set(scripts)
    for path in TOOLS_DIR.glob("*.py"):
        assert os.access(path, os.X_OK) and path.read_text().startswith("#!/usr/bin/env python\n")


def test_nothing_imports_the_tools_folder():
    """Detectron2's sdist can install a stray top-level `tools` package: d2ct must never need one."""
    for folder in ("d2ct", "tests", "bench", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    assert node.module.split(".")[0] != "tools", f"{path}: imports {node.module}"
                if isinstance(node, ast.Import):
                    assert all(a.name.split(".")[0] != "tools" for a in node.names), f"{path}: imports tools"


@pytest.mark.parametrize("script", sorted(console_scripts()))
def test_help_of_every_command(script, capsys):
    """--help of each main (in-process) exits 0; the examples in the module's docstring (the
    --help epilog of most) show the console script, the tools/ form and the module."""
    module = importlib.import_module(console_scripts()[script])
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")
    tool = next(p.stem for p in TOOLS_DIR.glob("*.py") if shim_module(p) == module.__name__)
    assert re.search(rf"^\s+{script} ", module.__doc__, re.M), f"no example line starts with {script}"
    for form in (f"python tools/{tool}.py", f"python -m {module.__name__}"):
        assert form in module.__doc__, form


def test_python_m_shim_and_console_script_agree(tmp_path):
    """The same help three ways, from a folder outside the project; only the usage line's program
    name differs (python -m shows the module, not cli.py)."""
    bin_dir = Path(sysconfig.get_path("scripts"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    runs = {
        "module": [sys.executable, "-m", "d2ct.pipeline.cli", "--help"],
        "shim": [sys.executable, str(TOOLS_DIR / "run_pipeline.py"), "--help"],
    }
    if (bin_dir / "d2ct-pipeline").exists():  # installed by setup.py's console_scripts
        runs["script"] = [str(bin_dir / "d2ct-pipeline"), "--help"]
    outs = {}
    for kind, cmd in runs.items():
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[kind] = proc.stdout
    assert outs["module"].startswith("usage: python -m d2ct.pipeline.cli ")
    assert outs["shim"].startswith("usage: run_pipeline.py ")
    if "script" in outs:
        assert outs["script"].startswith("usage: d2ct-pipeline ")
    # after the usage lines (wrapped by the program name's length), the text is the same
    assert len({out.split("\n\n", 1)[1] for out in outs.values()}) == 1


# ----------------------------------------------------------------------------------------------
# run_cli: the one way the commands end
# ----------------------------------------------------------------------------------------------
def test_run_cli_statuses(capsys):
    from d2ct.errors import ConfigError, DataError
    from d2ct.utils.cli import run_cli

    assert run_cli(lambda: None) == 0 and run_cli(lambda: 3) == 3 and run_cli(lambda: {"AP": 1.0}) == 0
    assert run_cli(lambda x, y=0: x + y, 1, y=4) == 5

    def bad_input():
        print("partial output")
        raise DataError("labels.csv: column 'x' has no image")

    assert run_cli(bad_input) == 2
    out, err = capsys.readouterr()
    assert out == "partial output\n" and err == "error: labels.csv: column 'x' has no image\n"

    def interrupted():
        raise KeyboardInterrupt

    assert run_cli(interrupted) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: no partial file") and err.count("\n") == 1
    assert run_cli(lambda: (_ for _ in ()).throw(ConfigError("--x: bad"))) == 2
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(lambda: 1 / 0)


def _python_snippet(code: str, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                            preexec_fn=default_sigint, **kwargs)


def test_run_cli_ctrl_c_and_closed_pipe_in_a_real_process():
    import signal

    # Ctrl-C while the command works: one line, status 130, no traceback
    proc = _python_snippet("import sys, time\nfrom d2ct.utils.cli import run_cli\n"
                           "def body():\n    print('ready', flush=True)\n    time.sleep(60)\n"
                           "sys.exit(run_cli(body))", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.startswith("interrupted:") and err.count("\n") == 1
    # the reader goes away (d2ct-evaluate ... | head -1): quiet, status 141
    read_end, write_end = os.pipe()
    proc = _python_snippet("import sys\nfrom d2ct.utils.cli import run_cli\n"
                           "def body():\n    for i in range(10 ** 6):\n        print('row', i)\n"
                           "sys.exit(run_cli(body))", stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        assert reader.readline() == "row 0\n"
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and err == ""


def test_worker_pools_inside_a_command_end_quietly():
    """A Pool's workers forked inside run_cli inherit its SIGTERM handler; the SIGTERM of
    Pool.terminate() (the end of every ``with Pool``) raised KeyboardInterrupt in idle workers and
    printed a traceback per worker on about one run in four (seen in every pipeline's baseline
    stage). init_pool_worker restores the default in the workers: no traceback in eight runs."""
    code = ("import sys, time, multiprocessing as mp\nfrom d2ct.utils.cli import run_cli, init_pool_worker\n"
            "def work(x):\n    time.sleep(0.02)\n    return x\n"
            "def body():\n    with mp.get_context('fork').Pool(2, initializer=init_pool_worker) as pool:\n"
            "        assert list(pool.imap(work, range(20))) == list(range(20))\n"
            "sys.exit(run_cli(body))")
    for _ in range(8):
        proc = _python_snippet(code, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in err, err
    # the pool's own initializer still runs, with its arguments
    code = ("import multiprocessing as mp\nfrom d2ct.utils.cli import init_pool_worker\nSEEN = []\n"
            "def remember(*a):\n    SEEN.extend(a)\n"
            "def seen(_):\n    return SEEN\n"
            "with mp.get_context('fork').Pool(1, initializer=init_pool_worker, initargs=(remember, (1, 2))) as p:\n"
            "    print(p.map(seen, [0]))")
    proc = _python_snippet(code, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out == "[[1, 2]]\n", err


def test_bad_input_through_a_shim_and_python_m(tmp_path):
    """The same one-line error and status 2 through tools/evaluate.py and python -m."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for cmd in ([sys.executable, str(TOOLS_DIR / "evaluate.py")], [sys.executable, "-m", "d2ct.evaluation.cli"]):
        proc = subprocess.run([*cmd, "--truth", "missing.csv", "--pred", "missing.csv"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and proc.stderr == "error: missing.csv: labels CSV not found\n", proc.stderr


# ----------------------------------------------------------------------------------------------
# a non-editable install, in a fresh virtual environment, run from a folder outside the project
# ----------------------------------------------------------------------------------------------
TINY_PIPELINE = [
    "data.phantom={n_train: 14, n_labelled: 6, n_test: 3, size: 96, seed: 1}",
    "radiologists.0.threshold=0.0", "radiologists.1.threshold=0.0", "radiologists.2.threshold=0.0",
    "pseudolabel.min_area=1", "baseline.workers=1",
    "opts=[" + ", ".join(f"'{o}'" for o in TINY_OPTS + ["TEST.EVAL_PERIOD", "2"]) + "]",
]


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory) -> Path:
    """A venv with d2ct installed from a built wheel (not editable). Its other dependencies come
    from this environment's site-packages, added as a plain path (a .pth line): the .pth files
    there, among them the editable d2ct's, are not run, so only the new copy of d2ct is importable."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "zz_d2ct_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # a copy of the source: building must not leave build/ or *.egg-info in the project
    src = venv.parent / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "output", "build", "*.egg-info",
                                                              "__pycache__", ".pytest_cache", "datasets"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                    "--no-build-isolation", "--no-index", "--quiet", str(src)],
                   check=True, capture_output=True, text=True, timeout=600)
    shutil.rmtree(src)
    return venv


def _run(venv: Path, cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_installed_d2ct_runs_the_pipeline_outside_the_project(installed_venv, tmp_path):
    work = tmp_path / "work"  # the user's folder: their own configs, no d2ct source, no tools/
    shutil.copytree(ROOT / "configs", work / "configs")
    where = _run(installed_venv, [str(installed_venv / "bin/python"), "-c", "import d2ct; print(d2ct.__file__)"], work)
    assert Path(where.stdout.strip()).is_relative_to(installed_venv), where.stdout  # not the project's copy
    help_ = _run(installed_venv, ["d2ct-pipeline", "--help"], work)
    assert help_.stdout.startswith("usage: d2ct-pipeline") and "d2ct-pipeline --config" in help_.stdout
    out = Path("run")  # relative: to the folder the command is typed in
    proc = _run(installed_venv, ["d2ct-pipeline", "--config", "configs/demo/pipeline.yaml", "--set",
                                 f"output_dir={out}", f"data.root={out}/data/phantom", *TINY_PIPELINE],
                work, timeout=1800)
    assert "| model | ARI (all pixels)" in proc.stdout
    run = work / out
    assert (run / "stages" / "report.json").exists() and (run / "submission.csv").exists()
    # every tool stage went through python -m with the venv's Python, in the user's folder
    logs = {p.name: p.read_text() for p in (run / "logs").glob("*.log")}
    py = str(installed_venv / "bin" / "python")
    for log, module in (("r50.log", "d2ct.engine.train_net"), ("student_r1.log", "d2ct.engine.train_net"),
                        ("pseudolabels_r1.log", "d2ct.pseudolabel.cli"), ("predict_student_r1.log", "d2ct.engine.predict")):
        assert f"$ {py} -m {module} " in logs[log], log
    assert f"OUTPUT_DIR {out}/radiologists/r50" in logs["r50.log"]
    assert not (ROOT / out).exists()
