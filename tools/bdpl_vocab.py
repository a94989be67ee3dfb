"""Write BDPL's bundled vocabulary, ``src/bbpt/methods/bdpl_words.txt``.

    python tools/bdpl_vocab.py [N]    # N words, default 1000; needs Debian's wamerican

BDPL (Diao et al., TMLR 2023) samples its prompt tokens from a candidate vocabulary built from
the task's *training text*: ``pmi_ngram.py`` of the official release ranks PMI n-grams of the
training sentences by frequency, and ``--prompt_search_space`` keeps the first ones. An image
task has no training text, so bbpt ranks words by frequency in the text CLIP was trained on
instead: CLIP's BPE merge list (``bpe_simple_vocab_16e6.txt.gz``, shipped by open_clip) is
ordered by how often each pair occurred in CLIP's training captions, so its whole-word tokens
(``word</w>``), in merge order, are CLIP's words from most to least frequent, each one token
of CLIP's tokenizer. Kept: lower-case ASCII words of 3 letters or more that are in SCOWL's
American English word list (Debian ``wamerican``, ``/usr/share/dict/american-english``), which
drops BPE fragments such as "ing" or "tion" and names. The file is data, written once; the
method reads it (``vocab="clip-frequent"``) and keeps its first ``search_space`` words.
"""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

DICT = Path("/usr/share/dict/american-english")
OUT = Path(__file__).resolve().parents[1] / "src" / "bbpt" / "methods" / "bdpl_words.txt"
NOTICE = """\
# SCOWL (Spell Checker Oriented Word Lists), via Debian's wamerican, filters the words:
#   Copyright 2000-2011 by Kevin Atkinson
#   Permission to use, copy, modify, distribute and sell these word lists, the associated
#   scripts, the output created from the scripts, and its documentation for any purpose is
#   hereby granted without fee, provided that the above copyright notice appears in all copies
#   and that both that copyright notice and this permission notice appear in supporting
#   documentation. Kevin Atkinson makes no representations about the suitability of this array
#   for any purpose. It is provided "as is" without express or implied warranty.
"""


def clip_words() -> list[str]:
    """CLIP's whole-word BPE tokens in merge order (most frequent first)."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]  # open_clip's slice
    out = []
    for line in merges:
        a, b = line.split()
        if (a + b).endswith("</w>"):
            out.append((a + b)[: -len("</w>")])
    return out


def main(n: int = 1000) -> None:
    if not DICT.exists():
        sys.exit(f"{DICT} is missing: apt-get install wamerican")
    known = {w.strip() for w in DICT.read_text(encoding="utf-8").splitlines()}
    seen, words = set(), []
    for w in clip_words():
        if len(w) >= 3 and w.isascii() and w.isalpha() and w.islower() and w in known and w not in seen:
            seen.add(w)
            words.append(w)
    words = words[:n]
    head = (f"# BDPL's candidate words for image tasks ({len(words)}), most frequent first: CLIP's whole-word BPE\n"
            "# tokens in merge order (open_clip bpe_simple_vocab_16e6.txt.gz), lower-case ASCII, >= 3 letters, in\n"
            "# SCOWL's American English list. Written by tools/bdpl_vocab.py; see bbpt.methods.bdpl.\n" + NOTICE)
    OUT.write_text(head + "\n".join(words) + "\n")
    print(f"wrote {OUT} ({len(words)} words)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
