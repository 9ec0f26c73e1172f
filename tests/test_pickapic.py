"""Training on Pick-a-Pic-layout data (caption, jpg_0, jpg_1, label_0): rows become K = 2 training rows
with the label's winner; DPO trains on a Parquet made here (tiny SD1.5-family pipeline, Ray Train);
a bad row is an error naming its file, row and column before anything runs or is written."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypref import pickapic, train
from raypref.collate import select
from raypref.config import load_config
from raypref.train_config import LossSection
from raypref.prefdata import decode_png
from tests.presets import train_tiny
from tests.tiny import tiny_model

CAPTIONS = ["a red circle", "two squares", "a circle left of a square", "a blue triangle"]


def _pairs(n: int, size: int = 16, ties: int = 0) -> pa.Table:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2 * (n + ties))]
    labels = [1.0 if i % 2 == 0 else 0.0 for i in range(n)] + [0.5] * ties
    return pickapic.example_table(images, [CAPTIONS[i % 4] for i in range(n + ties)], labels)


def test_rows_carry_the_labels_winner_and_ties_are_dropped():
    table = _pairs(4, ties=1)
    rows = pickapic.to_rows(table).to_pylist()
    assert len(rows) == 4
    src = table.to_pylist()
    for row, s in zip(rows, src):
        winner, loser = (s["jpg_0"], s["jpg_1"]) if s["label_0"] == 1.0 else (s["jpg_1"], s["jpg_0"])
        p = row["pairs"][0]
        assert row["images"][p["i"]] == winner and row["images"][p["j"]] == loser and row["prompt"] == s["caption"]
        assert row["phi"][p["i"]] == 1.0 and row["phi"][p["j"]] == 0.0
        for method in ("dpo", "balanced", "sft"):  # each pairwise method, and SFT, trains on the winner
            idx, pairs = select(row, LossSection(method=method))
            assert idx[pairs[0][0] if pairs else 0] == p["i"], method


def test_kept_ties_become_rows_of_equal_phi(tmp_path):
    table = _pairs(2, ties=1)
    rows = pickapic.to_rows(table, ties="keep").to_pylist()
    assert len(rows) == 3 and rows[2]["phi"] == [0.5, 0.5] and rows[2]["pairs"] == []
    assert rows[2]["images"] == [table["jpg_0"][2].as_py(), table["jpg_1"][2].as_py()]
    assert select(rows[2], LossSection(method="dpo")) is None
    assert select(rows[2], LossSection(method="dpo"), keep_ties=True) == ([0, 1], [(0, 1, 1.0)])
    pq.write_table(_pairs(0, ties=3), tmp_path / "t.parquet")  # all ties: nothing to train unless kept
    assert pickapic.check(str(tmp_path / "t.parquet"), keep_ties=True)["ties"] == 3
    cfg = load_config(train_tiny(), None, ["data.ties=keep"])
    assert cfg.data.ties == "keep"
    with pytest.raises(ValueError, match="data.ties=keep needs loss.method=dpo"):
        load_config(train_tiny(), None, ["data.ties=keep", "loss.method=sft"])


def test_dpo_trains_two_steps_on_pickapic_parquet(ray_local, tmp_path):
    tiny_model("shapes").save_pretrained(tmp_path / "base")
    pq.write_table(_pairs(2, ties=6), tmp_path / "pairs.parquet")
    cfg = load_config(train_tiny(), None, [
        f"model.path={tmp_path / 'base'}", f"data.path={tmp_path / 'pairs.parquet'}", "run.num_workers=1",
        f"run.storage_path={tmp_path / 'runs'}", "run.name=pickapic", "optim.max_steps=2", "data.ties=keep"])
    assert cfg.data.format == "auto" and pickapic.detect_format(cfg.data.path) == "pickapic"
    result = train.build_trainer(cfg).fit()
    assert result.error is None and result.metrics["step"] == 2
    # batch 4 of 8 rows: only with the 6 ties kept are there 4 prompts a step (skipped, 2 rows)
    assert np.isfinite(result.metrics["loss"]) and result.metrics["prompts"] == 4


@pytest.mark.parametrize("column, value, why", [
    ("jpg_1", b"\x89PNG not really", "undecodable image"),
    ("label_0", 2.0, "label in {0, 0.5, 1}"),
    ("caption", None, "non-empty text"),
    ("jpg_0", None, "encoded image bytes"),
])
def test_a_bad_row_names_file_row_and_column_and_nothing_runs(tmp_path, column, value, why):
    rows = _pairs(6).to_pylist()
    rows[4][column] = value
    good, bad = tmp_path / "data" / "a.parquet", tmp_path / "data" / "b.parquet"
    good.parent.mkdir()
    pq.write_table(_pairs(3), good)
    pq.write_table(pa.Table.from_pylist(rows, schema=_pairs(1).schema), bad)
    cfg = load_config(train_tiny(), None, [
        "model.path=unused", f"data.path={tmp_path / 'data'}", "data.format=pickapic",
        f"run.storage_path={tmp_path / 'runs'}"])
    with pytest.raises(ValueError, match=f"{bad}: row 4, column '{column}': .*{why}".replace("{", r"\{")
                       .replace("}", r"\}")):
        train.build_trainer(cfg)
    assert not (tmp_path / "runs").exists()  # nothing written


def test_missing_column_and_all_ties_are_errors(tmp_path):
    pq.write_table(_pairs(2).drop_columns(["label_0"]), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"a.parquet: missing column\(s\) \['label_0'\]"):
        pickapic.check(str(tmp_path / "a.parquet"))
    pq.write_table(_pairs(0, ties=3), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="every label is a tie"):
        pickapic.check(str(tmp_path / "t.parquet"))
    with pytest.raises(ValueError, match="data.format"):
        load_config(train_tiny(), None, ["data.format=hpd"])


def test_huggingface_image_structs_are_read(tmp_path):
    """datasets' Image feature stores {"bytes", "path"}: the same rows come out."""
    plain = _pairs(2)
    structs = plain.set_column(1, "jpg_0", pa.array([{"bytes": b, "path": None} for b in plain["jpg_0"].to_pylist()]))
    pq.write_table(structs, tmp_path / "hf.parquet")
    assert pickapic.check(str(tmp_path / "hf.parquet"))["pairs"] == 2
    rows = pickapic.to_rows(structs).to_pylist()
    assert decode_png(rows[0]["images"][0]).shape == (16, 16, 3)
    assert rows == pickapic.to_rows(plain).to_pylist()


