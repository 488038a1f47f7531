"""Evaluation: pass@k / Avg@k with hand-computed values, the behaviour counter, data specs, model resolution,
and `fastprerl eval` end to end on a tiny random-init model."""
import json
import math
from pathlib import Path

import pytest
import torch

from fastprerl import evaluation as ev
from fastprerl.cli import main
from fastprerl.metrics import behaviour_counts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


# ---------------------------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize("n,c,k,want", [
    (5, 2, 2, 0.7),              # 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    (10, 3, 1, 0.3),             # 1 - C(7,1)/C(10,1) = 1 - 7/10 = 0.3 (pass@1 = c/n)
    (10, 5, 3, 11 / 12),         # 1 - C(5,3)/C(10,3) = 1 - 10/120 = 11/12
    (4, 0, 2, 0.0),              # no correct sample: C(4,2)/C(4,2) = 1 -> 0
    (4, 3, 2, 1.0),              # n - c = 1 < k: every 2-subset holds a correct sample
    (8, 8, 8, 1.0),
    (8, 1, 8, 1.0),              # k = n: "any correct"
    (200, 1, 100, 0.5),          # 1 - C(199,100)/C(200,100) = 1 - 100/200 = 0.5
])
def test_pass_at_k_hand_values(n, c, k, want):
    assert ev.pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_pass_at_k_matches_exact_binomials_where_they_overflow_floats():
    # C(1000, 500) ~ 2.7e299 and C(2000, 1000) ~ 2e600 (beyond float): the product form stays exact enough
    for n, c, k in [(1000, 7, 500), (2000, 3, 1000), (64, 10, 32), (32, 31, 1)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 1.0
        assert ev.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        ev.pass_at_k(n, c, k)


def test_avg_at_k_and_mean_pass_at_k_on_a_score_table():
    table = [[1, 0, 0, 1],     # 2 of 4 right
             [0, 0, 0, 0],     # none
             [1, 1, 1, 1],     # all
             [0, 1, 0, 0]]     # 1 of 4
    # Avg@4 = (2/4 + 0 + 4/4 + 1/4) / 4 = 1.75 / 4 = 0.4375
    assert ev.avg_at_k(table) == pytest.approx(0.4375)
    # pass@1 = Avg@4 with binary verdicts
    assert ev.mean_pass_at_k(table, 1) == pytest.approx(0.4375)
    # pass@2 per problem: 1 - C(2,2)/C(4,2) = 5/6; 0; 1; 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2
    # mean = (5/6 + 0 + 1 + 1/2) / 4 = (14/6) / 4 = 7/12
    assert ev.mean_pass_at_k(table, 2) == pytest.approx(7 / 12)
    # pass@4: any correct -> (1 + 0 + 1 + 1) / 4
    assert ev.mean_pass_at_k(table, 4) == pytest.approx(0.75)
    # partial credit counts in Avg@k but a sample is "correct" for pass@k only with full credit
    partial = [[0.5, 1.0], [0.25, 0.0]]
    assert ev.avg_at_k(partial) == pytest.approx((0.75 + 0.125) / 2)
    assert ev.mean_pass_at_k(partial, 1) == pytest.approx((0.5 + 0.0) / 2)
    assert ev.pass_ks(8) == [1, 2, 4, 8] and ev.pass_ks(6) == [1, 2, 4, 6] and ev.pass_ks(1) == [1]


# ---------------------------------------------------------------------------------------------- behaviours
def test_behaviour_counts_paragraphs_and_keyword_precedence():
    text = ("First, add the units digits: 3 + 4 = 7.\n"       # one paragraph of two lines: execution
            "Then the tens.\n\n"
            "Wait, let me check the carry.\n\n"                # reflection ("wait", "let me check")
            "Alternatively, wait: think again with another approach.\n\n"   # transition wins over reflection
            "\n\n   \n\n"                                      # blank paragraphs are not counted
            "So the answer is 77. That's correct.\n\n"          # reflection ("'s correct")
            "ANOTHER WAY is to count up.")                      # transition, case-insensitive
    assert behaviour_counts(text) == {"transition": 2, "reflection": 2, "execution": 1}
    # single newlines do not split paragraphs
    assert behaviour_counts("a\nwait\nb") == {"transition": 0, "reflection": 1, "execution": 0}
    assert behaviour_counts("") == {"transition": 0, "reflection": 0, "execution": 0}
    # configurable keyword lists (the eval options): "hmm" becomes a reflection word, the defaults are gone
    s = ev.EvalSettings.from_options(**{"eval.transition_words": ev.parse_words("On second thought, alternatively"),
                                        "eval.reflection_words": ev.parse_words("hmm")})
    trans, refl = s.keywords()
    assert trans == ("on second thought", "alternatively") and refl == ("hmm",)
    assert behaviour_counts("Hmm.\n\nWait.\n\nOn second thought, no.", trans, refl) == \
        {"transition": 1, "reflection": 1, "execution": 1}
    assert ev.EvalSettings().keywords()[1][0] == "wait"
    with pytest.raises(ev.EvalError):
        ev.parse_words(" , ,")


# ---------------------------------------------------------------------------------------------- specs
def test_data_specs(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"problem": "1+1?", "answer": "2"}\n')
    assert ev.parse_data_spec("builtin:addition").kind == "addition"
    assert ev.parse_data_spec("reasoning_gym:chain_sum") == ev.DataSpec("reasoning_gym:chain_sum", "reasoning_gym",
                                                                       "chain_sum")
    assert ev.parse_data_spec("champ").kind == "champ"
    assert ev.parse_data_spec(str(f)).kind == "file"
    for bad, why in [("gsm8k", "unknown dataset"), ("builtin:mult", "unknown dataset"),
                     ("reasoning_gym:", "name a reasoning-gym task"), (str(tmp_path / "no.jsonl"), "not found")]:
        with pytest.raises(ev.EvalError, match=why):
            ev.parse_data_spec(bad)
    with pytest.raises(ev.EvalError, match="no task"):
        ev.load_eval_problems(ev.parse_data_spec("reasoning_gym:no_such_task"), 2, 0)
    wrong = tmp_path / "w.jsonl"
    wrong.write_text('{"question": "1+1?", "answer": "2"}\n')
    with pytest.raises(ev.EvalError, match="column 'problem'"):
        ev.load_eval_problems(ev.parse_data_spec(str(wrong)), None, 0)
    assert ev.default_reward(ev.parse_data_spec("builtin:addition")) == "last_number"
    assert ev.default_reward(ev.parse_data_spec("champ")) == "math"
    assert ev.default_reward(ev.parse_data_spec("reasoning_gym:chain_sum")) == "reasoning_gym"


def test_champ_loads_its_shipped_problems():
    pytest.importorskip("champ_dataset")
    probs = ev.champ_problems()
    assert len(probs) == 270 and all(p["prompt"] and p["answer"] for p in probs)
    sub = ev.load_eval_problems(ev.DataSpec("champ", "champ"), 5, seed=1)
    again = ev.load_eval_problems(ev.DataSpec("champ", "champ"), 5, seed=1)
    assert [p["id"] for p in sub] == [p["id"] for p in again] and len(sub) == 5
    ids = [p["id"] for p in probs]
    assert [ids.index(p["id"]) for p in sub] == sorted(ids.index(p["id"]) for p in sub)  # kept in order


def test_resolve_model_run_directories(tmp_path, caplog):
    run = tmp_path / "run"
    for step in (1, 3):
        (run / "checkpoints" / f"step_{step}").mkdir(parents=True)
        (run / "checkpoints" / f"step_{step}" / "config.json").write_text("{}")
    r = ev.resolve_model(str(run))   # no manifest (incomplete): the newest folder, with a warning
    assert r.spec == str(run / "checkpoints" / "step_3") and r.run_dir == run
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    assert ev.resolve_model(str(run)).spec == str(run / "final")
    assert ev.resolve_model(str(run / "final")).spec == str(run / "final")   # a model folder as is
    assert ev.resolve_model("builtin:tiny-llama").spec == "builtin:tiny-llama"
    assert ev.default_out(str(run), "eval.json") == run / "eval.json"
    assert ev.default_out("builtin:tiny-llama", "eval.json") == Path("eval.json")
    with pytest.raises(ev.EvalError, match="no such folder"):
        ev.resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ev.EvalError, match="without config.json"):
        ev.resolve_model(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_bad_data_exits_2_with_a_clear_message(capsys):
    assert main(["eval", "builtin:tiny-llama", "--data", "gsm8k"]) == 2
    err = capsys.readouterr().err
    assert "--data 'gsm8k': unknown dataset" in err and "builtin:addition" in err and "champ" in err
    assert main(["eval", "builtin:tiny-llama", "--data", "builtin:addition", "--k", "0"]) == 2
    assert "--k: expected a value > 0, got 0" in capsys.readouterr().err
    assert main(["eval", "builtin:tiny-llama", "--data", "builtin:addition", "--top-p", "1.5"]) == 2
    assert "--top-p: expected 0.0 < value <= 1.0, got 1.5" in capsys.readouterr().err
    assert main(["align", "builtin:tiny-llama", "--data", "nope.jsonl"]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["eval", "builtin:tiny-llama", "--data", "builtin:addition", "--template", "{problem}"]) == 2
    assert "--template '{problem}': cannot format a prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:   # --data is required
        main(["eval", "builtin:tiny-llama"])
    assert e.value.code == 2


def test_eval_end_to_end_on_a_tiny_model_against_a_different_baseline(tmp_path, capsys):
    """The baseline is another random-init model (seed 5, final norm x30: peaked distributions where the model's
    are near uniform), so its samples differ; the single letters "w" and "k" as keywords make the behaviour
    counts vary per response. Every number of the report is recomputed from the per-response records (model)
    and the baseline's block (ratios)."""
    from fastprerl.models import load_model, load_tokenizer

    base_dir = tmp_path / "base"
    base_model = load_model("builtin:tiny-llama", seed=5)
    with torch.no_grad():
        base_model.model.norm.weight.mul_(30.0)
    base_model.save_pretrained(base_dir)
    load_tokenizer("builtin:tiny-llama").save_pretrained(base_dir)
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {a} + {a}?", "answer": str(2 * a)}) + "\n"
                            for a in range(5)))
    out, samples = tmp_path / "eval.json", tmp_path / "samples.jsonl"
    argv = ["eval", "builtin:tiny-llama", "--data", "builtin:addition", "--data", str(data), "--k", "3",
            "--n-problems", "2", "--max-new-tokens", "5", "--out", str(out), "--samples", str(samples),
            "--baseline", str(base_dir), "--reward-timeout", "2", "--transition-words", "w",
            "--reflection-words", "k"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "avg@3" in table and "overall" in table and "trans/base" in table
    rep = json.loads(out.read_text())
    assert set(rep["datasets"]) == {"builtin:addition", str(data)}
    assert rep["settings"]["k"] == 3 and rep["settings"]["format"] == "completion"
    assert rep["datasets"]["builtin:addition"]["reward"] == "last_number"
    assert rep["datasets"][str(data)]["reward"] == "math"
    assert rep["datasets"]["builtin:addition"]["stop_at_newline"] is True
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len(rows) == 2 * 2 * 3
    differ = 0
    for name, block in rep["datasets"].items():
        mine = [r for r in rows if r["dataset"] == name]
        base = rep["baseline"]["datasets"][name]
        assert block["avg@k"] == pytest.approx(sum(r["verdict"] for r in mine) / len(mine))
        assert block["truncation"] == pytest.approx(sum(r["truncated"] for r in mine) / len(mine))
        assert block["response_len"] == pytest.approx(sum(r["tokens"] for r in mine) / len(mine))
        assert block["format"] == pytest.approx(sum(r["has_answer"] for r in mine) / len(mine))
        assert block["timeouts"] == sum(r["timed_out"] for r in mine) == 0
        assert 1 <= block["response_len"] <= 5 and list(block["pass_curve"]) == ["1", "2", "3"]
        for kind in ("transition", "reflection", "execution"):
            counts = [behaviour_counts(r["response"], ("w",), ("k",))[kind] for r in mine]
            assert block["behaviour"][kind] == pytest.approx(sum(counts) / len(counts))
            want = block["behaviour"][kind] / base["behaviour"][kind] if base["behaviour"][kind] > 0 else None
            assert block["behaviour_ratio"][kind] == (pytest.approx(want) if want is not None else None)
            differ += block["behaviour"][kind] != base["behaviour"][kind]
    assert differ > 0, "the baseline's behaviour counts equal the model's: the ratios test nothing"
    for kind in ("transition", "reflection", "execution"):   # overall: the mean over datasets, then the ratio
        o, b = rep["overall"]["behaviour"][kind], rep["baseline"]["overall"]["behaviour"][kind]
        assert o == pytest.approx(sum(rep["datasets"][n]["behaviour"][kind] for n in rep["datasets"]) / 2)
        assert rep["overall"]["behaviour_ratio"][kind] == (pytest.approx(o / b) if b > 0 else None)
    file_rows = [r for r in rows if r["dataset"] == str(data)]
    assert all(r["input"] == ev.MATH_TEMPLATE.format(prompt=r["prompt"]) for r in file_rows)
    assert all(r["input"].endswith("final answer within \\boxed{}.") for r in file_rows)
    add_rows = [r for r in rows if r["dataset"] == "builtin:addition"]
    assert all(r["input"] == r["prompt"] and r["input"].endswith(" =") for r in add_rows)
    assert {r["answer"] for r in file_rows} <= {str(2 * a) for a in range(5)}


def test_eval_scores_with_a_users_reward_and_a_run_directory(tmp_path):
    """A run directory with final/ (a saved tiny model); a module:function reward gives mixed verdicts, so
    avg@k and pass@k are checked against the per-response records."""
    from fastprerl.config import load_config, to_toml
    from fastprerl.models import load_model, load_tokenizer

    run = tmp_path / "run"
    load_model("builtin:tiny-llama", seed=3).save_pretrained(run / "final")
    load_tokenizer("builtin:tiny-llama").save_pretrained(run / "final")
    # the run's config supplies the prompt settings of the dataset it trained on
    cfg = load_config(ROOT / "configs" / "tiny.toml", ['data.template="Q: {prompt}"', "rollout.stop_at_newline=false"])
    (run / "config.toml").write_text(to_toml(cfg))
    samples = tmp_path / "s.jsonl"
    s = ev.EvalSettings.from_options(**{"eval.k": 4, "eval.n_problems": 3, "eval.max_new_tokens": 4,
                                        "reward": "fake_rewards:parity_reward"})
    rep = ev.evaluate(str(run), ["builtin:addition"], s, samples_path=str(samples))
    assert rep["resolved_model"] == str(run / "final")
    block = rep["datasets"]["builtin:addition"]
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    table = [[r["verdict"] for r in rows if r["problem"] == i] for i in range(3)]
    assert block["avg@k"] == pytest.approx(ev.avg_at_k(table))
    assert block["pass_curve"]["2"] == pytest.approx(ev.mean_pass_at_k(table, 2))
    assert block["pass@k"] == pytest.approx(sum(any(v == 1 for v in row) for row in table) / 3)
    assert block["stop_at_newline"] is False
    assert all(r["input"] == "Q: " + r["prompt"] for r in rows)
