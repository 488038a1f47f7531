"""math-verify's own test suite, run for real against `score_math` with its defaults.

The source distribution of the installed math-verify (it ships its tests) is downloaded from the package
index at test time; the parametrized (gold, pred, expected) rows of its test_all.py, test_numina_cases.py,
test_open_thoughts.py and test_boxed.py are read out of the files (their Python syntax trees, not copied
here). Those tests call `parse`/`verify` with per-test settings (only LaTeX or only plain extraction,
precision 5 or 2, `allow_set_relation_comp`); the comparison here holds every row to the library's defaults on
both sides: plain math-verify, `verify(parse(gold), parse(pred))`, against fastprerl's `score_math` defaults.
fastprerl must agree with the expected verdicts on at least as many rows and give no false positive (1.0
where 0 is expected) that plain math-verify does not give too. A failed download is a failure, not a skip.
"""
import ast
import importlib.metadata
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fastprerl.rewards import score_batch, shutdown

SUITE_FILES = ("test_all.py", "test_numina_cases.py", "test_open_thoughts.py", "test_boxed.py")


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory) -> Path:
    version = importlib.metadata.version("math-verify")
    where = tmp_path_factory.mktemp("math_verify_sdist")
    run = subprocess.run([sys.executable, "-m", "pip", "download", f"math-verify=={version}", "--no-deps",
                          "--no-binary", ":all:", "-d", str(where)], capture_output=True, text=True, timeout=300)
    archives = sorted(where.glob("*.tar.gz"))
    if run.returncode != 0 or not archives:
        pytest.fail(f"could not download math-verify {version}'s source distribution:\n{run.stdout}\n{run.stderr}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(where, filter="data")
    [tests] = [p for p in where.glob("*/tests") if p.is_dir()]
    yield tests
    shutdown()


def parametrized_rows(path: Path) -> list[tuple[str, str, str, int]]:
    """(test name, gold, pred, expected) of every `@pytest.mark.parametrize("gold, pred, expected...", [...])`."""
    rows = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if not (isinstance(deco, ast.Call) and ast.unparse(deco.func) == "pytest.mark.parametrize"):
                continue
            names = [n.strip() for n in ast.literal_eval(deco.args[0]).split(",")]
            if names[:3] != ["gold", "pred", "expected"]:
                continue
            # The rows are literals, some f-strings over `math` (e.g. f"{math.sqrt(17):.15f}").
            values = eval(compile(ast.Expression(deco.args[1]), str(path), "eval"), {"math": math})
            rows += [(node.name, v[0], v[1], int(v[2])) for v in values]
    return rows


def test_score_math_agrees_with_math_verify_on_its_own_suite(suite_dir):
    from math_verify import parse, verify

    rows = [row for name in SUITE_FILES for row in parametrized_rows(suite_dir / name)]
    assert len(rows) >= 250, f"only {len(rows)} rows read: did the suite's layout change?"
    golds, preds, expected = [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]
    plain = [float(verify(parse(g), parse(p))) for g, p in zip(golds, preds)]
    ours = score_batch(preds, golds)
    plain_agree = sum(v == e for v, e in zip(plain, expected))
    ours_agree = sum(v == e for v, e in zip(ours, expected))
    print(f"\nmath-verify's suite, {len(rows)} rows: plain math-verify agrees on {plain_agree}, "
          f"score_math on {ours_agree}")
    for (test, g, p, e), v, o in zip(rows, plain, ours):
        if o != e:
            print(f"  {test}: gold {g!r} pred {p!r}: expected {e}, score_math {o}, math-verify {v}")
    assert ours_agree >= plain_agree
    own_false_positives = [(t, g, p) for (t, g, p, e), v, o in zip(rows, plain, ours) if o == 1 and e == 0 and v != 1]
    assert not own_false_positives
