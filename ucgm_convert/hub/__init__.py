"""The Hugging Face Hub side: model cards (one generator) and the one-commit upload of `ucgm push`."""

from .card import CARD_MARKER, CardInfo, inspect_checkpoint, make_model_card, validate_repo_id, write_model_card
from .results import MeasuredResult, read_results
from .upload import UPLOAD_FILES, PushResult, push_to_hub

__all__ = ["CARD_MARKER", "UPLOAD_FILES", "CardInfo", "MeasuredResult", "PushResult", "inspect_checkpoint",
           "make_model_card", "push_to_hub", "read_results", "validate_repo_id", "write_model_card"]
