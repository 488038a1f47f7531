"""builtin:equations, its reward "equation", and the view probe against a float64 oracle."""
import re

import pytest
import torch

from fastprerl.config import RewardConfig
from fastprerl.data import EQUATION_SHOTS, PROBE_OFFSETS, equation_problems, problems_from_source
from fastprerl.evaluation.data import default_reward, parse_data_spec
from fastprerl.evaluation.probe import has_probe, view_probe
from fastprerl.models import empty_context_token, load_model, load_tokenizer
from fastprerl.rewards import EquationReward, RewardResult, from_config

LINE = re.compile(r"Question: What is (\d+) \+ (\d+)\?\nAnswer: (\d+) \+ (\d+) = (\d+)\n")


def test_problems_restate_their_question_and_carry_a_wrong_answer_of_the_same_form():
    probs = equation_problems(200, 2, seed=3)
    assert probs == problems_from_source("builtin:equations", n=200, seed=3, digits=2)   # deterministic
    for p in probs:
        shots = LINE.findall(p["prompt"])
        assert len(shots) == EQUATION_SHOTS
        for a, b, a2, b2, c in shots:
            assert (a, b) == (a2, b2) and int(a) + int(b) == int(c)
        a, b = map(int, re.fullmatch(r"(?s).*Question: What is (\d+) \+ (\d+)\?\nAnswer:", p["prompt"]).groups())
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert p["answer"] == f"{a} + {b} = {a + b}"
        assert p["probe"]["right"] == f" {a} + {b} = {a + b}"
        wa, wb, wc = map(int, re.fullmatch(r" (\d+) \+ (\d+) = (\d+)", p["probe"]["wrong"]).groups())
        assert (wa, wb) == (a, b) and wc - (a + b) in PROBE_OFFSETS
    assert len({p["probe"]["wrong"].rsplit(" ", 1)[1] for p in probs}) > 50
    assert has_probe(probs) and not has_probe(problems_from_source("builtin:addition", n=3, seed=0))


@pytest.mark.parametrize("response, score, correct, has", [
    (" 23 + 34 = 57", 1.0, 1.0, True),
    ("23+34=57\nQuestion: What is 1 + 1?", 1.0, 1.0, True),     # only the first line counts; spaces ignored
    (" 23 + 34 = 58", 0.0, 0.0, True),                           # the right form, the wrong sum
    (" 34 + 23 = 57", 0.0, 0.0, True),                           # not the question's equation
    (" 57", -0.5, 0.0, False),                                   # the right number alone is not self-contained
    ("", -0.5, 0.0, False),
    (" 23 + 34 = 57 and more", -0.5, 0.0, False),
])
def test_the_equation_reward_counts_only_the_whole_right_equation(response, score, correct, has):
    fn = EquationReward(format_penalty=0.5)
    assert fn([response], [{"answer": "23 + 34 = 57"}]) == [RewardResult(score, correct, has)]


def test_the_equation_reward_is_a_config_choice_and_the_eval_default_of_its_task():
    assert isinstance(from_config(RewardConfig(fn="equation")), EquationReward)
    assert default_reward(parse_data_spec("builtin:equations")) == "equation"
    with pytest.raises(ValueError, match="'answer'"):
        EquationReward()([" 1 + 1 = 2"], [{"prompt": "no answer field"}])


def _oracle(model, context, response):
    """log P(response | context) by one unpadded forward per sequence in float64, token by token."""
    ids = torch.tensor([context + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(response))


def test_view_probe_matches_a_float64_oracle_and_restores_train_mode():
    tok = load_tokenizer("builtin:tiny-llama")
    model = load_model("builtin:tiny-llama", dtype="float32", seed=0)
    model.train()
    probs = equation_problems(5, 2, seed=1)
    probs[1]["prompt"] = "What is " + probs[1]["prompt"][-30:]     # prompts of different lengths share a batch
    prompts = [tok(p["prompt"], add_special_tokens=False)["input_ids"] for p in probs]
    e = empty_context_token(tok)
    rep = view_probe(model, tok, probs, prompts, e)
    assert model.training
    oracle = model.double().eval()
    for view, ctxs in (("cond", prompts), ("free", [[e]] * len(probs))):
        right = [_oracle(oracle, c, tok(p["probe"]["right"], add_special_tokens=False)["input_ids"])
                 for c, p in zip(ctxs, probs)]
        wrong = [_oracle(oracle, c, tok(p["probe"]["wrong"], add_special_tokens=False)["input_ids"])
                 for c, p in zip(ctxs, probs)]
        assert rep[view]["logp_right"] == pytest.approx(sum(right) / 5, abs=1e-4)
        assert rep[view]["logp_wrong"] == pytest.approx(sum(wrong) / 5, abs=1e-4)
        assert rep[view]["prefers_right"] == sum(r > w for r, w in zip(right, wrong)) / 5
    assert rep["n"] == 5
