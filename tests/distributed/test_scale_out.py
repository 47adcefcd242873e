"""End-to-end scale-out checks through the product CLI (2 CPU processes, gloo; DeepSpeed on CPU).

The multi-process runs are `scaletune launch` / `accelerate launch -m scaletune train` on the tiny Llama:
real launcher subprocesses where the launch itself is under test (the raw ZeRO-2 launch, the 2-node job,
the SIGUSR1 preemption), else with their ranks forked from tests/zygote.py with the environment that
launch gives them (`run_launched`); single-process `scaletune train` / `merge` runs are forked too (same
CLI, ~10 s less import per process). One float32 single-process run is the
reference; the claims are:

* DDP (with torch.compile), ZeRO-2 and a 2-"node" ZeRO-3 run (same global batch 8, micro 2: accumulation
  4 at world size 1, 2 at world size 2) reproduce its per-step loss over 10 steps to <= 1e-4 relative
  (1-node ZeRO-3 launches are the resume tests': they continue the same curve); nodes given different
  configs are refused;
* the ZeRO-3 adapter is non-empty, equals the gathered parameters of the last checkpoint and loads in
  plain peft; `scaletune merge` of it reproduces the peft logits;
* resume continues the loss curve exactly: after a real SIGUSR1 to `scaletune launch` under ZeRO-3, and
  across world sizes (a ZeRO-3 world-size-2 checkpoint resumed on 1 process without DeepSpeed, and the reverse).

The reference runs (single process, DDP, ZeRO-2, the 2-node ZeRO-3 job) are module-scoped fixtures shared
between the assertions, each launched once; the single-process runs are forked. The CLI runners and the
`world` fixture here are also test_scale_out_zero.py's (ZeRO cases: non-finite steps, a second optimizer
group, QLoRA, bf16, refused combinations) and test_cls_scale_out.py's.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STEPS = 10
RTOL = 1e-4
LAUNCH_TIMEOUT = 420  # the first DeepSpeed launch JIT-compiles a comm op (~90 s, once per machine)

import forking  # noqa: E402
import stutil as helpers  # noqa: E402  (tests/ is on sys.path via tests/conftest.py)

# ------------------------------------------------------------------------------------------------
# running the CLI


def _env(world: SimpleNamespace, **extra: str) -> dict[str, str]:
    """A launched run's environment, sharing this module's tokenised-data cache."""
    return helpers.child_env(SCALETUNE_CACHE=str(world.cache), **extra)


def _scaletune(*args: str) -> list[str]:
    return [sys.executable, "-m", "scaletune", *args]


def _accelerate(launch_yaml: str, *train_args: str) -> list[str]:
    """`accelerate launch --config_file launch/<yaml> -m scaletune train ...` (the documented raw command)."""
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
            str(REPO / "launch" / launch_yaml), "--main_process_port", str(helpers.free_port()),
            "-m", "scaletune", "train", *train_args]


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, out: str, cmd: list[str], expect: int = 0) -> None:
    if proc.returncode != expect:
        raise AssertionError(f"exit {proc.returncode} (expected {expect}): {' '.join(cmd)}\n{out[-8000:]}")


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a launcher that is still running and the workers it started (only on failure paths)."""
    if proc.poll() is not None:
        return
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing or the process just went away
        children = []
    proc.kill()
    for child in children:
        try:
            child.kill()
        except Exception:
            pass


def run_forked(world: SimpleNamespace, argv: list[str], expect: int = 0, **env: str) -> str:
    """`scaletune <argv>` in one process of its own, forked from tests/zygote.py (the single-process
    runs here are references and resumes, not tests of how a process starts: that is `run_cli`)."""
    t0 = time.perf_counter()
    log = world.root / f"forked{len(world.timings)}.log"
    res = forking.run(argv, _env(world, **env), log, timeout=LAUNCH_TIMEOUT)
    world.timings.append(("(forked) scaletune " + " ".join(argv[:2]), round(time.perf_counter() - t0, 1)))
    out = res.stdout + res.stderr
    _check(res, out, ["scaletune", *argv], expect)
    return out


