"""``examples/dlrm/train.py --id-bias`` on the shared Frappe file: a share of the budget goes to
the most frequent ids' scalars (memory_report counts them, the tables fit the rest), ``all``
adds a scalar per id to the full model, and bad combinations are flag errors."""

import numpy as np
import pytest
from torchrec import EmbeddingBagConfig

from test_tiers_train import frappe, train  # noqa: F401  (the preprocessed-Frappe fixture)
from test_train_protocol import cli_error
from torchrec_cce import hot_ids_for_bytes

FEATURES = "user,item,daytime,weekday,isweekend,homework,cost,weather,country,city".split(",")


def _tables_and_counts(m, data_dir):
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=16,
                                 num_embeddings=m["table_rows"][f"t_{f}"], feature_names=[f])
              for f in FEATURES]
    return tables, {t.name: np.load(data_dir / "counts" / f"{t.feature_names[0]}.npy")
                    for t in tables}


@pytest.mark.timeout(600)
def test_a_share_of_the_budget_biases_the_most_frequent_ids(frappe):  # noqa: F811
    budget = 0.02
    m = train(frappe, "--embedding-budget-mb", str(budget), "--id-bias", "0.25")
    assert np.isfinite(m["test_logloss"])
    total = int(budget * 2**20)
    tables, counts = _tables_and_counts(m, frappe)
    expect = hot_ids_for_bytes(tables, counts, int(total * 0.25))
    assert sum(expect.values()) == int(total * 0.25) // 4
    report = m["embedding_tables"]
    for t in tables:
        assert report[t.name]["id_bias_bytes"] == 4 * expect.get(t.name, 0), t.name
    assert m["embedding_bytes"] <= total
    planned = sum(r["bytes"] for r in m["embedding_plan"]["tables"].values())
    assert planned <= total - int(total * 0.25)  # the planner sized the tables in the rest
    assert m["embedding_bytes"] == planned + 4 * sum(expect.values())


@pytest.mark.timeout(600)
def test_all_adds_a_scalar_per_id_to_the_full_model(frappe):  # noqa: F811
    m = train(frappe, "--method", "full", "--id-bias", "all")
    rows = m["table_rows"]
    assert m["embedding_bytes"] == m["full_embedding_bytes"] + 4 * sum(rows.values())
    for name, r in m["embedding_tables"].items():
        assert r["id_bias_bytes"] == 4 * rows[name]


def test_flag_errors():
    assert "--id-bias with a share spends part of --embedding-budget-mb" in cli_error(
        "--id-bias", "0.25")
    assert "--id-bias all adds a scalar per id" in cli_error(
        "--id-bias", "all", "--embedding-budget-mb", "1")
    assert "--id-bias takes 'all' or a float in (0, 1)" in cli_error("--id-bias", "1.5")


def test_plan_select_flag_errors():
    budget = ["--embedding-budget-mb", "0.02"]
    assert "--plan-select-id-bias adds candidates to --plan-select validation" in cli_error(
        *budget, "--plan-select-id-bias", "0.25")
    assert "--plan-select-id-bias tries shares of --id-bias itself" in cli_error(
        *budget, "--plan-select", "validation", "--plan-select-id-bias", "0.25",
        "--id-bias", "0.5")
    assert "--plan-select-id-bias takes comma-separated floats" in cli_error(
        *budget, "--plan-select", "validation", "--plan-select-id-bias", "0.25,1")


@pytest.mark.timeout(900)
def test_validation_selection_tries_the_best_plan_with_a_bias(frappe):  # noqa: F811
    """The candidate plans, then the best of them with each --plan-select-id-bias share (its
    plan re-sized in the rest of the budget): the lowest validation loss of all is kept."""
    m = train(frappe, "--embedding-budget-mb", "0.005", "--plan-select", "validation",
              "--plan-select-id-bias", "0.25,0.5")
    sel = m["plan_selection"]
    cands = sel["candidates"]
    plain = [c for c in cands if c["variant"] is None]
    biased = [c for c in cands if c["variant"] is not None]
    assert [c["variant"] for c in biased] == [{"id_bias": 0.25}, {"id_bias": 0.5}]
    assert cands[: len(plain)] == plain and len(plain) >= 2
    base = min(range(len(plain)), key=lambda j: (plain[j]["val_logloss"], j))
    total = int(0.005 * 2**20)
    for c, share in zip(biased, (0.25, 0.5)):
        # the same candidate plan, sized in the budget less the bias share
        assert c["method"] == plain[base]["method"]
        assert c["plan"]["total_bytes"] <= total - int(total * share)
        assert c["plan"]["byte_budget"] == total - int(total * share)
    vals = [c["val_logloss"] for c in cands]
    assert sel["chosen"] == int(np.argmin(vals)) and m["val_logloss"] == min(vals)
    chosen = cands[sel["chosen"]]
    bias_bytes = sum(r["id_bias_bytes"] for r in m["embedding_tables"].values())
    if chosen["variant"] is None:
        assert bias_bytes == 0
    else:
        assert 0 < bias_bytes <= int(total * chosen["variant"]["id_bias"])
    assert m["embedding_bytes"] <= total
