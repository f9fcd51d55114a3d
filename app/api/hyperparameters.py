"""What a job can be given: every hyperparameter's default and bounds on this server,
and settings scaled to a corpus (``model/presets.py``) for clients such as the demo."""

from __future__ import annotations

from fastapi import APIRouter, Query

from model.config import SERVED
from model.presets import for_corpus

from ..jobs.schemas import HyperparameterInfo, HyperparametersInfo
from .deps import StateDep
from .responses import documented

router = APIRouter(tags=["jobs"])


@router.get(
    "/hyperparameters",
    responses=documented(
        {
            413: "request body over max_body_bytes",
            422: "corpus_chars is not a whole number from 1 to 1e10",
        }
    ),
)
def hyperparameters(
    state: StateDep,
    corpus_chars: int | None = Query(
        None, ge=1, le=10**10, description="size of the text to train on, for `suggested`"
    ),
) -> HyperparametersInfo:
    """Every hyperparameter ``POST /jobs`` takes, with its default and this server's
    bounds; with ``corpus_chars``, settings that suit a text of that size."""
    ceilings = state.settings.hyperparameter_ceilings
    infos = [
        HyperparameterInfo(
            name=h.name,
            default=h.default,
            help=h.help,
            minimum=h.ge,
            exclusive_minimum=h.gt,
            maximum=min(x for x in (h.le, ceilings.get(h.name)) if x is not None)
            if h.le is not None or h.name in ceilings
            else None,
            exclusive_maximum=h.lt,
            choices=list(h.choices) or None,
        )
        for h in SERVED
    ]
    if corpus_chars is None:
        return HyperparametersInfo(hyperparameters=infos, suggested=None, reason=None)
    suggestion = for_corpus(corpus_chars)
    suggested = {
        k: min(v, ceilings[k]) if isinstance(v, int) and k in ceilings else v
        for k, v in suggestion.hyperparameters.items()
    }
    return HyperparametersInfo(hyperparameters=infos, suggested=suggested, reason=suggestion.reason)