def run_cli(world: SimpleNamespace, cmd: list[str], expect: int = 0, **env: str) -> str:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(world, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out = proc.communicate(timeout=LAUNCH_TIMEOUT)[0]
    finally:
        _kill_tree(proc)  # on a timeout: the launcher *and* its workers
    world.timings.append((" ".join(cmd[2:7]), round(time.perf_counter() - t0, 1)))
    _check(proc, out, cmd, expect)
    return out


def run_launched(world: SimpleNamespace, cmd: list[str], **env: str) -> str:
    """`run_cli` of a one-node launch that must succeed, its ranks forked (forking.launch: the same ranks, ~10 s
    less import each): for tests of what training does at world size 2, not of how processes start or stop."""
    t0 = time.perf_counter()
    res = forking.launch(cmd, _env(world, **env), world.root, REPO, timeout=LAUNCH_TIMEOUT)
    world.timings.append(("(forked) " + " ".join(cmd[2:7]), round(time.perf_counter() - t0, 1)))
    _check(res, res.stdout, cmd)
    return res.stdout


def losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss (a resumed run appends; the last record of a step wins)."""
    return {r["step"]: r["loss"] for r in helpers.read_metrics(run_dir)}


def assert_same_curve(ref: dict[int, float], got: dict[int, float], steps) -> None:
    steps = list(steps)
    assert set(steps) <= set(got), f"missing steps {sorted(set(steps) - set(got))} in {sorted(got)}"
    bad = {s: (ref[s], got[s]) for s in steps if abs(got[s] - ref[s]) > RTOL * abs(ref[s])}
    assert not bad, f"loss differs from the single-process run (step: (ref, got)): {bad}"


def copy_checkpoint(src_run: Path, step: int, dst_run: Path) -> None:
    """A fresh output_dir holding only checkpoint `step` of `src_run` (what `--resume auto` will pick)."""
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / f"step-{step}", dst_run / "checkpoints" / f"step-{step}")
    (dst_run / "checkpoints" / "latest").write_text(f"step-{step}\n")


# ------------------------------------------------------------------------------------------------
# shared runs (module scope: each is launched once, when a test first needs it)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """Tiny Llama + data + one float32 run config; `cfg(**overrides)` writes variants."""
    from scaletune.demo.tiny import build_model_dir

    root = tmp_path_factory.mktemp("scale_out")
    model = build_model_dir(root / "llama", helpers.corpus(), arch="llama", hidden=32, layers=2, heads=2,
                            vocab_size=256)
    train = helpers.write_jsonl(root / "train.jsonl", helpers.alpaca_records(96))
    base = helpers.tiny_lora_run(model, train, train={"max_steps": STEPS, "seed": 7, "save_every": 5,
                                                      "save_total_limit": None},
                                 distributed={"zero_stage": 0}, output_dir=str(root / "unused"))
    ns = SimpleNamespace(root=root, model=model, cache=root / "cache", timings=[])

    def cfg(name: str, **sections: dict) -> Path:
        raw = json.loads(json.dumps(base))
        for section, values in sections.items():
            raw[section].update(values)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    ns.cfg = cfg
    ns.fp32 = cfg("fp32")
    ns.zero3 = cfg("zero3", distributed={"zero_stage": 3})
    yield ns
    print("\nscale-out launch timings (s):", *(f"  {t:6.1f}  {c}" for c, t in ns.timings), sep="\n")


@pytest.fixture(scope="module")
def single(world) -> Path:
    """The reference: 1 process, no DeepSpeed, accumulation 4."""
    out = world.root / "single"
    run_forked(world, ["train", str(world.fp32), f"output_dir={out}"])
    return out


@pytest.fixture(scope="module")
def ddp_compiled(world) -> Path:
    """2-process DDP (gloo) as `scaletune launch --nproc 2` starts it, with train.torch_compile (inductor):
    compiled decoder blocks, with the fused LoRA layers' custom operators inside them, under DDP's
    gradient hooks. (The eager DDP step is the same loop code; a launch of its own cost CI ~45 s.)"""
    out = world.root / "ddp_compiled"
    text = run_launched(world, _scaletune("launch", str(world.fp32), f"output_dir={out}", "train.torch_compile=true",
                                          "--nproc", "2", "--master-port", str(helpers.free_port())))
    assert "--multi_gpu" in text.splitlines()[0]  # the printed accelerate command
    return out


@pytest.fixture(scope="module")
def zero2(world) -> Path:
    out = world.root / "zero2"
    run_cli(world, _accelerate("cpu_2proc_zero2.yaml", str(world.fp32), f"output_dir={out}",
                               "distributed.zero_stage=2"))
    return out


@pytest.fixture(scope="module")
def zero3(world) -> Path:
    """Two `scaletune launch --nnodes 2 --node-rank R --nproc 1` on localhost: a 2-node ZeRO-3 job, also
    the ZeRO-3 run whose adapter, merge and checkpoint the tests below read."""
    out = world.root / "zero3_2nodes"
    port = str(helpers.free_port())
    cmds = [_scaletune("launch", str(world.zero3), f"output_dir={out}", "--nproc", "1", "--nnodes", "2",
                       "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port)
            for rank in (0, 1)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=REPO, env=_env(world), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in cmds]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=LAUNCH_TIMEOUT)[0])
    finally:
        for p in procs:
            _kill_tree(p)
    world.timings.append(("launch --nnodes 2 (x2)", round(time.perf_counter() - t0, 1)))
    for p, o, c in zip(procs, outs, cmds):
        _check(p, o, c)
    printed = outs[1].splitlines()[0]
    assert "--num_machines 2" in printed and "--machine_rank 1" in printed
    assert "--deepspeed_multinode_launcher standard" in printed
    # run.json names the command that was typed, not the `-m scaletune train ...` each rank was given
    assert json.loads((out / "run.json").read_text())["argv"][:2] == ["scaletune", "launch"]
    return out


def test_nodes_given_different_configs_are_refused(world):
    """Each node's launcher reads its own config and overrides: a node given another learning rate trained with
    it silently (run.json records rank 0's), another max_steps ended in gloo's "collective mismatch". The ranks
    compare their configs at start and all refuse, naming the keys (paths aside: each node reads its mounts).
    (The ranks of two 1-process nodes whose launchers were given other overrides; forked: the ranks' check.)"""
    out = world.root / "two_configs"
    cmd = _scaletune("launch", str(world.fp32), f"output_dir={out}", "--nproc", "2", "--master-port",
                     str(helpers.free_port()))
    res = forking.launch(cmd, _env(world), world.root, REPO, timeout=LAUNCH_TIMEOUT,
                         rank_args={1: ["train.learning_rate=0.05", "train.max_steps=20"]}, nodes=2)
    text = res.stdout
    assert res.returncode == 2 and "[forked rank 1: exit 2]" in text, text[-3000:]
    assert text.count("the ranks were given different run configs (rank 1 differs from rank 0)") == 2, text[-3000:]
    assert text.count("train.learning_rate: 0.01 on rank 0, 0.05 on rank 1") == 2 and "Traceback" not in text
    assert text.count(f"train.max_steps: {STEPS} on rank 0, 20 on rank 1") == 2
    assert not (out / "metrics.jsonl").exists() or not helpers.read_metrics(out)


# ------------------------------------------------------------------------------------------------
# 1 + 2: loss curves at world size 2 == world size 1


@pytest.mark.parametrize("variant", ["ddp_compiled", "zero2", "zero3"])
def test_loss_curve_matches_single_process(variant, single, request):
    ref = losses(single)
    got = losses(request.getfixturevalue(variant))
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert_same_curve(ref, got, range(1, STEPS + 1))
    run = json.loads((request.getfixturevalue(variant) / "run.json").read_text())
    assert (run["world_size"], run["grad_accum"]) == (2, 2)
    assert json.loads((single / "run.json").read_text())["grad_accum"] == 4


# ------------------------------------------------------------------------------------------------
# 3 + 7: the ZeRO-3 adapter


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _prompt_ids(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world.model))
    return tok("### Instruction:\nReverse the order of these words.\n### Response:\nalpha bravo",
               return_tensors="pt").input_ids


def test_zero3_adapter_is_full_and_loads_in_peft(world, zero3, single):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = load_file(str(zero3 / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(v.numel() > 0 for v in adapter.values())
    # the parameters partitioned at load count at their full size (run.json; the MFU's FLOPs count them so)
    info = [json.loads((run / "run.json").read_text()) for run in (zero3, single)]
    assert [(i["trainable_params"], i["total_params"]) for i in info] == [(info[1]["trainable_params"],
                                                                          info[1]["total_params"])] * 2
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items()), "lora_B never trained"
    # Same tensors as the gathered fp32 parameters of the final checkpoint (keys carry the adapter name there).
    ckpt = load_file(str(zero3 / "checkpoints" / f"step-{STEPS}" / "trainable.safetensors"))
    mapped = {k.replace(".default.", "."): v for k, v in ckpt.items()}
    assert sorted(mapped) == sorted(adapter)
    for k, v in adapter.items():
        assert v.shape == mapped[k].shape and torch.equal(v.float(), mapped[k]), k

    ids = _prompt_ids(world)
    base = AutoModelForCausalLM.from_pretrained(str(world.model), dtype=torch.float32).eval()
    base_logits = _logits(base, ids)
    z3 = PeftModel.from_pretrained(base, str(zero3 / "adapter")).eval()
    z3_logits = _logits(z3, ids)
    assert (z3_logits - base_logits).abs().max() > 1e-3, "adapter did not change the model"
    # ... and the same model the single-process run trained (the curves match, so must the weights).
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(world.model), dtype=torch.float32), str(single / "adapter")).eval()
    torch.testing.assert_close(z3_logits, _logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_merge_zero3_adapter(world, zero3):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = world.root / "merged"
    run_forked(world, ["merge", str(world.zero3), f"output_dir={zero3}", "--out", str(merged_dir)])
    ids = _prompt_ids(world)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(world.model), dtype=torch.float32), str(zero3 / "adapter")).eval()
    torch.testing.assert_close(_logits(merged, ids), _logits(peft_model, ids), rtol=1e-5, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())


