"""What describes a model for SDSAT: a small JSON file (`sdsat.json`) beside the weights.

Adaptive ids and k are not in a transformers config, and guessing them from a file name is how
things silently break, so they are written down once, with built-in defaults for the released
checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import SdsatError

CARD_FILE = "sdsat.json"


@dataclass
class ModelCard:
    adaptive_ids: list[int]
    k: int = 5
    # FIM token ids by role ("prefix", "middle", "suffix"); empty when the model cannot infill.
    fim: dict[str, int] = field(default_factory=dict)
    context_length: int | None = None
    # Where the server retrieves drafts from by default ("stdlib", a folder, or None: nowhere). For
    # a model whose adaptive tokens are weak (the embedded one) retrieval drafts better than they
    # do; for the released checkpoints the adaptive tokens are the better drafts.
    draft_store: str | None = None
    # What the model was trained on: `sdsat-lsp corpus`'s manifest in short (train.corpus_summary).
    corpus: dict | None = None


# CodeLlama's unused id 32011 stands for every adaptive slot in the released SDSAT checkpoints;
# FIM ids are CodeLlama's (<PRE> 32007, <SUF> 32008, <MID> 32009).
KNOWN_CARDS = {
    "ainergy/CodeLlama-SDSAT_L5_7B": ModelCard(
        adaptive_ids=[32011], k=5, fim={"prefix": 32007, "suffix": 32008, "middle": 32009}, context_length=16384
    ),
    "ainergy/CodeLlama-SDSAT_L7_13B": ModelCard(
        adaptive_ids=[32011], k=7, fim={"prefix": 32007, "suffix": 32008, "middle": 32009}, context_length=16384
    ),
}


def write_model_card(folder: str | Path, card: ModelCard) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(json.dumps(asdict(card), indent=2) + "\n")
    return path


def read_model_card(model_ref: str | Path) -> ModelCard | None:
    """The card in a local folder, else a built-in one for a known hub id, else None."""
    path = Path(model_ref) / CARD_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            return ModelCard(
                adaptive_ids=[int(i) for i in data["adaptive_ids"]],
                k=int(data.get("k", 5)),
                fim={str(k): int(v) for k, v in (data.get("fim") or {}).items()},
                context_length=data.get("context_length"),
                draft_store=data.get("draft_store"),
                corpus=data.get("corpus"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise SdsatError(f"{path} is not a valid SDSAT model card: {exc}") from exc
    return KNOWN_CARDS.get(str(model_ref))
