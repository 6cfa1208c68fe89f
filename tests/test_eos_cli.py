"""experiments/eos/: presets write every promised file; bad flags give one line and exit 2
without overwriting anything; default run directories and --resume without --out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from eos_jax import cli
from eos_jax import data as edata
from eos_jax import train as tr
from eos_jax.stability import CRITERION, is_stable, stability_boundary
from eos_jax.train.stats import lane_summary
from experiments import eos as eos_cli

# Tiny and fast: scikit-learn's 8x8 digits 0/1 (always installed), few steps, power iteration.
# Plumbing runs keep the default convolution: XLA's (--conv-impl lax) compiles an unvmapped
# Hessian-vector program in about half the time, but vmapped over lanes it becomes a grouped
# convolution whose sharpness program compiled 4x slower (fig9 preset: 12.0 s vs 2.9 s).
SMALL_DATA = [
    "--dataset",
    "digits01",
    "--num-examples",
    "64",
    "--steps",
    "6",
    "--sharpness-every",
    "3",
    "--sharpness-iters",
    "4",
    "--sharpness-method",
    "power",
    "--checkpoint-every",
    "3",
    "--quiet",
    "--conv-impl",
    "fft",
]
# One lane (the main job's default is seeds 0-4 x k 1, 3) for plumbing tests.
SMALL = [*SMALL_DATA, "--seed", "0", "--k", "1"]
RUN_FILES = {"config.json", "metadata.json", "metrics.jsonl", "results.json", "eos.png", "checkpoints"}


def _run(argv, capsys):
    """Runs the CLI in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        cli.run(eos_cli.main, argv, prog="python -m experiments.eos")
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _check_run_dir(d: Path, n_lanes: int, steps: int = 6) -> dict:
    assert RUN_FILES <= {p.name for p in d.iterdir()}, sorted(p.name for p in d.iterdir())
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["dataset"]["name"] == "digits01" and meta["runtime"]["x64"] is True
    res = json.loads((d / "results.json").read_text())
    assert len(res["lanes"]) == n_lanes
    lines = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == n_lanes * (steps + 1)
    assert any("normalized_sharpness" in r for r in lines)
    assert (d / "eos.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return res


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset,variants",
    [("fig7", ("layers1", "layers3")), ("fig8", ("depth2", "depth4")), ("fig9", ("layers1", "layers2"))],
)
def test_preset_writes_every_file_and_prints_findings(preset, variants, tmp_path, capsys):
    out = tmp_path / preset
    # Two seeds (the presets' own default is PRESET_SEEDS, 0-4: checked below without running them).
    # One group per variant (every lane in one program: one compilation of each program).
    argv = ["--preset", preset, "--out", str(out), *SMALL_DATA, "--seed", "0", "1", "--max-lanes", "64"]
    code, stdout, stderr = _run(argv, capsys)
    assert code == 0, stderr
    assert {"config.json", "preset.json", "preset.png", *variants} <= {p.name for p in out.iterdir()}
    findings = json.loads((out / "preset.json").read_text())
    rule = findings["lr_rule"]
    seeds = 2  # as given; without --seed the cnn presets run PRESET_SEEDS as lanes:
    defaults = eos_cli.presets._preset_variants(preset, {}, measure=False).variants
    assert all(c.seed == ((0, 1, 2, 3, 4) if preset != "fig8" else (0,)) for _, c in defaults)
    for v in variants:
        _check_run_dir(out / v, len(rule["lr"]) * seeds)
        assert json.loads((out / v / "config.json").read_text())["lr"] == rule["lr"]
    assert set(findings["variants"]) == set(variants)
    assert f"{preset} findings" in stdout  # printed even with --quiet
    if preset in ("fig7", "fig9"):
        from eos_jax.stability import format_counts, regime_counts

        # The rates come from 2/lambda_max at initialization (median over the seeds), measured on the variants' data.
        ts = [t["lr_threshold"] for t in rule["thresholds_at_init"].values()]
        assert set(rule["thresholds_at_init"]) == set(variants) and all(t > 0 for t in ts)
        for t in rule["thresholds_at_init"].values():
            per = [p["lambda_max"] for p in t["per_seed"]]
            assert [p["seed"] for p in t["per_seed"]] == [0, 1] and t["lambda_max"] == pytest.approx(sum(per) / 2)
        # Regimes are counted over the seeds, per lr, from the lanes' own regimes.
        for v in variants:
            entry = findings["variants"][v]
            for c in entry["counts"]:
                regs = [l["regime"] for l in entry["lanes"] if l["learning_rate"] == c["learning_rate"]]
                assert c["seeds"] == [0, 1] and c["counts"] == regime_counts(regs)
                assert f"lr={c['learning_rate']:.4g}: {format_counts(c['counts'], 2)} seeds" in stdout
        if preset == "fig9":
            assert min(rule["lr"]) <= min(ts) / 10 and max(rule["lr"]) >= max(ts) * 10
            assert len(rule["lr"]) <= 3 * (len(ts) + 3)  # 1-2-5: three per decade
        else:
            assert {1.0, 2.0, 5.0} <= set(rule["lr"]) and all(any(t < lr <= 2.5 * t for lr in rule["lr"]) for t in ts)
        assert "2/lambda_max = " in stdout
    if preset == "fig9":
        for v in variants:
            b = findings["variants"][v]["boundary"]
            assert b["criterion"] == CRITERION
            lanes = findings["variants"][v]["lanes"]
            stable = [l["learning_rate"] for l in lanes if l["stable"]]
            assert b["largest_stable_lr"] == (max(stable) if stable else None)
            assert all(l["weight_decay"] == 5e-4 for l in lanes)
            ps = findings["variants"][v]["boundary_per_seed"]
            assert set(ps["per_seed"]) == {"0", "1"}
            for seed, bs in ps["per_seed"].items():
                st = [l["learning_rate"] for l in lanes if l["stable"] and l["seed"] == int(seed)]
                assert bs["largest_stable_lr"] == (max(st) if st else None)
        assert "largest stable lr" in stdout and "per seed: largest stable lr" in stdout
        c = findings["comparison"]
        a, b = (findings["variants"][v]["boundary_per_seed"]["per_seed"] for v in variants)
        pairs = [(a[s]["smallest_unstable_lr"], b[s]["smallest_unstable_lr"]) for s in a]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        assert (c["lower"], c["equal"], c["higher"]) == (
            sum(y < x for x, y in pairs),
            sum(y == x for x, y in pairs),
            sum(y > x for x, y in pairs),
        )
        assert "seed by seed, the smallest unstable lr of layers2" in stdout
    if preset == "fig8":
        cfg = json.loads((out / "depth4" / "config.json").read_text())
        assert cfg["model"] == "fc" and cfg["layers"] == 4 and cfg["width"] == 200 and cfg["activation"] == "tanh"
        # digits01 is not CIFAR-5k: the rate scaled to the fallback's sharpening, with the reason.
        assert cfg["lr"] == [2.0 / 30.0] and rule["dataset"] == "digits01" and "2/30" in rule["rule"]