# ------------------------------------------------------------------------------------------------
# 4 + 5: resume


def _workers(launcher: subprocess.Popen) -> list:
    import psutil

    out = []
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "scaletune" in cmd and "train" in cmd and not any(c.endswith("accelerate_cli") for c in cmd):
            out.append(child)
    # not a rank's own child: a subprocess it starts (platform's `uname`, a compiler) carries the rank's
    # command line between fork and exec
    ranks = {c.pid for c in out}

    def parent(proc):  # None: it has ended meanwhile (such a child)
        try:
            return proc.ppid()
        except psutil.Error:
            return None

    return [c for c in out if parent(c) not in (*ranks, None)]


def _last_train_step(metrics: Path) -> int:
    """Highest logged train step so far (the file is being appended to: skip a partly written line)."""
    step = 0
    for line in (metrics.read_text().splitlines() if metrics.is_file() else []):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") == "train":
            step = max(step, int(rec["step"]))
    return step


def test_zero3_stop_on_sigusr1_then_resume_continues_curve(world, single):
    """A real preemption: SIGUSR1 to `scaletune launch` (not its ranks) of a 2-process ZeRO-3 run mid-run.
    The launcher passes it on; both ranks checkpoint, the launch ends 124 with one summary line and no rank
    outlives it; `scaletune launch --resume auto` then continues the single-process curve. (SIGUSR1 used to
    kill the launcher alone and leave both ranks training, orphaned, with no checkpoint.)"""
    psutil = pytest.importorskip("psutil")
    out = world.root / "z3_signal"
    marker = world.root / "preempted.marker"
    cmd = _scaletune("launch", str(world.zero3), f"output_dir={out}", "--nproc", "2",
                     "--master-port", str(helpers.free_port()))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(world, SCALETUNE_PREEMPT_MARKER=str(marker)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while _last_train_step(metrics) < 2:
            assert proc.poll() is None, proc.communicate()[1][-8000:]
            assert time.monotonic() < deadline, "run never reached step 2"
            time.sleep(0.05)
        workers = _workers(proc)
        assert len(workers) == 2, workers
        proc.send_signal(signal.SIGUSR1)
        text = proc.communicate(timeout=LAUNCH_TIMEOUT)[1]
        _, alive = psutil.wait_procs(workers, timeout=60)
    finally:
        _kill_tree(proc)
    world.timings.append(("zero3 launch stopped by SIGUSR1", round(time.perf_counter() - t0, 1)))
    assert not alive, f"ranks {alive} outlived the launcher\n{text[-3000:]}"
    assert proc.returncode == 124, text[-8000:]
    stopped = helpers.read_metrics(out, "preempted")
    assert len(stopped) == 1, text[-8000:]
    k = stopped[0]["step"]
    assert 2 <= k < STEPS
    checkpoint = out / "checkpoints" / f"step-{k}"
    # the checkpoint, and the signal every rank stopped on (the Slurm templates requeue on SIGUSR1)
    assert marker.read_text().splitlines() == [str(checkpoint), "SIGUSR1"]
    assert stopped[0]["signal"] == signal.SIGUSR1
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{k}"
    summary = [line for line in text.splitlines() if line.startswith("scaletune launch:")]
    assert len(summary) == 1 and f"checkpoint {checkpoint} (continue with --resume auto)" in summary[0], text
    assert "Traceback" not in text

    run_launched(world, _scaletune("launch", str(world.zero3), f"output_dir={out}", "--nproc", "2", "--resume", "auto",
                                   "--master-port", str(helpers.free_port())))
    ref, got = losses(single), losses(out)
    assert_same_curve(ref, got, range(1, STEPS + 1))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "run.json").read_text())["resumed_from"] == str(checkpoint)


