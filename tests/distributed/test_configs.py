"""Shipped DeepSpeed JSONs, accelerate launch YAMLs, accelerator_kwargs and the launch command."""

from __future__ import annotations

import datetime
import json
import types
from pathlib import Path

import pytest
import yaml

from scaletune import distributed as D
from scaletune.launch import build_launch_command

REPO = Path(__file__).resolve().parents[2]
DS_DIR = REPO / "configs" / "deepspeed"
LAUNCH_DIR = REPO / "launch"
DS_FILES = ["zero1.json", "zero2.json", "zero3.json", "zero2_offload.json", "zero3_offload.json"]
LAUNCH_FILES = [
    "single_gpu.yaml", "multi_gpu.yaml", "zero2.yaml", "zero3.yaml", "zero3_offload.yaml",
    "multi_node_zero3.yaml", "cpu_2proc.yaml", "cpu_2proc_zero2.yaml", "cpu_2proc_zero3.yaml",
]  # fmt: skip


def make_cfg(stage: int = 0, offload: str = "none", *, micro: int = 2, mp: str = "bf16", clip=1.0, backend=None,
             timeout_s=1800):
    train = types.SimpleNamespace(micro_batch_size=micro, global_batch_size=16, max_grad_norm=clip, mixed_precision=mp)
    dist = types.SimpleNamespace(zero_stage=stage, offload=offload, backend=backend, timeout_s=timeout_s)
    return types.SimpleNamespace(train=train, distributed=dist)


@pytest.mark.parametrize("name", DS_FILES)
def test_deepspeed_json(name: str) -> None:
    ds = json.loads((DS_DIR / name).read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):  # fmt: skip
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == "auto"
    assert ds["fp16"]["enabled"] == "auto"
    zero = ds["zero_optimization"]
    assert zero["stage"] == int(name[4])
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    if "offload" in name:
        assert zero["offload_optimizer"]["device"] == "cpu"
        assert ("offload_param" in zero) == (zero["stage"] == 3)
        if zero["stage"] == 3:
            assert zero["offload_param"]["device"] == "cpu"
    else:
        assert "offload_optimizer" not in zero and "offload_param" not in zero


@pytest.mark.parametrize("name", DS_FILES)
def test_repo_json_is_identical_copy_of_packaged(name: str) -> None:
    packaged = D.deepspeed_config_path(name)
    assert packaged.is_file()
    assert (DS_DIR / name).read_bytes() == packaged.read_bytes(), (
        f"configs/deepspeed/{name} must equal src/scaletune/resources/deepspeed/{name}"
    )


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_launch_yaml(name: str) -> None:
    conf = yaml.safe_load((LAUNCH_DIR / name).read_text())
    for key in ("compute_environment", "distributed_type", "num_machines", "num_processes", "machine_rank"):
        assert key in conf, key
    if conf["distributed_type"] == "DEEPSPEED":
        ds = conf["deepspeed_config"]
        path = REPO / ds["deepspeed_config_file"]
        assert path.is_file(), path
        # accelerate rejects these next to a deepspeed_config_file (they belong in the JSON).
        for bad in ("gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device"):
            assert bad not in ds, bad
        assert "mixed_precision" not in conf
        # use_cpu would make accelerate drop DeepSpeed altogether.
        assert conf.get("use_cpu") is not True
    if name.startswith("cpu_2proc"):
        assert conf["num_processes"] == 2 and conf["num_machines"] == 1
    if name == "multi_node_zero3.yaml":
        assert conf["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
        assert conf["num_machines"] > 1
    if name == "zero3_offload.yaml":
        assert conf["deepspeed_config"]["deepspeed_config_file"].endswith("zero3_offload.json")


@pytest.mark.parametrize(
    ("stage", "offload", "opt_dev", "param_dev"),
    [(1, "none", None, None), (2, "optimizer", "cpu", None), (3, "none", None, None),
     (3, "optimizer", "cpu", None), (3, "params", None, "cpu"), (3, "all", "cpu", "cpu")],
)  # fmt: skip
def test_build_deepspeed_config(stage, offload, opt_dev, param_dev) -> None:
    cfg = make_cfg(stage, offload, micro=3, mp="bf16", clip=0.5)
    ds = D.build_deepspeed_config(cfg, grad_accum_steps=4, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 3 * 4 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert zero.get("offload_optimizer", {}).get("device") == opt_dev
    assert zero.get("offload_param", {}).get("device") == param_dev
    assert "auto" not in {v for v in ds.values() if isinstance(v, str)}


def test_no_clipping_and_fp16() -> None:
    ds = D.build_deepspeed_config(make_cfg(2, mp="fp16", clip=None), grad_accum_steps=1, world_size=1)
    assert ds["gradient_clipping"] == 0.0
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
                "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_a_missing_or_broken_deepspeed_json_is_a_config_error(clean_env, tmp_path) -> None:
    """`accelerate launch --config_file launch/zero2.yaml` from outside the repository names a DeepSpeed
    JSON that is not there: one error naming the file and where it was looked for (CLI exit 2), and
    bad JSON names its line; no traceback."""
    from scaletune.errors import ConfigError

    clean_env.chdir(tmp_path)
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "0")
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    clean_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "configs/deepspeed/zero2.json")
    clean_env.setattr(D, "cuda_available", lambda: False)
    with pytest.raises(ConfigError) as missing:
        D.accelerator_kwargs(make_cfg(2), grad_accum_steps=1)
    text = missing.value.render()
    assert "configs/deepspeed/zero2.json" in text and str(tmp_path) in text and "scaletune launch" in text
    (tmp_path / "broken.json").write_text('{"zero_optimization":\n  {"stage": 2,}\n}\n')
    with pytest.raises(ConfigError, match=r"broken\.json, line 2: not valid JSON"):
        D.load_deepspeed_json(tmp_path / "broken.json")


