"""The ablation runner: variant builder, command line, resume and determinism."""
import json
import sys
import textwrap

import pytest
import torch

import adv_chain as ac
from adv_chain.__main__ import main
from adv_chain.ablation import (AblationError, TaskRun, baseline_chain, build_variants, parse_transform,
                                parse_value, read_results)
from adv_chain.ablation.engine import summarize

ISSUE_FLAGS = ["ablate", "--preset", "adamw_adv", "--set", "cautious_mask=true", "--swap", "cautious=grams",
               "--without", "cautious"]


# -- values, transforms, settings ---------------------------------------------------------------
@pytest.mark.parametrize("text, value", [
    ("true", True), ("False", False), ("none", None), ("3", 3), ("1e-3", 1e-3), ("inf", float("inf")),
    ("0.9,0.95", (0.9, 0.95)), ("(0.9, 0.95)", (0.9, 0.95)), ("[1, 2]", (1, 2)), ("flattened", "flattened"),
    ("'iterative'", "iterative"),
])
def test_values_parse_as_typed(text, value):
    assert parse_value(text) == value


def test_transform_specs():
    assert parse_transform("grams") == ac.grams()
    assert parse_transform("grams()") == ac.grams()
    assert parse_transform('cautious(rescale="mean")') == ac.cautious(rescale="mean")
    assert parse_transform("eps_divide(1e-6)") == ac.eps_divide(1e-6)
    assert parse_transform("adam(betas=(0.9, 0.95))") == ac.scale_by_adam(betas=(0.9, 0.95))  # default name works


def test_unknown_transform_lists_the_available_ones():
    with pytest.raises(AblationError) as err:
        parse_transform("gramz()")
    assert "gramz" in str(err.value) and "grams" in str(err.value) and "orthograd" in str(err.value)


@pytest.mark.parametrize("spec, words", [
    ("grams(1, 2, 3)", ["grams", "takes"]), ("cautious(rescale=foo)", ["literals"]), ("1+", ["cannot read"]),
    ("cautious(rescale='bogus')", ["rescale"]),
])
def test_bad_transform_specs_say_what_is_wrong(spec, words):
    with pytest.raises(AblationError) as err:
        parse_transform(spec)
    assert all(w in str(err.value) for w in words)


def test_settings_reach_preset_keywords_and_transform_arguments():
    c = baseline_chain("adamw_adv", {"cautious_mask": "true", "adam.betas": "0.9,0.95", "weight_decay": "1"})
    assert "cautious" in c and c["adam"].args["betas"] == (0.9, 0.95)
    assert c["weight_decay"].args["weight_decay"] == 1.0 and isinstance(c["weight_decay"].args["weight_decay"], float)


@pytest.mark.parametrize("settings, words", [
    ({"bogus": "1"}, ["bogus", "adamw_adv", "cautious_mask"]),
    ({"nosuch.arg": "1"}, ["nosuch", "adam"]),
    ({"adam.nosuch": "1"}, ["nosuch", "betas"]),
    ({"use_atan2": "maybe"}, ["use_atan2", "true or false"]),
    ({"adam.betas": "2,3"}, ["betas"]),
])
def test_bad_settings_name_the_key_and_the_choices(settings, words):
    with pytest.raises(AblationError) as err:
        baseline_chain("adamw_adv", settings)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_issue_example_builds_three_variants():
    vs = build_variants("adamw_adv", {"cautious_mask": "true"},
                        [("swap", "cautious=grams"), ("without", "cautious")])
    assert [v.name for v in vs] == ["adamw_adv cautious_mask=true", "cautious -> grams", "without cautious"]
    assert vs[0].chain.names == ("adam", "eps_divide", "cautious", "weight_decay", "apply")
    assert vs[1].chain.names == ("adam", "eps_divide", "grams", "weight_decay", "apply")
    assert vs[2].chain.names == ("adam", "eps_divide", "weight_decay", "apply")


