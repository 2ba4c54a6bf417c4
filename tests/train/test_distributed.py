"""Two processes (4 CPU devices each, gloo over 127.0.0.1) take the same step as one process with 8, and
save and resume a run."""

import json
import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
import _processes as processes
import toy_run
from test_loop import losses
from test_step import flat, run_steps
from test_task import tiny

from jaxground import checkpoint, distributed

HERE = Path(__file__).parent


def run_two(script: str, *args) -> None:
    """Runs tests/train/SCRIPT PORT PROCESS_ID *args as processes 0 and 1 of one run; both must succeed."""
    results = processes.start_two(HERE / script, args, args)
    assert [code for code, _, _ in results] == [0, 0], "\n".join(err[-3000:] for _, _, err in results)


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "two.npz"
    run_two("run_distributed.py", out)
    two = np.load(out)
    _, one, metrics, _ = run_steps((1, 4, 2), jax.devices())
    np.testing.assert_allclose(two["loss"], metrics[0]["loss"], atol=1e-5, rtol=0)
    ref = flat(one.model)
    assert set(ref) == set(two.files) - {"loss"}
    for k, v in ref.items():
        np.testing.assert_allclose(two[k], v, atol=1e-5, rtol=0, err_msg=k)


def test_two_processes_save_and_resume_each_its_own_data_state(tmp_path):
    work = tmp_path / "two"
    run_two("run_distributed_fit.py", work, 2)
    run_two("run_distributed_fit.py", work, 4)  # resumes at step 2: each host must get its own shard's state
    files = sorted((work / "checkpoints" / "4" / "data").glob("*.json"))
    assert [json.loads(f.read_text()) for f in files] == [{"index": 4, "shard": [0, 2]}, {"index": 4, "shard": [1, 2]}]
    for steps in (2, 4):
        toy_run.fit(tmp_path / "one", steps=steps)
    two, one = (losses(tmp_path / d) for d in ("two", "one"))
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]  # the same batches as one process reading them all
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), atol=1e-5, rtol=0)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"process_0-of-2.json.*none for this run's process_0-of-1"):
        toy_run.fit(work, steps=6)


def fake_checkpoint(directory: Path, step: int) -> Path:
    """A folder `checkpoint.saved_steps` lists (`<step>/model`): these runs refuse before Orbax reads it."""
    (directory / str(step) / "model").mkdir(parents=True)
    return directory


@pytest.mark.parametrize("case", ["bad config", "init from", "resume"])
def test_train_refused_on_every_host(tmp_path, shapes_dir, case):
    """`jaxground train` on two processes where process 1 differs, refused by both (exit status 2, the same line)
    before the first collective, none left waiting for the other (a hang fails at the timeout): its data is missing
    (a bad config there alone), its `--init-from` is not there, or its workdir lists a checkpoint to resume from that
    process 0's does not."""
    common = ["--config", "configs/tiny_shapes.py", *tiny(shapes_dir, "train.steps=2")]
    work = [tmp_path / "run0", tmp_path / "run1"]
    own = [[], []]
    if case == "bad config":
        missing = tmp_path / "gone"
        own[1] = [f"data.datasets.shapes.path={missing}"]
        line = "jaxground train: process 1: bad config: "
    elif case == "init from":
        missing = tmp_path / "no_run"
        own = [["--init-from", fake_checkpoint(tmp_path / "stage1", 3)], ["--init-from", missing]]
        line = f"jaxground train: process 1: no checkpoint found at {missing}"
    else:
        fake_checkpoint(work[1] / "checkpoints", 5)
        line = ("jaxground train: process 1 read other checkpoints (the step to resume from) than process 0 (step 5 "
                "against none): every host must read the same files")
    results = processes.start_command("train", *[["--workdir", w, *common, *o] for w, o in zip(work, own)],
                                      timeout=120)
    processes.assert_refused_together(results, line, stream="stdout")  # train prints its refusals on stdout
    assert not (work[0] / "checkpoints").exists()


def test_train_stops_on_every_host_when_one_fails_after_comparing(tmp_path, shapes_dir):
    """Process 1 raises right after the hosts compared their start: process 0, gone on to Orbax and the first step,
    stops within seconds naming process 1's failure, where both used to wait until JAX's shutdown barrier gave up
    after 5 minutes (a hang fails at the timeout)."""
    common = ["--config", "configs/tiny_shapes.py", *tiny(shapes_dir, "train.steps=2")]
    results = processes.start_command("train", ["--workdir", tmp_path / "run0", *common],
                                  ["--fail-after-comparison=OSError", "--workdir", tmp_path / "run1", *common],
                                  timeout=120)
    processes.assert_injected_stopped_together(results, "train", "OSError")


