"""Training building blocks that need no model: schedules, optimiser, metrics log, curves."""

import json
import math

import pytest
import torch

from vgdistill.data.loader import SeededDataset, sample_seed
from vgdistill.recipe import TrainConfig
from vgdistill.report.curves import plot_curves
from vgdistill.training.metrics import MetricsLog, read_metrics
from vgdistill.training.optim import build_optimizer, build_scheduler, lr_multiplier
from vgdistill.training.student import RunState


def _cfg(**kw):
    return TrainConfig(**kw)


def test_step_schedule_drops_tenfold_after_lr_drop_epochs():
    f = lr_multiplier(_cfg(scheduler="step", lr_drop=2), total_steps=40, steps_per_epoch=10)
    assert [f(s) for s in (0, 19, 20, 39)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1)]


def test_cosine_with_warmup_rises_then_decays_to_zero():
    f = lr_multiplier(_cfg(scheduler="cosine", warmup_steps=4), total_steps=104, steps_per_epoch=1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(54) == pytest.approx(0.5)
    assert f(104) == pytest.approx(0.0, abs=1e-12)
    values = [f(s) for s in range(4, 105)]
    assert all(a >= b for a, b in zip(values[:-1], values[1:], strict=True))


def test_poly_and_constant():
    poly = lr_multiplier(_cfg(scheduler="poly"), total_steps=10, steps_per_epoch=5)
    assert poly(0) == 1.0 and poly(5) == pytest.approx(0.5**0.9) and poly(10) == 0.0
    const = lr_multiplier(_cfg(scheduler="constant", warmup_steps=2), 10, 5)
    assert [const(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_scheduler_keeps_group_ratios():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [a], "lr": 1e-5}, {"params": [b], "lr": 1e-4}, {"params": [], "lr": 1}]
    cfg = _cfg(scheduler="cosine", warmup_steps=0)
    opt = build_optimizer(groups, cfg, "cpu")
    assert len(opt.param_groups) == 2  # the empty group is left out
    sched = build_scheduler(opt, cfg, total_steps=10, steps_per_epoch=5)
    for _ in range(5):
        opt.step()
        sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[1] / lrs[0] == pytest.approx(10.0)
    assert lrs[1] == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_optimizer_is_fused_where_torch_has_the_kernel():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-4}]
    assert build_optimizer(groups, _cfg(), "cpu").defaults["fused"]
    assert not build_optimizer(groups, _cfg(), "mps").defaults["fused"]


def test_optimizer_refuses_no_parameters():
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer([{"params": [], "lr": 1e-4}], _cfg(), "cpu")


def test_metrics_log_truncates_after_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    m = MetricsLog(path)
    for step in (10, 20, 30):
        m.write({"type": "train", "step": step, "loss": float(step)})
    m.write({"type": "eval", "step": 30, "acc50": float("nan")})
    with open(path, "a") as f:
        f.write('{"type": "train", "st')  # a kill mid-line
    assert [r["step"] for r in read_metrics(path)] == [10, 20, 30, 30]
    m.truncate_after(20)
    assert [r["step"] for r in read_metrics(path)] == [10, 20]
    MetricsLog(tmp_path / "other.jsonl", enabled=False).write({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()


def test_curves_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"type": "train", "step": s, "loss": 2 / s, "loss_l1": 1 / s, "lr": 1e-3}
        for s in range(1, 20)
    ]
    lines += [{"type": "eval", "step": s, "split": "val", "acc50": s / 40} for s in (5, 10, 19)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = plot_curves(path, tmp_path / "curves.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(tmp_path / "missing.jsonl", tmp_path / "x.png") is None


def test_run_state_round_trip():
    s = RunState(epoch=3, batch=7, step=42, best_acc50=0.5, best_step=40)
    t = RunState()
    t.load_state_dict(s.state_dict())
    assert t == s


class _Noisy(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.rand(3)


def test_seeded_dataset_depends_on_seed_epoch_row_only():
    ds = SeededDataset(_Noisy(), seed=13)
    torch.manual_seed(0)
    a = ds[4]
    before = torch.get_rng_state()
    torch.rand(100)  # move the global RNG: must not matter
    assert torch.equal(ds[4], a)
    assert not torch.equal(ds[5], a)
    ds.set_epoch(1)
    assert not torch.equal(ds[4], a)
    # Fetching a sample leaves the global generator where it was.
    state = torch.get_rng_state()
    ds[3]
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(before, state)
    assert sample_seed(1, 2, 3) != sample_seed(1, 3, 2)
