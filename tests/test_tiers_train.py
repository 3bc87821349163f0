"""``examples/dlrm/train.py --hot-ids`` on the shared Frappe file (preprocessed into a temporary
directory): any --method, with --embedding-budget-mb (the planner sizes hot rows + the method)
and with the per-table cap; the model trains, its bytes are the plan's, and the tiered tables
are the ones the plan says."""

import os
from pathlib import Path

import numpy as np
import pytest

from test_train_protocol import cli_error, run
from torchrec_cce.data.preprocess import main as preprocess

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TORCHREC_CCE_SHARED_DATA", REPO / ".." / "shared" / "data"))


@pytest.fixture(scope="module")
def frappe(tmp_path_factory):
    path = SHARED / "frappe.csv"
    if not path.exists():
        pytest.skip(f"shared data file {path} not found (expected <repo>/../shared/data, or set "
                    f"TORCHREC_CCE_SHARED_DATA): the --hot-ids run needs a real vocabulary")
    out = tmp_path_factory.mktemp("frappe")
    preprocess(["--format", "csv", "--input", str(path), "--label-column", "label",
                "--categorical-columns", "user,item,daytime,weekday,isweekend,homework,cost,"
                "weather,country,city", "--split", "0.8,0.1,0.1", "--no-progress",
                "--out", str(out)])
    return out


def train(data_dir, *argv):
    return run("--data", "preprocessed", "--data-dir", str(data_dir), "--epochs", "1",
               "--max-steps", "6", "--batch-size", "512", "--no-progress", *argv)


def check(m, budget_mib=None):
    assert all(np.isfinite(v) for _, v in m["train_loss_curve"]) and np.isfinite(m["test_logloss"])
    if budget_mib is not None:
        assert m["embedding_bytes"] <= budget_mib * 2**20
    return {n: r for n, r in m["embedding_tables"].items() if r["method"].endswith("+hot")}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["qr", "hashing", "cce", "memcom"])
def test_budget_and_method(frappe, method):
    budget = {"memcom": 0.12}.get(method, 0.02)
    m = train(frappe, "--method", method, "--embedding-budget-mb", str(budget),
              "--hot-ids", "auto")
    tiered = check(m, budget)
    plan = m["embedding_plan"]["tables"]
    assert "t_item" in tiered and plan["t_item"]["hot_ids"] > 0
    for name, row in plan.items():  # memory_report measured what the planner planned
        assert m["embedding_tables"][name]["compressed_bytes"] == row["bytes"], name
        assert (name in tiered) == bool(row["hot_ids"]), name
        assert m["embedding_tables"][name]["method"] == row["method"], name
        if row["hot_ids"]:
            assert row["method"] == method + "+hot"
    assert m["method"] == method


@pytest.mark.timeout(600)
def test_cap_and_explicit_hot_ids(frappe):
    m = train(frappe, "--method", "qr", "--hot-ids", "64")
    tiered = check(m)
    assert set(tiered) >= {"t_item"}
    assert "TieredConfig(hot_ids=64" in m["stdout"] or any(
        r["codebook_bytes"] for r in tiered.values())


@pytest.mark.timeout(600)
def test_online_hot_set(frappe):
    """--hot-set online: the planner's OnlineTieredConfig (sketch + hot rows + the method over
    every id in the table's bytes) is what memory_report measures, and the training hooks
    migrate every --migrate-every steps with no call in train.py's loop."""
    m = train(frappe, "--method", "hashing", "--embedding-budget-mb", "0.05", "--hot-ids",
              "auto", "--hot-set", "online", "--migrate-every", "2")
    check(m, 0.05)
    plan = m["embedding_plan"]["tables"]
    online = {n for n, r in plan.items() if r["method"] == "hashing+online_hot"}
    assert "t_item" in online
    for name, row in plan.items():
        assert m["embedding_tables"][name]["compressed_bytes"] == row["bytes"], name
        assert m["embedding_tables"][name]["method"] == row["method"], name
    assert [r["step"] for r in m["migrations"]] == [2, 4, 6]
    first = m["migrations"][0]["tables"]
    assert set(first) == online
    assert all(s["promoted"] == plan[n]["hot_ids"] for n, s in first.items())
    # (fused row-wise Adagrad state of the promoted rows zeroed: one state tensor per table)
    assert all(s["optimizer_states_reset"] >= 1 for s in first.values())


