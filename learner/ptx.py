"""Pretraining batches for the ptx term of PPO-ptx (paper eq. 2: γ·E_{x~D_pretrain}[log π(x)]).

``PtxSource`` turns a text corpus into fixed-length token windows and hands out seeded random batches.
The corpus is, in order of precedence:

- a ``.txt`` (or any text) file: one document, or several separated by blank lines;
- a folder of ``.txt`` files (read recursively, sorted);
- a folder written by ``datasets.Dataset.save_to_disk``, or any path ``datasets.load_dataset`` reads
  offline (a folder of json/csv/parquet files, or a hub dataset already in the local cache), using the
  ``text_field`` column;
- a WordNet database folder (one holding ``data.noun``): every gloss (definition and example sentences) is
  a document;
- nothing (``None``): the default, WordNet 3.0's glosses from Debian's ``wordnet-base`` package
  (``/usr/share/wordnet``, installed by ``make install``): 117,659 glosses, about 1.9M SmolLM2 tokens of
  plain modern English definitions and usage examples over every domain, under the WordNet 3.0 licence
  (permission to use, copy, modify and distribute for any purpose, notice kept). Where it is not installed,
  the small corpus shipped in ``learner/data/`` (see ``learner/data/README.md``), with a warning.

Documents are tokenized once, joined with EOS, and cut into windows of ``seq_len`` tokens. A fixed share of
the documents (a hash of their text, ``heldout_fraction``) is kept out of the training windows: the held-out
NLL there says whether ptx keeps the policy on its corpus.

The alignment tax proper is measured on text from another source (``alignment_tax_windows``): the module
docstrings of the running Python's standard library, English technical prose with code examples under the
PSF License (use, copy, modify and distribute, notice kept), present offline wherever the learner runs and
unlike WordNet's one-line glosses in style and domain.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import sysconfig
from pathlib import Path

import torch

from learner.losses import ptx_loss

log = logging.getLogger(__name__)

SHIPPED_CORPUS = Path(__file__).parent / "data" / "ptx_corpus.txt"
"""The small corpus shipped with the code (self-written English prose; see learner/data/README.md)."""
DEFAULT_CORPUS = SHIPPED_CORPUS  # kept for callers that name the shipped file
WORDNET_DIR = Path("/usr/share/wordnet")
"""Where Debian's ``wordnet-base`` installs the WordNet 3.0 database (the default corpus)."""
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


def default_corpus() -> Path:
    """WordNet's glosses when ``wordnet-base`` is installed, else the shipped corpus (with a warning)."""
    if (WORDNET_DIR / "data.noun").exists():
        return WORDNET_DIR
    log.warning(
        "ptx: WordNet (Debian package wordnet-base) is not installed; using the small shipped corpus "
        "(run `make install`, or `apt-get install wordnet-base`, or set INSTRUCTLOOP_LEARNER_PTX_CORPUS)",
        extra={"corpus": str(SHIPPED_CORPUS)},
    )
    return SHIPPED_CORPUS


def wordnet_glosses(folder: Path) -> list[str]:
    """Every synset's gloss (definition; "example sentences") of a WordNet database folder, file order."""
    documents = []
    for name in WORDNET_FILES:
        path = folder / name
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or " | " not in line:  # the licence header, or a line without a gloss
                continue
            gloss = line.split(" | ", 1)[1].strip()
            if gloss:
                documents.append(gloss)
    return documents


def is_heldout_document(text: str, fraction: float) -> bool:
    """A fixed split of the corpus: the first 8 bytes of
    sha256(text) as a number in [0, 1) below ``fraction``."""
    return (
        fraction > 0 and int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64 < fraction
    )


def _split_documents(text: str) -> list[str]:
    documents = [block.strip() for block in text.split("\n\n")]
    return [doc for doc in documents if doc]


def load_documents(
    path: str | Path | None = None, text_field: str = "text", max_documents: int | None = None
) -> list[str]:
    """The documents of a corpus (see the module docstring for what ``path`` may be)."""
    if path is None:
        path = default_corpus()
    source = Path(path).expanduser()
    documents: list[str]
    if source.is_dir() and (source / "data.noun").exists():
        documents = wordnet_glosses(source)
    elif source.is_file():
        documents = _split_documents(source.read_text(encoding="utf-8"))
    elif source.is_dir() and any(source.rglob("*.txt")) and not (source / "dataset_info.json").exists():
        documents = []
        for file in sorted(source.rglob("*.txt")):
            documents.extend(_split_documents(file.read_text(encoding="utf-8")))
    else:
        documents = _load_hf_dataset(str(path), text_field)
    if max_documents is not None:
        documents = documents[:max_documents]
    if not documents:
        raise ValueError(f"the ptx corpus {path} holds no text")
    return documents