def test_a_save_to_disk_dataset_streams_through_ray_data(ray_local, tmp_path):
    """datasets' save_to_disk output (Arrow stream files; images as the Image feature) is read without the
    datasets package: checked row by row, then streamed by Ray Data to the same rows as the Parquet."""
    import datasets

    plain = _pairs(5, ties=1)
    ds = datasets.Dataset.from_dict(plain.to_pydict())
    ds = ds.cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"), max_shard_size="2KB")  # several .arrow shards
    assert len(pickapic.files(str(tmp_path / "hf"))) > 1 and pickapic.is_arrow(str(tmp_path / "hf"))
    assert pickapic.detect_format(str(tmp_path / "hf")) == "pickapic"
    assert pickapic.check(str(tmp_path / "hf")) == {"files": len(pickapic.files(str(tmp_path / "hf"))),
                                                   "rows": 6, "pairs": 5, "ties": 1}
    cfg = load_config(train_tiny(), None, [f"data.path={tmp_path / 'hf'}"])
    got = sorted(train.read_data(cfg).take_all(), key=lambda r: r["images"][0])
    want = sorted(pickapic.to_rows(plain).to_pylist(), key=lambda r: r["images"][0])
    assert [(r["prompt"], list(r["images"]), list(r["phi"])) for r in got] == [
        (r["prompt"], r["images"], r["phi"]) for r in want]


def _png_bytes(value: int) -> bytes:
    from raypref.prefdata import encode_png

    return encode_png(np.full((16, 16, 3), value, np.uint8))


def test_pairs_of_one_caption_become_a_ranking_where_consistent():
    a, b, c, d = (_png_bytes(v) for v in (10, 20, 30, 40))
    consistent = pa.Table.from_pydict({"caption": ["p"] * 4, "jpg_0": [a, c, b, d], "jpg_1": [b, b, c, a],
                                       "label_0": [1.0, 0.0, 1.0, 0.5]})  # a > b, b > c (twice); a tie
    (row,) = pickapic.group_to_rows(consistent).to_pylist()
    assert row["images"] == [a, b, c] and row["phi"] == [1.0, 0.5, 0.0] and row["ranking"] == [1, 2, 3]
    assert {(p["i"], p["j"]) for p in row["pairs"]} == {(0, 1), (1, 2)}
    cycle = pa.Table.from_pydict({"caption": ["q"] * 3, "jpg_0": [a, b, c], "jpg_1": [b, c, a],
                                  "label_0": [1.0, 1.0, 1.0]})  # a > b > c > a: no ranking
    rows = pickapic.group_to_rows(cycle).to_pylist()
    assert [r["images"] for r in rows] == [[a, b], [b, c], [c, a]] and all(r["phi"] == [1.0, 0.0] for r in rows)


def test_prefs_convert_writes_raypref_layout(ray_local, tmp_path, capsys):
    from raypref.cli import main
    from raypref.prefdata import SCHEMA

    a, b, c = (_png_bytes(v) for v in (10, 20, 30))
    pq.write_table(pa.Table.from_pydict({"caption": ["p", "q", "p", "r"], "jpg_0": [a, a, b, c],
                                         "jpg_1": [b, c, c, a], "label_0": [1.0, 0.0, 1.0, 0.5]}),
                   tmp_path / "in.parquet")
    assert main(["prefs", "convert", str(tmp_path / "in.parquet"), str(tmp_path / "out")]) == 0
    table = pq.read_table(tmp_path / "out")
    assert table.schema.equals(SCHEMA, check_metadata=False)
    got = {r["prompt"]: r for r in table.to_pylist()}
    assert sorted(got) == ["p", "q"]  # r was a tie
    assert got["p"]["images"] == [a, b, c] and got["p"]["phi"] == [1.0, 0.5, 0.0]
    assert got["q"]["images"] == [c, a] and got["q"]["phi"] == [1.0, 0.0]
    assert main(["prefs", "convert", str(tmp_path / "in.parquet"), str(tmp_path / "out")]) == 2
    assert "is not empty" in capsys.readouterr().err  # a re-run never overwrites


def test_images_of_other_sizes_are_fitted_to_the_model():
    from raypref.collate import fit

    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    out = fit(wide, (16, 16))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    same = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert fit(same, (16, 16)) is same
    small = fit(np.full((8, 12, 3), 200, np.uint8), (16, 16))  # upscaled to cover, then cropped
    assert small.shape == (16, 16, 3) and (small == 200).all()