def test_insert_and_vary_variants():
    vs = build_variants("adamw", None, [("insert_after", "eps_divide=cautious"),
                                        ("insert_before", "adam=orthograd()"), ("vary", "weight_decay=0.1")])
    assert vs[1].chain.names == ("adam", "eps_divide", "cautious", "weight_decay", "apply")
    assert vs[2].chain.names[0] == "orthograd"
    assert vs[3].chain["weight_decay"].args["weight_decay"] == 0.1


@pytest.mark.parametrize("changes, words", [
    ([], ["no variants"]),
    ([("swap", "cautious=grams")], ["cautious", "names"]),
    ([("swap", "adam")], ["NAME=TRANSFORM"]),
    ([("without", "weight_decay"), ("without", "weight_decay")], ["unique"]),
])
def test_bad_changes(changes, words):
    with pytest.raises(AblationError) as err:
        build_variants("adamw", None, changes)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_config_variants_every_form():
    vs = build_variants("adamw_adv", {"cautious_mask": True}, variants=[
        {"name": "grams", "swap": {"cautious": "grams"}},
        {"without": ["cautious"]},
        {"name": "lion", "preset": "lion_adv", "set": {"weight_decay": 0.1}},
        {"name": "hand", "chain": ["orthograd()", "scale_by_adam()", "eps_divide()", "apply()"]},
        {"name": "atan2", "set": {"use_atan2": True}},
    ])
    assert [v.name for v in vs][1:] == ["grams", "without cautious", "lion", "hand", "atan2"]
    assert vs[4].chain.names == ("orthograd", "adam", "eps_divide", "apply")
    assert "atan2_scale" in vs[5].chain and "cautious" in vs[5].chain
    with pytest.raises(AblationError, match="unknown key"):
        build_variants("adamw", None, variants=[{"swapp": {"a": "b"}}])


# -- running ------------------------------------------------------------------------------------
CALLS = []


def tiny_task(seed, steps, device="cpu", dtype=torch.float32):
    """A 2-layer regression; records each call (so tests can count the runs)."""
    CALLS.append(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=gen).to(device=device, dtype=dtype)
    y = torch.sin(x.float().sum(1, keepdim=True))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(device=device,
                                                                                                     dtype=dtype)
    loss = lambda: torch.nn.functional.mse_loss(model(x).float(), y)  # noqa: E731
    return TaskRun(model, lambda t: loss(), loss, lr=1e-2)


def test_same_seed_same_numbers_and_different_seeds_differ(tmp_path):
    kw = dict(changes=[("swap", "eps_divide=atan2_scale")], task=tiny_task, steps=15, seeds=2, progress=False)
    a = ac.ablate("adamw", **kw)
    b = ac.ablate("adamw", **kw)
    key = lambda r: (r.variant, r.seed, r.train_loss, r.val_loss, r.curve)  # noqa: E731
    assert [key(r) for r in a.runs] == [key(r) for r in b.runs]
    assert a.runs[0].val_loss != a.runs[2].val_loss  # seed 0 vs seed 1 of the baseline


def test_results_table_and_resume_after_an_interruption(tmp_path, monkeypatch):
    out = tmp_path / "abl"
    kw = dict(changes=[("without", "weight_decay")], task=tiny_task, steps=10, seeds=2, progress=False, plot=False)
    full = ac.ablate("adamw", out=tmp_path / "full", **kw)
    assert len(full.runs) == 4 and (tmp_path / "full" / "table.md").read_text() == full.table

    # interrupt the third run: two runs are recorded, nothing else is lost
    CALLS.clear()
    real = tiny_task

    def interrupted(seed, steps, device="cpu", dtype=torch.float32):
        if len(CALLS) == 2:
            raise KeyboardInterrupt
        return real(seed, steps, device, dtype)
    interrupted.__name__ = "tiny_task"  # the same task (its name is part of a run's identity)

    with pytest.raises(KeyboardInterrupt):
        ac.ablate("adamw", out=out, **{**kw, "task": interrupted})
    assert len(read_results(out / "results.jsonl")) == 2
    with (out / "results.jsonl").open("a") as fh:
        fh.write('{"variant": "adamw", "se')  # a line cut short by the interruption
    with pytest.raises(AblationError, match="resume"):
        ac.ablate("adamw", out=out, **kw)
    CALLS.clear()
    resumed = ac.ablate("adamw", out=out, resume=True, **kw)
    assert len(CALLS) == 2  # only the two missing runs were trained
    got = sorted((r.variant, r.seed, r.val_loss) for r in resumed.runs)
    assert got == sorted((r.variant, r.seed, r.val_loss) for r in full.runs)
    strip = lambda rows: [(r["variant"], r["train"], r["val"], r["delta"]) for r in rows]  # noqa: E731
    assert strip(resumed.rows()) == strip(full.rows())
    CALLS.clear()
    ac.ablate("adamw", out=out, resume=True, **kw)
    assert CALLS == []  # everything recorded: nothing to redo


