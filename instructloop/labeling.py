"""Redis keys of the labeling page that more than one room reads (the gateway writes them, the learner or
the page's labelers read them). Spelled here once.

- ``guidelines_key``: a string, the admin's labeling guidelines (plain text, shown on ``/label``). Written
  and read by the gateway only, kept here with its sibling so every labeling key outside the gateway's own
  ``<prefix>:gateway:`` space is listed in one place.
- ``excluded_labelers_key``: a hash, labeler key id -> JSON ``{"name", "by", "at", "reason"}``: the
  labelers an admin excluded. The contract: the gateway refuses their feedback from the moment they are
  excluded (403 ``labeler_excluded``), and the learner leaves every comparison whose ``labeler_id`` is in
  the hash out of each reward-model update that starts after that (training and held-out sets), so their
  past events stop training the RM too. Re-including a labeler (deleting the field) brings their stored
  events back for later updates. The learner may read this key and nothing else of the labeling page.
"""

from __future__ import annotations

from instructloop.streams import DEFAULT_PREFIX


def guidelines_key(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:labeling:guidelines"


def excluded_labelers_key(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:labeling:excluded"