def test_a_users_deepspeed_json_that_disagrees_with_the_run_config_is_refused(clean_env, tmp_path) -> None:
    """A user's JSON with its own micro batch, clipping or precision used to win silently: DeepSpeed then
    stepped, clipped and computed otherwise than the run config said. Its "auto" values and values equal
    to the run config's are fine."""
    from scaletune.errors import ConfigError

    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "0")
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    clean_env.setattr(D, "cuda_available", lambda: False)
    mine = tmp_path / "mine.json"
    clean_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(mine))
    base = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1,
            "bf16": {"enabled": "true"}, "fp16": {"enabled": False, "loss_scale": 0},
            "gradient_accumulation_steps": "auto"}
    mine.write_text(json.dumps(base))
    kw = D.accelerator_kwargs(make_cfg(2, micro=2, mp="bf16", clip=1.0), grad_accum_steps=4)
    assert kw["deepspeed_plugin"].deepspeed_config["gradient_accumulation_steps"] == 4
    mine.write_text(json.dumps({**base, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.5,
                                "fp16": {"enabled": True}}))
    with pytest.raises(ConfigError) as err:
        D.accelerator_kwargs(make_cfg(2, micro=2, mp="bf16", clip=1.0), grad_accum_steps=4)
    assert err.value.problems == [
        f"{mine}: {key} is {given}, the run config makes it {ours}; set it \"auto\" to follow the run config, "
        "or change the run config" for key, given, ours in (
            ("train_micro_batch_size_per_gpu", 8, "2 (train.micro_batch_size)"),
            ("gradient_clipping", 0.5, "1.0 (train.max_grad_norm)"),
            ("fp16.enabled", True, "False (train.mixed_precision bf16)"))]


def test_accelerator_kwargs_single_process(clean_env) -> None:
    kw = D.accelerator_kwargs(make_cfg(0, mp="no"), grad_accum_steps=8)
    assert kw["mixed_precision"] == "no"
    assert kw["gradient_accumulation_steps"] == 8
    assert "deepspeed_plugin" not in kw
    assert "kwargs_handlers" not in kw  # one process: no process group at all


def test_accelerator_kwargs_zero3_cpu_two_ranks(clean_env, monkeypatch) -> None:
    pytest.importorskip("deepspeed")
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(D, "cuda_available", lambda: False)
    kw = D.accelerator_kwargs(make_cfg(3, micro=2, mp="bf16", clip=1.0), grad_accum_steps=4)
    (handler,) = kw["kwargs_handlers"]
    assert handler.backend == "gloo"  # the no-CUDA DeepSpeed trap
    assert "cpu" not in kw  # cpu=True would make accelerate drop DeepSpeed
    ds = kw["deepspeed_plugin"].deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_accelerator_kwargs_ddp_cpu(clean_env, monkeypatch) -> None:
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(D, "cuda_available", lambda: False)
    kw = D.accelerator_kwargs(make_cfg(0), grad_accum_steps=1)
    assert kw["cpu"] is True and "deepspeed_plugin" not in kw
    assert kw["kwargs_handlers"][0].backend == "gloo"
    assert kw["kwargs_handlers"][0].timeout == datetime.timedelta(seconds=1800)