def test_train_stops_on_every_host_when_one_fails_mid_run_and_resumes(tmp_path, shapes_dir):
    """Process 1 raises reading the batch of step 4, while process 0 is inside step 3's collectives: both stop,
    process 0 naming process 1's failure. Steps 1 and 2 were saved (Orbax starts a save only once the one before is
    finished, so step 1's is; step 2's may be in flight and is then left unfinished), and the same command again
    resumes from the last finished save (Orbax discards the unfinished one) and finishes the 4 steps."""
    work = tmp_path / "run"
    common = ["--workdir", work, "--config", "configs/tiny_shapes.py",
              *tiny(shapes_dir, "train.steps=4", "train.save_every=2")]
    results = processes.start_command("train", common, ["--fail-at-step=3", *common], timeout=120)
    processes.assert_injected_stopped_together(results, "train", "OSError")
    saved = checkpoint.saved_steps(work / "checkpoints")
    assert saved in ([1], [1, 2]), saved
    results = processes.start_command("train", common, common, timeout=120)
    assert [code for code, _, _ in results] == [0, 0], "\n".join(err[-3000:] for _, _, err in results)
    out = results[0][1]
    assert f"resumed from {work / 'checkpoints' / str(max(saved))} at step {max(saved)}" in out, out
    assert "done: step 4" in out and checkpoint.saved_steps(work / "checkpoints")[-1] == 4


def test_train_stops_on_every_host_when_one_cannot_parse_its_command_line(tmp_path, shapes_dir):
    """Process 1's command line holds a flag train does not take: argparse refuses it there (status 2, its usage
    and line), and process 1 still joins the run to stop process 0, which would otherwise wait for it in
    `jax.distributed.initialize` for 5 minutes (a hang fails at the timeout)."""
    common = ["--config", "configs/tiny_shapes.py", *tiny(shapes_dir, "train.steps=2")]
    results = processes.start_command("train", ["--workdir", tmp_path / "run0", *common],
                                  ["--no-such-flag", "--workdir", tmp_path / "run1", *common], timeout=120)
    unknown = "unrecognized arguments: --no-such-flag"
    processes.assert_stopped_together(results, "train", code=2, line=f"jaxground train: error: {unknown}",
                                      failure=f"bad arguments: {unknown}")


def test_initialize_flags_and_single_process(monkeypatch):
    for var in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "JAXGROUND_MULTIHOST"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() == "single"
    with pytest.raises(ValueError, match="--num-processes"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match="--coordinator"):
        distributed.initialize(num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="--heartbeat-timeout"):
        distributed.initialize("127.0.0.1:1234", 2, 0, heartbeat_timeout=0)


def test_heartbeat_timeout_reaches_jax(monkeypatch, capsys):
    """`--heartbeat-timeout` of train and eval reaches `jax.distributed.initialize`; without it JAX's default holds."""
    from jaxground import cli

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append(kw))
    distributed.initialize("127.0.0.1:1234", 2, 0, cpu_collectives=False, heartbeat_timeout=300)
    distributed.initialize("127.0.0.1:1234", 2, 0, cpu_collectives=False)
    assert calls == [{"num_processes": 2, "process_id": 0, "heartbeat_timeout_seconds": 300},
                     {"num_processes": 2, "process_id": 0}]
    for command in (["train"], ["eval", "--checkpoint", "none"]):
        assert cli.main([*command, "--config", "no_such_config.py", "--coordinator", "127.0.0.1:1234",
                         "--num-processes", "2", "--process-id", "0", "--heartbeat-timeout", "0"]) == 2
        assert "--heartbeat-timeout must be at least 1 second" in capsys.readouterr().err


def test_tpu_vm_launcher_opts_in_to_jax_detection(monkeypatch):
    """A Cloud TPU VM slice sets no variable to detect: launch/tpu_vm.sh asks for JAX's detection explicitly."""
    for var in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
    script = (HERE.parents[1] / "launch" / "tpu_vm.sh").read_text()
    opt_in = re.search(r"(\w+)=(\S+) \.venv/bin/jaxground train", script)
    monkeypatch.setenv(opt_in[1], opt_in[2])
    assert distributed.initialize(cpu_collectives=False) == "auto" and calls == [((), {})]


def slurm_task(monkeypatch, *, tasks_per_node: int, gpus: int, localid: int, nodes: int = 2) -> list[int]:
    """The GPUs one simulated srun task of node 0 would drive: our arguments, then JAX's own SLURM detection."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": str(nodes * tasks_per_node),
           "SLURM_PROCID": str(localid), "SLURM_LOCALID": str(localid), "SLURM_NODEID": "0",
           "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})", "SLURM_GPUS_ON_NODE": str(gpus)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    seen = {}
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.update(kw))
    assert distributed.initialize(cpu_collectives=False) == "slurm"
    from jax._src import clusters

    *_, devices = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, seen.get("local_device_ids"), "slurm", 300)
    return devices


def test_slurm_tasks_drive_every_gpu_of_a_node(monkeypatch):
    script = (HERE.parents[1] / "launch" / "gpu_slurm.sbatch").read_text()
    tasks, gpus = (int(re.search(rf"#SBATCH --{k}=(\d+)", script)[1]) for k in ("ntasks-per-node", "gpus-per-node"))
    used = [slurm_task(monkeypatch, tasks_per_node=tasks, gpus=gpus, localid=i) for i in range(tasks)]
    assert sorted(d for ds in used for d in ds) == list(range(gpus)), used  # the script: each GPU driven by exactly one task
    assert slurm_task(monkeypatch, tasks_per_node=1, gpus=8, localid=0) == list(range(8))
    assert slurm_task(monkeypatch, tasks_per_node=8, gpus=8, localid=5) == [5]
    with pytest.raises(ValueError, match="2 tasks on a node with 8 GPUs"):
        slurm_task(monkeypatch, tasks_per_node=2, gpus=8, localid=0)