@pytest.mark.timeout(600)
def test_hot_share_mass_and_float32_hot_rows(frappe):
    """--hot-share mass --hot-dtype float32 before float16 CE: the item table's hot tier is
    mass_hot_ids' prefix at float32 rows (the config train.py built says so, not only the
    plan), the cold CE stays float16, and memory_report measures the plan's bytes."""
    import torch
    from torchrec import EmbeddingBagConfig

    from torchrec_cce import plan_compression
    from torchrec_cce.budget import _Curve, mass_hot_ids
    from torchrec_cce.data.preprocessed import load_meta

    m = train(frappe, "--method", "ce", "--codebook-dtype", "float16", "--embedding-budget-mb",
              "0.02", "--hot-ids", "auto", "--hot-share", "mass", "--hot-dtype", "float32")
    check(m, 0.02)
    plan = m["embedding_plan"]["tables"]
    item = plan["t_item"]
    assert item["method"] == "ce+hot" and item["hot_ids"] > 0
    assert "hot_dtype=torch.float32" in item["config"]
    assert "codebook_dtype=torch.float16" in item["config"]
    for name, row in plan.items():
        assert m["embedding_tables"][name]["compressed_bytes"] == row["bytes"], name
    # the planner's rule on the data's own counts: the untiered CE plan's item bytes, then
    # the largest prefix carrying at least its byte share of the occurrences
    feats = load_meta(str(frappe))["features"]
    ts = [EmbeddingBagConfig(name=f"t_{f['name']}", embedding_dim=16,
                             num_embeddings=int(f["vocab_size"]), feature_names=[f["name"]])
          for f in feats]
    counts = {t.name: np.load(os.path.join(frappe, "counts", f"{t.feature_names[0]}.npy"))
              for t in ts}
    base = plan_compression(ts, int(0.02 * 2**20), counts=counts, methods=["ce"],
                            codebook_dtype=torch.float16)
    item_t = next(t for t in ts if t.name == "t_item")
    assert item["hot_ids"] == mass_hot_ids(_Curve(item_t, counts["t_item"]),
                                           base.tables["t_item"].bytes, 16 * 4)


@pytest.mark.timeout(600)
def test_hot_tables_limits_the_tier(frappe):
    """--hot-tables t_item: the item table gets the same hot tier as without the flag, the user
    table (tiered without it) keeps the method alone, at the same bytes per table."""
    flags = ("--method", "hashing", "--embedding-budget-mb", "0.02", "--hot-ids", "auto")
    every = train(frappe, *flags)["embedding_plan"]["tables"]
    m = train(frappe, *flags, "--hot-tables", "t_item")
    check(m, 0.02)
    plan = m["embedding_plan"]["tables"]
    assert every["t_user"]["hot_ids"] and every["t_item"]["hot_ids"]
    assert plan["t_item"] == every["t_item"]
    assert plan["t_user"]["method"] == "hashing" and not plan["t_user"]["hot_ids"]
    assert [n for n, r in plan.items() if r["hot_ids"]] == ["t_item"]
    for name, row in plan.items():
        assert m["embedding_tables"][name]["compressed_bytes"] == row["bytes"], name


def test_flag_errors():
    assert "--hot-ids takes 'auto' or an int >= 1" in cli_error("--hot-ids", "0")
    assert "the candidate plans already include tiered" in cli_error(
        "--embedding-budget-mb", "1", "--plan-select", "validation", "--hot-ids", "auto")
    assert "--hot-set online needs --hot-ids" in cli_error("--hot-set", "online")
    assert "--hot-share takes 'mass' or a float in (0, 1)" in cli_error(
        "--hot-ids", "auto", "--hot-share", "1.5")
    assert "--hot-share sizes --hot-ids auto" in cli_error("--hot-ids", "64", "--hot-share",
                                                           "0.25")
    assert "--hot-dtype needs --hot-ids" in cli_error("--hot-dtype", "float32")
    assert "--hot-tables needs --hot-ids" in cli_error("--hot-tables", "t_item")
