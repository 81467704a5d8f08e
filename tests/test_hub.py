"""Hub round trips with huggingface_hub replaced at its boundary only (no network): a trained model pushed by the
trainer, and `HeadScores.push_to_hub` / `from_pretrained(repo_id)`, read back through a fake `hf_hub_download` that
serves exactly the files that were uploaded."""

import fnmatch
import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from datasets import Dataset
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

from tests.test_trainer import PROMPTS, SCORES, config
from tests.tiny import make_tiny_model
from trl_retmask import HeadScores
from trl_retmask.trainer import RetMaskTrainer

GRID = {f"{l}-{h}": [0.05 * (l * 4 + h) / 11] for l in range(3) for h in range(4)}


def _not_found(repo_id):
    """huggingface_hub's error for a missing repo (its constructor wants an HTTP response; the code reads none)."""
    error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
    Exception.__init__(error, f"404: {repo_id}")
    return error


class FakeHub:
    """Repos as {repo_id: {path: bytes}}; the HfApi methods the code under test calls, and hf_hub_download."""

    def __init__(self, tmp_path):
        self.repos, self.created, self.tmp, self.online = {}, [], tmp_path, True
        self.calls = []  # (what, arguments) of every call that carries settings

    def api(self, token=None):
        hub = self
        hub.calls.append(("HfApi", {"token": token}))

        class Api:
            def create_repo(self, repo_id, token=None, private=None, exist_ok=False, repo_type=None, **kw):
                hub.calls.append(
                    (
                        "create_repo",
                        {"repo_id": repo_id, "private": private, "exist_ok": exist_ok, "repo_type": repo_type},
                    )
                )
                hub.created.append(repo_id)
                hub.repos.setdefault(repo_id, {})
                return SimpleNamespace(repo_id=repo_id)

            def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kw):
                root = Path(folder_path)
                for f in sorted(root.rglob("*")):
                    rel = f.relative_to(root).as_posix()
                    if f.is_file() and not any(
                        fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel.split("/")[0], p) for p in ignore_patterns or []
                    ):
                        hub.repos[repo_id][rel] = f.read_bytes()
                return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/fake")

            def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, **kw):
                hub.calls.append(("upload_file", {"path_in_repo": path_in_repo, "repo_id": repo_id, **kw}))
                if repo_id not in hub.repos:
                    raise _not_found(repo_id)
                hub.repos[repo_id][path_in_repo] = path_or_fileobj
                return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/fake")

        return Api()

    def download(self, repo_id, filename, *, revision=None, token=None, **kw):
        self.calls.append(
            ("download", {"repo_id": repo_id, "filename": filename, "revision": revision, "token": token})
        )
        if not self.online:
            raise LocalEntryNotFoundError("offline and not cached")
        if repo_id not in self.repos:
            raise _not_found(repo_id)
        if filename not in self.repos.get(repo_id, {}):
            raise EntryNotFoundError(f"{repo_id}/{filename}")
        path = self.tmp / "hub_cache" / repo_id / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.repos[repo_id][filename])
        return str(path)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import transformers.trainer

    fake = FakeHub(tmp_path)
    monkeypatch.setattr(transformers.trainer, "hf_api", fake.api)
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.download)
    return fake


def test_pushed_model_gives_back_its_heads(hub, tiny_tokenizer, tmp_path):
    prompts = Dataset.from_dict({"prompt": PROMPTS})
    trainer = RetMaskTrainer(
        model=make_tiny_model("llama"),
        args=config(tmp_path, max_steps=1, mask_top_k=2, hub_model_id="me/tiny-retmask"),
        train_dataset=prompts,
        processing_class=tiny_tokenizer,
        head_scores=SCORES,
    )
    trainer.train()
    trainer.push_to_hub()

    assert hub.created == ["me/tiny-retmask"]
    files = hub.repos["me/tiny-retmask"]
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "README.md",
        "retmask.json",
        "retmask_head_scores.json",
    ):
        assert name in files, (name, sorted(files))
    assert not any(name.startswith("_") for name in files)  # the pair cache stays local
    card = files["README.md"].decode()
    assert 'model="me/tiny-retmask"' in card and "## RetMask" in card and "| 0 | 1 | 0.8000 |" in card
    assert card.index("## Citations") < card.index("## RetMask")

    back = HeadScores.from_pretrained("me/tiny-retmask")
    assert back.trained_heads == trainer.masked_heads == SCORES.select(top_k=2)
    assert back.mean_scores() == SCORES.mean_scores()
    assert json.loads(files["retmask.json"])["selection"]["top_k"] == 2