def test_default_out_and_resume_without_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--layers", "1", "--lr", "2", "3", *SMALL]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    (run,) = list((tmp_path / "runs" / "eos").iterdir())
    first = _check_run_dir(run, 2)
    digests = [l["params_digest"] for l in first["lanes"]]
    # --max-lanes left out: one group sized to memory, the estimate recorded.
    est = first["lane_groups"]["estimate"]
    assert first["lane_groups"]["groups"] == [2] and est["width"] == 2 and est["fit"] >= 2 and est["cap"] == 16
    assert json.loads((run / "checkpoints" / "lane_groups.json").read_text())["width"] == 2
    code, _, err = _run([*argv, "--resume"], capsys)  # finds the run by its config
    assert code == 0, err
    assert [l["params_digest"] for l in json.loads((run / "results.json").read_text())["lanes"]] == digests
    # Another config has nothing to resume.
    code, _, err = _run(["--layers", "1", "--lr", "4", *SMALL, "--resume"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no run under" in err, err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--lr", "-1"], "'-1'"),
        (["--lr", "nan"], "'nan'"),
        (["--steps", "0"], "'0'"),
        (["--lane-batch", "0"], "'0'"),
        (["--loss-goal", "0"], "'0'"),
        (["--acc-goal", "1.5"], "1.5"),
        (["--init", "xavier"], "xavier"),
        (["--init-std", "2", "--init", "pytorch"], "--init-std"),
        (["--model", "resnet"], "resnet"),
        (["--dataset", "imagenet"], "imagenet"),
        (["--loss", "hinge"], "hinge"),
        (["--weight-decay", "-0.1"], "-0.1"),
        (["--preset", "fig10"], "fig10"),
        (["--pool", "max"], "max"),
        (["--binary", "hinge"], "hinge"),
        (["--preset", "fig7-readings", "--pool", "sum"], "--pool"),
        (["--preset", "fig7", "--layers", "2"], "--layers"),
        (["--resume", "--out", "DIR/none"], "nothing to resume"),
    ],
)
def test_bad_flags_one_line_exit_2(argv, needle, tmp_path, capsys):
    argv = [a.replace("DIR", str(tmp_path)) for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "none").exists()