def test_zero3_world2_checkpoint_resumes_on_one_process(world, zero3, single):
    """ZeRO-3 x 2 processes -> 1 process without DeepSpeed (zero_stage is not part of the fingerprint)."""
    out = world.root / "resume_2_to_1"
    copy_checkpoint(zero3, 5, out)
    text = run_forked(world, ["train", str(world.fp32), f"output_dir={out}", "--resume", "auto"])
    assert "saved at world size 2, now 1" in text
    got = losses(out)
    assert sorted(got) == list(range(6, STEPS + 1))
    assert_same_curve(losses(single), got, range(6, STEPS + 1))


def test_single_process_checkpoint_resumes_under_zero3(world, single):
    """1 process (no DeepSpeed) -> ZeRO-3 x 2 processes. The resume adds evals and train.best_metric (keys a
    resume may change): each new best's adapter is gathered from the partitions by every rank."""
    from safetensors.torch import load_file

    out = world.root / "resume_1_to_2"
    copy_checkpoint(single, 5, out)
    text = run_launched(world, _accelerate("cpu_2proc_zero3.yaml", str(world.zero3), f"output_dir={out}",
                                           "--resume", "auto", f"data.eval={world.root / 'train.jsonl'}",
                                           f"train.eval_every={STEPS - 5}", "train.best_metric=loss"))
    assert "saved at world size 1, now 2" in text
    got = losses(out)
    assert sorted(got) == list(range(6, STEPS + 1))
    assert_same_curve(losses(single), got, range(6, STEPS + 1))
    assert [r["step"] for r in helpers.read_metrics(out, "best")] == [STEPS]
    best, final = (load_file(str(out / d / "adapter_model.safetensors")) for d in ("best_adapter", "adapter"))
    assert best.keys() == final.keys() and all(v.numel() for v in best.values())
    for name, w in final.items():
        assert torch.equal(best[name], w), name