def test_head_scores_push_and_download(hub):
    partial = HeadScores({"1-2": [0.4]}, num_layers=3, num_heads=4)
    partial.push_to_hub("me/scores", private=True)
    assert hub.created == ["me/scores"] and set(hub.repos["me/scores"]) == {"retmask_head_scores.json"}
    back = HeadScores.from_pretrained("me/scores")
    assert (back.num_layers, back.num_heads) == (3, 4) and back.mean_scores() == partial.mean_scores()
    assert back.trained_heads is None  # a bare score repo records no training

    hub.repos["me/empty"] = {}
    with pytest.raises(ValueError, match="holds no retmask_head_scores.json"):
        HeadScores.from_pretrained("me/empty")
    hub.online = False
    with pytest.raises(ValueError, match="not in the local cache.*offline mode"):
        HeadScores.from_pretrained("me/scores")
    assert HeadScores.from_pretrained("Qwen/Qwen3-8B").num_layers == 36  # bundled names never reach the Hub


def test_head_scores_hub_settings_reach_the_hub_and_refusals_say_why(hub):
    """Token, privacy, revision and commit message reach the Hub calls (a private push must be private); reading
    passes revision and token to both downloads; a missing repo and offline mode are named with their fix."""
    scores = HeadScores({"1-2": [0.4]}, num_layers=3, num_heads=4)
    scores.push_to_hub("me/scores", token="hf_x", private=True, revision="v2")
    assert hub.calls == [
        ("HfApi", {"token": "hf_x"}),
        ("create_repo", {"repo_id": "me/scores", "private": True, "exist_ok": True, "repo_type": "model"}),
        (
            "upload_file",
            {
                "path_in_repo": "retmask_head_scores.json",
                "repo_id": "me/scores",
                "repo_type": "model",
                "revision": "v2",
                "commit_message": "Upload RetMask head scores",
            },
        ),
    ]
    hub.calls.clear()
    scores.push_to_hub("me/scores", commit_message="rescored", create_repo=False)
    assert [c[0] for c in hub.calls] == ["HfApi", "upload_file"] and hub.calls[1][1]["commit_message"] == "rescored"
    hub.calls.clear()
    HeadScores.from_pretrained("me/scores", revision="v2", token="hf_x")
    assert hub.calls == [
        ("download", {"repo_id": "me/scores", "filename": name, "revision": "v2", "token": "hf_x"})
        for name in ("retmask_head_scores.json", "retmask.json")
    ]
    hint = (
        "Detect them with `trl-retmask detect --model_name_or_path me/nothing --output_dir DIR` and pass "
        "`--head_scores DIR` (bundled: Llama-3.1-8B-Instruct, Olmo-3-7B-Think, Qwen3-8B, SmolLM2-135M-Instruct)."
    )
    with pytest.raises(ValueError) as e:
        HeadScores.from_pretrained("me/nothing")
    assert str(e.value) == (
        "No bundled head scores for 'me/nothing', and no such Hub repo (or it is private/gated: "
        f"log in with `hf auth login`). {hint}"
    )
    hub.online = False
    with pytest.raises(ValueError) as e:
        HeadScores.from_pretrained("me/nothing")
    assert str(e.value) == (
        "No bundled head scores for 'me/nothing', and retmask_head_scores.json of the Hub repo "
        "'me/nothing' is not in the local cache while the Hub cannot be reached (offline mode, "
        "HF_HUB_OFFLINE=1, or no network): LocalEntryNotFoundError. Download it once online, or "
        f"pass a local file. {hint}"
    )