def test_resume_does_not_reuse_runs_of_another_configuration(tmp_path):
    kw = dict(changes=[("without", "weight_decay")], task=tiny_task, seeds=1, progress=False, plot=False)
    ac.ablate("adamw", out=tmp_path, steps=5, **kw)
    CALLS.clear()
    result = ac.ablate("adamw", out=tmp_path, steps=6, resume=True, **kw)
    assert len(CALLS) == 2 and len(result.runs) == 2
    assert len(read_results(tmp_path / "results.jsonl")) == 4  # the earlier runs are kept in the file


def test_summary_flags_a_consistent_difference():
    from adv_chain.ablation import RunRecord, Variant
    c = ac.presets.adamw()
    vs = [Variant("a", c), Variant("b", c)]
    mk = lambda v, s, x: RunRecord(v, s, "k", x, x, 1.0, 8, False, [x], [[1, x]], 0.1)  # noqa: E731
    runs = [mk("a", s, 1.0 + 0.01 * s) for s in range(3)] + [mk("b", s, 0.9 + 0.01 * s + 0.001 * (s == 1))
                                                               for s in range(3)]
    rows = summarize(vs, runs)
    assert rows[1]["delta"] == pytest.approx(-0.1 + 0.001 / 3) and rows[1]["significant"] is True
    noisy = [mk("a", s, 1.0) for s in range(3)] + [mk("b", s, 1.0 + (0.1, -0.1, 0.02)[s]) for s in range(3)]
    assert summarize(vs, noisy)[1]["significant"] is False


def test_bf16_uses_the_stochastic_rounding_terminal():
    result = ac.ablate("adamw", changes=[("without", "weight_decay")], task=tiny_task, steps=3, seeds=1,
                       dtype="bf16", progress=False)
    assert all(v.chain.transforms[-1].type_name == "stochastic_round_apply" for v in result.variants)
    assert all(r.val_loss == r.val_loss for r in result.runs)


@pytest.mark.parametrize("kw, words", [
    ({"steps": 0}, ["steps"]), ({"seeds": 1.5}, ["seeds"]), ({"dtype": "fp8"}, ["dtype", "bf16"]),
    ({"lr": -1.0}, ["lr"]), ({"task": "nosuch"}, ["charlm", "mlp", "module:function"]),
    ({"task": "nosuch_module_xyz:f"}, ["cannot import"]), ({"device": "nosuchdevice"}, ["device"]),
])
def test_bad_run_arguments(kw, words):
    with pytest.raises(AblationError) as err:
        ac.ablate("adamw", changes=[("without", "weight_decay")], progress=False, **{"task": tiny_task, **kw})
    assert all(w in str(err.value) for w in words), str(err.value)


def test_builtin_tasks_run(tmp_path):
    for task in ("charlm", "mlp"):
        result = ac.ablate("adamw", changes=[("without", "weight_decay")], task=task, steps=3, seeds=1,
                           progress=False)
        assert all(r.val_loss == r.val_loss and r.state_bytes > 0 for r in result.runs)


