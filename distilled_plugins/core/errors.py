"""The errors a stage raises on purpose, and the one table that says whether running again can fix each.

``RETRY_CAN_FIX`` is read by the command line (``cli.run``: an error listed here is the user's to fix and ends the
command with one line, anything else is a bug and says so) and by the operators
(``operators.dag_helpers.failures``: an error no retry can fix fails the task at once instead of waiting out its
retries). Decisions go by type, never by the
message's text: where one kind of error needs its own advice, it gets its own subclass here.
"""

from __future__ import annotations


class DataError(ValueError):
    """Input data that a stage cannot use; the message says what and where."""


class MissingColumn(DataError):
    """A row or dataset lacks a column a setting names (the problem, id or gold answer column)."""


class SeqLengthMismatch(DataError):
    """Packed rows of one length, a fine-tune profile of another."""


class CheckpointMissing(DataError):
    """The fine-tune's base checkpoint (``load_checkpoint``) does not exist."""


class FatalRequestError(Exception):
    """A request that will fail however often it is repeated (bad key, wrong model, unreachable endpoint)."""


class EndpointUnreachable(FatalRequestError):
    """No endpoint of the fleet answered any connection: down, or a wrong host or port."""


class BatchError(Exception):
    """The Batch API refused a call for a reason no retry fixes (bad key, no Batch API at this address)."""


class GenerationIncomplete(RuntimeError):
    """Some rows still miss completions after all retries; what succeeded is kept for the next run."""


class BudgetReached(GenerationIncomplete):
    """The run stopped at ``max_cost``; what succeeded is kept, and a rerun resumes (with a new budget)."""


class FinetuneFailed(RuntimeError):
    """The training job ended badly; the message carries the failing worker's last log lines."""


class FinetuneStoppedByUser(FinetuneFailed):
    """A person stopped the job (marked a node's task failed or cleared it): nothing retries it by itself."""


class ChildFailed(RuntimeError):
    """A program a stage starts (mindformers' generation, a grading worker) exited badly or never started; the
    message carries its last lines."""


# (error class, whether running the same thing again can fix it): the first class the error is an instance of
# decides, so subclasses come before their bases. Every class here is "expected": its message is the whole story.
RETRY_CAN_FIX: tuple[tuple[type[BaseException], bool], ...] = (
    (EndpointUnreachable, False),  # start the endpoint or correct the address first
    (FatalRequestError, False),  # a key, a model name: the request is wrong, not unlucky
    (BatchError, False),
    (BudgetReached, False),  # a rerun would spend the same budget again: a person raises it
    (GenerationIncomplete, True),  # the teacher was overloaded: a rerun requests only the missing rows
    (FinetuneStoppedByUser, False),
    (FinetuneFailed, True),  # a lost node, an OOM: the rerun resumes from the newest checkpoint
    (ChildFailed, True),
    (DataError, False),  # MissingColumn, SeqLengthMismatch, CheckpointMissing included
    (FileNotFoundError, False),
    (ValueError, False),  # a setting out of range, a config that does not parse
    (OSError, True),  # a full disk, a dropped mount: may be gone on the next try
    (LookupError, True),  # a missing key may be a bug as well as bad input: Airflow retries, as it always did
)
EXPECTED: tuple[type[BaseException], ...] = tuple(kind for kind, _ in RETRY_CAN_FIX)


def retry_can_fix(error: BaseException) -> bool | None:
    """Whether running again can fix ``error`` (``None``: not an error of this table, i.e. a bug or unknown)."""
    return next((fixable for kind, fixable in RETRY_CAN_FIX if isinstance(error, kind)), None)
