"""Kept models: the trained weights of the final runs a study keeps (``keep_models``), staged as
each final run ends (:mod:`~harness.models.keep`) and kept in one folder per leaderboard row and
seed with a card once the board is known (:mod:`~harness.models.card`), in timm's own layout too
where the head allows it (:mod:`~harness.models.timm_layout`)."""

from harness.models.card import FORMAT, read_card, row_folder, verify, write_model_folder

__all__ = ["FORMAT", "read_card", "row_folder", "verify", "write_model_folder"]