# -- the command line ---------------------------------------------------------------------------
def test_cli_ablate_writes_table_jsonl_config_and_says_about_the_plot(tmp_path, monkeypatch, capsys):
    module = tmp_path / "my_task_mod.py"
    module.write_text(textwrap.dedent("""
        import torch
        from adv_chain.ablation import TaskRun

        def task(seed, steps, device="cpu", dtype=torch.float32):
            torch.manual_seed(seed)
            model = torch.nn.Linear(4, 1)
            x = torch.randn(32, 4)
            loss = lambda: (model(x) ** 2).mean()
            return model, (lambda t: loss()), loss
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a machine without the plot extra
    out = tmp_path / "run"
    rc = main(ISSUE_FLAGS + ["--task", "my_task_mod:task", "--steps", "4", "--seeds", "2", "--out", str(out),
                             "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "cautious -> grams" in text and "without cautious" in text and "pip install 'adv-chain[plot]'" in text
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {x["seed"] for x in lines} == {0, 1}
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "adamw_adv" and len(config["variants"]) == 3
    assert (out / "table.md").exists() and not (out / "curves.png").exists()


def test_cli_draws_the_plot_when_matplotlib_is_installed(tmp_path, capsys):
    try:  # the plot extra: CI runs without it (that branch is also forced in the test above)
        import matplotlib  # noqa: F401
        has_matplotlib = True
    except ImportError:
        has_matplotlib = False
    rc = main(["ablate", "--preset", "adamw", "--without", "weight_decay", "--task", "mlp", "--steps", "3",
               "--seeds", "1", "--out", str(tmp_path), "--quiet"])
    assert rc == 0 and (tmp_path / "curves.png").exists() == has_matplotlib
    if has_matplotlib:
        assert (tmp_path / "curves.png").stat().st_size > 1000


def test_cli_config_file_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "abl.toml"
    cfg.write_text(textwrap.dedent("""
        preset = "adamw"
        task = "mlp"
        steps = 3
        seeds = 1
        [set]
        weight_decay = 0.1
        [[variants]]
        name = "atan2"
        swap = { eps_divide = "atan2_scale()" }
        [[variants]]
        without = ["weight_decay"]
    """))
    assert main(["ablate", "--config", str(cfg), "--quiet", "--no-plot"]) == 0
    runs = list((tmp_path / "ablations").glob("adamw-*/results.jsonl"))
    assert len(runs) == 1 and len(runs[0].read_text().splitlines()) == 3
    # --resume finds the newest ablation of the preset; --seeds 2 adds only the new seed's runs
    assert main(["ablate", "--config", str(cfg), "--resume", "--seeds", "2", "--quiet", "--no-plot"]) == 0
    assert len(runs[0].read_text().splitlines()) == 6
    assert "atan2" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (ISSUE_FLAGS[:5] + ["--swap", "cautious=gramz"], ["gramz", "available transforms", "grams"]),
    (["ablate", "--preset", "nosuch", "--without", "x"], ["nosuch", "known presets", "adamw"]),
    (["ablate", "--preset", "adamw", "--without", "cautious"], ["cautious", "adam"]),
    (["ablate", "--preset", "adamw", "--without", "weight_decay", "--steps", "0"], ["steps"]),
    (["ablate", "--config", "/nonexistent/x.toml"], ["no such file"]),
    (["ablate", "--resume", "--preset", "sgd", "--without", "apply"], ["resume", "--out"]),
    (["show", "adamw", "--bogus", "1"], ["bogus", "keywords"]),
    (["presets", "nosuch"], ["nosuch", "known presets"]),
])
def test_cli_errors_are_clear(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["ablate"] + argv if argv[0].startswith("--") else argv
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert "Traceback" not in err


def test_cli_presets_and_show(capsys):
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ac.presets.names())
    assert main(["presets", "ADAMW_ADV"]) == 0 and "cautious_mask = False" in capsys.readouterr().out
    assert main(["show", "adamw_adv", "--use_atan2", "true", "--adam.betas=0.9,0.95"]) == 0
    text = capsys.readouterr().out
    assert "atan2_scale" in text and "betas=(0.9, 0.95)" in text
    assert main(["show", "adamw", "--json"]) == 0
    assert ac.chain_from_config(json.loads(capsys.readouterr().out)) == ac.presets.adamw()
