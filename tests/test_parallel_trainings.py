"""parallel_trainings: trainings that do not wait for each other run N at a time, each with its share
of the CPU threads (or its own GPUs); a failure lets the others finish; an interruption stops them.
The jobs here are a stand-in tool (a few lines of Python that sleep and record what they saw), so the
scheduling is tested in seconds; the real trainings run two at a time in tests/test_pipeline.py."""
from __future__ import annotations

import json
import logging
import os
import textwrap
import time

import pytest

from d2ct.errors import ConfigError
from d2ct.pipeline import runner
from d2ct.pipeline.config import load_pipeline_config
from d2ct.pipeline.runner import Pipeline, StageError, training_slots

FAKE_TOOL = textwrap.dedent('''
    import json, os, sys, time
    out, seconds, code = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    start = time.time()
    with open(out + ".pid", "w") as f:
        f.write(str(os.getpid()))
    share = os.environ.get("D2CT_THREADS_FILE")
    first = open(share).read().strip() if share else None
    time.sleep(seconds)
    with open(out, "w") as f:
        json.dump({"start": start, "end": time.time(), "omp": os.environ.get("OMP_NUM_THREADS"),
                   "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "share_first": first,
                   "share_last": open(share).read().strip() if share else None}, f)
    sys.exit(code)
''')


def test_slots_share_the_threads_and_give_each_training_its_own_gpus():
    assert [s["OMP_NUM_THREADS"] for s in training_slots(3, 1, 2, [])] == ["1", "1", "1"]
    assert [s["OMP_NUM_THREADS"] for s in training_slots(2, 1, 8, [])] == ["4", "4"]
    assert all("CUDA_VISIBLE_DEVICES" not in s for s in training_slots(2, 1, 8, []))
    gpu = training_slots(2, 2, 16, ["0", "1", "2", "3"])
    assert [s["CUDA_VISIBLE_DEVICES"] for s in gpu] == ["0,1", "2,3"]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in training_slots(3, 1, 6, ["4", "6", "7"])] == ["4", "6", "7"]
    # too few GPUs for all at once: as many as fit, each with its share of the threads
    assert [(s["CUDA_VISIBLE_DEVICES"], s["OMP_NUM_THREADS"]) for s in training_slots(3, 2, 16, ["0", "1", "2", "3"])] \
        == [("0,1", "8"), ("2,3", "8")]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in training_slots(3, 2, 16, ["0", "1", "2"])] == ["0,1"]
    with pytest.raises(StageError, match=r"num_gpus 3: this host shows 2 GPU\(s\) \(0,1\): lower num_gpus"):
        training_slots(3, 3, 16, ["0", "1"])


def test_parallel_trainings_is_checked():
    assert load_pipeline_config("configs/demo/pipeline.yaml")["parallel_trainings"] == 1
    assert load_pipeline_config("configs/demo/pipeline.yaml", ["parallel_trainings=3"])["parallel_trainings"] == 3
    for bad in ("0", "two", "1.5", "true"):
        with pytest.raises(ConfigError, match="parallel_trainings must be a whole number of at least 1"):
            load_pipeline_config("configs/demo/pipeline.yaml", [f"parallel_trainings={bad}"])
    with pytest.raises(ConfigError, match="rebalance_threads must be true or false"):
        load_pipeline_config("configs/demo/pipeline.yaml", ["rebalance_threads=3"])


