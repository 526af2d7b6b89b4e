"""eval/elastic_grid.py on a tiny random model: grid parsing, per-point measurements, and the three reports."""

import json

import pytest
import torch

from eval.elastic_grid import default_grid, evaluate_grid, markdown_table, parse_grid_point, write_reports
from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM


def test_grid_points_are_parsed_and_validated():
    cfg = Ernie5Config.from_preset("tiny")
    assert parse_grid_point("full", cfg) == (4, 8, 2)
    assert parse_grid_point("3:4:1", cfg) == (3, 4, 1)
    for bad, msg in (("3:4", "LAYERS:EXPERTS:TOPK"), ("5:8:2", "layers"), ("4:9:2", "experts"), ("4:2:3", "top-k")):
        with pytest.raises(ValueError, match=msg):
            parse_grid_point(bad, cfg)
    assert default_grid(cfg)[0] == "full" and len(default_grid(cfg)) == 5


def test_grid_measures_each_point_and_writes_reports(tmp_path):
    torch.manual_seed(0)
    model = Ernie5ForCausalLM(Ernie5Config.from_preset("tiny", num_nextn_predict_layers=0)).eval()
    val = torch.randint(0, 512, (12, 16), generator=torch.Generator().manual_seed(0))
    rows = evaluate_grid(model, val, [(4, 8, 2), (3, 4, 1)], calibration_blocks=4, decode_new_tokens=4)
    full, small = rows
    assert full["active_fraction"] == 1.0 and full["total_fraction"] == 1.0 and full["kept_layers"] == [0, 1, 2, 3]
    assert small["active_params"] < full["active_params"] and small["total_fraction"] < small["active_fraction"] < 1
    with torch.no_grad():  # the full point is scored on the blocks after the calibration slice
        want = model(val[4:], labels=val[4:]).lm_loss.item()
    assert full["val_loss"] == pytest.approx(want, abs=1e-4)
    assert all(r["decode_tokens_per_s"] > 0 and r["ms_per_token"] > 0 for r in rows)
    paths = write_reports({"tiny": rows}, str(tmp_path), meta={"val_blocks": 8})
    assert json.loads(open(paths["json"]).read())["results"]["tiny"][1]["experts"] == 4
    md = open(paths["md"]).read()
    assert md.count("\n| ") == 3 and md == markdown_table(rows, "tiny")
    assert open(paths["png"], "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="calibration_blocks"):
        evaluate_grid(model, val[:4], [(4, 8, 2)], calibration_blocks=4)


def test_validation_blocks_come_from_the_runs_own_held_out_split(tmp_path):
    """A run with `max_docs` splits fewer documents: the grid must validate on that run's held-out part (read from
    `pretrain_summary.json`), not on a split of the whole corpus, part of which the run trained on."""
    from eval.elastic_grid import load_validation_ids, training_data_settings
    from processing.text_data import pack_texts, split_corpus
    from processing.tokenizer import train_text_tokenizer
    from training.pretrain import corpus_documents

    docs = [f"document number {i} is about item {i * 7 % 13} and colour {i % 5}" for i in range(200)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs))
    data = {"train_files": [str(tmp_path / "corpus.txt")], "text_field": "text", "seed": 3, "max_docs": 60,
            "val_fraction": 0.1, "block_size": 16}  # fmt: skip
    (tmp_path / "pretrain_summary.json").write_text(json.dumps({"global_step": 1, "data": data}))
    tok = train_text_tokenizer(docs, vocab_size=280)
    assert training_data_settings(str(tmp_path)) == data and training_data_settings(str(tmp_path / "none")) is None
    got = load_validation_ids(tok, None, 16, seed=0, val_fraction=0.05, max_blocks=None, training_data=data)
    train_docs, val_docs = split_corpus(corpus_documents(data["train_files"], "text", 3, 60), 0.1)
    assert torch.equal(got, torch.tensor(pack_texts(tok, val_docs, 16)["input_ids"]))
    assert not set(val_docs) & set(train_docs)
    # The old rule split the whole file with the grid's own fraction: part of that "validation" was trained on.
    _, whole_split = split_corpus(corpus_documents(data["train_files"], "text", 0, None), 0.05)
    assert set(whole_split) & set(train_docs)
