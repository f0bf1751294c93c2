"""Rebuilds demo/corpus_kjv.txt from the King James Version text of Debian's bible-kjv packages.

How the shipped corpus was made (needs Debian's `bible-kjv` and `bible-kjv-text`):

    apt-get download bible-kjv bible-kjv-text
    dpkg -x bible-kjv_*.deb x; dpkg -x bible-kjv-text_*.deb x
    x/usr/bin/bible -f -p x/usr/lib "Gen1:1-Rev22:21" > kjv.txt
    python demo/make_corpus.py kjv.txt demo/corpus_kjv.txt

The verses of each chapter are joined into running text and split into sentences at
., ? or ! followed by a capital letter, which gives sentences from two words to over a
hundred. Only the books in BOOKS are kept so that the file stays small.
"""

import re
import sys

BOOKS = ("Ge", "Ruth", "Job", "Psa", "Prv", "Eccl", "Mark", "John", "Acts", "Rom", "Jas", "Rev")

HEADER = """\
# King James Version (1611) of the Bible, selected books, one sentence a line.
# Public domain: the KJV text's copyright has expired (Debian package bible-kjv-text,
# whose copyright file says so). Built by demo/make_corpus.py; lines starting with # are comments.
"""

_REF = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
_SPLIT = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")


def main(src, dst):
    chapters = {}
    for line in open(src, encoding="utf-8"):
        m = _REF.match(line.strip())
        if m and m.group(1) in BOOKS:
            chapters.setdefault((m.group(1), int(m.group(2))), []).append(m.group(4))
    with open(dst, "w", encoding="utf-8") as out:
        out.write(HEADER)
        for verses in chapters.values():
            for sentence in _SPLIT.split(" ".join(verses)):
                sentence = " ".join(sentence.split())
                if sentence:
                    out.write(sentence + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