def test_other_config_in_out_dir_is_refused_and_nothing_is_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run(["--layers", "1", "--lr", "2", "--out", str(out), *SMALL], capsys)
    assert code == 0, err
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = _run(["--layers", "1", "--lr", "3", "--out", str(out), *SMALL], capsys)
    assert code == 2 and err.count("\n") == 1 and "another config" in err and "lr" in err
    code, _, err = _run(["--layers", "1", "--lr", "2", "--out", str(out), *SMALL], capsys)  # same config, no --resume
    assert code == 2 and err.count("\n") == 1 and "--resume" in err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_dataset_fallback_is_visible(tmp_path, capsys):
    """Without --dataset the cnn uses MNIST 0/1, else a named fallback with a warning on the terminal."""
    out = tmp_path / "run"
    code, _, err = _run(
        [
            "--layers",
            "1",
            "--lr",
            "2",
            "--num-examples",
            "32",
            "--steps",
            "2",
            "--sharpness-every",
            "0",
            "--checkpoint-every",
            "0",
            "--quiet",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    meta = json.loads((out / "metadata.json").read_text())["dataset"]
    assert meta["requested"] == ["mnist01", "fashion_mnist01", "fashion_mnist01_bundled", "digits01"]
    if meta["name"] != "mnist01":
        assert meta["fallback_from"] and meta["fallback_from"][0]["name"] == "mnist01"
        assert f"falling back to {meta['name']}" in err and "WARNING" in err
    else:
        assert meta["fallback_from"] == [] and "WARNING" not in err


def test_stability_criterion_and_boundary():
    """A spike (> 1% loss rise) anywhere makes a lane unstable; late spikes are counted separately."""

    def lines(losses):  # one lane's logged series, without sharpness
        n = len(losses)
        nan = np.full(n, np.nan)
        return {"step": np.arange(n), "loss": np.array(losses), "finite": np.ones(n, bool), "sharpness": nan,
                "normalized_sharpness": nan, "measured": np.zeros(n, bool)}  # fmt: skip

    smooth = lane_summary(lines([1.0 - 0.01 * i for i in range(50)]), 2.0)
    early = lane_summary(lines([1.0, 5.0] + [0.9 - 0.01 * i for i in range(48)]), 2.0)
    late = lane_summary(lines([1.0 - 0.01 * i for i in range(30)] + [0.8] + [0.7] * 19), 2.0)
    assert smooth["num_loss_increases_1pct"] == 0 and smooth["max_rel_loss_increase_late"] < 0
    assert early["num_loss_increases_1pct"] == 1 and early["num_loss_increases_1pct_late"] == 0
    assert late["num_loss_increases_1pct_late"] == 1 and late["max_rel_loss_increase_late"] == pytest.approx(
        0.8 / 0.71 - 1
    )
    lanes = [
        dict(learning_rate=lr, finite=f, **s)
        for lr, f, s in [(1.0, True, smooth), (2.0, True, early), (4.0, True, late), (8.0, False, smooth)]
    ]
    assert [is_stable(l) for l in lanes] == [True, False, False, False]
    b = stability_boundary(lanes)
    assert (b["largest_stable_lr"], b["smallest_unstable_lr"], b["monotone"]) == (1.0, 2.0, True)
    b = stability_boundary([lanes[2], dict(lanes[0], learning_rate=16.0)])
    assert (b["largest_stable_lr"], b["smallest_unstable_lr"], b["monotone"]) == (16.0, 4.0, False)


@pytest.mark.slow
def test_tracked_cnn_sharpness_matches_dense_hessian(tmp_path, capsys):
    """Main-job path end to end: the sharpness logged for the 3-layer CNN (default conv, warm-started
    Lanczos) equals the top eigenvalue of the dense Hessian computed with the lax convolution; with
    ``track``, the logged trace is within its standard errors of the dense trace and the density's
    Ritz values (27 Lanczos steps on 27 parameters) are the dense spectrum's extremes."""
    import dataclasses

    import jax
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from eos_jax.checkpoint import CheckpointStore
    from experiments import eos

    out = tmp_path / "run"
    cfg = eos.default_config(
        "cnn",
        layers=3,
        lr=(2.0,),
        seed=(0,),
        k=(1,),
        dataset=("digits01",),
        num_examples=64,
        steps=6,
        sharpness_every=6,
        checkpoint_every=6,
        track=("trace", "density"),
        trace_probes=16,
        density_steps=27,
    )
    eos.run(cfg, out=out, quiet=True)
    data, _ = eos.load_data(cfg)
    prob, _ = eos.build_problem(cfg, data)
    ref, _ = eos.build_problem(dataclasses.replace(cfg, conv_impl="lax"), data)
    hp = tr.stack_hparams(tr.make_lanes([2.0]))
    template = jax.eval_shape(jax.vmap(lambda h: tr.init_state(prob, h)), hp)
    step, state = CheckpointStore(out / "checkpoints" / "group_000").restore_latest(template)
    assert step == 6
    params = jax.tree_util.tree_map(lambda a: a[0], state.params)
    flat, unravel = ravel_pytree(params)
    hess = jax.jit(jax.hessian(lambda f, b: ref.loss_fn(unravel(f), b)))(flat, ref.data)
    eig = np.linalg.eigvalsh(np.asarray(hess, np.float64))
    top = float(eig[-1])
    logged = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    (last,) = [r for r in logged if r["step"] == 6 and "sharpness" in r]
    assert last["sharpness"] == pytest.approx(top, rel=1e-4)
    assert last["normalized_sharpness"] == pytest.approx(2.0 * top, rel=1e-4)
    # The tracked curvature, at every sharpness step and at the same parameters.
    assert [r["step"] for r in logged if "curvature" in r] == [r["step"] for r in logged if "sharpness" in r]
    c = last["curvature"]
    assert abs(c["trace"] - float(np.trace(np.asarray(hess, np.float64)))) <= 5 * c["trace_stderr"], c
    (ritz,) = c["ritz"]  # one probe, 27 nodes
    assert max(ritz) == pytest.approx(top, rel=1e-4) and min(ritz) == pytest.approx(eig[0], abs=1e-4 * top)
    res = json.loads((out / "results.json").read_text())
    assert res["lanes"][0]["curvature"]["step"] == [0, 6] and res["timing"]["curvature_s"] > 0


def test_sigint_checkpoints_exits_130_and_resume_matches_uninterrupted(tmp_path, capsys, monkeypatch):
    import signal

    from eos_jax import progress

    argv = ["--layers", "1", "--lr", "2", *SMALL, "--steps", "12", "--checkpoint-every", "0", "--chunk-steps", "4"]
    argv += ["--track", "trace,density", "--trace-probes", "2", "--density-steps", "3"]  # their probes resume too
    code, _, err = _run([*argv, "--out", str(tmp_path / "ref")], capsys)
    assert code == 0, err
    calls = []

    def interrupting_update(self, step, *a, **k):
        calls.append(step)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C during the run

    with monkeypatch.context() as m:
        m.setattr(progress.ProgressBar, "update", interrupting_update)
        code, _, err = _run([*argv, "--out", str(tmp_path / "run")], capsys)
    assert code == 128 + signal.SIGINT and err.count("\n") == 1 and "SIGINT at step 3" in err, err
    assert err.rstrip().endswith("continue with --resume"), err  # the library's resume=True, as the flag
    assert not (tmp_path / "run" / "results.json").exists()
    code, _, err = _run([*argv, "--out", str(tmp_path / "run"), "--resume"], capsys)
    assert code == 0, err
    got, ref = (json.loads((tmp_path / d / "results.json").read_text())["lanes"] for d in ("run", "ref"))
    assert [l["params_digest"] for l in got] == [l["params_digest"] for l in ref]
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == (tmp_path / "ref" / "metrics.jsonl").read_bytes()
    assert b'"curvature"' in (tmp_path / "run" / "metrics.jsonl").read_bytes()


def test_standardize_flag_reaches_the_config():
    """--standardize / --no-standardize override the model's default; absent, the default stays."""
    parse = lambda argv: eos_cli.overrides_from_args(eos_cli.build_parser().parse_args(argv))  # noqa: E731
    assert parse(["--standardize"])["standardize"] is True
    assert parse(["--no-standardize"])["standardize"] is False
    assert "standardize" not in parse([])


def test_lane_batch_flag_values():
    """--lane-batch: absent keeps the experiment's default 1 (one lane at a time); "all" is None (every lane
    at once, the setting of runs made before "auto" existed, so that they resume); an integer is itself."""
    parse = lambda argv: eos_cli.overrides_from_args(eos_cli.build_parser().parse_args(argv))  # noqa: E731
    assert "lane_batch" not in parse([]) and eos_cli.default_config("cnn").lane_batch == 1
    assert parse(["--lane-batch", "all"])["lane_batch"] is None
    assert parse(["--lane-batch", "auto"])["lane_batch"] == "auto"
    assert parse(["--lane-batch", "3"])["lane_batch"] == 3


# ------------------------------------------------------------------ data on a fresh machine, --num-examples, --data-dir

TINY = ["--layers", "1", "--lr", "2", "--steps", "2", "--sharpness-every", "0", "--checkpoint-every", "0"]
TINY += ["--seed", "0", "--k", "1"]  # one lane: the data tests need no sweep


def test_default_num_examples_means_up_to(tmp_path, capsys):
    """Left at its default (2000) --num-examples uses all of a smaller dataset, says so, and resumes."""
    out = tmp_path / "run"
    argv = [*TINY, "--dataset", "digits01", "--out", str(out)]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    warn = [l for l in err.splitlines() if "WARNING" in l]
    assert warn == [
        "WARNING: digits01 has 288 training examples, fewer than the default --num-examples 2000; "
        "using all 288 (recorded in metadata.json)"
    ]
    meta = json.loads((out / "metadata.json").read_text())["dataset"]
    assert (
        meta["num_examples_requested"],
        meta["num_examples_exact"],
        meta["num_examples_available"],
        meta["num_examples_used"],
    ) == (2000, False, 288, 288)
    assert "on digits01 (288 examples, 2 steps)" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_examples"] == 2000 and cfg["num_examples_exact"] is False
    # --resume finds a run by config.json equality: the same flags must give the same config.
    from experiments import eos

    def config_of(argv):
        return eos.default_config(
            "cnn", **eos_cli.overrides_from_args(eos_cli.build_parser().parse_args(argv))
        ).to_dict()

    assert config_of(argv) == cfg and config_of([*argv, "--resume"]) == cfg
    assert config_of([*argv, "--num-examples", "2000"]) != cfg  # explicit is another config (it may fail)
    # --all-examples: no cap, no warning.
    import io

    c = eos.default_config(
        "cnn", **eos_cli.overrides_from_args(eos_cli.build_parser().parse_args([*argv, "--all-examples"]))
    )
    stream = io.StringIO()
    data, info = eos.load_data(c, stream=stream)
    assert stream.getvalue() == "" and data["x"].shape[0] == 288
    assert info["num_examples_requested"] is None and info["num_examples_used"] == 288


def test_explicit_num_examples_too_large_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run([*TINY, "--dataset", "digits01", "--num-examples", "289", "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "--num-examples 289 exceeds the 288 training examples of digits01" in err
    assert not out.exists()
    code, _, err = _run(
        [
            "--preset",
            "fig7",
            "--dataset",
            "digits01",
            "--num-examples",
            "300",
            "--steps",
            "2",
            "--sharpness-every",
            "0",
            "--out",
            str(tmp_path / "preset"),
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1 and "exceeds the 288" in err, err
    assert not (tmp_path / "preset").exists()  # refused before anything is written
    # Exactly the dataset's size is fine, and recorded as explicit.
    code, _, err = _run([*TINY, "--dataset", "digits01", "--num-examples", "288", "--quiet", "--out", str(out)], capsys)
    assert code == 0 and "WARNING" not in err, err
    assert json.loads((out / "config.json").read_text())["num_examples_exact"] is True


def _fake_mnist(d: Path, seed: int) -> None:
    """Tiny MNIST-layout IDX files (random images, labels 0..9)."""
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 40), ("t10k", 20)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        (d / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">I3I", 0x803, n, 28, 28) + x.tobytes())
        )
        (d / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">II", 0x801, n) + y.tobytes()))


def test_unused_data_dir_files_warn_when_passed_over(tmp_path, capsys, monkeypatch):
    """A --data-dir whose files are not used gets one warning line saying why (and metadata.json
    records it); a --data-dir that supplied the data gets none."""
    monkeypatch.delenv("EOS_JAX_NO_SYSTEM_DATA", raising=False)
    dd = tmp_path / "dd"
    _fake_mnist(dd / "fashion_mnist", seed=1)
    out = tmp_path / "run"
    code, _, err = _run([*TINY, "--dataset", "digits01", "--data-dir", str(dd), "--quiet", "--out", str(out)], capsys)
    assert code == 0, err
    (warn,) = [l for l in err.splitlines() if "--data-dir" in l]
    assert warn.startswith(
        f"WARNING: --data-dir {dd} holds dataset files that are not used: Fashion-MNIST in "
        f"{dd / 'fashion_mnist'}: Fashion-MNIST is not among the requested datasets (digits01)"
    )
    (u,) = json.loads((out / "metadata.json").read_text())["dataset"]["unused_in_data_dir"]
    assert u["path"] == str(dd / "fashion_mnist")
    # The default chain finds MNIST 0/1 in EOS_JAX_DATA first: the user's Fashion-MNIST is passed over, and said so.
    import io

    from experiments import eos

    env = tmp_path / "env"
    _fake_mnist(env / "mnist", seed=2)
    monkeypatch.setenv("EOS_JAX_DATA", str(env))
    stream = io.StringIO()
    data, info = eos.load_data(eos.default_config("cnn"), str(dd), stream=stream)
    (warn, fewer) = stream.getvalue().splitlines()
    assert fewer.startswith("WARNING: mnist01 has 8 training examples, fewer than the default --num-examples 2000")
    assert warn.startswith(f"WARNING: --data-dir {dd} holds dataset files that are not used: Fashion-MNIST in")
    assert "mnist01 comes before fashion_mnist01 in the search order" in warn and str(env / "mnist") in warn
    assert info["name"] == "mnist01" and info["num_examples_used"] == 8 and len(info["unused_in_data_dir"]) == 1
    # The directory supplies the data: no warning.
    stream = io.StringIO()
    _, info = eos.load_data(
        eos.default_config("cnn", dataset=("fashion_mnist01",), num_examples=8), str(dd), stream=stream
    )
    assert stream.getvalue() == "" and info["unused_in_data_dir"] == [] and info["source"][0].startswith(str(dd))


def test_unidentifiable_loose_files_in_data_dir_are_refused(tmp_path, capsys):
    import gzip
    import struct

    dd = tmp_path / "dd"
    dd.mkdir()
    for prefix, n in (("train", 12), ("t10k", 12)):
        (dd / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">I3I", 0x803, n, 28, 28) + bytes(n * 784))
        )
        (dd / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">II", 0x801, n) + bytes(n)))
    out = tmp_path / "run"
    code, _, err = _run([*TINY, "--data-dir", str(dd), "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"put them in {dd / 'mnist'}/ or {dd / 'fashion_mnist'}/" in err and not out.exists()


def _fresh_machine_run(tmp_path, name, *flags):
    """README's first command (with ``flags``) with no data installed anywhere: the cache and
    /usr/share/datasets switched off, no EOS_JAX_DATA, a new HOME. Returns (process, run dir)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("EOS_JAX_DATA", "XLA_FLAGS")}
    home = tmp_path / f"home-{name}"
    env.update(
        EOS_JAX_NO_SYSTEM_DATA="1",
        HOME=str(home),
        XDG_CACHE_HOME=str(tmp_path / f"xdg-{name}"),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(repo),
    )
    home.mkdir()
    out = tmp_path / name
    cmd = [sys.executable, "-m", "experiments.eos", *flags, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warn = [l for l in proc.stderr.splitlines() if l.startswith("WARNING")]
    assert warn == [
        "WARNING: dataset mnist01, fashion_mnist01 not found; falling back to fashion_mnist01_bundled "
        "(recorded in metadata.json)"
    ], proc.stderr[-3000:]
    meta = json.loads((out / "metadata.json").read_text())["dataset"]
    assert meta["name"] == "fashion_mnist01_bundled" and meta["num_examples_used"] == 2000
    assert [f["name"] for f in meta["fallback_from"]] == ["mnist01", "fashion_mnist01"]
    assert "EOS_JAX_NO_SYSTEM_DATA is set" in meta["fallback_from"][1]["reason"]
    return proc, out


@pytest.mark.subprocess
@pytest.mark.slow
def test_main_job_on_a_fresh_machine_shows_figure7_and_the_amplified_perturbation(tmp_path):
    """README's first command, as written, on the bundled data of a fresh machine: seeds 0-4 with k = 1
    and k = 3 as lanes. The 3-layer net at lr 5 shows restrained instabilities (lr*lambda_max above 2,
    late spikes, the loss finite and below the constant predictor's) in some seeds, and those amplify
    the last-bit perturbation to RelL1 >= 1e-2; collapsed seeds meet the collapse criterion. The
    1-layer net at lr 5 is stable in every seed, with RelL1 <= 1e-5. The summary's findings are the
    counts of the lanes' own regimes."""
    from eos_jax.stability import constant_loss, format_counts, is_collapsed, regime_counts

    proc, out = _fresh_machine_run(tmp_path, "layers3", "--layers", "3", "--lr", "5")
    assert "on fashion_mnist01_bundled (2000 examples, 200 steps)" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    lanes = res["lanes"]
    assert sorted((l["seed"], l["k"]) for l in lanes) == [(s, k) for s in range(5) for k in (1, 3)]
    y = edata.load("fashion_mnist01_bundled", "train").y[:2000]
    c0 = constant_loss(y, "bce")
    plain = sorted((l for l in lanes if l["k"] == 1), key=lambda l: l["seed"])
    perturbed = {l["seed"]: l for l in lanes if l["k"] == 3}
    restrained = [l for l in plain if l["regime"] == "restrained"]
    assert restrained, [l["regime"] for l in plain]
    for l in restrained:
        assert l["finite"] and l["max_normalized_sharpness"] > 2.0 and l["num_loss_increases_1pct_late"] > 0
        assert l["tail_loss_min"] < c0 and l["constant_loss"] == pytest.approx(c0, rel=1e-12)
        assert perturbed[l["seed"]]["rel_l1_to_k1"] >= 1e-2, (l["seed"], perturbed[l["seed"]]["rel_l1_to_k1"])
    for l in lanes:  # collapse: fires exactly where its criterion holds
        assert (l["regime"] == "collapsed") == (not l["stable"] and is_collapsed(l, 2.0))
    text = format_counts(regime_counts([l["regime"] for l in plain]), 5)
    assert f"lr 5, k=1: {text} seeds" in proc.stdout
    amplified = [l["seed"] for l in plain if perturbed[l["seed"]]["rel_l1_to_k1"] >= 1e-4]
    assert (
        f"amplified (RelL1 >= 0.0001) in seed{'s' if len(amplified) > 1 else ''} {', '.join(map(str, amplified))}"
        in (proc.stdout)
    )
    assert (out / "eos.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # README's second command without sharpness tracking: the same training bits (the estimates never
    # feed the step: test_train.py), so the same regimes (stable needs no estimate) and RelL1.
    proc, out = _fresh_machine_run(tmp_path, "layers1", "--layers", "1", "--lr", "5", "--sharpness-every", "0")
    res = json.loads((out / "results.json").read_text())
    assert len(res["lanes"]) == 10 and all(l["regime"] == "stable" for l in res["lanes"]), [
        l["regime"] for l in res["lanes"]
    ]
    rel = [l["rel_l1_to_k1"] for l in res["lanes"] if l["k"] == 3]
    assert len(rel) == 5 and max(rel) <= 1e-5, rel
    assert "lr 5, k=1: stable in 5/5 seeds" in proc.stdout and "stayed small in every seed" in proc.stdout


@pytest.mark.subprocess
def test_resume_on_another_device_count_is_one_line_exit_2_and_moves_nothing(tmp_path, capsys):
    """3 lanes checkpointed on 1 device, resumed on 2 (forced host devices): the group would be padded
    to 4 lanes. One line, exit 2, and every file of the run (checkpoints, metrics, metadata) stays
    byte for byte (no checkpoint is moved aside as corrupt, and the run does not restart from step 0)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    argv = [
        "--layers",
        "1",
        "--lr",
        "1",
        "2",
        "3",
        *SMALL,
        "--num-examples",
        "16",
        "--steps",
        "1",
        "--chunk-steps",
        "1",
        "--sharpness-every",
        "0",
        "--checkpoint-every",
        "1",
        "--out",
        str(out),
    ]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    before = {str(p.relative_to(out)): (p.read_bytes() if p.is_file() else None) for p in sorted(out.rglob("*"))}
    assert any(k.startswith("checkpoints/group_000/1/") for k in before)
    repo = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", PYTHONPATH=str(repo)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.eos", *argv, "--resume"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = proc.stderr
    assert proc.returncode == 2 and err.count("\n") == 1, err[-3000:]
    assert err.startswith("python -m experiments.eos: error: checkpoints/group_000") and "holds 3 lanes" in err, err
    assert "put 4 there" in err and "padded to a multiple of 2 devices" in err and "new run directory" in err, err
    after = {str(p.relative_to(out)): (p.read_bytes() if p.is_file() else None) for p in sorted(out.rglob("*"))}
    assert after == before


def test_pool_and_binary_reach_the_model_and_are_recorded(tmp_path, capsys):
    """--pool sum / --binary softmax: config.json and metadata.json record them, and the model uses them."""
    out = tmp_path / "run"
    code, _, err = _run(
        ["--layers", "1", "--lr", "2", "--pool", "sum", "--binary", "softmax", "--lane-batch", "1", "--out", str(out)]
        + SMALL,
        capsys,
    )
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    model = json.loads((out / "metadata.json").read_text())["model"]
    assert cfg["pool"] == "sum" and cfg["binary"] == "softmax" and cfg["lane_batch"] == 1
    assert model["config"]["pool"] == "sum" and model["num_outputs"] == 2 and model["config"]["head"] == "linear"
    from experiments import eos

    assert eos.default_config("cnn").pool == "mean" and eos.default_config("cnn").binary == "bce"


@pytest.mark.slow
def test_initial_sharpness_matches_dense_hessian():
    """2/lambda_max at initialization (the fig7/fig9 rate rule) vs eigh of the dense Hessian of loss + wd/2|p|^2."""
    import jax
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from experiments import eos

    for pool in ("mean", "sum"):
        cfg = eos.default_config(  # fft: the same rule, a Hessian-vector program that compiles 2.5x faster
            "cnn", layers=2, dataset=("digits01",), num_examples=32, weight_decay=(5e-4,), pool=pool, conv_impl="fft"
        )
        data, _ = eos.load_data(cfg)
        got = eos.initial_sharpness(cfg, data, num_iters=18)  # 18 = number of parameters (2 x 3x3)
        prob, _ = eos.build_problem(cfg, data)
        hp = tr.stack_hparams(tr.make_lanes([1.0], weight_decays=[5e-4]))
        params = jax.jit(lambda h: tr.init_state(prob, h).params)(jax.tree_util.tree_map(lambda a: a[0], hp))
        flat, unravel = ravel_pytree(params)
        h = np.asarray(jax.jit(jax.hessian(lambda f, b: prob.loss_fn(unravel(f), b)))(flat, prob.data), np.float64)
        top = float(np.linalg.eigvalsh(h + 5e-4 * np.eye(h.shape[0]))[-1])
        assert got["lambda_max"] == pytest.approx(top, rel=1e-4), pool
        assert got["lr_threshold"] == pytest.approx(2.0 / top, rel=1e-4)


def test_lr_series_rules():
    from experiments.eos import ceil_125, series_125

    assert series_125(2.01, 427.2) == [2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]
    assert series_125(0.0015, 0.02) == [0.001, 0.002, 0.005, 0.01, 0.02]
    assert (ceil_125(20.25), ceil_125(354.9), ceil_125(20.0), ceil_125(0.7)) == (50.0, 500.0, 50.0, 1.0)


def _lane(lr, *, finite=True, spikes=0, late=0, max_inc=0.0, ns=None):
    return dict(
        learning_rate=lr,
        finite=finite,
        first_nonfinite_step=None if finite else 3,
        num_loss_increases_1pct=spikes,
        num_loss_increases_1pct_late=late,
        max_rel_loss_increase=max_inc,
        max_normalized_sharpness=ns,
    )


def test_regime_and_the_figure7_finding_both_ways():
    """regime() from the numbers; the readings' per-seed 'matches Figure 7' and the chosen reading follow from them."""
    from experiments import eos

    assert eos.regime(_lane(5, finite=False), 2.0) == "divergent"
    assert eos.regime(_lane(5, max_inc=0.005, ns=1.0), 2.0) == "stable"
    assert eos.regime(_lane(5, spikes=3, late=2, max_inc=0.3, ns=2.4), 2.0) == "restrained"
    assert eos.regime(_lane(5, spikes=3, late=2, max_inc=0.3, ns=0.5), 2.0) == "spikes-off-edge"
    assert eos.regime(_lane(5, spikes=1, late=0, max_inc=3.0, ns=9.0), 2.0) == "transient"

    def entry(*regimes_by_seed):
        return {
            "lanes": [
                {"learning_rate": lr, "seed": seed, "regime": r}
                for seed, regimes in enumerate(regimes_by_seed)
                for lr, r in zip((1.0, 2.0, 5.0), regimes)
            ]
        }

    s, r, c = ("stable",) * 3, ("stable", "stable", "restrained"), ("stable", "stable", "collapsed")
    paper = {"layers1": entry(s, s, s), "layers3": entry(r, r, c)}  # 3 of 3 seeds unstable, 2 restrained
    other = {"layers1": entry(s, s, s), "layers3": entry(c, r, c)}  # 3 of 3 unstable, 1 restrained
    m = eos.matches_paper_fig7(paper)
    assert (m["matching_seeds"], m["restrained_seeds"], m["matches"]) == (3, 2, True)
    assert m["layers3"] == ["restrained", "restrained", "collapsed"]
    m = eos.matches_paper_fig7(other)
    assert (m["matching_seeds"], m["restrained_seeds"], m["matches"]) == (3, 1, False)
    table = {
        "normal-mean-raw-bce": {"match": eos.matches_paper_fig7(other)},
        "pytorch-mean-raw-bce": {"match": eos.matches_paper_fig7(paper)},
    }
    ch = eos.choose_reading(table)  # restrained counts, not collapses
    assert ch["reading"] == "pytorch-mean-raw-bce" and ch["matching"] == ["pytorch-mean-raw-bce"]
    assert "(2/3; unstable in 3/3)" in ch["why"] and not ch["tied_with"]
    table["normal-mean-raw-bce"]["match"] = eos.matches_paper_fig7(paper)  # a tie: the readings' order decides
    ch = eos.choose_reading(table)
    assert ch["reading"] == "normal-mean-raw-bce" and ch["tied_with"] == ["pytorch-mean-raw-bce"]
    none = {"layers1": entry(s, s, s), "layers3": entry(s, c, s)}
    table = {n: {"match": eos.matches_paper_fig7(none)} for n in table}
    ch = eos.choose_reading(table)
    assert ch["reading"] == "normal-mean-raw-bce" and ch["matching"] == [] and "no reading" in ch["why"]


def test_collapse_fires_where_it_must_and_not_elsewhere():
    """collapsed: a non-stable lane whose last tenth sits at (or above) the constant predictor's loss on a flat
    landscape. Not for a restrained lane below it, a lane still moving at the edge (stalled), or without the loss."""
    from eos_jax.stability import constant_loss, is_collapsed, regime

    c0 = constant_loss([0] * 953 + [1] * 1047)  # the bundled subset's label counts
    assert c0 == pytest.approx(0.692042273560129, rel=1e-12)
    assert constant_loss([0, 1, 2, 2], "ce", 3) == pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)))
    assert constant_loss([0, 1], "mse") == pytest.approx(0.25)  # 0.5 (1 - 2 * 0.25)
    unstable = _lane(5, spikes=3, late=3, max_inc=0.3, ns=4.8)
    dead = dict(
        unstable,
        constant_loss=c0,
        min_loss=0.6852,  # left the constant's loss (by 1%) ...
        max_loss=0.7327,
        tail_loss_min=0.69220,  # ... and returned to it, on a flat landscape
        tail_loss_max=0.69221,
        final_normalized_sharpness=0.02,
    )
    assert regime(dead, 2.0) == "collapsed" and is_collapsed(dead, 2.0)
    dead_above = dict(dead, tail_loss_min=0.9045, tail_loss_max=0.9203, final_normalized_sharpness=0.001)
    assert regime(dead_above, 2.0) == "collapsed"  # a dead net at a worse constant
    assert regime(dict(dead, tail_loss_min=0.541), 2.0) == "restrained"  # below the constant: alive
    assert regime(dict(dead, final_normalized_sharpness=1.7), 2.0) == "stalled"  # at the constant, not flat
    untracked = dict(dead, final_normalized_sharpness=None)
    assert regime(untracked, 2.0) == "collapsed"  # flat loss stands in for the flat landscape
    assert regime(dict(untracked, tail_loss_max=0.75), 2.0) == "stalled"
    assert regime({k: v for k, v in dead.items() if k != "constant_loss"}, 2.0) == "restrained"  # no labels, no call
    never_left = dict(dead, min_loss=0.6905, max_loss=0.6931, final_normalized_sharpness=0.02)
    assert regime(never_left, 2.0) == "stalled" and not is_collapsed(never_left, 2.0)
    assert regime(dict(never_left, max_normalized_sharpness=0.07), 2.0) == "spikes-off-edge"  # a flat, slow start
    assert regime(dict(dead, max_rel_loss_increase=0.0), 2.0) == "stable"  # stable comes first
    assert regime(dict(dead, finite=False), 2.0) == "divergent"


@pytest.mark.slow
def test_fig7_readings_writes_the_table(tmp_path, capsys):
    """The readings comparison (two readings here, tiny) writes readings.md/json with every lr and regime.

    The two readings differ only in the kernels' initialization (N(0, 1) against PyTorch's default), so
    they run the same compiled programs from other initial weights."""
    from experiments import eos

    # The data and schedule of SMALL: the fig7 preset test compiles the same initial-sharpness programs.
    ov = dict(
        dataset=("digits01",),
        num_examples=64,
        steps=6,
        sharpness_every=3,
        sharpness_iters=4,
        sharpness_method="power",
        checkpoint_every=3,
        conv_impl="fft",
        seed=(0, 1),  # two seeds as lanes (the preset's own default: READINGS_SEEDS)
    )
    readings = [r for r in eos.READINGS if r["pool"] == "mean" and r["binary"] == "bce" and not r["standardize"]]
    root, found = eos.run_readings(overrides=ov, out=tmp_path / "r", quiet=True, readings=readings)
    md = (root / "readings.md").read_text()
    got = json.loads((root / "readings.json").read_text())
    assert set(got["readings"]) == {"normal-mean-raw-bce", "pytorch-mean-raw-bce"} and got["steps"] == 6
    for name, t in got["readings"].items():
        for v in ("layers1", "layers3"):
            lanes = t["variants"][v]["lanes"]
            # every (lr, seed) of the preset's sweep: lr 1, 2, 5 x seeds 0-4 as lanes
            assert sorted((l["learning_rate"], l["seed"]) for l in lanes) == [
                (lr, s) for lr in (1.0, 2.0, 5.0) for s in (0, 1)
            ]
            for l in lanes:
                assert l["regime"] in eos.REGIMES
                assert f"| {name} | {v[6:]} |" in md
        assert t["match"] == eos.matches_paper_fig7(t["variants"])
    assert got["choice"] == eos.choose_reading(got["readings"]) and got["choice"]["why"] in md


def test_acc_goal_stops_lanes_and_is_recorded(tmp_path, capsys):
    """--acc-goal: a lane stops at the first step whose training accuracy (before the update) exceeds the goal,
    with its parameters frozen from then on. On 64 digits the 1-layer net of seed 1 starts at 38/64 correct
    and seed 0 at 1/64 (N(0, 1) kernels, one logit): with goal 0.5 seed 1 stops at step 0, seed 0 trains on."""
    import jax
    import numpy as np

    from eos_jax.metrics import tree_digest
    from experiments import eos

    out = tmp_path / "run"
    argv = ["--layers", "1", "--lr", "2", *SMALL_DATA, "--seed", "0", "1", "--k", "1", "--acc-goal", "0.5"]
    code, _, err = _run([*argv, "--out", str(out)], capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    cfg = eos.default_config(
        "cnn", layers=1, dataset=("digits01",), num_examples=64, conv_impl="fft", acc_goal=0.5, seed=(0, 1), k=(1,)
    )
    data, _ = eos.load_data(cfg)
    prob, _ = eos.build_problem(cfg, data)
    x, y = np.asarray(data["x"], np.float64), np.asarray(data["y"])
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for l in res["lanes"]:
        hp = jax.tree_util.tree_map(lambda a: a[0], tr.stack_hparams(tr.make_lanes([2.0], 1, [l["seed"]])))
        params = tr.init_state(prob, hp).params
        # Independent accuracy: the 1-layer net's logit in float64 (valid 3x3 correlation, Swish, mean).
        kern = np.asarray(jax.tree_util.tree_leaves(params)[0], np.float64).reshape(3, 3)
        z = sum(kern[i, j] * x[:, i : i + 6, j : j + 6, 0] for i in range(3) for j in range(3))
        logit = (z / (1 + np.exp(-z))).mean(axis=(1, 2))
        acc0 = float(np.mean((logit > 0) == (y == 1)))
        assert acc0 == {0: 1 / 64, 1: 38 / 64}[l["seed"]] and float(prob.accuracy_fn(params, prob.data)) == acc0
        if acc0 > 0.5:
            assert l["stop_step"] == 0 and l["params_digest"] == tree_digest(params)  # never updated
        else:
            assert l["stop_step"] is None or l["stop_step"] > 0
        if l["stop_step"] is not None:
            after = [r["loss"] for r in lines if r["lane"] == l["lane"] and r["step"] >= l["stop_step"]]
            assert len(set(after)) == 1, after  # frozen


def test_automatic_groups_keep_every_perturbed_lane_with_its_twin():
    """Lanes run learning rate slowest; automatic lane groups are whole learning-rate blocks (k x seed x wd), so
    RelL1 to the k = 1 twin is always measured inside one program."""
    from experiments import eos

    cfg = eos.default_config("cnn", lr=(0.25, 0.5, 1.0, 2.0, 5.0, 10.0), k=(1, 3), seed=(0, 1, 2, 3, 4))
    ec = cfg.engine_config()
    assert ec.lane_multiple == 10 and ec.auto_lane_cap == 16
    lanes = tr.make_lanes(list(cfg.lr), list(cfg.k), list(cfg.seed), list(cfg.weight_decay))
    from eos_jax.train.core import first_width

    assert first_width(len(lanes), ec) == 10  # the widest multiple of 10 under the cap
    groups = tr.core.group_lanes(len(lanes), 10)
    twins = tr.core.find_twins(lanes, groups)
    assert all(t["in_group"] for l, t in zip(lanes, twins) if l.k != 1)
    assert eos.default_config("cnn", k=(1,)).engine_config().lane_multiple == 1