@pytest.fixture()
def fake_pipeline(tmp_path, monkeypatch):
    """pipeline(n) -> a Pipeline whose 'fake.py' tool is FAKE_TOOL, parallel_trainings=n, 2 threads."""
    (tmp_path / "fake_tool.py").write_text(FAKE_TOOL)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setitem(runner.TOOLS, "fake.py", "fake_tool")
    monkeypatch.setattr(runner, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(runner, "visible_gpus", lambda: [])

    def make(n: int, *overrides: str) -> Pipeline:
        return Pipeline(load_pipeline_config("configs/demo/pipeline.yaml",
                                             [f"output_dir={tmp_path / 'run'}", f"parallel_trainings={n}", *overrides]))

    make.out = tmp_path / "out"
    make.out.mkdir()
    return make


def job(out, name: str, seconds: float, code: int = 0):
    return ("fake.py", [out / name, seconds, code], name)


def test_jobs_run_n_at_a_time_with_their_share_of_the_threads(fake_pipeline):
    pipe, out = fake_pipeline(2), fake_pipeline.out
    pipe._run_tools_at_once([job(out, "a", 1.0), job(out, "b", 1.0), job(out, "c", 0.2)])
    runs = {n: json.loads((out / n).read_text()) for n in "abc"}
    assert {r["omp"] for r in runs.values()} == {"1"}  # 2 threads, 2 at a time
    assert runs["a"]["start"] < runs["b"]["end"] and runs["b"]["start"] < runs["a"]["end"]  # a and b together
    assert runs["c"]["start"] >= min(runs["a"]["end"], runs["b"]["end"]) - 0.05  # c waited for a free slot
    for name in "abc":  # each job's own log, with the command and its environment
        assert "OMP_NUM_THREADS=1" in (pipe.out / "logs" / f"{name}.log").read_text()


def test_threads_freed_by_a_finished_job_go_to_the_one_still_running(fake_pipeline):
    pipe, out = fake_pipeline(2, "rebalance_threads=true"), fake_pipeline.out
    pipe._run_tools_at_once([job(out, "short", 0.2), job(out, "long", 1.5)])
    runs = {n: json.loads((out / n).read_text()) for n in ("short", "long")}
    assert runs["short"]["share_first"] == runs["short"]["share_last"] == "1"
    assert runs["long"]["share_first"] == "1" and runs["long"]["share_last"] == "2"  # alone: both threads
    assert (pipe.out / "logs" / "long.threads").read_text() == "2\n"


def test_threads_stay_fixed_unless_rebalancing_is_asked_for(fake_pipeline):
    pipe, out = fake_pipeline(2), fake_pipeline.out  # rebalance_threads false: reproducible models
    pipe._run_tools_at_once([job(out, "short", 0.1), job(out, "long", 0.5)])
    assert json.loads((out / "long").read_text())["share_last"] is None
    assert not (pipe.out / "logs" / "long.threads").exists()


def test_a_training_follows_its_threads_file(tmp_path, caplog):
    import torch

    from d2ct.engine.trainer import ThreadShare

    share, before = tmp_path / "r50.threads", torch.get_num_threads()
    hook = ThreadShare(str(share))
    try:
        hook.before_step()  # no file yet: nothing changes
        assert torch.get_num_threads() == before
        share.write_text(f"{before + 1}\n")
        with caplog.at_level(logging.INFO, logger="d2ct.engine.trainer"):
            hook.before_step()
        assert torch.get_num_threads() == before + 1 and f"CPU threads: {before} -> {before + 1}" in caplog.text
        share.write_text("two\n")
        os.utime(share, ns=(time.time_ns() + 10**9,) * 2)  # a new stamp even on a coarse clock
        hook.before_step()  # not a number: ignored
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_too_few_gpus_run_the_jobs_fewer_at_a_time(fake_pipeline, monkeypatch, caplog):
    pipe, out = fake_pipeline(3), fake_pipeline.out  # the demo config: num_gpus 1
    monkeypatch.setattr(runner, "visible_gpus", lambda: ["5"])
    with caplog.at_level(logging.WARNING, logger="d2ct.pipeline"):
        pipe._run_tools_at_once([job(out, "a", 0.3), job(out, "b", 0.3)])
    runs = [json.loads((out / n).read_text()) for n in "ab"]
    assert [r["cuda"] for r in runs] == ["5", "5"] and runs[1]["start"] >= runs[0]["end"] - 0.05  # one after another
    assert "parallel_trainings 3: only 1 at a time fit on this host's 1 GPU(s) at num_gpus 1" in caplog.text


def test_a_failed_job_lets_the_others_finish_and_is_named(fake_pipeline):
    pipe, out = fake_pipeline(2), fake_pipeline.out
    with pytest.raises(StageError, match=r"fake.py failed \(exit 3\); log: .*bad.log"):
        pipe._run_tools_at_once([job(out, "bad", 0.1, code=3), job(out, "slow", 1.0), job(out, "next", 0.1)])
    assert (out / "slow").exists() and (out / "next").exists()  # started and finished after the failure


def test_an_interruption_stops_every_running_job(fake_pipeline, monkeypatch):
    pipe, out = fake_pipeline(2), fake_pipeline.out
    sleeps, real_sleep = [], time.sleep

    def interrupt(seconds):
        sleeps.append(seconds)
        real_sleep(0.5)  # both jobs have started by then
        if len(sleeps) >= 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.time, "sleep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pipe._run_tools_at_once([job(out, "a", 60), job(out, "b", 60), job(out, "c", 60)])
    pids = [int((out / f"{n}.pid").read_text()) for n in "ab"]
    for pid in pids:  # gone, not left running in the background
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (out / "c.pid").exists()  # never started


def test_radiologists_and_the_control_go_through_the_scheduler(tmp_path, monkeypatch):
    """parallel_trainings > 1: the radiologist stage hands its trainings to the scheduler together;
    already-trained models are left out; with 1 they are trained one by one as before."""
    pipe = Pipeline(load_pipeline_config("configs/demo/pipeline.yaml",
                                         [f"output_dir={tmp_path / 'run'}", "parallel_trainings=3"]))
    claimed = []
    monkeypatch.setattr(pipe, "_claim_training", lambda config, output_dir, train_sets, pseudo=None, model_opts=None:
                        claimed.append(output_dir.name) or (None if output_dir.name == "r101" else ["--config", config]))
    batches = []
    monkeypatch.setattr(pipe, "_run_tools_at_once", lambda jobs: batches.append([j[2] for j in jobs]))
    monkeypatch.setattr(pipe, "train", lambda *a, **k: pytest.fail("trained one by one"))
    outputs = pipe.stage_radiologists()
    assert list(outputs) == ["r50", "r101", "x101"] and claimed == ["r50", "r101", "x101"]
    assert batches == [["r50", "x101"]]  # r101 was trained before
