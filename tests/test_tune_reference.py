"""benchmarks/tune_reference.py and quality.py's full-table recipe: the cells' train.py
arguments (every recipe parses, later flags win, only the full row gets FULL_RECIPES) and the
choice of a recipe on seed-0 validation log loss."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "examples" / "dlrm"))

import quality  # noqa: E402
import train  # noqa: E402
import tune_reference  # noqa: E402

DATA = ["--data", "preprocessed", "--data-dir", "/nonexistent"]


def test_every_recipe_parses_and_overrides_the_grid_recipe() -> None:
    qargs = quality.parse_args([])
    for dataset, rows in tune_reference.ROWS.items():
        base_lr = quality.recipe(dataset, qargs)["lr"]
        for row, fraction in rows:
            budget = None if fraction is None else 1 << 20
            for recipe, flags in tune_reference.GRID.items():
                args = train.parse_args(tune_reference.train_args(
                    dataset, row, budget, recipe, 0, DATA, qargs))
                want_lr = base_lr * (float(flags[0][3:]) if flags and flags[0].startswith("lr*")
                                     else 1.0)
                assert abs(args.lr - want_lr) < 1e-12, (dataset, row, recipe)
                assert args.embedding_gain == ("--embedding-gain" in flags)
                l2 = flags[flags.index("--embedding-l2") + 1] if "--embedding-l2" in flags else 0
                assert args.embedding_l2 == float(l2)
                # the search starts from the grid's recipe, never from FULL_RECIPES
                if recipe == "base":
                    assert args.embedding_l2 == 0 and args.embedding_dropout == 0


def test_full_recipes_reach_only_the_full_row() -> None:
    qargs = quality.parse_args([])
    for dataset, flags in quality.FULL_RECIPES.items():
        full = quality.cell_args(dataset, "full", None, 0, DATA, qargs)
        assert full[-len(flags):] == flags
        train.parse_args(full)  # the flags exist
        assert quality.cell_args(dataset, "full", None, 0, DATA, qargs, full_recipe=False) \
            == full[:-len(flags)]
        other = quality.cell_args(dataset, "hashing", 1 << 20, 0, DATA, qargs)
        assert not set(flags) & set(other) - {"0.001", "0.01"}


def _row(recipe: str, seed: int, val: float, status: str = "ok") -> dict:
    return {"recipe": recipe, "seed": seed, "val_logloss": val, "status": status,
            "test_logloss": val + 1}


def test_the_recipe_is_chosen_on_seed_0_validation_once_every_recipe_ran() -> None:
    grid = list(tune_reference.GRID)
    rows = [_row(g, 0, 0.5 + 0.01 * i) for i, g in enumerate(grid)]
    assert tune_reference.chosen(rows[:-1]) is None  # search unfinished
    rows[3]["val_logloss"] = 0.1
    rows.append(_row(grid[5], 1, 0.0))  # other seeds do not count
    assert tune_reference.chosen(rows) == grid[3]
    rows[6]["val_logloss"] = 0.1  # a tie: the earlier recipe of GRID
    assert tune_reference.chosen(rows) == grid[3]
    rows[3]["status"] = "failed"  # a failed cell is never chosen
    assert tune_reference.chosen(rows) == grid[6]