def test_accelerator_kwargs_cuda_default_backend(clean_env, monkeypatch) -> None:
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(D, "cuda_available", lambda: True)
    kw = D.accelerator_kwargs(make_cfg(0, timeout_s=3600), grad_accum_steps=1)
    (handler,) = kw["kwargs_handlers"]
    assert "cpu" not in kw and handler.backend == "nccl"  # what accelerate would pick itself
    # distributed.timeout_s, not NCCL's 10 minutes (InitProcessGroupKwargs leaves out what equals its defaults)
    assert handler.to_kwargs() == {"timeout": datetime.timedelta(seconds=3600)}
    kw = D.accelerator_kwargs(make_cfg(0, backend="gloo"), grad_accum_steps=1)
    assert kw["kwargs_handlers"][0].backend == "gloo"


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_launch_command_zero3_multinode() -> None:
    cfg = make_cfg(3, "optimizer")
    cmd = build_launch_command("run.yaml", ["train.learning_rate=1e-4"], cfg, nproc=8, nnodes=2, node_rank=1,
                               master_addr="10.0.0.1", master_port=29600, cpu=False)  # fmt: skip
    assert "launch" in cmd
    assert "--use_deepspeed" in cmd and "--cpu" not in cmd and "--multi_gpu" not in cmd
    assert _flag(cmd, "--zero_stage") == "3"
    ds_file = Path(_flag(cmd, "--deepspeed_config_file"))
    assert ds_file.is_file() and ds_file.name == "zero3.json"
    assert _flag(cmd, "--deepspeed_multinode_launcher") == "standard"
    assert _flag(cmd, "--num_processes") == "16"
    assert _flag(cmd, "--num_machines") == "2"
    assert _flag(cmd, "--machine_rank") == "1"
    assert _flag(cmd, "--main_process_ip") == "10.0.0.1"
    assert _flag(cmd, "--main_process_port") == "29600"
    assert cmd[-5:] == ["-m", "scaletune", "train", "run.yaml", "train.learning_rate=1e-4"]
    # node 0's torchrun waited 600 s, silently, for a node that never joined: now distributed.timeout_s
    assert _flag(cmd, "--rdzv_conf") == f"timeout={cfg.distributed.timeout_s}"
    assert "--rdzv_conf" not in build_launch_command("run.yaml", [], cfg, nproc=2, cpu=False)


def test_a_rendezvous_the_nodes_never_all_met_at_is_one_line(monkeypatch, capsys) -> None:
    """torchrun's DistStoreError (a node lost while starting) ended the launch in a 40-line traceback."""
    import accelerate.commands.launch as accelerate_launch
    from torch.distributed import DistStoreError

    from scaletune.launch import run_accelerate

    def never_met(args):
        raise DistStoreError("Timed out after 21 seconds waiting for clients. 1/2 clients joined.")

    monkeypatch.setattr(accelerate_launch, "launch_command", never_met)
    cmd = build_launch_command("r.yaml", [], make_cfg(3), nproc=1, nnodes=2, master_addr="10.0.0.1",
                               master_port=29600, cpu=False)  # fmt: skip
    assert run_accelerate(cmd) == 1
    err = capsys.readouterr().err
    assert err.startswith("scaletune launch: the 2 nodes did not all meet at node 0's rendezvous (10.0.0.1:29600): "
                          "Timed out after 21 seconds waiting for clients. 1/2 clients joined; ")
    assert err.count("\n") == 1


def test_launch_command_variants() -> None:
    one_cpu = build_launch_command("r.yaml", [], make_cfg(0), nproc=1, cpu=True)
    assert "--cpu" in one_cpu and "--multi_gpu" not in one_cpu
    ddp_cpu = build_launch_command("r.yaml", [], make_cfg(0), nproc=2, cpu=True)
    assert "--multi_gpu" in ddp_cpu and "--cpu" not in ddp_cpu  # torchrun launcher; gloo in-process
    ddp_gpu = build_launch_command("r.yaml", [], make_cfg(0), nproc=4, cpu=False)
    assert "--multi_gpu" in ddp_gpu and _flag(ddp_gpu, "--num_processes") == "4"
    z2_cpu = build_launch_command("r.yaml", [], make_cfg(2, "optimizer"), nproc=2, cpu=True)
    assert "--cpu" not in z2_cpu  # accelerate refuses --cpu with --use_deepspeed
    assert Path(_flag(z2_cpu, "--deepspeed_config_file")).name == "zero2_offload.json"
    with pytest.raises(ValueError):
        build_launch_command("r.yaml", [], make_cfg(0), nproc=2, nnodes=2, node_rank=2)
    # a config named like an option (`-r.yaml`): each rank's `scaletune train` took it for one
    dashed = build_launch_command("-r.yaml", ["a=1"], make_cfg(0), nproc=1, cpu=True)
    assert dashed[-2:] == ["./-r.yaml", "a=1"]


