"""Corpus preparation: Lhotse recipes -> our normalised CutSets, one ``cuts_SPLIT.jsonl.gz`` per split.

``prepare_corpus(name, corpus_dir, out_dir, **options)`` dispatches to the functions in
:mod:`speechssl.data.corpora.prepare`; ``prepare_iemocap`` (Lhotse has no IEMOCAP recipe) lives in
:mod:`speechssl.data.corpora.iemocap`; the synthetic mini corpus in :mod:`speechssl.data.corpora.mini`.
"""
from speechssl.data.corpora.prepare import CORPORA, prepare_corpus

__all__ = ["CORPORA", "prepare_corpus"]
