"""`--push_to_hub --hub_model_id ...` of a recipe, with the Hub API replaced at the boundary (no network).

The fake records what `upload_folder` would send (every file under the folder, minus the ignore patterns) at the
moment of the call, so the test checks the actual files and card a user would publish.
"""

import fnmatch
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.recipe_utils import (
    HEAD_SCORES,
    SELECTED,
    load_recipe,
    save_tiny_model,
    tiny_overrides,
    write_chat_log,
    write_head_scores,
)


class FakeHfApi:
    def __init__(self):
        self.created, self.uploads = [], []

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        self.created.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, commit_message=None, token=None, run_as_future=False,
                      ignore_patterns=None, revision=None, **kwargs):
        root = Path(folder_path)
        files = {}
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root).as_posix()
            if f.is_file() and not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel.split("/")[0], p)
                                       for p in ignore_patterns or []):
                files[rel] = f.read_bytes()
        self.uploads.append({"repo_id": repo_id, "commit_message": commit_message, "files": files})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/fake")


@pytest.fixture
def fake_hub(monkeypatch):
    import transformers.trainer

    api = FakeHfApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    return api


def test_recipe_push_uploads_model_card_and_head_scores(fake_hub, tmp_path):
    from trl_retmask.recipe import main

    model_dir = save_tiny_model(tmp_path / "tiny-llama")
    data = write_chat_log(tmp_path / "prompts.jsonl")
    scores = write_head_scores(tmp_path / "scores.json")
    out = tmp_path / "out"
    argv = tiny_overrides(model_dir, data, scores, out, "--mask_top_k", "2", "--niah_eval", "False",
                          "--max_steps", "1", "--push_to_hub", "True", "--hub_model_id", "me/tiny-retmask")
    summary = main(load_recipe("smollm2").DEFAULTS, argv)

    assert fake_hub.created == ["me/tiny-retmask"]
    assert fake_hub.uploads, "nothing was pushed"
    assert all(u["repo_id"] == "me/tiny-retmask" for u in fake_hub.uploads)
    files = fake_hub.uploads[-1]["files"]

    # The model, its tokenizer and the training arguments: a loadable checkpoint.
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "training_args.bin"):
        assert name in files, (name, sorted(files))
    assert json.loads(files["config.json"])["model_type"] == "llama"

    # The head scores as used, in the retrieval-head format, and the machine-readable record.
    assert json.loads(files["retmask_head_scores.json"]) == HEAD_SCORES
    record = json.loads(files["retmask.json"])
    assert [tuple(h) for h in record["masked_heads"]] == SELECTED
    assert record["pair_stats"]["train"]["prompts"] == 8
    assert record["selection"]["top_k"] == 2

    # The card: TRL's DPO card plus the RetMask section (masked heads with scores, pair statistics, citation).
    card = files["README.md"].decode()
    assert "RetMask" in card and "2601.11020" in card
    assert "| 0 | 1 | 0.6000 |" in card and "| 2 | 3 | 0.3000 |" in card
    assert "Pair statistics (train)" in card and "kept" in card
    assert "DPO" in card and "retmask" in card  # TRL's card and the trainer's tags
    assert summary["masked_heads"] == ["0-1", "2-3"]