def _load_hf_dataset(path: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets comes with trl
        raise ValueError(
            f"ptx corpus {path!r}: not a file or folder, and `datasets` is not installed"
        ) from error
    source = Path(path).expanduser()
    try:
        if (source / "dataset_info.json").exists() or (source / "state.json").exists():
            dataset = datasets.load_from_disk(str(source))
        else:
            dataset = datasets.load_dataset(path, split="train")
    except Exception as error:
        raise ValueError(
            f"cannot load the ptx corpus {path!r}: give a text file, a folder of .txt files, a folder saved "
            f"with Dataset.save_to_disk, or a dataset already in the local HF cache ({error})"
        ) from error
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    if text_field not in dataset.column_names:
        raise ValueError(
            f"ptx dataset {path!r} has no column {text_field!r} (columns: {dataset.column_names})"
        )
    return [text for text in dataset[text_field] if text and text.strip()]


def python_docstrings(max_chars: int = 40_000) -> list[str]:
    """Module docstrings (20 words or more) of the top-level ``*.py`` files of the running Python's standard
    library, in file-name order, until ``max_chars`` characters: the alignment-tax text (PSF License)."""
    documents: list[str] = []
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if docstring and len(docstring.split()) >= 20:
            documents.append(docstring)
            total += len(docstring)
            if total >= max_chars:
                break
    return documents


def alignment_tax_windows(tokenizer, n: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``n`` windows of ``seq_len`` tokens of ``python_docstrings`` (documents joined with EOS), (n, T) each;
    fewer when the text runs out, None when it has not one window (a Python without its stdlib sources)."""
    ids: list[int] = []
    for document in python_docstrings(max_chars=8 * n * seq_len):  # ~4 characters a token, with margin
        ids.extend(tokenizer(document, add_special_tokens=False).input_ids)
        ids.append(tokenizer.eos_token_id)
    windows = min(n, len(ids) // seq_len)
    if windows < 1:
        return None
    input_ids = torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, seq_len)  # (n, T)
    return input_ids, torch.ones_like(input_ids)


@torch.no_grad()
def mean_nll(model, batch: tuple[torch.Tensor, torch.Tensor], chunk: int = 4) -> float:
    """Per-token NLL of ``model`` on ``batch`` (input_ids, attention_mask: (n, T)), ``chunk`` windows per
    forward, in eval mode (the model's mode is restored); each chunk weighted by its predicted tokens."""
    device = next(model.parameters()).device
    input_ids, attention_mask = (t.to(device) for t in batch)
    was_training = model.training
    model.eval()
    total = tokens = 0.0
    for i in range(0, input_ids.size(0), chunk):
        ids, mask = input_ids[i : i + chunk], attention_mask[i : i + chunk]
        nll = ptx_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask, 1.0)[1]
        predicted = (mask[:, 1:].bool() & mask[:, :-1].bool()).sum().item()  # CPU/GPU sync
        total += nll.item() * predicted
        tokens += predicted
    model.train(was_training)
    return total / tokens


class PtxSource:
    """Seeded random batches of ``batch_size`` windows of ``seq_len`` tokens from a text corpus; the documents
    of the held-out share (``heldout_fraction``) are cut into separate windows that are never trained on."""

    def __init__(
        self,
        tokenizer,
        path: str | Path | None = None,
        seq_len: int = 128,
        batch_size: int = 4,
        seed: int = 0,
        text_field: str = "text",
        max_tokens: int = 2_000_000,
        heldout_fraction: float = 0.01,
    ):
        if seq_len < 2 or batch_size < 1:
            raise ValueError("PtxSource needs seq_len >= 2 and batch_size >= 1")
        if not 0 <= heldout_fraction < 1:
            raise ValueError(f"PtxSource heldout_fraction must be in [0, 1), got {heldout_fraction}")
        self.path = str(path) if path is not None else str(default_corpus())
        self.seq_len = seq_len
        self.batch_size = batch_size
        documents = load_documents(self.path, text_field)
        eos = tokenizer.eos_token_id
        streams: dict[bool, list[int]] = {False: [], True: []}
        for start in range(0, len(documents), 1024):  # batched: the fast tokenizer works in parallel
            chunk = documents[start : start + 1024]
            for doc, ids in zip(chunk, tokenizer(chunk, add_special_tokens=False).input_ids, strict=True):
                stream = streams[is_heldout_document(doc, heldout_fraction)]
                stream.extend(ids)
                stream.append(eos)
            if len(streams[False]) + len(streams[True]) >= max_tokens:
                break
        stream = streams[False]
        n_windows = len(stream) // seq_len
        if n_windows < 1:
            raise ValueError(
                f"the ptx corpus {self.path} has {len(stream)} tokens, fewer than seq_len={seq_len}"
            )
        self.windows = torch.tensor(stream[: n_windows * seq_len], dtype=torch.long).view(
            n_windows, seq_len
        )  # (W, T)
        n_heldout = len(streams[True]) // seq_len
        self.heldout_windows = torch.tensor(streams[True][: n_heldout * seq_len], dtype=torch.long).view(
            n_heldout, seq_len
        )  # (W_h, T)
        self.generator = torch.Generator().manual_seed(seed)
        log.info(
            "ptx corpus loaded",
            extra={
                "path": self.path,
                "documents": len(documents),
                "tokens": len(stream),
                "windows": n_windows,
                "heldout_windows": n_heldout,
            },
        )

    def heldout_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first ``n`` held-out windows (never trained on), or None when the corpus has none."""
        if self.heldout_windows.size(0) == 0:
            return None
        input_ids = self.heldout_windows[:n]
        return input_ids, torch.ones_like(input_ids)

    @property
    def num_tokens(self) -> int:
        return self.windows.numel()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (batch_size, seq_len); windows drawn with replacement."""
        rows = torch.randint(0, self.windows.size(0), (self.batch_size,), generator=self.generator)
        input_ids = self.windows[rows]  # (B, T)
        return input_ids, torch.ones_like(input_ids)

    def fixed_batch(self, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` consecutive windows from ``offset`` (for a stable held-out measure of the ptx NLL)."""
        input_ids = self.windows[offset : offset + n]
        return input_ids, torch.ones_like(input_ids)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
