"""The end of a multi-process run: every rank takes the same path through the last checkpoint and the adapter,
whenever each gets there."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed


def test_a_rank_reaching_the_end_after_rank_0_wrote_the_last_checkpoint_does_not_hang(make_config, tmp_path):
    """final_outputs checkpoints the last step unless it is checkpointed already. Each rank looked for itself:
    under DDP rank 0 writes the checkpoint before its first collective, so a rank 1 that came later found it,
    skipped the save, and its next collective (the adapter's) paired with the save's: rank 0 then waited in the
    adapter's and rank 1 at the final barrier until distributed.timeout_s (30 minutes by default)."""
    import forking
    import stutil

    path = make_config("causal_lm", n=16, train={"max_steps": 1}, distributed={"timeout_s": 30})
    forking.run_ranks(Path(__file__).with_name("final_race_worker.py"), [str(path)], stutil.child_env(), 2,
                      tmp_path, timeout=150)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-1").is_dir() and (run / "adapter" / "adapter_model.safetensors").is_file()
