"""builtin:word_problems: the generated problems, their answers, and the configured task end to end."""
import re
from pathlib import Path

from fastprerl.config import load_config
from fastprerl.data import format_prompt, load_problems, word_problems
from fastprerl.evaluation.data import EvalSettings, parse_data_spec, prepare_datasets
from fastprerl.models import load_tokenizer
from fastprerl.rewards import from_config, score_responses

ROOT = Path(__file__).resolve().parents[2]
PATTERN = re.compile(r"(\w+) has (\d) (\w+)\. \1 gets (\d) more \3, then gives (\d+) \3 to a friend\. "
                     r"How many \3 does \1 have now\?")


def test_problems_are_seeded_and_their_answers_follow_from_the_text():
    probs = word_problems(500, 7)
    assert probs == word_problems(500, 7) and probs != word_problems(500, 8)
    for p in probs:
        m = PATTERN.fullmatch(p["prompt"])
        assert m, p["prompt"]
        a, b, c = int(m.group(2)), int(m.group(4)), int(m.group(5))
        assert 2 <= a <= 9 and 1 <= b <= 9 and 1 <= c < a + b
        assert p["answer"] == str(a + b - c)


def test_the_config_builds_chat_prompts_and_the_math_reward_scores_boxed_answers():
    cfg = load_config(ROOT / "configs" / "word_problems.toml")
    assert cfg.data.source == "builtin:word_problems" and cfg.data.format == "chat"
    probs = load_problems(cfg.data, 0)
    tok = load_tokenizer(cfg.model.path)
    text = tok.decode(format_prompt(probs[0], cfg.data, tok))
    assert probs[0]["prompt"] in text and "\\boxed{}" in text and text.rstrip().endswith("assistant")
    fn = from_config(cfg.reward)
    good = f"First step.\n\nSo the answer is \\boxed{{{probs[0]['answer']}}}."
    bad = f"So the answer is \\boxed{{{int(probs[0]['answer']) + 1}}}."
    assert score_responses(fn, [good, bad], [probs[0], probs[0]]).score == [1.0, 0.0]


def test_eval_knows_the_builtin():
    assert parse_data_spec("builtin:word_problems").kind == "word_problems"
    settings = EvalSettings.from_options(**{"eval.n_problems": 3, "data.format": "chat"})
    tok = load_tokenizer("builtin:smollm2-135m")
    (ds,) = prepare_datasets([parse_data_spec("builtin:word_problems")], settings, tok)
    assert len(ds.problems) == 3 and ds.reward == "math"
    assert "\\boxed{}" in tok.decode(ds.prompt_ids[0])