# ------------------------------------------------------------------------------------------------
# a failure on one rank: the same error everywhere, one exit code for the launch


@pytest.mark.parametrize("mode", ["user", "bug", "ok", "slow0", "slow1"])
def test_main_process_first_relays_rank_0s_error(tmp_path, mode) -> None:
    """Rank 0 builds the data while the others wait; its error used to reach them as a broken connection
    (a gloo traceback on every other rank). Now they raise the same UserError, marked as relayed.
    slow0/slow1: a block longer than the process group's timeout (rank 0 tokenising a large file; another
    node tokenising again) is waited for; it used to end the run when the timeout (NCCL's: 10 minutes) passed."""
    import forking
    import stutil

    forking.run_ranks(Path(__file__).with_name("relay_worker.py"), [mode, str(tmp_path)], stutil.child_env(), 2,
                      tmp_path, timeout=120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["error"] for r in (0, 1)]
    if mode in ("ok", "slow0", "slow1"):
        assert ranks == [None, None] and (tmp_path / "seen").read_text() == "rank 0 was here"
    elif mode == "user":
        assert ranks[0]["relayed_from"] is None and ranks[1]["relayed_from"] == 0
        assert ranks[0]["type"] == ranks[1]["type"] == "DataError"
        assert ranks[0]["text"] == ranks[1]["text"] == ("error: data.train: no usable examples in train.jsonl\n"
                                                        "hint: raise data.max_length")
    else:
        assert ranks[0]["type"] == "ValueError" and ranks[1]["relayed_from"] == 0
        assert "rank 0 failed: ValueError: something broke" in ranks[1]["text"]
    assert not (tmp_path / "seen").exists() or mode in ("ok", "slow0", "slow1")


@pytest.mark.parametrize(("codes", "expected"), [
    ([2, -15], 2),  # rank 0's bad input; the launcher stopped rank 1
    ([2, 2], 2),  # every rank raised the (relayed) error
    ([124, 124], 124),  # preempted with a checkpoint
    ([130, -15], 130),  # Ctrl-C: the rank that exited by itself was interrupted
    ([130, 124], 1),  # no single cause
    ([1, 3], 1),  # a crash on rank 0; rank 1 stopped when it lost its peer
    ([2, 3], 2),  # rank 0's own bad input (not relayed); rank 1 lost its peer
    ([3, 3], 1),  # both lost a peer (another node was lost): a failure, not bad input
    ([-9], 1),  # killed
])  # fmt: skip
def test_launch_exit_code(codes, expected) -> None:
    from scaletune.launch import exit_code

    assert exit_code(codes) == expected


def test_run_accelerate_reports_failed_ranks_in_one_line(monkeypatch, capsys) -> None:
    """accelerate's CLI ended a failed run with exit 1 and torchrun's ChildFailedError traceback."""
    import subprocess

    import accelerate.commands.launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from scaletune.launch import run_accelerate

    failures = {0: ProcessFailure(local_rank=0, pid=11, exitcode=2, error_file="<N/A>"),
                1: ProcessFailure(local_rank=1, pid=12, exitcode=-15, error_file="<N/A>")}

    def torchrun_failed(args):
        assert args.num_processes == 2 and args.training_script_args[-1] == "r.yaml"
        raise ChildFailedError("scaletune", failures)

    cmd = build_launch_command("r.yaml", [], make_cfg(0), nproc=2, cpu=True)
    monkeypatch.setattr(accelerate_launch, "launch_command", torchrun_failed)
    assert run_accelerate(cmd) == 2
    assert capsys.readouterr().err == "scaletune launch: rank 0 exited with code 2, rank 1 was stopped (SIGTERM)\n"

    def one_process_failed(args):
        raise subprocess.CalledProcessError(2, ["python", "-m", "scaletune"])

    monkeypatch.setattr(accelerate_launch, "launch_command", one_process_failed)
    assert run_accelerate(build_launch_command("r.yaml", [], make_cfg(0), nproc=1, cpu=True)) == 2
    monkeypatch.setattr(accelerate_launch, "launch_command", lambda args: None)
    assert run_accelerate(cmd) == 0


