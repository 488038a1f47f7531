"""The house rules the code is held to: trainer.py reads in an afternoon (<= 300 lines) and every module of
fastprerl/ and kernels/ stays <= 400 lines, so that a module holds one job."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lines(p: Path) -> int:
    return len(p.read_text().splitlines())


def test_trainer_is_at_most_300_lines():
    assert _lines(ROOT / "fastprerl" / "trainer.py") <= 300


def test_every_module_is_at_most_400_lines():
    modules = sorted((ROOT / "fastprerl").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    assert len(modules) > 30   # the walk found the package
    over = {str(p.relative_to(ROOT)): _lines(p) for p in modules if _lines(p) > 400}
    assert over == {}