@pytest.mark.parametrize(("config_stage", "launch"), [(0, "configs/deepspeed/zero3.json"),
                                                      (2, "configs/deepspeed/zero3.json"),
                                                      (3, "--zero_stage 2")])
def test_a_launch_of_another_zero_stage_than_the_configs_is_refused(clean_env, make_config, capsys, config_stage,
                                                                    launch) -> None:
    """Raw `accelerate launch --config_file launch/zero3.yaml -m scaletune train run.yaml` with a run config
    of another distributed.zero_stage: what is supported, gathered and fused is decided from the config's
    stage, so running the launch's (as a warning once said it did) could crash or mis-train. One error naming
    both stages and the override to add, exit 2, before anything starts."""
    from scaletune.cli import main

    clean_env.chdir(REPO)
    clean_env.setenv("WORLD_SIZE", "1")
    clean_env.setenv("LOCAL_RANK", "0")
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    if launch.endswith(".json"):
        clean_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", launch)
        launched, source = 3, launch
    else:
        clean_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        launched, source = 2, "accelerate's --zero_stage"
    path = make_config("causal_lm", distributed={"zero_stage": config_stage})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert (f"distributed.zero_stage={config_stage}, but this process was launched with DeepSpeed ZeRO stage "
            f"{launched} ({source}): add distributed.zero_stage={launched}") in err, err
    assert "Traceback" not in err and not (path.parent / "run").exists()
    # the other ranks of the launch find the same problem: one line each, not the whole screen again
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "1")
    clean_env.setenv("LOCAL_RANK", "1")
    assert main(["train", str(path), "train.global_batch_size=8", "train.micro_batch_size=2"]) == 2
    assert capsys.readouterr().err.strip() == "rank 1: stopped by rank 0's error (rank 0 prints it)"


def test_another_node_waits_for_node_0_saying_so_then_gives_up_naming_the_address(capsys) -> None:
    """A wrong --master-port: torchrun on node 1 waited silently for minutes (or printed a C++ trace per retry
    where something else answered). It now says it is waiting, and ends after distributed.timeout_s."""
    import socket

    from scaletune.launch import wait_for_node_0

    with socket.socket() as listening:  # node 0's rendezvous up: no wait
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        wait_for_node_0("127.0.0.1", listening.getsockname()[1], timeout_s=5)
        closed = listening.getsockname()[1]
    gave_up = wait_for_node_0("127.0.0.1", closed, timeout_s=1.5, every_s=0.5)  # (the launch then exits 1)
    assert f"node 0 did not answer at --master-addr 127.0.0.1 --master-port {closed} within" in gave_up
    assert f"scaletune launch: waiting for node 0 at 127.0.0.1:{closed}" in capsys.readouterr().err


def test_ranks_configs_are_compared_without_what_concerns_one_node(monkeypatch) -> None:
    """Data workers, the cache, memory release and trackers may differ per node (another CPU count); a
    trajectory key may not. (The real 2-node refusal: test_scale_out.py.)"""
    from types import SimpleNamespace

    import torch.distributed as dist

    from scaletune.distributed import refuse_differing_configs
    from scaletune.errors import ConfigError

    base = {"train": {"learning_rate": 0.01, "release_cpu_memory": False, "report_to": ["tensorboard"]},
            "data": {"num_workers": 2, "num_proc": 1, "cache": True, "train": "/a/t.jsonl"}, "output_dir": "/a/run"}
    other = {"train": {"learning_rate": 0.01, "release_cpu_memory": True, "report_to": []},
             "data": {"num_workers": 8, "num_proc": 4, "cache": False, "train": "/mnt/b/t.jsonl"}, "output_dir": "/b"}
    acc = SimpleNamespace(num_processes=2, process_index=0)

    def compared(config):
        """What the rank given `config` contributes to the gather."""
        seen = []
        monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: (seen.append(mine), out.__setitem__(
            slice(None), [mine, mine])))
        refuse_differing_configs(acc, config)
        return seen[0]

    def check(theirs):
        peer = compared(theirs)
        monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), [mine, peer]))
        refuse_differing_configs(acc, base)

    check(other)  # only per-node keys and paths differ
    with pytest.raises(ConfigError) as err:
        check({**other, "train": {**other["train"], "learning_rate": 0.05}})
    assert err.value.problems == ["train.learning_rate: 0.01 on rank 0, 0.05 on rank 1"]
